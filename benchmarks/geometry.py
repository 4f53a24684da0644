"""Benchmark of stages 1 + 2 (sampling, voting, sides, extraction) on a synthetic store.

Usage::

    python benchmarks/geometry.py [--shape 128 320 320] [--membranes 10] [--ref-points 300]

Measures, in one run, on the same tomogram, points and normals:
1. ``points_per_s``: sampling + voting + sides + extraction (order 1) of every membrane in one
   process on one core, in memory (the work the issue names), with a per-stage breakdown;
   and the whole stage on the Zarr store (``process_membrane``: chunk reads, cube writes);
2. the naive v1-style reference: the same sampling and voting, then a Python loop with one
   cubic ``map_coordinates`` rotation of a 25^3 crop per point (on a subsample), per point;
3. the speed-up of mapping ``process_membrane`` over the membranes with a dask
   ``LocalCluster`` of 1 vs 2 single-threaded worker processes (tasks get paths and ids),
   workers set up as the CLI's; the median over ``--cluster-rounds`` rounds of 1 then 2
   workers (back to back, so that the machine's drift cancels).

Timings are the best of ``--repeats`` runs (the machine may be shared: the load average is
recorded). Prints a table and writes ``benchmarks/results/geometry.json``.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # as the CLI: no INFO chatter

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cloudpickle  # noqa: E402
import common  # noqa: E402
import numpy as np  # noqa: E402
from common import best_of, peak_rss_mb  # noqa: E402
from scipy.ndimage import binary_dilation  # noqa: E402

from membrain_dist import store  # noqa: E402
from membrain_dist.extraction import (  # noqa: E402
    Intensity,
    _margin,
    _reference_extract_loop,
    _sample_coords,
    extract_cubes,
    rotation_frames,
)
from membrain_dist.geometry import GeometryConfig, process_membrane  # noqa: E402
from membrain_dist.normals import vote_normals  # noqa: E402
from membrain_dist.sampling import sample_membrane  # noqa: E402
from membrain_dist.sides import assign_sides, enclosed_volume  # noqa: E402

cloudpickle.register_pickle_by_value(common)  # workers need not import benchmarks/

log = logging.getLogger("benchmarks.geometry")
NAME = "bench"


def build_store(root: Path, shape: tuple[int, int, int], n_membranes: int, seed: int = 0) -> dict:
    """Synthetic tomogram: vesicles (radius 18-40) and tilted sheets, noise; labels 1..M."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for mid in range(1, n_membranes + 1):
        for _ in range(200):
            if mid % 3 == 0:  # tilted sheet patch (disc) of radius 40-70
                rad = float(rng.uniform(40, 70))
                half = np.array([12, rad, rad])
            else:
                rad = float(rng.uniform(18, 40))
                half = np.full(3, rad + 3)
            lo = np.ceil(half).astype(int) + 2
            hi = np.array(shape) - lo
            if np.any(hi <= lo):
                continue
            c = rng.uniform(lo, hi)
            sl = tuple(slice(max(int(a), 0), min(int(b), n)) for a, b, n in
                       zip(np.floor(c - half - 10), np.ceil(c + half + 11), shape, strict=True))
            g = np.indices(tuple(s.stop - s.start for s in sl), dtype=np.float32)
            g += np.array([s.start for s in sl], np.float32)[:, None, None, None]
            d = g - c.astype(np.float32)[:, None, None, None]
            if mid % 3 == 0:
                nrm = np.array([1.0, *rng.normal(scale=0.25, size=2)], np.float32)
                nrm /= np.linalg.norm(nrm)
                h = np.einsum("a,azyx->zyx", nrm, d)
                lat = np.sqrt(np.maximum((d * d).sum(0) - h * h, 0))
                shell = (np.abs(h) < 2) & (lat < rad)
            else:
                r = np.sqrt((d * d).sum(0))
                shell = (r >= rad - 2) & (r < rad + 2)
            region = labels[sl]
            if np.any(region[binary_dilation(shell, iterations=8)] > 0):
                continue  # keep a gap of 8 voxels to other membranes: try another place
            region[shell] = mid
            break
    tomo = rng.normal(size=shape).astype(np.float32)
    tomo -= 2.0 * (labels > 0)
    grp = store.open_store(root).require_group(NAME)
    store.write_array_atomic(root, f"{NAME}/{store.TOMOGRAM_KEY}", tomo, (128, 128, 128))
    store.write_array_atomic(root, f"{NAME}/{store.LABELS_KEY}", labels, (128, 128, 128))
    membranes = []
    for mid in range(1, n_membranes + 1):
        nz = np.nonzero(labels == mid)
        if nz[0].size == 0:
            continue
        bbox = [int(f(a)) + d for a in nz for f, d in ((np.min, 0), (np.max, 1))]
        membranes.append({"id": mid, "voxels": int(nz[0].size), "bbox": bbox})
    meta = store.TomogramMeta(NAME, 10.0, shape, (128, 128, 128), source={"synthetic": seed},
                              intensity={"center": 0.0, "scale": 1.0, "polarity": -1.0},
                              membranes=membranes)
    grp.attrs.update(meta.to_attrs())
    return {"labels": labels, "tomo": tomo, "membranes": membranes}


def _extract_map_coordinates(tomo: np.ndarray, pts: np.ndarray, nrm: np.ndarray,
                             intensity: Intensity, batch_size: int = 2048) -> np.ndarray:
    """The previous order-1 path (one float64-internal ``map_coordinates`` call per batch)."""
    from scipy import ndimage

    from membrain_dist.extraction import normalise_intensity

    out = np.empty((len(pts), 12, 12, 12), np.float32)
    shape = np.asarray(tomo.shape)
    for st in range(0, len(pts), batch_size):
        p = pts[st : st + batch_size]
        lo = np.clip(np.floor(p.min(0)).astype(np.int64) - _margin(12, 1), 0, shape - 1)
        hi = np.clip(np.ceil(p.max(0)).astype(np.int64) + _margin(12, 1) + 1, lo + 1, shape)
        block = normalise_intensity(tomo[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))],
                                    intensity)
        c = _sample_coords(p - lo.astype(np.float32), rotation_frames(nrm[st : st + batch_size]), 12)
        out[st : st + len(p)] = ndimage.map_coordinates(
            block, c.reshape(3, -1), order=1, mode="nearest", prefilter=False, output=np.float32,
        ).reshape(len(p), 12, 12, 12)
    return out


def _warm() -> int:
    """Imports and first-call costs of a worker, paid before the timed map."""
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(32, 32, 32)).astype(np.float32)
    pts = rng.uniform(8, 24, size=(64, 3)).astype(np.float32)
    nrm = rng.normal(size=(64, 3)).astype(np.float32)
    extract_cubes(vol, pts, nrm / np.linalg.norm(nrm, axis=1, keepdims=True))
    vote_normals(pts, nrm, np.ones(64, np.float32))
    return os.getpid()


def _clear(root: Path) -> None:
    shutil.rmtree(root / NAME / store.GEOMETRY_KEY, ignore_errors=True)


def _timed_task(root: str, name: str, mid: int, cfg: GeometryConfig) -> tuple[int, float, float]:
    """process_membrane plus its CPU and wall seconds (CPU time exposes core contention)."""
    c, w = time.process_time(), time.perf_counter()
    n = process_membrane(root, name, mid, cfg)
    return n, time.process_time() - c, time.perf_counter() - w


def _cluster_round(root: Path, ids: list[int], cfg: GeometryConfig, n_workers: int) -> dict:
    """One timed map of process_membrane over ``ids`` (largest first) on a fresh LocalCluster
    of ``n_workers`` single-threaded processes, set up as the CLI's (after a warm-up)."""
    import dask
    from distributed import Client, LocalCluster

    from flows.runtime import spawn_environment

    # the workers' environment and dask config of flows.runtime (one BLAS/OpenMP thread, heap
    # tuning, no stack sampler); one task at a time per worker so the largest-first order is
    # kept (greedy packing)
    with spawn_environment(1), \
            dask.config.set({"distributed.scheduler.worker-saturation": 1.0}), \
            LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                         dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(_warm)
        _clear(root)
        t0 = time.perf_counter()
        futs = [client.submit(_timed_task, str(root), NAME, mid, cfg, pure=False,
                              priority=len(ids) - i) for i, mid in enumerate(ids)]
        res = client.gather(futs)
        dt = time.perf_counter() - t0
        rss = client.run(peak_rss_mb)
    cpu = sum(r[1] for r in res)
    task_wall = sum(r[2] for r in res)
    n = sum(r[0] for r in res)
    return {"n_workers": n_workers, "seconds": dt, "points": int(n), "points_per_s": n / dt,
            "task_cpu_s": cpu, "task_wall_s": task_wall,
            # CPU share a task got while running: < 1 means the cores were shared with others
            "cpu_share": cpu / task_wall,
            "peak_rss_mb_per_worker": sorted(float(v) for v in rss.values())}


def run_clusters(root: Path, ids: list[int], cfg: GeometryConfig, rounds: int) -> list[dict]:
    """``rounds`` rounds of timed maps, each a 1-worker then a 2-worker map: ``[{1: .., 2: ..}]``.

    The machine's speed drifts by +-10 % over tens of seconds (a shared VM): a round's two maps
    run back to back, so their ratio compares like with like.
    """
    return [{n: _cluster_round(root, ids, cfg, n) for n in (1, 2)} for _ in range(max(1, rounds))]


def scaling_summary(rounds: list[dict]) -> dict:
    """Worker scaling from the rounds of :func:`run_clusters`: the median over rounds of the
    2-worker over the 1-worker throughput (headline), the best of each, and the runs."""
    ratios = [r[2]["points_per_s"] / r[1]["points_per_s"] for r in rounds]
    # CPU-share normalised: what 2 workers give when each gets a whole core
    norm = [x * r[1]["cpu_share"] / r[2]["cpu_share"] for x, r in zip(ratios, rounds, strict=True)]
    best = {n: min((r[n] for r in rounds), key=lambda x: x["seconds"]) for n in (1, 2)}
    return {
        "worker_scaling": float(np.median(ratios)),
        "worker_scaling_description": (
            "median over rounds of (2-worker points/s) / (1-worker points/s); a round is a "
            "1-worker then a 2-worker map of process_membrane over all membranes, each on a "
            "fresh LocalCluster set up as the CLI's (flows.runtime.spawn_environment)"),
        "worker_scaling_per_round": ratios,
        "worker_scaling_best_of_each": best[2]["points_per_s"] / best[1]["points_per_s"],
        "worker_scaling_cpu_normalised": float(np.median(norm)),
        "peak_rss_mb_per_worker_max": max(max(r[n]["peak_rss_mb_per_worker"])
                                          for r in rounds for n in (1, 2)),
        "cluster_rounds": [[r[1], r[2]] for r in rounds],
        "cluster_runs": [best[1], best[2]],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[128, 320, 320])
    ap.add_argument("--membranes", type=int, default=10)
    ap.add_argument("--ref-points", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3, help="timings: best of this many runs")
    ap.add_argument("--cluster-rounds", type=int, default=7,
                    help="rounds of a 1-worker then a 2-worker timed map (scaling: median)")
    ap.add_argument("--no-cluster", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "geometry.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    logging.getLogger("membrain_dist").setLevel(logging.WARNING)

    tmp = Path(tempfile.mkdtemp(prefix="bench_geometry_"))
    root = tmp / "campaign.zarr"
    try:
        t = time.perf_counter()
        data = build_store(root, tuple(args.shape), args.membranes)
        ids = [m["id"] for m in sorted(data["membranes"], key=lambda m: -m["voxels"])]
        log.info("store: %s, %d membranes, built in %.1f s", args.shape, len(ids),
                 time.perf_counter() - t)
        cfg = GeometryConfig()

        load_start = list(os.getloadavg())
        # 1. one core, whole stage on the store (reads, writes, compression included)
        def stage() -> int:
            _clear(root)
            return sum(process_membrane(root, NAME, mid, cfg) for mid in ids)

        stage_s, n_points = best_of(stage, args.repeats)
        # per-stage breakdown on the pure functions (in memory)
        labels, tomo = data["labels"], data["tomo"]
        br = {"sampling": 0.0, "voting": 0.0, "sides": 0.0, "extraction_order1": 0.0,
              "extraction_order1_map_coordinates": 0.0, "extraction_order3": 0.0}
        n_bd = 0
        pts_all, nrm_all = [], []
        inten = Intensity(0, 1, -1)
        for m in data["membranes"]:
            dt, sp = best_of(lambda m=m: sample_membrane(labels.__getitem__, m["id"], m["bbox"],
                                                       labels.shape), args.repeats)
            br["sampling"] += dt
            dt, nv = best_of(lambda sp=sp: vote_normals(sp.zyx, sp.raw_normal, sp.weight),
                           args.repeats)
            br["voting"] += dt
            br["sides"] += best_of(lambda sp=sp, nv=nv: assign_sides(
                sp.zyx, nv, cavity=enclosed_volume(sp.coarse_mask),
                cavity_origin=sp.coarse_origin, cavity_factor=sp.coarse_factor,
                neighbours=cfg.orient_neighbours), args.repeats)[0]
            br["extraction_order1"] += best_of(
                lambda sp=sp, nv=nv: extract_cubes(tomo, sp.zyx, nv, intensity=inten),
                args.repeats)[0]
            br["extraction_order1_map_coordinates"] += best_of(
                lambda sp=sp, nv=nv: _extract_map_coordinates(tomo, sp.zyx, nv, inten),
                args.repeats)[0]
            t = time.perf_counter()  # slow, once
            extract_cubes(tomo, sp.zyx, nv, order=3, intensity=inten)
            br["extraction_order3"] += time.perf_counter() - t
            n_bd += len(sp)
            pts_all.append(sp.zyx)
            nrm_all.append(nv)
        pts = np.concatenate(pts_all)
        nrm = np.concatenate(nrm_all)

        # 2. naive reference on a subsample (per point)
        rng = np.random.default_rng(1)
        sub = rng.choice(len(pts), size=min(args.ref_points, len(pts)), replace=False)
        norm_tomo = np.clip(-tomo, -3, 3)
        # per point: the loop's one-off setup (edge-padding the whole tomogram) is timed with
        # zero points and subtracted, so the reference is not charged for it
        ref_setup_s, _ = best_of(lambda: _reference_extract_loop(norm_tomo, pts[:0], nrm[:0]),
                               args.repeats)
        ref_total_s, _ = best_of(lambda: _reference_extract_loop(norm_tomo, pts[sub], nrm[sub]),
                               args.repeats)
        ref_loop_pps = len(sub) / max(ref_total_s - ref_setup_s, 1e-9)
        # the reference samples and votes exactly as we do (shared code), then loops
        shared_s = br["sampling"] + br["voting"]
        ref_pps = 1.0 / (shared_s / n_bd + 1.0 / ref_loop_pps)
        ours_s = shared_s + br["sides"] + br["extraction_order1"]
        ours_pps = n_bd / ours_s

        result = {
            "shape_zyx": list(args.shape),
            "n_membranes": len(ids),
            "n_points": int(n_points),
            "cube_size": cfg.cube_size,
            "order": cfg.order,
            "points_per_s": ours_pps,
            "points_per_s_description": (
                "sampling + voting + sides + order-1 extraction of all membranes, one process, "
                "one core, in memory (sum of the per-stage best-of-repeats times)"),
            "stage_on_store_seconds": stage_s,
            "stage_on_store_points_per_s": n_points / stage_s,
            "breakdown_points_per_s": {k: n_bd / v for k, v in br.items()},
            "pipeline_in_memory_order3_points_per_s": n_bd / (shared_s + br["sides"]
                                                              + br["extraction_order3"]),
            "reference_points_per_s": ref_pps,
            "reference_loop_points_per_s": ref_loop_pps,
            "reference_points": int(len(sub)),
            "reference_description": (
                "v1 style: the same sampling and voting (shared code, timed above), then a "
                "Python loop over points on the same tomogram (pre-normalised): per point a 25^3 "
                "crop around the rounded point is rotated by one cubic-spline "
                "scipy.ndimage.map_coordinates call (prefilter on, mode nearest) and "
                "centre-cropped to 12^3; loop timed on a subsample, best of repeats; the one-off "
                "edge padding of the tomogram (reference_setup_s) is excluded"),
            "reference_setup_s": ref_setup_s,
            "reference_total_s_incl_setup": ref_total_s,
            "repeats": args.repeats,
            "timing": "best of repeats (wall clock), one process, BLAS/OpenMP threads = 1",
            "speedup_vs_reference": ours_pps / ref_pps,
            "speedup_vs_reference_stage_on_store": (n_points / stage_s) / ref_pps,
            "speedup_vs_reference_order3": (n_bd / (shared_s + br["sides"]
                                                    + br["extraction_order3"])) / ref_pps,
            "peak_rss_mb_main": peak_rss_mb(),
            "cpu_count": os.cpu_count(),
            "load_average_at_start": load_start,
            "load_average_after_single_core": list(os.getloadavg()),
        }
        if not args.no_cluster:
            result.update(scaling_summary(run_clusters(root, ids, cfg, args.cluster_rounds)))
            result["load_average_at_end"] = list(os.getloadavg())

        rows = [
            ("points", f"{n_points}"),
            ("sampling+voting+sides+extraction, 1 core (points/s)", f"{ours_pps:.0f}"),
            *((f"  {k} alone (points/s)", f"{v:.0f}")
              for k, v in result["breakdown_points_per_s"].items()),
            ("whole stage on the store, 1 core (points/s)",
             f"{result['stage_on_store_points_per_s']:.0f}"),
            ("reference: same sampling+voting, v1 loop (points/s)",
             f"{ref_pps:.1f} (loop alone {ref_loop_pps:.1f})"),
            ("speed-up vs reference (order 1)", f"{result['speedup_vs_reference']:.1f}x"),
            ("speed-up vs reference (whole stage on the store)",
             f"{result['speedup_vs_reference_stage_on_store']:.1f}x"),
            ("speed-up vs reference (in memory, order 3)",
             f"{result['speedup_vs_reference_order3']:.1f}x"),
        ]
        if "worker_scaling" in result:
            for r in result["cluster_runs"]:
                rows.append((f"dask {r['n_workers']} worker(s), best round (points/s)",
                             f"{r['points_per_s']:.0f}  CPU share {r['cpu_share']:.2f}"))
            rows.append(("peak RSS per worker, all rounds",
                         f"{result['peak_rss_mb_per_worker_max']:.0f} MB"))
            rows.append(("worker scaling 1 -> 2 (median of rounds)",
                         f"{result['worker_scaling']:.2f}x  (rounds: "
                         f"{', '.join(f'{x:.2f}' for x in result['worker_scaling_per_round'])})"))
            rows.append(("  best of each", f"{result['worker_scaling_best_of_each']:.2f}x"))
            rows.append(("  CPU-share normalised",
                         f"{result['worker_scaling_cpu_normalised']:.2f}x"))
        w = max(len(a) for a, _ in rows)
        print("\n".join(f"{a:<{w}}  {b}" for a, b in rows))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
