"""Stage subflows: each maps one stage over (tomogram, membrane group) pairs on a dask cluster
(a group: one membrane, or several small ones of a tomogram,
:func:`membrain_dist.pipeline.membrane_groups`).

Each subflow gets its ``DaskTaskRunner`` from the caller (``.with_options(task_runner=...)``),
so the CPU stages and the inference stage can run on different clusters (SLURM CPU and GPU
workers). A failure is isolated to its tomogram: the other tomograms finish, and the failed
ones are returned with the reason, for the caller to report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import dask
from prefect import flow, get_run_logger

from membrain_dist import pipeline, store
from membrain_dist.config import PipelineConfig
from membrain_dist.manifest import TomogramEntry

from . import progress
from .tasks import cluster_task, convert_task, geometry_task, outputs_task, score_task

Failures = dict[str, str]


def gather(futures: Mapping[Any, Any], stage: str | None = None
           ) -> tuple[dict[Any, Any], dict[Any, str]]:
    """Wait for Prefect futures; split into results and failure messages (by key). Each
    finished future advances ``stage`` of the run's progress (flows.progress)."""
    ok, bad = {}, {}
    run = progress.current() if stage else None
    for key, fut in futures.items():
        fut.wait()
        state = fut.state
        if state.is_completed():
            ok[key] = fut.result()
        else:
            bad[key] = state.message or state.type.value
        if run is not None:
            run.advance(stage)
    return ok, bad


def _begin(stage: str, total: int) -> None:
    run = progress.current()
    if run is not None:
        run.begin(stage, total)


def _fail_by_tomogram(bad: Mapping[Any, str]) -> Failures:
    out: Failures = {}
    for key, msg in bad.items():
        name = key[0] if isinstance(key, tuple) else key
        out.setdefault(name, msg)
    return out


@flow(name="convert", log_prints=False)
def convert_flow(entries: Sequence[TomogramEntry], root: str,
                 cfg: PipelineConfig) -> tuple[dict[str, list[int]], Failures]:
    """MRC -> chunked Zarr for every tomogram; returns membrane ids per tomogram."""
    logger = get_run_logger()
    _begin("convert", len(entries))
    futs = {e.name: convert_task.submit(e, root, cfg.convert) for e in entries}
    ok, bad = gather(futs, "convert")
    for name, ids in ok.items():
        logger.info("converted %s: %d membranes", name, len(ids))
    for name, msg in bad.items():
        logger.error("could not convert %s: %s", name, msg)
    sign = pipeline.harmonise_polarity(root, list(ok))
    if sign is not None:
        logger.info("membrane contrast of the campaign: %s", "bright" if sign > 0 else "dark")
    store.write_index(root)  # the root lists every converted tomogram (NGFF collection)
    return ok, _fail_by_tomogram(bad)


Key = tuple[str, tuple[int, ...]]  # (tomogram, membrane group)


@flow(name="geometry")
def geometry_flow(entries: Sequence[TomogramEntry], membranes: Mapping[str, list[int]],
                  root: str, cfg: PipelineConfig, keep_cubes: bool = False,
                  group_voxels: int = pipeline.GROUP_VOXELS
                  ) -> tuple[dict[Key, dict[int, int]], Failures]:
    """Sampling, normal voting and sides for every membrane (and the cubes, with
    ``keep_cubes``), one task per membrane group; the points of each membrane by group."""
    logger = get_run_logger()
    futs = {}
    for e in entries:
        if e.name not in membranes:
            continue
        sides = pipeline.side_specs(e, membranes[e.name])
        for g in pipeline.membrane_groups(root, e.name, membranes[e.name], group_voxels):
            futs[(e.name, g)] = geometry_task.submit(root, e.name, g, cfg.geometry,
                                                     {m: sides[m] for m in g}, keep_cubes)
    _begin("geometry", len(futs))
    ok, bad = gather(futs, "geometry")
    logger.info("geometry: %d membranes in %d tasks, %d points",
                sum(len(v) for v in ok.values()), len(ok),
                sum(n for v in ok.values() for n in v.values()))
    return ok, _fail_by_tomogram(bad)


@flow(name="inference")
def inference_flow(keys: Sequence[Key], root: str, model_dir: str,
                   cfg: PipelineConfig, gpu_resource: bool = False
                   ) -> tuple[dict[Key, dict[int, int]], Failures]:
    """CNN scores for every membrane group (its stored cubes, or cut by the scoring task); on
    GPU workers when the cluster has them."""
    logger = get_run_logger()
    ctx = dask.annotate(resources={"GPU": 1}) if gpu_resource else contextlib.nullcontext()
    _begin("inference", len(keys))
    with ctx:
        futs = {k: score_task.submit(root, k[0], k[1], model_dir, cfg.inference, cfg.geometry)
                for k in keys}
    ok, bad = gather(futs, "inference")
    logger.info("inference: %d membranes, %d points scored", sum(len(v) for v in ok.values()),
                sum(n for v in ok.values() for n in v.values()))
    return ok, _fail_by_tomogram(bad)


@flow(name="particles")
def particles_flow(keys: Sequence[Key], entries: Sequence[TomogramEntry], root: str,
                   out_dir: str, cfg: PipelineConfig,
                   in_plane: pipeline.InPlaneSearch | None = None
                   ) -> tuple[dict[str, dict], Failures]:
    """Mean Shift + orientation per membrane group, then STAR and QC per tomogram (in-plane angles
    from the model's average when ``in_plane`` is given)."""
    logger = get_run_logger()
    candidates = {k[0] for k in keys}
    _begin("particles", len(keys) + len(candidates))  # groups clustered + STARs written
    futs = {k: cluster_task.submit(root, k[0], k[1], cfg.cluster, cfg.orientation) for k in keys}
    ok, bad = gather(futs, "particles")
    failed = _fail_by_tomogram(bad)
    by_name = {e.name: e for e in entries}
    names = sorted(candidates - set(failed), key=list(by_name).index)
    run = progress.current()
    if run is not None:
        run.retotal("particles", len(keys) + len(names))
    out_futs = {n: outputs_task.submit(root, n, out_dir,
                                       None if by_name[n].particles is None
                                       else str(by_name[n].particles),
                                       cfg.cluster.score_threshold, cfg.picks, in_plane)
                for n in names}
    summaries, bad_out = {}, {}
    for n, fut in out_futs.items():  # each tomogram counts as done when its STAR is written
        one, one_bad = gather({n: fut}, "particles")
        summaries.update(one)
        bad_out.update(one_bad)
        if run is not None and n in one:
            run.tomogram_done(n)
    for i, n in enumerate(names, 1):
        if n in summaries:
            logger.info("[%d/%d] %s: %d particles from %d points", i, len(names), n,
                        summaries[n]["particles"], summaries[n]["points"])
    failed.update(bad_out)
    return summaries, failed
