"""Scale benchmark: every predict stage on realistic tomogram sizes, distributed vs naive.

Usage::

    python benchmarks/scale.py                                  # 150x500x500 and 300x1000x1000
    python benchmarks/scale.py --sizes 64x200x200 80x256x256    # quick run
    python benchmarks/scale.py --model runs/model --profile     # given model; + cProfile pass

For each ``--sizes`` entry (Z x Y x X voxels) a synthetic tomogram is generated once with
``membrain_dist.synth`` (``benchmark_config``, membrane sizes scaled with the volume, ~10
membranes; MRC + segmentation + manifest under ``--work``, reused on later runs; generated in a
child process whose peak RSS is recorded). A model is taken from ``--model`` or trained once
(``pipeline.fit_model``, a few epochs with small batches on a small synthetic campaign) and
cached in ``--work``. Inference throughput does not depend on the weights, but clustering's
workload does: it clusters the points scored below the threshold, which an untrained model puts
almost everywhere (worst case: every point kept). The fraction kept is reported, with a warning
when it is implausibly high.

Measured per size, in one run:

1. **Stages on a real dask LocalCluster** (worker processes, 1 thread each, n_workers 1 and 2,
   a fresh cluster and a fresh Zarr store for each; workers warmed: imports, model load):
   convert (``pipeline.convert_entry``), geometry = sampling + voting + sides
   (``pipeline.geometry_membrane`` per membrane), inference = cube extraction + scoring
   (``pipeline.score_membrane``, CPU; cubes cut in memory, as a campaign does),
   clustering (``pipeline.cluster_membrane``) and outputs (``pipeline.write_tomogram_outputs``:
   STAR + QC figure). Tasks get paths, names, ids and small configs only; largest membrane
   first. Per stage: wall seconds (best of ``--repeats``, each on a fresh store), points/s and
   cubes/s (voxels/s for convert), throughput per core, task CPU seconds and the CPU share the
   tasks got (< 1: the cores were shared with other load), and the peak RSS of every worker
   during that stage (VmHWM, reset before the stage through ``/proc/self/clear_refs``; not
   ``ru_maxrss``, which cannot be reset and survives exec, so a spawned worker would report its
   parent's peak). Workers get the environment the CLI's own LocalCluster gives them
   (``flows.runtime.spawn_environment``; recorded in the JSON). Worker scaling = throughput
   with 2 workers / with 1.
2. **Naive references in the same run** (this process, one thread, on subsamples of the
   stored data), reported as ratios to the library's 1-worker (= 1 core) rate:
   geometry: MemBrain v1's per-point loop, one cubic ``map_coordinates`` per cube
   (``extraction._reference_extract_loop``) vs the whole geometry stage; inference: batch size 1
   (``benchmarks/inference.py``'s ``_reference``); clustering: ``sklearn.cluster.MeanShift``
   (flat kernel, one bandwidth, unweighted) vs ``clustering.hierarchical_mean_shift`` on the
   same contiguous patch of kept points of one membrane.
3. **End to end**: the real CLI ``membrain-dist predict --scheduler`` as a subprocess against a
   LocalCluster started here (2 workers x 1 thread, cold), on a fresh store, wall time; the
   Prefect API is started once beforehand (``flows.runtime.prefect_api``; its start-up time is
   reported apart) so the CLI and the workers share it. Peak RSS of each worker and of the CLI
   process; the share of the E2E time each stage takes (2-worker stage timings / E2E).
4. ``--profile``: the sequential predict (``pipeline.predict_sequential``) of the smallest size
   under cProfile in this process: top 15 cumulative entries printed and stored, with the
   stages' shares.

Prints a table and writes ``benchmarks/results/scale.json``. Targets checked (issue): E2E of
300x1000x1000 < 600 s, peak RSS per worker < 3 GB and flat across sizes, geometry >= 50x the
naive reference, CPU inference cubes/s per core.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"  # this process: single-threaded references (per-core comparisons)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import cProfile  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import cloudpickle  # noqa: E402
import common  # noqa: E402
import numpy as np  # noqa: E402
from common import best_of, peak_rss_mb, reset_peak_rss  # noqa: E402

from flows import runtime as flows_runtime  # noqa: E402
from membrain_dist import pipeline, store  # noqa: E402
from membrain_dist.config import PipelineConfig  # noqa: E402
from membrain_dist.inference import default_batch_size  # noqa: E402
from membrain_dist.manifest import TomogramEntry, read_manifest  # noqa: E402
from membrain_dist.synth import SynthConfig, benchmark_config, generate_campaign  # noqa: E402

cloudpickle.register_pickle_by_value(common)  # workers need not import benchmarks/

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
log = logging.getLogger("benchmarks.scale")

DEFAULT_SIZES = ("150x500x500", "300x1000x1000")
STAGES = ("convert", "geometry", "inference", "clustering", "outputs")
E2E_TARGET_S = 600.0
RSS_TARGET_MB = 3000.0
GEOMETRY_TARGET_X = 50.0
SEED = 2024
KEPT_WARN = 0.3  # kept fraction above which the model is flagged (particles cover a few % of points)
MB = 1024.0**2
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


# --------------------------------------------------------------------------- small helpers
def parse_size(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    if len(parts) != 3 or min(parts) < 16:
        raise argparse.ArgumentTypeError(f"size is ZxYxX with each >= 16, e.g. 300x1000x1000: {text!r}")
    return parts[0], parts[1], parts[2]


def size_tag(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
    """Run ``fn(*args)`` (on a worker); return its result, CPU seconds and wall seconds."""
    c, w = time.process_time(), time.perf_counter()
    res = fn(*args)
    return res, time.process_time() - c, time.perf_counter() - w


def _convert_row(manifest: str, name: str, root: str, cfg: Any) -> list[int]:
    """Task: convert one manifest row (the worker reads the manifest itself)."""
    entry = next(e for e in read_manifest(manifest) if e.name == name)
    return pipeline.convert_entry(entry, root, cfg)


def _warm_worker(model_dir: str) -> int:
    """Imports, first-call costs and the per-worker model load, paid before the timed stages."""
    import membrain_dist.clustering  # noqa: F401
    import membrain_dist.qc  # noqa: F401
    from membrain_dist.extraction import extract_cubes
    from membrain_dist.inference import configure_threads, get_model
    from membrain_dist.normals import vote_normals

    rng = np.random.default_rng(0)
    vol = rng.normal(size=(32, 32, 32)).astype(np.float32)
    pts = rng.uniform(8, 24, size=(64, 3)).astype(np.float32)
    nrm = rng.normal(size=(64, 3)).astype(np.float32)
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    extract_cubes(vol, pts, nrm)
    vote_normals(pts, nrm, np.ones(64, np.float32))
    configure_threads()
    get_model(model_dir, "cpu")
    return os.getpid()


def _load_benchmark(name: str) -> Any:
    """Import a sibling benchmark script (``benchmarks/<name>.py``) as a module."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _machine() -> dict:
    import psutil

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"host": platform.node(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "python": platform.python_version()}


# --------------------------------------------------------------------------- data and model
def size_config(shape: tuple[int, int, int]) -> SynthConfig:
    """``benchmark_config`` at ``shape``: membrane sizes scaled with the smallest axis ratio."""
    full = benchmark_config()
    f = min(s / b for s, b in zip(shape, full.shape_zyx, strict=True))
    return benchmark_config(
        shape_zyx=tuple(shape), keep_density=False,
        vesicle_radius=tuple(r * f for r in full.vesicle_radius),
        sheet_radius=tuple(r * f for r in full.sheet_radius),
        sheet_min_curvature_radius=full.sheet_min_curvature_radius * f,
    )


def _cfg_json(cfg: SynthConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))


def _generate_child(folder: Path, shape: tuple[int, int, int], seed: int) -> None:
    """Child process: write the campaign (1 test row), then ``gen.json`` as the done marker."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = size_config(shape)
    t0 = time.perf_counter()
    manifest = generate_campaign(folder, n_tomos=1, seed=seed, cfg=cfg, n_train=0, n_val=0)
    info = {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
            "manifest": str(manifest), "seed": seed, "config": _cfg_json(cfg)}
    _write_json(folder / "gen.json", info)


def ensure_tomogram(work: Path, shape: tuple[int, int, int], seed: int = SEED) -> tuple[Path, dict]:
    """The size's manifest, generated once (in a child process) and reused when current."""
    folder = work / "data" / size_tag(shape)
    marker = folder / "gen.json"
    want = _cfg_json(size_config(shape))
    if marker.is_file():
        info = json.loads(marker.read_text())
        manifest = Path(info["manifest"])
        if info.get("config") == want and info.get("seed") == seed and manifest.is_file() and \
                all(e.tomogram.is_file() and e.segmentation.is_file() for e in read_manifest(manifest)):
            log.info("%s: reusing %s", size_tag(shape), manifest)
            return manifest, {**info, "reused": True}
    shutil.rmtree(folder, ignore_errors=True)
    log.info("%s: generating the synthetic tomogram (child process)", size_tag(shape))
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-generate", str(folder),
                    "--child-shape", size_tag(shape), "--child-seed", str(seed)], check=True)
    info = json.loads(marker.read_text())
    log.info("%s: generated in %.0f s, peak RSS %.0f MB", size_tag(shape), info["seconds"],
             info["peak_rss_mb"])
    return Path(info["manifest"]), {**info, "reused": False}


# a few epochs of the default batch (1024) are a dozen optimiser steps: nothing is learned, every
# point scores below the threshold and clustering runs its worst case. 4 epochs of batch 64 at
# lr 1e-3 (~20 s on 2 cores) reached a validation loss of 0.34 (from 5.5) and kept ~1 % of points.
TRAIN_BATCH, TRAIN_LR = 64, 1e-3


def ensure_model(work: Path, model_arg: Path | None, epochs: int) -> tuple[Path, dict]:
    """``--model``, or a model trained once on a small synthetic campaign (cached in ``work``)."""
    if model_arg is not None:
        pipeline.model_fingerprint(model_arg)
        return model_arg.resolve(), {"dir": str(model_arg.resolve()), "trained_here": False}
    model_dir = work / f"model_e{epochs}_b{TRAIN_BATCH}_lr{TRAIN_LR:g}"
    if (model_dir / "model.json").is_file():
        return model_dir, {"dir": str(model_dir), "trained_here": True, "reused": True}
    t0 = time.perf_counter()
    train_dir = work / "model_train"
    shutil.rmtree(train_dir, ignore_errors=True)
    manifest = generate_campaign(train_dir / "data", n_tomos=1, seed=7, n_train=1,
                                 cfg=SynthConfig(shape_zyx=(64, 128, 128), n_membranes=3,
                                                 keep_density=False))
    cfg = PipelineConfig()
    cfg = replace(cfg,
                  train=replace(cfg.train, max_epochs=epochs, patience=epochs, batch_size=TRAIN_BATCH,
                                lr=TRAIN_LR, num_threads=os.cpu_count() or 1),
                  labels=replace(cfg.labels, template=str(manifest.parent / "template.mrc"),
                                 max_membranes=2))
    train = read_manifest(manifest)
    root = train_dir / "train.zarr"
    pipeline.prepare_sequential(train, root, cfg)
    tmp = work / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    metrics = pipeline.fit_model(root, train, [], cfg, tmp)
    os.replace(tmp, model_dir)
    shutil.rmtree(train_dir, ignore_errors=True)
    secs = time.perf_counter() - t0
    log.info("model trained in %.0f s (%d epochs, %d points)", secs, epochs, metrics["train_points"])
    return model_dir, {"dir": str(model_dir), "trained_here": True, "reused": False,
                       "train_seconds": secs, "epochs": epochs, "train_points": metrics["train_points"],
                       "best_val_loss": metrics.get("best_val_loss"),
                       "initial_val_loss": metrics.get("initial_val_loss")}


# --------------------------------------------------------------------------- dask stages
@contextlib.contextmanager
def local_cluster(n_workers: int) -> Iterator[Any]:
    """A fresh LocalCluster (processes, 1 thread each) whose workers get the environment the
    CLI's own LocalCluster gives them (``flows.runtime.spawn_environment``), and its Client."""
    import dask
    from distributed import Client, LocalCluster

    from flows.runtime import spawn_environment

    # one task at a time per worker: the largest-first order is kept (greedy packing)
    with spawn_environment(1), dask.config.set({"distributed.scheduler.worker-saturation": 1.0}), \
            LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                         dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def run_stage(client: Any, calls: Sequence[tuple[Callable[..., Any], tuple]]) -> dict:
    """Map ``calls`` (largest first) over the workers; wall time, task CPU, per-worker peak RSS."""
    reset = client.run(reset_peak_rss)
    t0 = time.perf_counter()
    # retries as the Prefect tasks have (flows/tasks.py): a lost worker is not a lost benchmark
    futs = [client.submit(_timed, fn, *args, pure=False, priority=len(calls) - i, retries=2)
            for i, (fn, args) in enumerate(calls)]
    res = client.gather(futs)
    seconds = time.perf_counter() - t0
    rss = client.run(peak_rss_mb)
    cpu, wall = sum(r[1] for r in res), sum(r[2] for r in res)
    return {"seconds": seconds, "results": [r[0] for r in res], "tasks": len(calls),
            "task_cpu_s": cpu, "task_wall_s": wall, "cpu_share": cpu / wall if wall > 0 else None,
            "peak_rss_mb_per_worker": sorted(float(v) for v in rss.values()),
            "peak_rss_scope": "stage" if all(reset.values()) else "cumulative (no clear_refs)"}


def _pipeline_once(client: Any, manifest: Path, entry: TomogramEntry, root: Path, out: Path,
                   model_dir: Path, cfg: PipelineConfig) -> dict[str, dict]:
    """One pass of every stage on a fresh store; per-stage raw measurements."""
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    name, r = entry.name, str(root)
    st: dict[str, dict] = {}
    st["convert"] = run_stage(client, [(_convert_row, (str(manifest), name, r, cfg.convert))])
    ids = st["convert"]["results"][0]
    voxels = {int(m["id"]): int(m["voxels"]) for m in store.read_meta(root, name).membranes}
    ids = sorted(ids, key=lambda i: -voxels[i])
    sides = pipeline.side_specs(entry, ids)
    # the parents of the per-membrane groups, made here: two workers creating one at the same
    # time race (store._ensure_parent is check-then-create; the flows' task retries absorb it)
    grp = store.open_store(root)
    for parent in (store.GEOMETRY_KEY, pipeline.PICKS_KEY):
        grp.require_group(f"{name}/{parent}")
    st["geometry"] = run_stage(client, [(pipeline.geometry_membrane,
                                         (r, name, mid, cfg.geometry, sides[mid])) for mid in ids])
    npts = dict(zip(ids, st["geometry"]["results"], strict=True))
    ids = sorted(ids, key=lambda i: -npts[i])
    st["inference"] = run_stage(client, [(pipeline.score_membrane,
                                          (r, name, mid, str(model_dir), cfg.inference,
                                           cfg.geometry)) for mid in ids])
    st["clustering"] = run_stage(client, [(pipeline.cluster_membrane,
                                           (r, name, mid, cfg.cluster, cfg.orientation)) for mid in ids])
    gt = None if entry.particles is None else str(entry.particles)
    st["outputs"] = run_stage(client, [(pipeline.write_tomogram_outputs,
                                        (r, name, str(out), gt, cfg.cluster.score_threshold))])
    return st


def _stage_summary(stage: str, raw: dict, n_workers: int, voxels: int, n_points: int) -> dict:
    """Throughputs of one stage measurement (items: voxels for convert, points = cubes else)."""
    s = raw["seconds"]
    d = {k: v for k, v in raw.items() if k != "results"}
    d["n_workers"] = n_workers
    if stage == "convert":
        d["voxels_per_s"] = voxels / s
        d["mb_per_s"] = voxels * 4 / MB / s
        d["voxels_per_s_per_core"] = d["voxels_per_s"] / n_workers
        items = voxels
    else:
        items = n_points
        d["points"] = n_points
        d["points_per_s"] = d["cubes_per_s"] = n_points / s
        d["points_per_s_per_core"] = d["cubes_per_s_per_core"] = n_points / s / n_workers
        if stage == "clustering":
            d["picks"] = int(sum(raw["results"]))
        if stage == "outputs":
            d["particles"] = int(sum(r["particles"] for r in raw["results"]))
    # throughput per fully used core: robust to other load sharing the cores
    d["items_per_cpu_s"] = items / raw["task_cpu_s"] if raw["task_cpu_s"] > 0 else None
    return d


def measure_stages(manifest: Path, model_dir: Path, cfg: PipelineConfig, run_dir: Path,
                   workers: Sequence[int], repeats: int, keep_last: bool) -> dict:
    """Per-stage measurements for each worker count (fresh cluster, fresh store per repeat)."""
    entry = read_manifest(manifest)[0]
    out: dict[str, Any] = {"stages": {s: {} for s in STAGES}}
    for n in workers:
        root, pred = run_dir / f"w{n}" / "campaign.zarr", run_dir / f"w{n}" / "pred"
        best: dict[str, dict] = {}
        with local_cluster(n) as client:
            client.run(_warm_worker, str(model_dir))
            for rep in range(max(1, repeats)):
                log.info("  %d worker(s), pass %d/%d", n, rep + 1, max(1, repeats))
                st = _pipeline_once(client, manifest, entry, root, pred, model_dir, cfg)
                for k, v in st.items():
                    if k not in best or v["seconds"] < best[k]["seconds"]:
                        best[k] = v
                    log.info("    %-10s %8.2f s  peak RSS/worker %s MB", k, v["seconds"],
                             [round(x) for x in v["peak_rss_mb_per_worker"]])
        meta = store.read_meta(root, entry.name)
        voxels = int(np.prod(meta.shape_zyx))
        n_points = int(sum(best["geometry"]["results"]))
        out.update(n_membranes=len(meta.membranes), n_points=n_points, voxels=voxels,
                   membrane_points=sorted((int(p) for p in best["geometry"]["results"]), reverse=True),
                   kept_fraction=_kept_fraction(root, entry.name, cfg))
        for k in STAGES:
            out["stages"][k][str(n)] = _stage_summary(k, best[k], n, voxels, n_points)
        if n != workers[-1] or not keep_last:
            shutil.rmtree(run_dir / f"w{n}", ignore_errors=True)
        else:
            out["store"] = str(root)
    for k in STAGES:
        runs = out["stages"][k]
        if "1" in runs and "2" in runs:
            runs["worker_scaling_1_to_2"] = runs["1"]["seconds"] / runs["2"]["seconds"]
            a, b = runs["1"], runs["2"]
            if a.get("cpu_share") and b.get("cpu_share"):
                # what 2 workers would give if every task had a whole core
                runs["worker_scaling_cpu_normalised"] = runs["worker_scaling_1_to_2"] * \
                    a["cpu_share"] / b["cpu_share"]
    return out


def _kept_fraction(root: Path, name: str, cfg: PipelineConfig) -> float | None:
    """Fraction of points the clustering keeps (score < threshold): its workload depends on it."""
    kept = total = 0
    for mid in pipeline.membrane_ids(root, name):
        sc = pipeline.read_scores(root, name, mid)
        kept += int((sc < cfg.cluster.score_threshold).sum())
        total += int(sc.size)
    return kept / total if total else None


# --------------------------------------------------------------------------- references
def _largest_membrane(root: Path, name: str) -> int:
    ids = pipeline.membrane_ids(root, name)
    return max(ids, key=lambda m: pipeline.read_geometry(root, name, m)["zyx"].shape[0])


def _cubes(root: Path, name: str, mid: int, cfg: PipelineConfig, start: int, stop: int
           ) -> np.ndarray:
    """Cubes of points ``start:stop`` of a membrane, as the scoring stage cuts them."""
    from membrain_dist.geometry import membrane_cubes

    return membrane_cubes(root, name, mid, cfg.geometry, start, stop)


def _patch(zyx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the ``n`` points nearest to a random one (a contiguous patch)."""
    from scipy.spatial import cKDTree

    n = min(n, zyx.shape[0])
    centre = zyx[rng.integers(zyx.shape[0])]
    _, idx = cKDTree(zyx).query(centre, k=n)
    return np.sort(np.atleast_1d(idx))


def reference_geometry(root: Path, name: str, cfg: PipelineConfig, n: int, repeats: int,
                       rng: np.random.Generator) -> dict:
    """v1 per-point loop (``_reference_extract_loop``) on a patch of stored points, points/s."""
    from membrain_dist.extraction import Intensity, _reference_extract_loop, normalise_intensity

    mid = _largest_membrane(root, name)
    geo = pipeline.read_geometry(root, name, mid)
    idx = _patch(geo["zyx"], n, rng)
    pts, nrm = geo["zyx"][idx], geo["normal"][idx]
    meta = store.read_meta(root, name)
    shp = np.asarray(meta.shape_zyx)
    lo = np.clip(np.floor(pts.min(0)).astype(int) - 16, 0, shp - 1)
    hi = np.clip(np.ceil(pts.max(0)).astype(int) + 17, lo + 1, shp)
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    block = np.asarray(store.tomogram_array(root, name)[region])
    vol = normalise_intensity(block, Intensity.from_attrs(meta.intensity, clip=cfg.geometry.intensity_clip))
    local = (pts - lo).astype(np.float32)
    # the loop's one-off setup (edge-padding the volume) is timed with zero points and subtracted
    setup_s, _ = best_of(lambda: _reference_extract_loop(vol, local[:0], nrm[:0], cfg.geometry.cube_size),
                          repeats)
    total_s, cubes = best_of(lambda: _reference_extract_loop(vol, local, nrm, cfg.geometry.cube_size),
                              repeats)
    stored = _cubes(root, name, mid, cfg, int(idx[0]), int(idx[-1]) + 1)[idx - idx[0]]
    corr = float(np.corrcoef(cubes.ravel(), stored.ravel())[0, 1])
    return {"points": int(len(idx)), "membrane": mid, "points_per_s": len(idx) / max(total_s - setup_s, 1e-9),
            "setup_s": setup_s, "total_s": total_s, "corr_with_stored_cubes": corr,
            "description": "MemBrain v1-style Python loop, this process, 1 thread: per point a 25^3 crop "
                           "rotated by one cubic-spline map_coordinates call, centre-cropped to 12^3; "
                           "extraction only (no sampling/voting), padding setup excluded; compared "
                           "with the library's geometry stage (sampling + voting + sides + "
                           "store I/O; extraction is timed in the inference stage, where the "
                           "cubes are cut) on 1 worker"}


def reference_inference(root: Path, name: str, model_dir: Path, n: int, batch_size: int) -> dict:
    """Batch-size-1 forward loop (``benchmarks/inference.py``) on stored cubes, cubes/s on 1 thread."""
    import torch

    from membrain_dist.inference import predict_distances
    from membrain_dist.model import load_model

    ref = _load_benchmark("inference")._reference
    torch.set_num_threads(1)
    model, _ = load_model(model_dir, "cpu")
    model.eval()
    mid = _largest_membrane(root, name)
    cubes = _cubes(root, name, mid, pipeline.model_pipeline_config(model_dir), 0, n)
    dev = torch.device("cpu")
    ref(model, cubes[:8], dev)  # warm-up
    t = time.perf_counter()
    r = ref(model, cubes, dev)
    ref_s = time.perf_counter() - t
    batched_s, b = best_of(lambda: predict_distances(model, cubes, batch_size, "cpu"), 2)
    return {"cubes": int(len(cubes)), "cubes_per_s": len(cubes) / ref_s, "threads": 1,
            "batched_same_cubes_per_s": len(cubes) / batched_s,
            "max_abs_diff_vs_batched": float(np.abs(r - b).max()) if len(cubes) else None,
            "description": "one cube per forward call, result fetched each time, this process, "
                           "1 torch thread; compared with the inference stage on 1 worker (1 thread)"}


def reference_clustering(root: Path, name: str, cfg: PipelineConfig, n: int,
                         rng: np.random.Generator) -> dict:
    """sklearn MeanShift vs ``hierarchical_mean_shift`` on one contiguous patch of kept points."""
    from sklearn.cluster import MeanShift

    from membrain_dist.clustering import hierarchical_mean_shift

    thr = cfg.cluster.score_threshold
    best = None
    for mid in pipeline.membrane_ids(root, name):
        geo = pipeline.read_geometry(root, name, mid)
        sc = pipeline.read_scores(root, name, mid)
        for s in (-1, 1):
            m = (geo["side"] == s) & (sc < thr)
            if best is None or m.sum() > best[0]:
                best = (int(m.sum()), mid, geo["zyx"][m], sc[m])
    if best is None or best[0] < 10:
        return {"skipped": f"fewer than 10 points below the score threshold {thr} (untrained model?)"}
    _, mid, pts, sc = best
    idx = _patch(pts, n, rng)
    pts, sc = pts[idx].astype(np.float64), sc[idx]
    lib_s, cl = best_of(lambda: hierarchical_mean_shift(pts, sc, cfg.cluster), 3)
    t = time.perf_counter()
    ms = MeanShift(bandwidth=cfg.cluster.bandwidth, n_jobs=1).fit(pts)
    ref_s = time.perf_counter() - t
    return {"points": int(len(idx)), "membrane": mid, "library_s": lib_s, "reference_s": ref_s,
            "speedup": ref_s / max(lib_s, 1e-9), "library_clusters": len(cl),
            "reference_clusters": int(len(ms.cluster_centers_)),
            "description": f"sklearn.cluster.MeanShift(bandwidth={cfg.cluster.bandwidth}, flat kernel, "
                           "unweighted, every point a seed, n_jobs=1) vs clustering.hierarchical_mean_shift "
                           "(weighted, re-clustering) on the same contiguous patch of points below the "
                           "score threshold, one side of one membrane, this process, 1 thread"}


# --------------------------------------------------------------------------- end to end
def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("membrain-dist")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "membrain_dist.cli"]


def compute_seconds(record: dict) -> float:
    """Seconds one dask task-stream record spent computing (not transferring or waiting)."""
    return sum(ss["stop"] - ss["start"] for ss in record.get("startstops", ())
               if ss.get("action") == "compute")


#: the id dask or the runner appends to a task's key: a uuid (with dashes) or hex digits
_TASK_ID = re.compile(r"-(?:[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}|[0-9a-f]+)$")


def task_seconds(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Compute seconds and count of the tasks of each kind in dask task-stream ``records``;
    a task's kind is its key without the trailing id (``membrane_task-3f2a...``, or a mapped
    task's ``_pass1_block-<uuid>``)."""
    out: dict[str, dict[str, float]] = {}
    for rec in records:
        kind = _TASK_ID.sub("", str(rec["key"]))
        row = out.setdefault(kind, {"seconds": 0.0, "tasks": 0})
        row["seconds"] = round(row["seconds"] + compute_seconds(rec), 2)
        row["tasks"] += 1
    return out


def run_e2e(manifest: Path, model_dir: Path, run_dir: Path, n_workers: int, keep: bool,
            rotations: int = 1, predict_args: Sequence[str] = ()) -> dict:
    """``membrain-dist predict --scheduler`` against a fresh LocalCluster; wall time and RSS
    (``predict_args``: more options of predict, e.g. ``--refine-margin off``)."""
    import psutil

    from flows.runtime import prefect_api

    e2e = run_dir / "e2e"
    shutil.rmtree(e2e, ignore_errors=True)
    e2e.mkdir(parents=True)
    root, out = e2e / "campaign.zarr", e2e / "pred"
    t_api = time.perf_counter()
    with prefect_api() as url:
        api_s = time.perf_counter() - t_api
        with local_cluster(n_workers) as client:
            addr = client.scheduler.address
            cmd = [*_cli(), "predict", "--manifest", str(manifest), "--model", str(model_dir),
                   "--out", str(out), "--store", str(root), "--scheduler", addr,
                   "--rotations", str(rotations), *predict_args]
            logf = e2e / "predict.log"
            driver_peak = 0
            client.get_task_stream(start=time.time())  # the scheduler records from here on
            t_stream = time.time()
            with open(logf, "w") as fh:
                t0 = time.perf_counter()
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                        env=dict(os.environ, PREFECT_API_URL=url))
                ps = psutil.Process(proc.pid)
                while proc.poll() is None:
                    with contextlib.suppress(psutil.Error):
                        driver_peak = max(driver_peak, ps.memory_info().rss)
                    time.sleep(0.2)
                wall = time.perf_counter() - t0
            rss = client.run(peak_rss_mb)
            tasks = task_seconds(client.get_task_stream(start=t_stream, count=None))
    text = logf.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"predict failed ({proc.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
    from membrain_dist.star import read_particles

    names = [e.name for e in read_manifest(manifest)]
    particles = sum(len(read_particles(out / f"{n}.star")) for n in names)
    res = {"seconds": wall, "seconds_incl_prefect_api_startup": wall + api_s,
           "prefect_api_startup_s": api_s, "n_workers": n_workers, "threads_per_worker": 1,
           "under_600_s": wall < E2E_TARGET_S, "particles": particles,
           "peak_rss_mb_per_worker": sorted(float(v) for v in rss.values()),
           "driverpeak_rss_mb_polled": driver_peak / MB,
           "command": " ".join(cmd), "cli_last_line": text.strip().splitlines()[-1] if text.strip() else "",
           "task_seconds": tasks}
    if not keep:
        shutil.rmtree(e2e, ignore_errors=True)
    return res


# --------------------------------------------------------------------------- profile
_PROFILE_STAGES = {"convert": "convert_entry", "geometry": "geometry_membrane",
                   "inference": "score_membrane", "clustering": "cluster_membrane",
                   "outputs": "write_tomogram_outputs"}


def run_profile(manifest: Path, model_dir: Path, cfg: PipelineConfig, run_dir: Path, top: int = 15) -> dict:
    """The sequential predict of one size under cProfile; top cumulative entries, stage shares."""
    prof_dir = run_dir / "profile"
    shutil.rmtree(prof_dir, ignore_errors=True)
    entries = read_manifest(manifest)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    pipeline.predict_sequential(entries, prof_dir / "campaign.zarr", model_dir, prof_dir / "pred", cfg)
    prof.disable()
    wall = time.perf_counter() - t0
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf).sort_stats("cumulative")
    stats.print_stats(top)
    text = buf.getvalue()
    print(f"\ncProfile of predict_sequential ({wall:.1f} s, 1 thread), top {top} cumulative:")
    print(text[text.find("ncalls") - 2 if "ncalls" in text else 0:].rstrip())
    raw = stats.stats  # type: ignore[attr-defined]
    shares = {}
    for stage, fn in _PROFILE_STAGES.items():
        ct = sum(v[3] for k, v in raw.items() if k[2] == fn and k[0].endswith("pipeline.py"))
        shares[stage] = ct / wall
    entries_top = []
    for k in stats.fcn_list[:top]:  # type: ignore[attr-defined]
        cc, nc, tt, ct, _ = raw[k]
        entries_top.append({"function": f"{Path(k[0]).name}:{k[1]}({k[2]})", "ncalls": nc,
                            "tottime_s": tt, "cumtime_s": ct})
    shutil.rmtree(prof_dir, ignore_errors=True)
    return {"seconds": wall, "stage_share": shares, "top_cumulative": entries_top}


# --------------------------------------------------------------------------- report
def _fmt_rate(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    for div, p in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.2f} {p}{unit}"
    return f"{v:.1f} {unit}"


def print_size_table(tag: str, r: dict) -> None:
    g = r.get("generation", {})
    print(f"\n=== {tag}  ({r['voxels'] * 4 / 1e9:.2f} GB float32, {r['n_membranes']} membranes, "
          f"{r['n_points']:,} points; generation {g.get('seconds', float('nan')):.0f} s, "
          f"peak RSS {g.get('peak_rss_mb', float('nan')):.0f} MB{', reused' if g.get('reused') else ''})")
    head = (f"{'stage':<11}{'workers':>8}{'seconds':>10}{'throughput':>18}{'per core':>16}"
            f"{'per CPU-s':>14}{'CPU share':>10}{'peak RSS/worker MB':>22}")
    print(head)
    print("-" * len(head))
    for stage in STAGES:
        runs = r["stages"][stage]
        for n in sorted(k for k in runs if k.isdigit()):
            d = runs[n]
            unit = "vox/s" if stage == "convert" else ("cubes/s" if stage == "inference" else "pts/s")
            rate = d.get("voxels_per_s") if stage == "convert" else d.get("points_per_s")
            per_core = d.get("voxels_per_s_per_core" if stage == "convert" else "points_per_s_per_core")
            rss = "/".join(f"{x:.0f}" for x in d["peak_rss_mb_per_worker"])
            share = f"{d['cpu_share']:.2f}" if d.get("cpu_share") else "-"
            print(f"{stage:<11}{n:>8}{d['seconds']:>10.2f}{_fmt_rate(rate, unit):>18}"
                  f"{_fmt_rate(per_core, unit):>16}{_fmt_rate(d.get('items_per_cpu_s'), ''):>14}"
                  f"{share:>10}{rss:>22}")
    shares = [r["stages"][s][n]["cpu_share"] for s in ("geometry", "inference")
              for n in ("1", "2") if r["stages"][s].get(n, {}).get("cpu_share")]
    if shares and min(shares) < 0.8:
        print("NOTE: the tasks got less CPU than the workers could use (CPU share = task CPU s / task "
              "wall s; other load on the machine?): throughputs and scaling are pessimistic; "
              "'per CPU-s' is the rate per fully used core")
    sc = {s: r["stages"][s].get("worker_scaling_1_to_2") for s in STAGES}
    print("worker scaling 1 -> 2: " + ", ".join(f"{s} {v:.2f}x" for s, v in sc.items() if v)
          + "   (CPU-share normalised: " + ", ".join(
              f"{s} {r['stages'][s]['worker_scaling_cpu_normalised']:.2f}x" for s in STAGES
              if r["stages"][s].get("worker_scaling_cpu_normalised")) + ")")
    if r.get("kept_fraction") is not None:
        print(f"points below the score threshold (clustering load): {100 * r['kept_fraction']:.1f} %"
              + (f"  WARNING: > {100 * KEPT_WARN:.0f} %: an undertrained model? clustering and E2E "
                 "run their worst case" if r["kept_fraction"] > KEPT_WARN else ""))
    ref = r.get("reference")
    if ref:
        rg, ri, rc = ref["geometry"], ref["inference"], ref["clustering"]
        print(f"reference geometry (v1 loop, 1 core):  {rg['points_per_s']:.1f} pts/s on {rg['points']} pts "
              f"-> library stage {ref['ratios']['geometry_1_core']:.1f}x on 1 core, "
              f"{ref['ratios']['geometry_2_workers']:.1f}x with 2 workers "
              f"(cube corr {rg['corr_with_stored_cubes']:.2f})")
        print(f"reference inference (batch 1, 1 thread): {ri['cubes_per_s']:.1f} cubes/s "
              f"on {ri['cubes']} cubes "
              f"-> library {ref['ratios']['inference_1_core']:.1f}x per core")
        if "speedup" in rc:
            print(f"reference clustering (sklearn MeanShift): {rc['reference_s']:.2f} s vs library "
                  f"{rc['library_s']:.3f} s on {rc['points']} pts -> {rc['speedup']:.1f}x")
        else:
            print(f"reference clustering: skipped ({rc['skipped']})")
    e = r.get("e2e")
    if e:
        ok = "yes" if e["under_600_s"] else "NO"
        print(f"end to end (CLI predict, {e['n_workers']} workers x 1 thread): {e['seconds']:.1f} s "
              f"(< 600 s: {ok}; + {e['prefect_api_startup_s']:.1f} s Prefect API start-up), "
              f"{e['particles']} particles, peak RSS/worker "
              f"{'/'.join(f'{x:.0f}' for x in e['peak_rss_mb_per_worker'])} MB, "
              f"CLI driver {e['driverpeak_rss_mb_polled']:.0f} MB")
        print("share of E2E time (2-worker stage timings): " + ", ".join(
            f"{k} {100 * v:.0f}%" for k, v in e["stage_share"].items()))
    p = r.get("profile")
    if p:
        print(f"sequential profile ({p['seconds']:.1f} s): " + ", ".join(
            f"{k} {100 * v:.0f}%" for k, v in p["stage_share"].items()))


def summarise(doc: dict) -> dict:
    """Cross-size targets of the issue."""
    sizes = doc["sizes"]
    tags = sorted(sizes, key=lambda t: sizes[t]["voxels"])
    peak = {t: max([x for s in STAGES for n in ("1", "2") if n in sizes[t]["stages"][s]
                    for x in sizes[t]["stages"][s][n]["peak_rss_mb_per_worker"]]
                   + list(sizes[t].get("e2e", {}).get("peak_rss_mb_per_worker", [])))
            for t in tags}
    out: dict[str, Any] = {
        "peak_rss_mb_per_worker_by_size": peak,
        "peak_rss_under_3_gb": all(v < RSS_TARGET_MB for v in peak.values()),
    }
    if len(tags) >= 2:
        a, b = tags[0], tags[-1]
        out["peak_rss_growth"] = {"sizes": [a, b], "voxel_ratio": sizes[b]["voxels"] / sizes[a]["voxels"],
                                  "rss_ratio": peak[b] / peak[a]}
    full = size_tag(benchmark_config().shape_zyx)
    e2e = {t: sizes[t]["e2e"]["seconds"] for t in tags if "e2e" in sizes[t]}
    out["e2e_seconds_by_size"] = e2e
    out["e2e_target_size"] = full
    out["e2e_under_600_s_at_target_size"] = (e2e[full] < E2E_TARGET_S) if full in e2e else None
    geo = {t: sizes[t]["reference"]["ratios"]["geometry_1_core"] for t in tags if "reference" in sizes[t]}
    out["geometry_vs_reference_1_core"] = geo
    out["geometry_at_least_50x"] = all(v >= GEOMETRY_TARGET_X for v in geo.values()) if geo else None
    out["cpu_inference_cubes_per_s_per_core"] = {
        t: sizes[t]["stages"]["inference"]["1"]["cubes_per_s_per_core"] for t in tags
        if "1" in sizes[t]["stages"]["inference"]}
    return out


def print_summary(s: dict) -> None:
    print("\n=== targets")
    pk = s["peak_rss_mb_per_worker_by_size"]
    print("peak RSS per worker (max over stages and E2E): "
          + ", ".join(f"{t} {v:.0f} MB" for t, v in pk.items())
          + f"  (< 3 GB: {'yes' if s['peak_rss_under_3_gb'] else 'NO'})")
    if "peak_rss_growth" in s:
        g = s["peak_rss_growth"]
        print(f"  growth {g['sizes'][0]} -> {g['sizes'][1]}: {g['voxel_ratio']:.1f}x voxels, "
              f"{g['rss_ratio']:.2f}x peak RSS")
    e = s["e2e_under_600_s_at_target_size"]
    print(f"E2E at {s['e2e_target_size']}: " + ("not measured in this run" if e is None
                                               else f"{s['e2e_seconds_by_size'][s['e2e_target_size']]:.0f} s "
                                               f"(< 600 s: {'yes' if e else 'NO'})"))
    if s["geometry_vs_reference_1_core"]:
        print("geometry vs naive reference (1 core): " + ", ".join(
            f"{t} {v:.0f}x" for t, v in s["geometry_vs_reference_1_core"].items())
            + f"  (>= 50x: {'yes' if s['geometry_at_least_50x'] else 'NO'})")
    print("CPU inference per core: " + ", ".join(
        f"{t} {v:.0f} cubes/s" for t, v in s["cpu_inference_cubes_per_s_per_core"].items()))


# --------------------------------------------------------------------------- main
def bench_size(shape: tuple[int, int, int], args: argparse.Namespace, model_dir: Path,
               cfg: PipelineConfig, profile: bool) -> dict:
    tag = size_tag(shape)
    manifest, gen = ensure_tomogram(args.work, shape)
    run_dir = args.work / "runs" / tag
    res: dict[str, Any] = {"shape_zyx": list(shape), "generation": gen,
                           "load_average_start": list(os.getloadavg())}
    log.info("%s: stages on 1 and 2 workers", tag)
    res.update(measure_stages(manifest, model_dir, cfg, run_dir, (1, 2), args.repeats,
                              keep_last=not args.skip_reference))
    if not args.skip_reference:
        log.info("%s: naive references", tag)
        root, name = Path(res.pop("store")), read_manifest(manifest)[0].name
        rng = np.random.default_rng(0)
        ref = {"geometry": reference_geometry(root, name, cfg, args.ref_points, args.repeats, rng),
               "inference": reference_inference(root, name, model_dir, args.ref_cubes,
                                                cfg.inference.batch_size),
               "clustering": reference_clustering(root, name, cfg, args.ref_cluster_points, rng)}
        st = res["stages"]
        ref["ratios"] = {
            "geometry_1_core": st["geometry"]["1"]["points_per_s"] / ref["geometry"]["points_per_s"],
            "geometry_2_workers": st["geometry"]["2"]["points_per_s"] / ref["geometry"]["points_per_s"],
            "inference_1_core": st["inference"]["1"]["cubes_per_s_per_core"]
            / ref["inference"]["cubes_per_s"],
            "clustering_same_patch": ref["clustering"].get("speedup"),
        }
        res["reference"] = ref
        if not args.keep_stores:
            shutil.rmtree(run_dir / "w2", ignore_errors=True)
    log.info("%s: end to end (CLI)", tag)
    e2e = run_e2e(manifest, model_dir, run_dir, 2, args.keep_stores, cfg.inference.rotations,
                  predict_options(args))
    stage_s = {k: res["stages"][k]["2"]["seconds"] for k in STAGES}
    e2e["stage_share"] = {**{k: v / e2e["seconds"] for k, v in stage_s.items()},
                          "other (start-up, Prefect, scheduling)":
                              max(0.0, 1 - sum(stage_s.values()) / e2e["seconds"])}
    e2e["points_per_s"] = res["n_points"] / e2e["seconds"]
    res["e2e"] = e2e
    if profile:
        log.info("%s: cProfile of the sequential predict", tag)
        res["profile"] = run_profile(manifest, model_dir, cfg, run_dir)
    res["load_average_end"] = list(os.getloadavg())
    if not args.keep_stores:
        shutil.rmtree(run_dir, ignore_errors=True)
    return res


def predict_options(args: argparse.Namespace) -> list[str]:
    """predict's options given to this benchmark (``--refine-margin``, ``--screen``)."""
    out: list[str] = []
    for opt in ("refine_margin", "screen"):
        if getattr(args, opt, None) is not None:
            out += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
    return out


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:8]))
    ap.add_argument("--sizes", type=parse_size, nargs="+", default=[parse_size(s) for s in DEFAULT_SIZES],
                    help=f"tomogram sizes ZxYxX (default: {' '.join(DEFAULT_SIZES)})", metavar="ZxYxX")
    ap.add_argument("--work", type=Path, default=HERE / "data" / "scale",
                    help="scratch folder: generated data, model, stores (default benchmarks/data/scale)")
    ap.add_argument("--model", type=Path, default=None, help="trained model directory (default: train one)")
    ap.add_argument("--train-epochs", type=int, default=4, help="epochs of the model trained when no --model")
    ap.add_argument("--rotations", type=int, choices=(1, 2, 4, 8), default=4,
                    help="inference passes per cube (predict --rotations; default 4, what "
                         "train stores in new models; 1 gives the earlier figures)")
    ap.add_argument("--refine-margin", default=None, metavar="VOXELS|off",
                    help="end to end: predict --refine-margin (turn cascade; default: predict's)")
    ap.add_argument("--screen", default=None, metavar="VOXELS|off",
                    help="end to end: predict --screen (spatial screen; default: predict's)")
    ap.add_argument("--skip-reference", action="store_true", help="skip the naive references")
    ap.add_argument("--repeats", type=int, default=1, help="stage timings: best of this many passes")
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile the sequential predict of the smallest size")
    ap.add_argument("--ref-points", type=int, default=200, help="points for the geometry reference")
    ap.add_argument("--ref-cubes", type=int, default=256, help="cubes for the inference reference")
    ap.add_argument("--ref-cluster-points", type=int, default=2000,
                    help="kept points for the clustering reference")
    ap.add_argument("--keep-stores", action="store_true", help="keep the Zarr stores and predictions")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    ap.add_argument("--child-generate", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-shape", type=parse_size, help=argparse.SUPPRESS)
    ap.add_argument("--child-seed", type=int, default=SEED, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_generate:
        _generate_child(args.child_generate, args.child_shape, args.child_seed)
        return None

    # as the CLI does for itself and the workers it starts: quiet Prefect task logs
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    import distributed  # noqa: F401  (its import configures its loggers: quiet them after)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("distributed", "membrain_dist", "prefect", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir, model_info = ensure_model(args.work, args.model, args.train_epochs)
    cfg = pipeline.model_pipeline_config(model_dir)
    # stage timings: CPU throughput per core; one pass per cube unless asked (a model may carry
    # rotations=4, the demo's quality setting, at 4x the inference cost)
    cfg = cfg.with_overrides("inference", device="cpu", rotations=args.rotations)
    model_meta = json.loads((model_dir / "model.json").read_text())
    model_info.update(channels=model_meta.get("channels"), cube_size=model_meta.get("cube_size"),
                      fingerprint=pipeline.model_fingerprint(model_dir))
    sizes = sorted(args.sizes, key=lambda s: int(np.prod(s)))
    doc: dict[str, Any] = {
        "benchmark": "scale", "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(), "model": model_info,
        "settings": {"repeats": args.repeats, "threads_per_worker": 1, "worker_counts": [1, 2],
                     "inference_device_stages": "cpu",
                     "inference_batch_size": cfg.inference.batch_size or default_batch_size("cpu"),
                     "inference_rotations": cfg.inference.rotations,
                     "worker_environ": flows_runtime.worker_environ(1),
                     "load_average_start": list(os.getloadavg()),
                     "timing": "wall clock; stages: best of repeats, warm workers; E2E: cold workers"},
        "sizes": {},
    }
    for i, shape in enumerate(sizes):
        tag = size_tag(shape)
        doc["sizes"][tag] = bench_size(shape, args, model_dir, cfg, args.profile and i == 0)
        print_size_table(tag, doc["sizes"][tag])
        doc["summary"] = summarise(doc)
        _write_json(args.out, doc)  # after every size: a long run keeps what it measured
    doc["total_seconds"] = time.perf_counter() - t0
    _write_json(args.out, doc)
    print_summary(doc["summary"])
    print(f"\nwrote {args.out} ({doc['total_seconds']:.0f} s in all)")
    return doc


if __name__ == "__main__":
    main()
