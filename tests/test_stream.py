"""Streaming prediction (flows.stream) on real dask clusters: the same STARs as the stage-by-stage
flow with cubes through the store, and as cubes cut on CPU workers and handed in memory to a
worker started with ``--resources GPU=1``; nothing but points in the store without
``--keep-cubes``."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_flows import _assert_same_picks, _names, _picks

pytestmark = pytest.mark.timeout(900)


def _geometry_groups(store: Path) -> list[Path]:
    return sorted(p for p in store.glob("*/geometry/m*") if (p / "zarr.json").is_file())


@pytest.fixture(scope="module")
def stage_prediction(test_manifest: Path, trained_model: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The earlier flow: stage by stage, every cube written to the store and read back, one
    task per membrane and stage (no membrane groups)."""
    from flows.predict import predict_campaign
    from flows.runtime import ClusterSpec, prefect_api
    from flows.stream import Schedule

    work = tmp_path_factory.mktemp("stages")
    with prefect_api():
        result = predict_campaign(str(test_manifest), str(trained_model), str(work / "pred"),
                                  str(work / "store.zarr"),
                                  cluster=ClusterSpec(n_workers=2, memory_limit="4GiB"),
                                  schedule=Schedule(mode="stages", keep_cubes=True,
                                                    group_voxels=0))
    assert result.failures == {}
    return work / "pred", work / "store.zarr"


def test_stream_gives_the_stage_by_stage_picks(flow_prediction, stage_prediction,
                                               test_manifest):
    """Same STARs, whether the cubes went through the store or were cut where they were
    scored, and whether each membrane had its own tasks or a tomogram's small membranes
    shared theirs; only the stage-by-stage store holds cubes."""
    names = _names(test_manifest)
    stream_pred, stream_store, result = flow_prediction
    stage_pred, stage_store = stage_prediction
    assert result.failures == {}
    picks = _picks(stream_pred, names)
    assert sum(len(v) for v in picks.values()) > 0
    _assert_same_picks(picks, _picks(stage_pred, names))
    assert _geometry_groups(stage_store) and _geometry_groups(stream_store)
    assert all((g / "cubes").is_dir() for g in _geometry_groups(stage_store))
    assert not any((g / "cubes").exists() for g in _geometry_groups(stream_store))
    assert all((g / "scores").is_dir() for g in _geometry_groups(stream_store))


def test_cpu_tasks_go_to_inference_workers_only_when_nothing_is_scored():
    from flows.stream import PRIORITY, cpu_task_placement

    cpu = ["tcp://cpu-1", "tcp://cpu-2"]
    kept = {"workers": cpu, "allow_other_workers": False}
    for kind in PRIORITY:
        # no workers set apart for inference: anywhere, always
        assert cpu_task_placement(kind, [], scoring=3, contrast_decided=True) == {}
        # something to score (or waiting to be): the CPU workers only
        assert cpu_task_placement(kind, cpu, scoring=1, contrast_decided=True) == kept
    for kind in ("geometry", "cluster", "outputs"):  # nothing to score: any worker
        assert cpu_task_placement(kind, cpu, scoring=0, contrast_decided=True) == {}
    # a conversion only before the campaign's contrast is decided; a cut never
    assert cpu_task_placement("convert", cpu, scoring=0, contrast_decided=False) == {}
    assert cpu_task_placement("convert", cpu, scoring=0, contrast_decided=True) == kept
    assert cpu_task_placement("cut", cpu, scoring=0, contrast_decided=False) == kept


def test_small_membranes_share_a_group_large_ones_have_their_own():
    """First fit, largest first, groups of at most ``max_voxels``; 0: one per membrane."""
    from membrain_dist.pipeline import group_membranes

    voxels = {1: 100, 2: 60, 3: 50, 4: 30, 5: 10, 6: 250, 7: 120}
    # 6 and 7 (>= 120) alone; 1 opens a group that only 5 still fits into; 2 + 3; 4 alone
    assert group_membranes(voxels, list(voxels), 120) == [(6,), (7,), (1, 5), (2, 3), (4,)]
    assert group_membranes(voxels, [5, 2, 6], 0) == [(6,), (2,), (5,)]
    assert group_membranes(voxels, [], 120) == []
    rng = np.random.default_rng(0)
    sizes = {i: int(v) for i, v in enumerate(rng.integers(1, 5000, 300), 1)}
    groups = group_membranes(sizes, list(sizes), 8000)
    assert sorted(m for g in groups for m in g) == sorted(sizes)
    assert all(sum(sizes[m] for m in g) <= 8000 for g in groups if len(g) > 1)
    totals = [sum(sizes[m] for m in g) for g in groups]
    assert totals == sorted(totals, reverse=True)
    assert len(groups) < 300 // 2  # packed: a mean of 2,500 voxels, up to 8,000 a group


def _start_gpu_worker(address: str, log: Path) -> subprocess.Popen:
    """A real ``dask worker`` process that advertises the GPU resource (runs on the CPU)."""
    return subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
         "--nworkers", "1", "--resources", "GPU=1", "--memory-limit", "4GiB",
         "--no-dashboard"], stdout=log.open("w"), stderr=subprocess.STDOUT)


def _join_gpu_worker(client, gpu: subprocess.Popen, log: Path, n_workers: int) -> str:
    """Wait (at most 2 min) until the scheduler has ``n_workers`` workers, the GPU worker
    among them; start the task stream; return the GPU worker's address."""
    deadline = time.monotonic() + 120
    while len(client.scheduler_info()["workers"]) < n_workers:
        assert time.monotonic() < deadline and gpu.poll() is None, log.read_text()[-2000:]
        time.sleep(0.2)
    client.get_task_stream()  # the scheduler records tasks from its first call on
    return next(a for a, w in client.scheduler_info()["workers"].items()
                if w["resources"].get("GPU"))


def test_cubes_cut_on_cpu_workers_and_scored_on_the_gpu_worker(
        test_manifest, trained_model, stage_prediction, tmp_path):
    """cut_on=cpu: cut tasks on the plain worker, scoring parts only on the GPU worker, cubes
    handed over by dask; parts of 1,000 points and a window of one tomogram; same STARs; the
    parts are joined into each membrane's scores and removed. Each tomogram's four small
    membranes are one group: one geometry and one clustering task per tomogram, the parts of
    all four scored before their clustering starts."""
    from distributed import Client, LocalCluster

    from flows.predict import predict_campaign
    from flows.runtime import ClusterSpec, prefect_api
    from flows.stream import Schedule

    names = _names(test_manifest)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="4GiB",
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        gpu = _start_gpu_worker(cluster.scheduler_address, tmp_path / "gpu-worker.log")
        try:
            gpu_addr = _join_gpu_worker(client, gpu, tmp_path / "gpu-worker.log", 2)
            with prefect_api():
                result = predict_campaign(
                    str(test_manifest), str(trained_model), str(tmp_path / "pred"),
                    str(tmp_path / "store.zarr"),
                    cluster=ClusterSpec(kind="address", address=cluster.scheduler_address,
                                        gpu_resource=True),
                    schedule=Schedule(window=1, cut_on="cpu", part_points=1000,
                                      parts_in_flight=2))
            # where each task ran, from the scheduler's task stream
            where: dict[str, set[str]] = {}
            stream = client.get_task_stream(start=0)
            for rec in stream:
                kind = "score" if "score" in rec["key"] else "cut" if "cut" in rec["key"] \
                    else "other"
                where.setdefault(kind, set()).add(rec["worker"])
        finally:
            gpu.terminate()
            gpu.wait(30)
    assert result.failures == {}
    _assert_same_picks(_picks(tmp_path / "pred", names), _picks(stage_prediction[0], names))
    store = tmp_path / "store.zarr"
    groups = _geometry_groups(store)
    assert groups and not any((g / "cubes").exists() for g in groups)
    assert not any((g / "score_parts").exists() for g in groups)  # joined and removed
    assert all((g / "scores").is_dir() for g in groups)
    # scoring only where the GPU resource is; cutting only on the CPU worker (the other
    # stages go to the inference worker only while it has nothing to score)
    assert where.get("score") == {gpu_addr}, where
    assert where.get("cut") and gpu_addr not in where["cut"], where
    assert where.get("other") and set(where["other"]) - {gpu_addr}, where
    # one geometry and one clustering task per tomogram (its membranes are one group), many
    # parts cut: each membrane's own
    n_membranes = len(groups)
    assert n_membranes == 4 * len(names)
    for kind in ("geometry_task", "cluster_task"):
        assert sum(str(r["key"]).startswith(kind) for r in stream) == len(names), kind
    assert sum(str(r["key"]).startswith("cut_task") for r in stream) > n_membranes


def test_a_failing_tomogram_is_isolated_and_frees_its_slot(test_manifest, trained_model,
                                                           sequential_prediction, tmp_path):
    """A row whose segmentation is empty (found only when its data are read) fails with the
    file and the problem named; with a window of one tomogram the rows after it still run,
    and their STARs are the sequential path's."""
    import dataclasses

    import numpy as np

    from flows.predict import predict_campaign
    from flows.runtime import ClusterSpec, prefect_api
    from flows.stream import Schedule
    from membrain_dist.manifest import read_manifest, write_manifest
    from membrain_dist.mrc import open_volume, write_volume

    good = read_manifest(test_manifest)
    seg = tmp_path / "empty_seg.mrc"
    write_volume(seg, np.zeros(open_volume(good[0].segmentation).shape, np.uint8),
                 good[0].voxel_size_A or 14.08)
    bad = dataclasses.replace(good[0], name="empty", segmentation=seg, particles=None)
    manifest = tmp_path / "m.csv"
    write_manifest([bad, *good], manifest)
    with prefect_api():
        result = predict_campaign(str(manifest), str(trained_model), str(tmp_path / "pred"),
                                  str(tmp_path / "store.zarr"),
                                  cluster=ClusterSpec(n_workers=2, memory_limit="4GiB"),
                                  schedule=Schedule(window=1))
    assert list(result.failures) == ["empty"]
    assert "empty segmentation" in result.failures["empty"] and str(seg) in \
        result.failures["empty"]
    names = [e.name for e in good]
    assert sorted(result.summaries) == sorted(names)
    assert not (tmp_path / "pred" / "empty.star").exists()
    _assert_same_picks(_picks(tmp_path / "pred", names), _picks(sequential_prediction, names))
