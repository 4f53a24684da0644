"""Helpers shared by the benchmark scripts: peak memory (also on dask workers) and best-of timing.

The scripts import these functions by name and register this module with cloudpickle by value,
so ``client.run(peak_rss_mb)`` works on workers that cannot import ``benchmarks/``.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def peak_rss_mb() -> float:
    """This process's peak RSS (MB): VmHWM. ``ru_maxrss`` only where /proc is missing: it
    survives exec, so a spawned dask worker would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False when unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Shortest wall time (s) of ``repeats`` calls of ``fn`` and the last result."""
    best, res = float("inf"), None
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t)
    return best, res


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write a benchmark's report as indented JSON to ``out`` (folders made) and say where."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


@contextlib.contextmanager
def work_dir(work: Path | None, keep: bool, prefix: str) -> Iterator[Path]:
    """The benchmark's working folder: ``work`` when given (always kept), else a new temporary
    folder, removed on exit unless ``keep``."""
    base = work or Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield base
    finally:
        if not keep and work is None:
            shutil.rmtree(base, ignore_errors=True)
