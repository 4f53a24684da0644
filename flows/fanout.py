"""Blocks of one task spread over the cluster: a :data:`membrain_dist.convert.BlockMap` whose
blocks run as dask tasks on the CPU workers of the scheduler the calling task runs on.

A campaign of many tomograms keeps every worker busy with one conversion task each, but one
large tomogram (a single-tomogram run, a bin-1 volume) would convert on one worker while the
others wait for its membranes. Called from inside a dask task, :func:`cluster_block_map` maps
the conversion's blocks over the cluster instead: the calling task's thread secedes while its
blocks run (``distributed.worker_client``), so on a 1-thread worker the blocks can use it,
and it rejoins when they are done. Blocks are plain functions of small picklable jobs (store
paths and block bounds, never arrays); each writes whole Zarr chunks of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import distributed

from membrain_dist.convert import BlockMap

__all__ = ["cpu_workers_of", "cluster_block_map"]

_T = TypeVar("_T")


def cpu_workers_of(workers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The addresses of the workers without a ``GPU`` resource, given the scheduler's worker
    info (``Client.scheduler_info()["workers"]``); ``[]`` (anywhere) when every worker is
    plain or every worker has one."""
    plain = [a for a, w in workers.items() if not (w.get("resources") or {}).get("GPU")]
    return plain if len(plain) < len(workers) else []


def _cluster_map(fn: Callable[[Any], _T], items: Sequence[Any]) -> list[_T]:
    if len(items) < 2:
        return [fn(item) for item in items]
    with distributed.worker_client() as client:
        workers = cpu_workers_of(client.scheduler_info()["workers"])
        placement = {"workers": workers, "allow_other_workers": False} if workers else {}
        futures = client.map(fn, items, pure=False, **placement)
        try:
            return client.gather(futures)
        finally:
            client.cancel(futures)  # after an error: the blocks still queued do not run


def cluster_block_map() -> BlockMap | None:
    """A map over the cluster when called inside a dask worker's task, else ``None`` (the
    caller converts in its own process)."""
    try:
        distributed.get_worker()
    except ValueError:
        return None
    return _cluster_map
