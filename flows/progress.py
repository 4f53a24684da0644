"""Progress of a prediction run: tomograms and stages done, time left.

:class:`RunProgress` counts what the stage subflows finish (tomograms converted, membranes
sampled and scored, membranes clustered and tomograms written) and shows it in two places:

- a Prefect **progress artifact** (key ``progress``) of the flow run, whose percentage and
  description ("3/5 tomograms done; geometry 12/20 membranes; about 2 min left") are updated
  as the run goes (at most every :data:`PUSH_S` seconds, and at every stage boundary);
- listeners in this process, e.g. :class:`TerminalProgress`, the ``rich`` display the CLI
  shows in its default (flow) mode.

The run's tracker is module state (:func:`current`): the stage subflows run in the flow
process, in the thread of the parent flow, so they find it without a parameter.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

STAGES = ("convert", "geometry", "inference", "particles")
UNITS = {"convert": "tomograms", "geometry": "membranes", "inference": "membranes",
         "particles": "membranes + STARs"}
PUSH_S = 2.0  # the artifact is updated at most this often (plus at every stage boundary)

_current: list[RunProgress] = []
_listeners: list[Callable[[RunProgress], None]] = []


@dataclass
class StageCount:
    total: int = 0
    done: int = 0
    started: bool = False

    @property
    def fraction(self) -> float:
        if not self.started:
            return 0.0
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)


class RunProgress:
    """Counts of one run (see the module docstring)."""

    def __init__(self, names: Iterable[str], artifact: bool = True) -> None:
        self.names = list(names)
        self.stages = {s: StageCount() for s in STAGES}
        self.finished: set[str] = set()
        self.failed: set[str] = set()
        self.stage: str | None = None
        self.t0 = time.monotonic()
        self._artifact = artifact
        self._artifact_id = None
        self._pushed = 0.0

    # ------------------------------------------------------------------ counting
    def begin(self, stage: str, total: int) -> None:
        self.stage = stage
        self.stages[stage] = StageCount(total=total, started=True)
        self._changed(force=True)

    def advance(self, stage: str, n: int = 1) -> None:
        self.stages[stage].done += n
        self._changed()

    def retotal(self, stage: str, total: int) -> None:
        self.stages[stage].total = total
        self._changed()

    def tomogram_done(self, name: str) -> None:
        self.finished.add(name)
        self._changed()

    def tomograms_failed(self, names: Iterable[str]) -> None:
        new = set(names) - self.failed
        if new:
            self.failed |= new
            self._changed(force=True)

    # ------------------------------------------------------------------ reading
    @property
    def total(self) -> int:
        return len(self.names)

    @property
    def tomograms_finished(self) -> int:
        return len(self.finished | self.failed)

    def fraction(self) -> float:
        """Share of the run done: the mean of the stages' shares (every tomogram failed or
        written: 1)."""
        if self.total and self.tomograms_finished >= self.total:
            return 1.0
        return sum(c.fraction for c in self.stages.values()) / len(self.stages)

    def seconds_left(self) -> float | None:
        f = self.fraction()
        if f < 0.02 or f >= 1.0:
            return None if f < 1.0 else 0.0
        return (time.monotonic() - self.t0) * (1 - f) / f

    def describe(self) -> str:
        parts = [f"{len(self.finished)}/{self.total} tomograms done"]
        if self.failed:
            parts[0] += f", {len(self.failed)} failed"
        if self.stage is not None and self.fraction() < 1.0:
            c = self.stages[self.stage]
            parts.append(f"{self.stage} {c.done}/{c.total} {UNITS[self.stage]}")
        left = self.seconds_left()
        if left is not None and left > 0:
            parts.append(f"about {format_duration(left)} left")
        return "; ".join(parts)

    # ------------------------------------------------------------------ showing
    def _changed(self, force: bool = False) -> None:
        for listener in list(_listeners):
            try:
                listener(self)
            except Exception:  # noqa: BLE001 - a display must never stop a run
                log.debug("progress listener failed", exc_info=True)
        if force or time.monotonic() - self._pushed >= PUSH_S:
            self.push()

    def push(self) -> None:
        """Create or update the flow run's progress artifact (needs a flow run context)."""
        if not self._artifact:
            return
        self._pushed = time.monotonic()
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            pct = round(100.0 * self.fraction(), 1)
            if self._artifact_id is None:
                self._artifact_id = create_progress_artifact(
                    progress=pct, key="progress", description=self.describe())
            else:
                update_progress_artifact(self._artifact_id, pct, description=self.describe())
        except Exception as exc:  # noqa: BLE001 - no API, no artifact: the run goes on
            log.warning("progress artifact not updated: %s", exc)
            self._artifact = False


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 90:
        return f"{s} s"
    if s < 90 * 60:
        return f"{round(s / 60)} min"
    return f"{s // 3600} h {round((s % 3600) / 60)} min"


def current() -> RunProgress | None:
    """The tracker of the run going on in this process, if any."""
    return _current[-1] if _current else None


@contextlib.contextmanager
def tracking(progress: RunProgress) -> Iterator[RunProgress]:
    """Make ``progress`` the current tracker for the block; its final state is pushed."""
    _current.append(progress)
    try:
        progress.push()
        yield progress
    finally:
        _current.remove(progress)
        progress.push()


@contextlib.contextmanager
def listening(fn: Callable[[RunProgress], None]) -> Iterator[None]:
    _listeners.append(fn)
    try:
        yield
    finally:
        _listeners.remove(fn)


class TerminalProgress:
    """A ``rich`` display on stderr of the runs tracked while it is open: one bar for the
    tomograms (with the time left), one per stage. Does nothing when stderr is not a terminal
    (``TTY_COMPATIBLE=1`` forces it). Log lines of this process go above it."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = self.console.is_terminal
        self._bars: dict[str, int] = {}

    def __enter__(self) -> TerminalProgress:
        if not self.enabled:
            return self
        import sys

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(TextColumn("{task.description:<10}"), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                                  console=self.console, transient=False,
                                  redirect_stderr=True, refresh_per_second=4)
        self._progress.__enter__()
        # the CLI's log handler writes to the real stderr: through rich's proxy instead, so
        # lines scroll above the bars
        self._handlers = [h for h in logging.getLogger().handlers
                          if isinstance(h, logging.StreamHandler)
                          and getattr(h, "stream", None) is sys.__stderr__]
        for h in self._handlers:
            h.setStream(sys.stderr)
        self._listen = listening(self.update)
        self._listen.__enter__()
        return self

    def update(self, run: RunProgress) -> None:
        p = self._progress
        if "tomograms" not in self._bars:
            self._bars["tomograms"] = p.add_task("tomograms", total=run.total, note="")
            for s in STAGES:
                self._bars[s] = p.add_task(s, total=None, note="", visible=False)
        left = run.seconds_left()
        p.update(self._bars["tomograms"], total=run.total, completed=run.tomograms_finished,
                 note=(f"{len(run.failed)} failed; " if run.failed else "")
                 + (f"about {format_duration(left)} left" if left else ""))
        for s in STAGES:
            c = run.stages[s]
            if c.started:
                p.update(self._bars[s], total=max(c.total, 1), completed=c.done,
                         visible=True, note=UNITS[s])

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        import sys

        self._listen.__exit__(*exc)
        for h in self._handlers:
            h.setStream(sys.__stderr__)
        self._progress.__exit__(*exc)
