"""Prefect flows on a real dask LocalCluster: same picks as the sequential path, survival of a
killed worker, and resumption that recomputes only what is missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from membrain_dist.manifest import read_manifest
from membrain_dist.star import read_particles

pytestmark = pytest.mark.timeout(900)


def _picks(pred_dir: Path, names: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for n in names:
        df = read_particles(pred_dir / f"{n}.star")
        cols = ["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ", "rlnAngleRot",
                "rlnAngleTilt", "rlnAnglePsi", "mbMembrane", "mbSide"]
        arr = df[cols].to_numpy(dtype=np.float64) if len(df) else np.zeros((0, len(cols)))
        out[n] = arr[np.lexsort(arr[:, :3].T[::-1])] if len(arr) else arr
    return out


def _assert_same_picks(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].shape == b[n].shape, n
        np.testing.assert_allclose(a[n], b[n], atol=1e-3, err_msg=n)


def _names(manifest: Path) -> list[str]:
    return [e.name for e in read_manifest(manifest)]


def test_flow_gives_the_sequential_picks(flow_prediction, sequential_prediction, test_manifest):
    pred, _, result = flow_prediction
    names = _names(test_manifest)
    assert result.failures == {}
    assert sorted(result.summaries) == sorted(names)
    flow_picks = _picks(pred, names)
    assert sum(len(v) for v in flow_picks.values()) > 0
    _assert_same_picks(flow_picks, _picks(sequential_prediction, names))
    assert (pred / "particles.star").is_file()
    import starfile

    pd.testing.assert_frame_equal(starfile.read(pred / "tomograms.star"),
                                  starfile.read(sequential_prediction / "tomograms.star"))
    assert all((pred / "qc" / f"{n}.png").is_file() for n in names)


def _stage_files(store: Path) -> dict[str, int]:
    """mtime_ns of each stage group's / array's zarr.json (what a recomputation rewrites)."""
    out = {}
    for p in store.rglob("zarr.json"):
        rel = p.parent.relative_to(store).as_posix()
        parts = rel.split("/")
        if len(parts) == 3 and parts[1] in ("geometry", "picks"):
            out[rel] = p.stat().st_mtime_ns
        elif len(parts) == 4 and parts[3] == "scores":
            out[rel] = p.stat().st_mtime_ns
    return out


def test_rerun_recomputes_only_what_is_missing(flow_prediction, test_manifest, trained_model):
    import shutil

    from flows.predict import predict_campaign
    from flows.runtime import ClusterSpec, prefect_api

    pred, store, _ = flow_prediction
    before = _stage_files(store)
    geoms = sorted(k for k in before if k.split("/")[1] == "geometry")
    picks = sorted(k for k in before if k.split("/")[1] == "picks")
    assert geoms and picks
    lost_geometry, lost_picks = geoms[0], picks[-1]
    assert lost_geometry.split("/")[2] != lost_picks.split("/")[2] or \
        lost_geometry.split("/")[0] != lost_picks.split("/")[0]
    shutil.rmtree(store / lost_geometry)  # also removes its scores
    shutil.rmtree(store / lost_picks)
    time.sleep(0.05)
    with prefect_api():
        result = predict_campaign(str(test_manifest), str(trained_model), str(pred), str(store),
                                  cluster=ClusterSpec(n_workers=2, memory_limit="4GiB"))
    assert result.failures == {}
    after = _stage_files(store)
    assert after.keys() == before.keys()
    recomputed = sorted(k for k in after if k not in before or after[k] != before[k])
    assert recomputed == sorted([lost_geometry, f"{lost_geometry}/scores", lost_picks])


def test_campaign_survives_a_killed_worker(test_manifest, trained_model, sequential_prediction,
                                           tmp_path):
    """A worker process is SIGKILLed mid-campaign; the run completes with every output once."""
    from distributed import Client, LocalCluster

    names = _names(test_manifest)
    store, pred = tmp_path / "store.zarr", tmp_path / "pred"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      memory_limit="4GiB", dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        proc = subprocess.Popen(
            [sys.executable, "-m", "membrain_dist.cli", "predict", "--manifest",
             str(test_manifest), "--model", str(trained_model), "--out", str(pred),
             "--store", str(store), "--scheduler", cluster.scheduler_address],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        # wait until the first membrane's geometry is written: the campaign is under way
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if any((store / n / "geometry").is_dir() and
                   any(p.name.startswith("m") and ".tmp-" not in p.name
                       for p in (store / n / "geometry").iterdir()) for n in names):
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        pids = client.run(os.getpid)
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    _assert_same_picks(_picks(pred, names), _picks(sequential_prediction, names))
    leftovers = [p for p in store.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []
