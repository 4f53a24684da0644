"""Streaming prediction: each tomogram's stages are submitted as soon as their inputs exist.

The stage-by-stage flow (:mod:`flows.stages`) finishes a stage for the whole campaign before the
next starts: on a deployment with CPU and GPU workers, the GPU idles through all conversion and
geometry and the CPUs idle through all inference. Here the flow process is a small event loop
over Prefect futures: a tomogram's conversion, its membranes' geometry, scoring, clustering and
its outputs are submitted one after the other as each finishes, so tomogram k+1 is converted and
sampled on the CPU workers while tomogram k is scored on the inference workers.

Bounded in flight:

- at most ``Schedule.window`` tomograms are between conversion and outputs (store growth and
  the flow's bookkeeping stay flat over a campaign of any length);
- later stages get a higher dask priority than earlier ones, so a tomogram in flight finishes
  before the next one's work is taken up;
- with cubes cut on the CPU workers (``cut_on="cpu"``), at most ``Schedule.parts_in_flight``
  parts of ``part_points`` cubes are cut and not yet scored: the cubes go from the worker that
  cut them to the one that scores them through dask, in memory, never through the store or
  this process.

The unit of work is a membrane group (:func:`membrain_dist.pipeline.membrane_groups`): a large
membrane alone, small ones of a tomogram together up to ``Schedule.group_voxels`` labelled
voxels, so a campaign of many small membranes is not thousands of sub-second tasks, each with
its Prefect task run (API calls, events) and dask round trips. Without workers set apart for
inference (no ``GPU`` resource: a local or CPU-only cluster) a group's geometry, scoring
(cubes cut in memory) and clustering are one task: fewer, larger tasks, and no cube ever
leaves the worker that cut it. With them:

Where the cubes are cut (``Schedule.cut_on``): ``inference`` — the scoring task cuts its own
cubes part by part (one task per group; the only choice when the inference workers are on
another scheduler, e.g. the SLURM GPU cluster, since dask moves data only between workers of one
scheduler); ``cpu`` — cut tasks on the CPU workers, scored on the inference workers (same
scheduler, GPU workers marked with the ``GPU`` resource); ``auto`` — ``cpu`` when that is
possible and the spatial screen is off, else ``inference`` (with the screen a cut task would
cut every point's cube while the scoring task cuts only the ~45 % it scores: 146.8 s against
199.9 s in ``benchmarks/campaign.py`` part (a)). ``benchmarks/campaign.py`` measures both.

Campaign-wide membrane contrast: the first window's tomograms vote
(:func:`membrain_dist.pipeline.harmonise_polarity`) before any geometry starts; later tomograms
take that sign. Failures stay per tomogram, and every stage skips work whose stored provenance
is current (parts of a membrane's scores too), so a rerun resumes.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import dask
from prefect import get_run_logger
from pydantic import ConfigDict

from membrain_dist import pipeline
from membrain_dist.config import PipelineConfig
from membrain_dist.manifest import TomogramEntry

from . import progress
from .fanout import cpu_workers_of
from .runtime import task_runner
from .tasks import (
    cluster_task,
    convert_task,
    cut_task,
    geometry_task,
    membrane_task,
    outputs_task,
    score_part_task,
    score_task,
)

log = logging.getLogger(__name__)

Failures = dict[str, str]

#: seconds between two questions to the scheduler about which workers are CPU workers
WORKERS_REFRESH_S = 5.0

#: dask priorities: a later stage runs before an earlier one when both wait for a worker
PRIORITY = {"convert": 0, "geometry": 1, "membrane": 1, "cut": 2, "score": 3, "part": 3,
            "cluster": 4, "outputs": 5}
#: the task kinds that score (on the inference workers, with the ``GPU`` resource)
SCORING = frozenset({"score", "part"})


@dataclass(frozen=True)
class Schedule:
    """How a prediction is scheduled over the workers.

    Attributes
    ----------
    mode
        ``stream`` (default): per tomogram, each stage as soon as its inputs exist;
        ``stages``: every tomogram through one stage before the next (the earlier flow).
    window
        Tomograms in flight at once (stream).
    cut_on
        Where the cubes are cut: ``auto``, ``cpu`` or ``inference`` (see the module doc).
    parts_in_flight
        Parts cut and not yet scored (``cut_on="cpu"``): bounds the cubes held in memory to
        about ``parts_in_flight x part_points x 6.9 kB``.
    part_points
        Points per part (one cut task and one scoring pass; 16,384 cubes = 113 MB at s = 12).
    keep_cubes
        Also write every point's cube to the store (debugging, training sets).
    group_voxels
        Membranes smaller than this (labelled voxels) share their geometry, scoring and
        clustering tasks, up to this many voxels a group (:func:`~membrain_dist.pipeline.
        group_membranes`); 0: one task per membrane and stage.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    mode: Literal["stream", "stages"] = "stream"
    window: int = 4
    cut_on: Literal["auto", "cpu", "inference"] = "auto"
    parts_in_flight: int = 4
    part_points: int = pipeline.PART_POINTS
    keep_cubes: bool = False
    group_voxels: int = pipeline.GROUP_VOXELS

    def __post_init__(self) -> None:
        if self.window < 1 or self.parts_in_flight < 1 or self.part_points < 1:
            raise ValueError("window, parts_in_flight and part_points must be >= 1")
        if self.group_voxels < 0:
            raise ValueError("group_voxels must be >= 0")

    def cuts_on_cpu(self, same_scheduler: bool, gpu_resource: bool,
                    screening: bool = False) -> bool:
        """Whether cut tasks run on the CPU workers (cubes handed over in memory). ``auto``
        does not with the spatial screen (``screening``): a cut task cuts every point's cube,
        the scoring task only those it scores (~45 %)."""
        if self.cut_on == "inference" or not same_scheduler:
            return False
        return self.cut_on == "cpu" or (gpu_resource and not screening)


Group = tuple[int, ...]  # membrane ids that share their tasks (pipeline.membrane_groups)


def cpu_task_placement(kind: str, cpu_workers: list[str], scoring: int,
                       contrast_decided: bool) -> dict[str, Any]:
    """dask annotations of a CPU task of ``kind`` (a :data:`PRIORITY` key) on a scheduler
    whose workers ``cpu_workers`` are not set apart for inference ([]: no such split).

    Kept on the CPU workers while ``scoring`` tasks (submitted or waiting) exist: a CPU task
    on an inference worker would hold up the scoring behind it. With nothing to score the
    inference workers would idle (the start of a campaign, its end, a stretch where the
    CPU stages are the slower ones: a fast GPU), so the task may go to any worker. A
    conversion (minutes on a large tomogram) only before the campaign's contrast is decided
    (``contrast_decided``): no scoring can start before the first window is converted. Cut
    tasks never: they feed the scoring."""
    idle = not scoring and kind != "cut" and (kind != "convert" or not contrast_decided)
    if not cpu_workers or idle:
        return {}
    return {"workers": list(cpu_workers), "allow_other_workers": False}


@dataclass
class _Tomogram:
    """Bookkeeping of one tomogram in flight."""

    entry: TomogramEntry
    mids: list[int] = field(default_factory=list)
    to_cluster: int = 0  # its membrane groups not yet clustered
    running: int = 0  # its tasks submitted and not finished
    error: str | None = None
    converted: bool = False


class StreamRun:
    """The event loop of one streaming prediction (runs in the flow, see
    :func:`stream_entries`)."""

    def __init__(self, entries: Sequence[TomogramEntry], model_dir: str, out_dir: str,
                 root: str, cfg: PipelineConfig, submit_cpu: Callable, submit_gpu: Callable,
                 gpu_resource: bool, schedule: Schedule, cut_on_cpu: bool,
                 in_plane: pipeline.InPlaneSearch | None,
                 cpu_workers: Callable[[], list[str]] = list) -> None:
        self.entries = list(entries)
        self.model_dir, self.out_dir, self.root, self.cfg = model_dir, out_dir, root, cfg
        self.submit_cpu, self.submit_gpu = submit_cpu, submit_gpu
        self.gpu_resource = gpu_resource
        self.schedule, self.cut_on_cpu, self.in_plane = schedule, cut_on_cpu, in_plane
        self.cpu_workers = cpu_workers
        self.done_q: queue.Queue = queue.Queue()
        self.waiting = deque(self.entries)
        self.active: dict[str, _Tomogram] = {}
        self.summaries: dict[str, dict] = {}
        self.failures: Failures = {}
        self.sign: int | None = None
        self.sign_decided = False
        self.first_window: list[str] = []
        self.parked: list[str] = []  # converted, waiting for the campaign's contrast
        # (name, group, mid, start, stop) waiting to be cut
        self.parts_queue: deque = deque()
        self.parts_running = 0
        self.scoring = 0  # scoring tasks submitted and not finished
        # parts of a group's membranes not yet scored (cut_on_cpu)
        self.parts_left: dict[tuple[str, Group], int] = {}
        self.running = 0
        self.run = progress.current()
        self.logger = get_run_logger()

    # ------------------------------------------------------------------ submission
    def _placement(self, kind: str) -> dict[str, Any]:
        """dask annotations of a task: inference tasks ask for the GPU resource; with workers
        set apart for inference on the same scheduler, the other tasks are kept on the CPU
        workers while there is scoring to do (:func:`cpu_task_placement`)."""
        if kind in SCORING:
            return {"resources": {"GPU": 1}} if self.gpu_resource else {}
        return cpu_task_placement(kind, self.cpu_workers(),
                                  scoring=self.scoring + len(self.parts_queue),
                                  contrast_decided=self.sign_decided)

    def _submit(self, kind: str, name: str, key: Any, task: Any, params: dict[str, Any]) -> Any:
        """Submit a task of ``kind`` (:data:`SCORING` kinds to the inference runner)."""
        scoring = kind in SCORING
        with dask.annotate(priority=PRIORITY[kind], **self._placement(kind)):
            fut = (self.submit_gpu if scoring else self.submit_cpu)(task, params)
        self.active[name].running += 1
        self.running += 1
        self.scoring += scoring
        if kind != "cut":  # a cut's outcome is read through the score that consumes it
            fut.add_done_callback(lambda f, k=(kind, name, key): self.done_q.put((k, f)))
        return fut

    def _admit(self) -> None:
        """Start tomograms while the window has room."""
        while self.waiting and len(self.active) < self.schedule.window:
            e = self.waiting.popleft()
            self.active[e.name] = _Tomogram(e)
            if not self.sign_decided:
                self.first_window.append(e.name)
            self._submit("convert", e.name, None, convert_task,
                         dict(entry=e, root=self.root, cfg=self.cfg.convert))

    def _geometry(self, name: str) -> None:
        t = self.active[name]
        sides = pipeline.side_specs(t.entry, t.mids)
        groups = pipeline.membrane_groups(self.root, name, t.mids, self.schedule.group_voxels)
        t.to_cluster = len(groups)
        if not groups:
            self._outputs(name)
        for g in groups:  # largest first: a large membrane does not start last
            common = dict(root=self.root, name=name, membrane_ids=g,
                          sides={m: sides[m] for m in g}, keep_cubes=self.schedule.keep_cubes)
            if not self.gpu_resource:  # no inference workers apart: one task per group
                self._submit("membrane", name, g, membrane_task,
                             dict(common, gcfg=self.cfg.geometry, model_dir=self.model_dir,
                                  icfg=self.cfg.inference, part_points=self.schedule.part_points,
                                  ccfg=self.cfg.cluster, ocfg=self.cfg.orientation))
            else:
                self._submit("geometry", name, g, geometry_task,
                             dict(common, cfg=self.cfg.geometry))

    def _score(self, name: str, group: Group, points: dict[int, int]) -> None:
        inf = self.cfg.inference
        todo = [m for m in group
                if not pipeline.scores_current(self.root, name, m, self.model_dir, inf)]
        if not todo:
            self._cluster(name, group, None)
            return
        if not self.cut_on_cpu or self.schedule.keep_cubes:
            self._submit("score", name, group, score_task,
                         dict(root=self.root, name=name, membrane_ids=todo,
                              model_dir=self.model_dir, cfg=inf, gcfg=self.cfg.geometry,
                              part_points=self.schedule.part_points))
            return
        # parts of every membrane not scored by an earlier, interrupted run; a membrane without
        # points has none: its (empty) scores are written when the group's parts are joined
        todo_parts = [(m, a, b) for m in todo
                      for a, b in pipeline.point_parts(points[m], self.schedule.part_points)
                      if not pipeline.part_current(self.root, name, m, self.model_dir, inf, a, b)]
        if not todo_parts:
            self._cluster(name, group, self._parts_spec())
            return
        self.parts_left[(name, group)] = len(todo_parts)
        self.parts_queue.extend((name, group, m, a, b) for m, a, b in todo_parts)

    def _pump_parts(self) -> None:
        """Cut and score parts while fewer than ``parts_in_flight`` are in flight."""
        while self.parts_queue and self.parts_running < self.schedule.parts_in_flight:
            name, group, mid, a, b = self.parts_queue.popleft()
            if self.active[name].error is not None:
                continue
            cubes = self._submit("cut", name, (mid, a), cut_task,
                                 dict(root=self.root, name=name, membrane_id=mid,
                                      cfg=self.cfg.geometry, start=a, stop=b,
                                      icfg=self.cfg.inference))
            self._submit("part", name, (group, cubes), score_part_task,
                         dict(cubes=cubes, root=self.root, name=name, membrane_id=mid,
                              model_dir=self.model_dir, cfg=self.cfg.inference, start=a, stop=b))
            self.parts_running += 1

    def _parts_spec(self) -> pipeline.ScoreParts:
        return pipeline.ScoreParts(self.model_dir, self.cfg.inference, self.schedule.part_points)

    def _cluster(self, name: str, group: Group, parts: pipeline.ScoreParts | None) -> None:
        self._submit("cluster", name, group, cluster_task,
                     dict(root=self.root, name=name, membrane_ids=group, ccfg=self.cfg.cluster,
                          ocfg=self.cfg.orientation, parts=parts))

    def _outputs(self, name: str) -> None:
        e = self.active[name].entry
        self._submit("outputs", name, None, outputs_task,
                     dict(root=self.root, name=name, out_dir=self.out_dir,
                          gt_star=None if e.particles is None else str(e.particles),
                          score_threshold=self.cfg.cluster.score_threshold,
                          pcfg=self.cfg.picks, in_plane=self.in_plane))

    # ------------------------------------------------------------------ events
    def _fail(self, name: str, message: str) -> None:
        t = self.active[name]
        if t.error is None:
            t.error = message
            self.failures[name] = message
            self.logger.error("%s failed: %s", name, message)
            if self.run is not None:
                self.run.tomograms_failed([name])

    def _converted(self, name: str, mids: list[int]) -> None:
        t = self.active[name]
        t.mids, t.converted = [int(m) for m in mids], True
        self.logger.info("converted %s: %d membranes", name, len(mids))
        if self.run is not None:
            self.run.retotal("geometry", self.run.stages["geometry"].total + len(mids))
            self.run.retotal("inference", self.run.stages["inference"].total + len(mids))
            self.run.retotal("particles", self.run.stages["particles"].total + len(mids) + 1)
        if self.sign_decided:
            pipeline.harmonise_polarity(self.root, [name], sign=self.sign)
            self._geometry(name)
        else:
            self.parked.append(name)
            self._decide_sign()

    def _decide_sign(self) -> None:
        """Once every tomogram of the first window is converted (or failed): one contrast."""
        pending = [n for n in self.first_window
                   if n in self.active and not self.active[n].converted
                   and self.active[n].error is None]
        if pending:
            return
        ok = [n for n in self.first_window if n not in self.failures]
        self.sign = pipeline.harmonise_polarity(self.root, ok)
        self.sign_decided = True
        if self.sign is not None:
            self.logger.info("membrane contrast of the campaign: %s",
                             "bright" if self.sign > 0 else "dark")
        parked, self.parked = self.parked, []
        for n in parked:
            if self.active[n].error is None:
                self._geometry(n)

    def _tick(self, stage: str, n: int = 1) -> None:
        if self.run is not None:
            self.run.advance(stage, n)

    def _event(self, kind: str, name: str, key: Any, fut: Any) -> None:
        t = self.active[name]
        t.running -= 1
        self.running -= 1
        self.scoring -= kind in SCORING
        fut.wait()  # the final state (small results: points, counts, summaries)
        state = fut.state
        ok = state.is_completed()
        if kind == "part":  # its cut is settled too
            key, cubes = key
            t.running -= 1
            self.running -= 1
            self.parts_running -= 1
            if not ok and state.is_pending():  # not run: the cut failed; its own message
                cubes.wait()
                state = cubes.state
            del cubes  # the cubes are freed on the workers once no future refers to them
        if not ok:
            self._fail(name, state.message or state.type.value)
            if kind == "convert" and not self.sign_decided:
                self._decide_sign()
            return
        if t.error is not None:
            return
        result = fut.result()
        if kind == "convert":
            self._tick("convert")
            self._converted(name, result)
        elif kind == "geometry":
            self._tick("geometry", len(key))
            self._score(name, key, result)
        elif kind == "part":
            self.parts_left[(name, key)] -= 1
            if self.parts_left[(name, key)] == 0:
                del self.parts_left[(name, key)]
                self._tick("inference", len(key))
                self._cluster(name, key, self._parts_spec())
        elif kind == "score":
            self._tick("inference", len(key))
            self._cluster(name, key, None)
        elif kind == "membrane":
            for stage in ("geometry", "inference", "particles"):
                self._tick(stage, len(key))
            t.to_cluster -= 1
            if t.to_cluster == 0:
                self._outputs(name)
        elif kind == "cluster":
            self._tick("particles", len(key))
            t.to_cluster -= 1
            if t.to_cluster == 0:
                self._outputs(name)
        elif kind == "outputs":
            self._tick("particles")
            self.summaries[name] = result
            if self.run is not None:
                self.run.tomogram_done(name)
            s = result
            self.logger.info("%s: %d particles from %d points", name, s["particles"],
                             s["points"])

    def _retire(self) -> None:
        """Free the window slots of tomograms that are finished or failed and settled."""
        for name in [n for n, t in self.active.items() if t.running == 0]:
            t = self.active[name]
            if t.error is not None or name in self.summaries:
                del self.active[name]
                self.parts_queue = deque(p for p in self.parts_queue if p[0] != name)
                self.parts_left = {k: v for k, v in self.parts_left.items() if k[0] != name}

    def execute(self) -> tuple[dict[str, dict], Failures]:
        self._admit()
        while self.running:
            (kind, name, key), fut = self.done_q.get()
            self._event(kind, name, key, fut)
            self._retire()
            self._admit()
            self._pump_parts()  # before the loop's test: an event may queue the only work left
        return self.summaries, self.failures


def stream_entries(entries: Sequence[TomogramEntry], model_dir: str, out_dir: str, root: str,
                   cfg: PipelineConfig, cpu_address: str, gpu_address: str, gpu_resource: bool,
                   schedule: Schedule) -> tuple[dict[str, dict], Failures]:
    """Run every entry through all predict stages, streamed (call inside a flow)."""
    same = cpu_address == gpu_address
    cut_on_cpu = schedule.cuts_on_cpu(same, gpu_resource,
                                      pipeline.with_refinement(cfg).inference.screening)
    if run := progress.current():
        run.begin("convert", len(entries))
        for stage in ("geometry", "inference", "particles"):
            run.begin(stage, 0)
    with contextlib.ExitStack() as stack:
        cpu = stack.enter_context(task_runner(cpu_address))
        gpu = cpu if same else stack.enter_context(task_runner(gpu_address))

        def submit_on(runner: Any) -> Callable:
            return lambda task, params: runner.submit(task, params)

        asked: list = [-WORKERS_REFRESH_S, []]  # (when, CPU workers) last asked

        def cpu_workers() -> list[str]:
            """The CPU workers of a scheduler shared with GPU workers (asked again every
            WORKERS_REFRESH_S: workers come and go); [] when CPU tasks may go anywhere."""
            if not (same and gpu_resource):
                return []
            if time.monotonic() - asked[0] >= WORKERS_REFRESH_S:
                asked[:] = [time.monotonic(),
                            cpu_workers_of(cpu.client.scheduler_info()["workers"])]
            return asked[1]

        get_run_logger().info(
            "streaming %d tomograms, %d in flight; cubes cut on the %s workers", len(entries),
            schedule.window, "CPU" if cut_on_cpu else "inference")
        return StreamRun(entries, model_dir, out_dir, root, cfg, submit_on(cpu), submit_on(gpu),
                         gpu_resource, schedule, cut_on_cpu,
                         pipeline.in_plane_search(model_dir, cfg), cpu_workers).execute()
