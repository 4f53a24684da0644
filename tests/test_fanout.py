"""One tomogram's conversion spread over a real dask cluster (flows.fanout): its blocks run as
dask tasks on the plain workers (none on a ``--resources GPU=1`` worker) and write the same
arrays as a conversion in one process; a bad block's InputError reaches the caller and leaves
no group behind."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_convert import _entry, _spanning_segmentation
from test_stream import _join_gpu_worker, _start_gpu_worker

from membrain_dist.convert import ConvertConfig, convert_tomogram
from membrain_dist.errors import InputError

pytestmark = pytest.mark.timeout(300)

CFG = ConvertConfig(chunk=8, min_membrane_voxels=1, pyramid_min=8)


def _convert_on_worker(entry, root: str, cfg: ConvertConfig) -> dict:
    """Runs in a dask task: convert with the cluster map, every tomogram large enough."""
    from flows.fanout import cluster_block_map

    fan_out = cluster_block_map()
    assert fan_out is not None  # inside a worker's task
    meta = convert_tomogram(entry, root, cfg, fan_out, fan_out_min_voxels=0)
    return {"membranes": meta.membranes, "intensity": meta.intensity}


def _arrays(root: Path, name: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}

    def walk(g: zarr.Group, prefix: str) -> None:
        for k, a in g.arrays():
            out[prefix + k] = a[:]
        for k, sub in g.groups():
            walk(sub, f"{prefix}{k}/")

    walk(zarr.open_group(str(root / name), mode="r"), "")
    return out


@pytest.fixture(scope="module")
def cluster_with_gpu_worker(tmp_path_factory):
    """Two plain 1-thread worker processes and one ``--resources GPU=1`` worker process."""
    from distributed import Client, LocalCluster

    logs = tmp_path_factory.mktemp("fanout-logs")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="2GiB",
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        gpu = _start_gpu_worker(cluster.scheduler_address, logs / "gpu-worker.log")
        try:
            yield client, _join_gpu_worker(client, gpu, logs / "gpu-worker.log", 3)
        finally:
            gpu.terminate()
            gpu.wait(30)


def test_blocks_run_on_the_plain_workers_and_write_what_one_process_writes(
        cluster_with_gpu_worker, tmp_path):
    client, gpu_addr = cluster_with_gpu_worker
    rng = np.random.default_rng(3)
    tomo = rng.normal(size=(20, 19, 11)).astype(np.float32)
    e = _entry(tmp_path, tomo, _spanning_segmentation())
    serial = convert_tomogram(e, tmp_path / "serial.zarr", CFG)

    t0 = time.time()
    plain = [a for a in client.scheduler_info()["workers"] if a != gpu_addr]
    got = client.submit(_convert_on_worker, e, str(tmp_path / "fanned.zarr"), CFG,
                        workers=plain[:1], pure=False).result()
    blocks: dict[str, set[str]] = {}
    for rec in client.get_task_stream(start=t0, count=None):
        kind = str(rec["key"]).split("-", 1)[0]
        blocks.setdefault(kind, set()).add(rec["worker"])

    # 3 z slabs x 3 row bands of 8 voxels: pass 1, pass 2 and the pyramid level ran as tasks
    assert {"_pass1_block", "_pass2_block", "_level_block"} <= blocks.keys()
    assert all(gpu_addr not in w for w in blocks.values())
    assert blocks["_pass1_block"] <= set(plain)
    assert got["membranes"] == serial.membranes and got["intensity"] == serial.intensity
    a, b = _arrays(tmp_path / "fanned.zarr", e.name), _arrays(tmp_path / "serial.zarr", e.name)
    assert a.keys() == b.keys() and len(a) == 6  # levels 0-2 of tomogram and labels
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_a_bad_block_fails_the_conversion_by_name(cluster_with_gpu_worker, tmp_path):
    client, _ = cluster_with_gpu_worker
    tomo = np.random.default_rng(4).normal(size=(20, 19, 11)).astype(np.float32)
    tomo[17, 2, 3] = np.nan  # in the last z slab
    e = _entry(tmp_path, tomo, _spanning_segmentation())
    root = tmp_path / "bad.zarr"
    with pytest.raises(InputError, match=r"NaN values in the tomogram \(first at z, y, x = "
                                         r"\(17, 2, 3\)\)") as ei:
        client.submit(_convert_on_worker, e, str(root), CFG, pure=False).result()
    assert str(e.tomogram) in str(ei.value)
    assert not any(p.name.startswith(e.name) for p in root.iterdir())


def test_blocks_spread_on_a_cluster_of_plain_workers(tmp_path):
    """Without a GPU worker the blocks may go anywhere (and the arrays are the same)."""
    from distributed import Client, LocalCluster

    tomo = np.random.default_rng(5).normal(size=(20, 19, 11)).astype(np.float32)
    e = _entry(tmp_path, tomo, _spanning_segmentation())
    serial = convert_tomogram(e, tmp_path / "serial.zarr", CFG)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        t0 = time.time()
        client.get_task_stream()
        got = client.submit(_convert_on_worker, e, str(tmp_path / "fanned.zarr"), CFG,
                            pure=False).result()
        kinds = {str(r["key"]).split("-", 1)[0] for r in client.get_task_stream(start=t0)}
    assert "_pass1_block" in kinds and got["membranes"] == serial.membranes
    a, b = _arrays(tmp_path / "fanned.zarr", e.name), _arrays(tmp_path / "serial.zarr", e.name)
    assert all(np.array_equal(a[k], b[k]) for k in b) and a.keys() == b.keys()
