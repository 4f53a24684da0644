"""Train flow: convert and sample the annotated tomograms, then fit the scoring CNN."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from membrain_dist import pipeline
from membrain_dist.config import PipelineConfig
from membrain_dist.errors import InputError
from membrain_dist.manifest import TomogramEntry, read_manifest
from membrain_dist.store import sweep_orphans
from membrain_dist.training import log_epoch

from .logs import forward_library_logs
from .runtime import ClusterSpec, manifest_run_name, open_clusters, task_runner
from .stages import convert_flow, geometry_flow


@task(name="fit-model", cache_policy=NO_CACHE)
def fit_task(root: str, train: list[TomogramEntry], val: list[TomogramEntry],
             cfg: PipelineConfig, model_dir: str) -> dict:
    # one line per epoch: on the terminal (the CLI shows INFO of membrain_dist) and, forwarded
    # by flows.logs, in this task run's logs in the Prefect UI
    forward_library_logs()
    return pipeline.fit_model(root, train, val, cfg, model_dir, log_epoch)


def split_training(entries: list[TomogramEntry], manifest: str) -> tuple[list, list]:
    """Train and val rows of a manifest; rows without particles cannot train."""
    train = [e for e in entries if e.split == "train"]
    val = [e for e in entries if e.split == "val"]
    if not train:  # a manifest of annotated rows without splits: use them all
        train = [e for e in entries if e.particles is not None and e.split != "val"]
    missing = [e.name for e in (*train, *val) if e.particles is None]
    if missing:
        raise InputError(manifest, f"rows {missing} are for training but have no particles STAR")
    if not train:
        raise InputError(manifest, "no training rows (split 'train' with a particles STAR)")
    return train, val


@flow(name="membrain-train", flow_run_name=manifest_run_name)
def train_campaign(manifest: str, model_dir: str, store: str,
                   cfg: PipelineConfig = PipelineConfig(),
                   cluster: ClusterSpec = ClusterSpec()) -> dict:
    """Convert -> geometry on dask workers, then training: on a GPU worker when there is one,
    else in this process with all its cores, after the clusters of the first two stages are
    closed (a local cluster's idle workers and scheduler would take CPU time from it)."""
    forward_library_logs()
    logger = get_run_logger()
    entries = read_manifest(manifest)
    train, val = split_training(entries, manifest)
    rows = [*train, *val]
    pipeline.validate_entries(rows)
    metrics = None
    with open_clusters(cluster) as cl:
        runner = task_runner(cl.cpu_address)
        membranes, bad = convert_flow.with_options(task_runner=runner)(rows, store, cfg)
        if bad:
            raise InputError(manifest, f"training tomograms failed to convert: {bad}")
        # the training set's cubes are cut on the workers and kept (a few membranes)
        _, bad = geometry_flow.with_options(task_runner=runner)(rows, membranes, store, cfg,
                                                               keep_cubes=True)
        sweep_orphans(store, [e.name for e in rows])  # left by workers lost mid-write
        if bad:
            raise RuntimeError(f"geometry failed for training tomograms: {bad}")
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        if cl.gpu_resource:
            import dask

            @flow(name="fit-on-gpu", task_runner=task_runner(cl.gpu_address))
            def _fit_remote() -> dict:
                with dask.annotate(resources={"GPU": 1}):
                    return fit_task.submit(store, train, val, cfg, model_dir).result()

            metrics = _fit_remote()
    if metrics is None:  # train here, the CPU clusters closed: their workers would idle on its cores
        metrics = fit_task(store, train, val, cfg, model_dir)
    logger.info("model written to %s (best epoch %s, val loss %.4f)", model_dir,
                metrics.get("best_epoch"), metrics.get("best_val_loss", float("nan")))
    return metrics
