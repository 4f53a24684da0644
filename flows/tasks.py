"""Prefect tasks: thin wrappers of :mod:`membrain_dist.pipeline` stage functions.

Tasks receive store paths, names, membrane ids and small frozen configs, never arrays; every
stage function skips work whose stored provenance is current, so a rerun after an interruption
recomputes only what is missing. Retries cover transient failures (a lost worker, a flaky
shared filesystem); a bad input raises ``InputError`` and is not retried.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from membrain_dist import pipeline
from membrain_dist.clustering import ClusterConfig
from membrain_dist.config import InferenceConfig
from membrain_dist.convert import ConvertConfig
from membrain_dist.errors import InputError
from membrain_dist.geometry import GeometryConfig
from membrain_dist.manifest import TomogramEntry
from membrain_dist.orientation import OrientationConfig
from membrain_dist.picks import PickConfig
from membrain_dist.sides import SideSpec

from .fanout import cluster_block_map
from .logs import forward_library_logs

# this module is imported in every dask worker that runs one of its tasks: the library's log
# lines of those tasks go to their Prefect task run (flows.logs)
forward_library_logs()


def _retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: never retry bad input, retry anything else."""
    try:
        state.result()
    except InputError:
        return False
    except Exception:  # noqa: BLE001 - decide on the exception type only
        return True
    return False


_COMMON = dict(retries=2, retry_delay_seconds=1, retry_condition_fn=_retry_unless_bad_input,
               cache_policy=NO_CACHE)


@task(name="convert", task_run_name="convert-{entry.name}", **_COMMON)
def convert_task(entry: TomogramEntry, root: str, cfg: ConvertConfig) -> list[int]:
    """Convert one tomogram; a large one's blocks spread over the cluster (flows.fanout)."""
    return pipeline.convert_entry(entry, root, cfg, cluster_block_map())


def _run_name(stage: str) -> Any:
    """Task run name ``<stage>-<tomogram>-m<id>[+m<id>...]`` of a task over a membrane group."""
    def name(parameters: dict[str, Any]) -> str:
        mids = "+".join(f"m{int(m)}" for m in parameters["membrane_ids"])
        return f"{stage}-{parameters['name']}-{mids}"
    return name


# geometry, score, cluster and membrane tasks run over a group of membranes
# (pipeline.membrane_groups: one membrane, or several small ones) and return {id: value}


@task(name="geometry", task_run_name=_run_name("geometry"), **_COMMON)
def geometry_task(root: str, name: str, membrane_ids: Sequence[int], cfg: GeometryConfig,
                  sides: dict[int, SideSpec], keep_cubes: bool = False) -> dict[int, int]:
    """Points of each membrane of the group (sampled, normals voted, sides chosen)."""
    return {int(m): pipeline.geometry_membrane(root, name, int(m), cfg, sides[int(m)],
                                               keep_cubes) for m in membrane_ids}


@task(name="score", task_run_name=_run_name("score"), **_COMMON)
def score_task(root: str, name: str, membrane_ids: Sequence[int], model_dir: str,
               cfg: InferenceConfig, gcfg: GeometryConfig | None = None,
               part_points: int = pipeline.PART_POINTS) -> dict[int, int]:
    """Scores of each membrane of the group: stored cubes, or cut here part by part."""
    return {int(m): pipeline.score_membrane(root, name, int(m), model_dir, cfg, gcfg,
                                            part_points) for m in membrane_ids}


# cut: returns the cubes of a part, handed to score_part_task worker to worker (dask); a
# retry of score_part_task reuses them
@task(name="cut", task_run_name="cut-{name}-m{membrane_id}-{start}", **_COMMON)
def cut_task(root: str, name: str, membrane_id: int, cfg: GeometryConfig, start: int,
             stop: int, icfg: InferenceConfig) -> Any:
    return pipeline.part_cubes(root, name, membrane_id, cfg, icfg, start, stop)


@task(name="score-part", task_run_name="score-{name}-m{membrane_id}-{start}", **_COMMON)
def score_part_task(cubes: Any, root: str, name: str, membrane_id: int, model_dir: str,
                    cfg: InferenceConfig, start: int, stop: int) -> int:
    return pipeline.score_part(cubes, root, name, membrane_id, model_dir, cfg, start, stop)


@task(name="cluster", task_run_name=_run_name("cluster"), **_COMMON)
def cluster_task(root: str, name: str, membrane_ids: Sequence[int], ccfg: ClusterConfig,
                 ocfg: OrientationConfig, parts: pipeline.ScoreParts | None = None
                 ) -> dict[int, int]:
    """Mean Shift + orientations of each membrane of the group (joining its scored parts
    first, if any); particles of each."""
    out = {}
    for m in map(int, membrane_ids):
        if parts is not None:
            pipeline.assemble_scores(root, name, m, parts.model_dir, parts.inference,
                                     parts.part_points)
        out[m] = pipeline.cluster_membrane(root, name, m, ccfg, ocfg)
    return out


@task(name="membrane", task_run_name=_run_name("membrane"), **_COMMON)
def membrane_task(root: str, name: str, membrane_ids: Sequence[int], gcfg: GeometryConfig,
                  sides: dict[int, SideSpec], keep_cubes: bool, model_dir: str,
                  icfg: InferenceConfig, part_points: int, ccfg: ClusterConfig,
                  ocfg: OrientationConfig) -> dict[int, int]:
    """Geometry, scores (cubes cut here, in memory) and clusters of each membrane of the group
    in one task: when no worker is set apart for inference, one task instead of three.
    Returns the number of points of each."""
    out = {}
    for m in map(int, membrane_ids):
        out[m] = pipeline.geometry_membrane(root, name, m, gcfg, sides[m], keep_cubes)
        pipeline.score_membrane(root, name, m, model_dir, icfg, gcfg, part_points)
        pipeline.cluster_membrane(root, name, m, ccfg, ocfg)
    return out


@task(name="outputs", task_run_name="outputs-{name}", **_COMMON)
def outputs_task(root: str, name: str, out_dir: str, gt_star: str | None,
                 score_threshold: float, pcfg: PickConfig,
                 in_plane: pipeline.InPlaneSearch | None = None) -> dict:
    return pipeline.write_tomogram_outputs(root, name, out_dir, gt_star, score_threshold,
                                           pcfg=pcfg, in_plane=in_plane)


@task(name="campaign-star", cache_policy=NO_CACHE)
def campaign_star_task(out_dir: str, names: Sequence[str], root: str | None = None) -> str:
    return str(pipeline.write_campaign_star(out_dir, names, root))


def as_str(path: Path | str | None) -> str | None:
    return None if path is None else str(path)
