"""Campaign throughput: streaming vs stage-by-stage prediction, store size, per-task overhead.

Usage::

    python benchmarks/campaign.py                       # all three parts
    python benchmarks/campaign.py --tomos 12 --tiny 0   # (a) and (b) only
    python benchmarks/campaign.py --rotations 1         # one scoring pass per cube
    python benchmarks/campaign.py --refine-margin off   # 4 turns for every cube (no cascade)
    python benchmarks/campaign.py --screen off          # every point scored (no spatial screen)
    python benchmarks/campaign.py --precision bfloat16  # the CNN in bfloat16

In one run, each part on a fresh store:

(a) **Streaming vs stage by stage**, ``--tomos`` (>= 12) small synthetic tomograms (default
    phantom, 80 x 160 x 160) on one scheduler with **1 CPU worker + 1 inference worker**
    (a real ``dask worker`` process started with ``--resources GPU=1``, on the CPU here):
    the earlier flow (``Schedule(mode="stages", keep_cubes=True)``: every stage for every
    tomogram, cubes written to the store and read back) and the streaming flow with cubes cut
    on the CPU worker (handed to the inference worker in memory) and with cubes cut on the
    inference worker. Wall time of each, and each worker's busy fraction (the dask task
    stream's compute time / wall time). Target: streaming <= 0.65 x stage by stage. Small
    membranes share their tasks in every flow (``Schedule.group_voxels``); ``--per-membrane``
    adds the stage-by-stage flow and the streaming flow (cut on the inference worker) with
    one task per membrane and stage, as the flows ran before the groups.
(b) **Store size** after each run of (a), over the bytes of its tomogram and label arrays
    (all pyramid levels). Target: <= 1.3 x without ``--keep-cubes``.
(c) **Per-task overhead**, ``--tiny`` (>= 200) tiny tomograms (32 x 64 x 64, one membrane):
    the streaming flow on a 2-worker LocalCluster against the same stage functions called in
    this process without dask or Prefect (``pipeline.predict_sequential``: the compute the
    tasks hold). Per task: (wall x workers - compute) / tasks; and the campaign's wall time
    over its compute.
(d) ``--e2e 300x1000x1000``: ``membrain-dist predict`` end to end on one large synthetic
    tomogram (``benchmarks/scale.py``'s tomogram and E2E runner), 2 workers x 1 thread: wall
    time and peak RSS per worker.

The model is the one ``benchmarks/scale.py`` trains once and caches (``--work``), or
``--model``. Prints a table and writes ``benchmarks/results/campaign.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import scale  # noqa: E402  (benchmarks/scale.py: the cached model)

from flows.runtime import ClusterSpec, prefect_api, spawn_environment  # noqa: E402
from flows.stream import Schedule  # noqa: E402
from membrain_dist import pipeline  # noqa: E402
from membrain_dist.cli import _refine_margin, _screen  # noqa: E402  (predict's options)
from membrain_dist.config import PRECISIONS, InferenceConfig  # noqa: E402
from membrain_dist.inference import resolve_precision  # noqa: E402
from membrain_dist.manifest import read_manifest, write_manifest  # noqa: E402
from membrain_dist.star import read_particles  # noqa: E402
from membrain_dist.synth import SynthConfig, generate_campaign  # noqa: E402

log = logging.getLogger("benchmarks.campaign")

STREAM_TARGET = 0.65
STORE_TARGET = 1.3
MODEL_EPOCHS = 4  # as benchmarks/scale.py trains it (throughput does not depend on the weights)
SMALL = SynthConfig()  # 80 x 160 x 160, 4 membranes
TINY = SynthConfig(shape_zyx=(32, 64, 64), n_membranes=1, keep_density=False)


# --------------------------------------------------------------------------- clusters
def _wait_workers(client: Any, n: int, proc: subprocess.Popen | None = None,
                  timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while len(client.scheduler_info()["workers"]) < n:
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            raise RuntimeError(f"only {len(client.scheduler_info()['workers'])} of {n} workers")
        time.sleep(0.2)


@contextlib.contextmanager
def cpu_and_inference_worker(work: Path) -> Iterator[tuple[Any, str]]:
    """A scheduler with one plain worker and one ``--resources GPU=1`` worker (1 thread each,
    the environment the CLI's workers get); yields ``(client, inference worker address)``."""
    from distributed import Client, LocalCluster

    with spawn_environment(1) as env, LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
            memory_limit="8GiB") as cluster, Client(cluster) as client:
        logf = (work / "inference-worker.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
             "--nthreads", "1", "--nworkers", "1", "--resources", "GPU=1",
             "--memory-limit", "8GiB", "--no-dashboard"],
            stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **env})
        try:
            _wait_workers(client, 2, proc)
            client.get_task_stream()  # the scheduler records tasks from its first call on
            gpu = next(a for a, w in client.scheduler_info()["workers"].items()
                       if w["resources"].get("GPU"))
            yield client, gpu
        finally:
            proc.terminate()
            proc.wait(30)
            logf.close()


def busy_fractions(client: Any, t0: float, wall: float) -> dict[str, float]:
    """Compute seconds of each worker since ``t0`` (epoch seconds) over ``wall``."""
    busy: dict[str, float] = {a: 0.0 for a in client.scheduler_info()["workers"]}
    for rec in client.get_task_stream(start=t0, count=None):
        busy[rec["worker"]] = busy.get(rec["worker"], 0.0) + scale.compute_seconds(rec)
    return {a: round(b / wall, 3) for a, b in busy.items()}


# --------------------------------------------------------------------------- sizes
def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def store_sizes(store: Path) -> dict[str, int]:
    """Bytes of the whole store, of its tomogram arrays (``<name>/<level>``) and its label
    arrays (``<name>/labels``), and of cubes (``.../cubes``)."""
    total, tomo, labels, cubes = _bytes(store), 0, 0, 0
    for t in (d for d in store.iterdir() if d.is_dir()):
        for d in t.iterdir():
            if d.is_dir() and d.name.isdigit():
                tomo += _bytes(d)
            elif d.is_dir() and d.name == "labels":
                labels += _bytes(d)
    for c in store.glob("*/geometry/m*/cubes"):
        cubes += _bytes(c)
    return {"store": total, "tomogram_arrays": tomo, "label_arrays": labels, "cubes": cubes}


# --------------------------------------------------------------------------- runs
def run_flow(manifest: Path, model_dir: Path, run_dir: Path, cluster: ClusterSpec,
             schedule: Schedule, cfg: Any) -> tuple[float, Any]:
    from flows.predict import predict_campaign

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    t = time.perf_counter()
    result = predict_campaign(str(manifest), str(model_dir), str(run_dir / "pred"),
                              str(run_dir / "store.zarr"), cfg, cluster, schedule)
    wall = time.perf_counter() - t
    if result.failures:
        raise RuntimeError(f"failures: {result.failures}")
    return wall, result


def _picks(pred: Path) -> dict[str, np.ndarray]:
    """Per tomogram STAR: coordinates, angles, membrane and side of every pick, sorted."""
    cols = ["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ", "rlnAngleRot",
            "rlnAngleTilt", "rlnAnglePsi", "mbMembrane", "mbSide"]
    out = {}
    for path in sorted(pred.glob("*.star")):
        if path.name in (pipeline.CAMPAIGN_STAR, pipeline.TOMOGRAMS_STAR):
            continue
        df = read_particles(path)
        a = df[cols].to_numpy(np.float64) if len(df) else np.zeros((0, len(cols)))
        out[path.name] = a[np.lexsort(a[:, :3].T[::-1])] if len(a) else a
    return out


def same_picks(a: Path, b: Path, atol: float = 1e-3) -> bool:
    """Whether two prediction folders hold the same picks (STAR files, up to ``atol``)."""
    pa, pb = _picks(a), _picks(b)
    return pa.keys() == pb.keys() and all(
        pa[k].shape == pb[k].shape and np.allclose(pa[k], pb[k], atol=atol) for k in pa)


VARIANTS = {
    "stages": Schedule(mode="stages", keep_cubes=True),
    "stream_cut_cpu": Schedule(cut_on="cpu"),
    "stream_cut_inference": Schedule(cut_on="inference"),
}
PER_MEMBRANE = {  # one task per membrane and stage (no membrane groups)
    "stages_per_membrane": Schedule(mode="stages", keep_cubes=True, group_voxels=0),
    "stream_per_membrane": Schedule(cut_on="inference", group_voxels=0),
}


def part_a(manifest: Path, model_dir: Path, work: Path, cfg: Any,
           per_membrane: bool = False) -> dict:
    variants = {**VARIANTS, **(PER_MEMBRANE if per_membrane else {})}
    out: dict[str, Any] = {}
    with cpu_and_inference_worker(work) as (client, gpu):
        spec = ClusterSpec(kind="address", address=client.scheduler.address, gpu_resource=True)
        # warm both workers (imports, model load) on two tomograms before any timed run
        warm = work / "warm_manifest.csv"
        write_manifest(read_manifest(manifest)[:2], warm)
        run_flow(warm, model_dir, work / "warm", spec, Schedule(window=1), cfg)
        for name, sched in variants.items():
            t0 = time.time()
            wall, _ = run_flow(manifest, model_dir, work / name, spec, sched, cfg)
            busy = busy_fractions(client, t0, wall)
            sizes = store_sizes(work / name / "store.zarr")
            arrays = sizes["tomogram_arrays"] + sizes["label_arrays"]
            out[name] = {"wall_s": round(wall, 2),
                         "busy": {"cpu_worker": sum(v for a, v in busy.items() if a != gpu),
                                  "inference_worker": busy.get(gpu, 0.0)},
                         "store_bytes": sizes, "store_over_arrays": round(sizes["store"] / arrays, 3)}
            log.info("%s: %.1f s, busy %s, store %.2f x arrays", name, wall, out[name]["busy"],
                     out[name]["store_over_arrays"])
    out["same_stars"] = all(same_picks(work / "stages" / "pred", work / n / "pred")
                            for n in variants)
    best = min(out["stream_cut_cpu"]["wall_s"], out["stream_cut_inference"]["wall_s"])
    out["stream_over_stages"] = round(best / out["stages"]["wall_s"], 3)
    if per_membrane:
        out["per_membrane_stream_over_stages"] = round(
            out["stream_per_membrane"]["wall_s"] / out["stages_per_membrane"]["wall_s"], 3)
    return out


def part_c(manifest: Path, model_dir: Path, work: Path, cfg: Any) -> dict:
    from distributed import Client, LocalCluster

    entries = read_manifest(manifest)
    with spawn_environment(1) as _, LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
            memory_limit="4GiB") as cluster, Client(cluster):
        spec = ClusterSpec(kind="address", address=cluster.scheduler_address)
        # warm the workers (imports, model load) on a few tomograms first
        warm = work / "tiny_warm_manifest.csv"
        write_manifest(entries[:4], warm)
        run_flow(warm, model_dir, work / "tiny_warm", spec, Schedule(), cfg)
        wall, _ = run_flow(manifest, model_dir, work / "tiny_stream", spec, Schedule(), cfg)
    seq_dir = work / "tiny_sequential"
    shutil.rmtree(seq_dir, ignore_errors=True)
    t = time.perf_counter()
    pipeline.predict_sequential(entries, seq_dir / "store.zarr", model_dir, seq_dir / "pred", cfg)
    compute = time.perf_counter() - t
    ids = {e.name: pipeline.membrane_ids(seq_dir / "store.zarr", e.name) for e in entries}
    membranes = sum(len(v) for v in ids.values())
    groups = sum(len(pipeline.membrane_groups(seq_dir / "store.zarr", n, v)) for n, v in ids.items())
    tasks = 2 * len(entries) + groups  # convert + outputs, one task per membrane group
    return {"tomograms": len(entries), "membranes": membranes, "tasks": tasks,
            "wall_s": round(wall, 2), "compute_s": round(compute, 2), "workers": 2,
            "overhead_per_task_s": round((wall * 2 - compute) / tasks, 4),
            "wall_over_compute": round(wall / compute, 3),
            "same_stars": same_picks(work / "tiny_stream" / "pred", seq_dir / "pred")}


def part_d(shape: tuple[int, int, int], work: Path, model_dir: Path, rotations: int) -> dict:
    """``membrain-dist predict`` end to end on one large tomogram, 2 workers (scale.run_e2e)."""
    manifest, gen = scale.ensure_tomogram(work, shape)
    e2e = scale.run_e2e(manifest, model_dir, work / "runs" / scale.size_tag(shape), 2, False,
                        rotations)
    return {"shape_zyx": list(shape), "rotations": rotations, "seconds": round(e2e["seconds"], 1),
            "peak_rss_mb_per_worker": e2e["peak_rss_mb_per_worker"],
            "driver_peak_rss_mb": round(e2e["driverpeak_rss_mb_polled"]),
            "particles": e2e["particles"], "command": e2e["command"], "generation": gen,
            "task_seconds": e2e["task_seconds"]}


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tomos", type=int, default=12, help="small tomograms of part (a)")
    ap.add_argument("--tiny", type=int, default=200, help="tiny tomograms of part (c); 0: skip")
    ap.add_argument("--rotations", type=int, choices=(1, 2, 4, 8), default=4)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--refine-margin", type=_refine_margin, default=1.0, metavar="VOXELS|off",
                    help="turn cascade margin of the scoring (InferenceConfig.refine_margin; "
                         "off: every cube at every turn)")
    ap.add_argument("--screen", type=_screen, default=InferenceConfig().screen,
                    metavar="VOXELS|off",
                    help="spatial screen cell of the scoring (InferenceConfig.screen; "
                         f"default {InferenceConfig().screen}; off: every point scored)")
    ap.add_argument("--precision", choices=PRECISIONS, default=InferenceConfig().precision,
                    help="arithmetic of the CNN (InferenceConfig.precision; default "
                         f"{InferenceConfig().precision})")
    ap.add_argument("--e2e", type=scale.parse_size, nargs="*", default=[],
                    help="also time `membrain-dist predict` end to end on these sizes (ZxYxX, "
                         "e.g. 300x1000x1000), 2 workers x 1 thread (part d)")
    ap.add_argument("--e2e-rotations", type=int, choices=(1, 2, 4, 8), default=1,
                    help="scoring passes of part (d) (default 1)")
    ap.add_argument("--skip-a", action="store_true", help="skip parts (a) and (b)")
    ap.add_argument("--per-membrane", action="store_true",
                    help="part (a) also with one task per membrane and stage (no groups)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/membrain-bench-campaign"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "campaign.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("distributed", "prefect", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    model_dir, model_info = scale.ensure_model(args.work, args.model, MODEL_EPOCHS)
    cfg = pipeline.model_pipeline_config(model_dir)
    margin = args.refine_margin
    cfg = replace(cfg, inference=replace(cfg.inference, rotations=args.rotations,
                                         refine_margin=margin, screen=args.screen,
                                         precision=args.precision))
    doc: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                           "model": model_info, "rotations": args.rotations,
                           "refine_margin": margin, "screen": args.screen,
                           "precision": args.precision,
                           # what auto gives on this machine's CPU (the inference worker's)
                           "precision_on_cpu": str(resolve_precision(args.precision, "cpu"))
                           .removeprefix("torch.")}
    small = args.work / f"small_{args.tomos}"
    if not args.skip_a and not (small / "manifest.csv").is_file():
        generate_campaign(small, n_tomos=args.tomos, seed=31, cfg=SMALL, n_train=0)
    with prefect_api():
        if not args.skip_a:
            doc["a_stream_vs_stages"] = part_a(small / "manifest.csv", model_dir, args.work, cfg,
                                               args.per_membrane)
        if args.tiny:
            tiny = args.work / f"tiny_{args.tiny}"
            if not (tiny / "manifest.csv").is_file():
                generate_campaign(tiny, n_tomos=args.tiny, seed=32, cfg=TINY, n_train=0)
            doc["c_tiny"] = part_c(tiny / "manifest.csv", model_dir, args.work, cfg)
    if args.e2e:  # outside the API above: run_e2e starts its own, as the CLI would find one
        doc["d_e2e"] = [part_d(shape, args.work, model_dir, args.e2e_rotations)
                        for shape in args.e2e]
    doc["seconds"] = round(time.perf_counter() - t_all, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    report(doc)
    print(f"wrote {args.out} ({doc['seconds']:.0f} s in all)")
    return doc


def report(doc: dict) -> None:
    if "a_stream_vs_stages" in doc:
        report_a(doc)
    if "c_tiny" in doc:
        c = doc["c_tiny"]
        print(f"(c) {c['tomograms']} tiny tomograms, {c['tasks']} tasks on 2 workers: wall "
              f"{c['wall_s']:.1f} s, compute {c['compute_s']:.1f} s, overhead per task "
              f"{c['overhead_per_task_s'] * 1000:.0f} ms, wall / compute "
              f"{c['wall_over_compute']:.2f}; same STARs as sequential: {c['same_stars']}")
    for d in doc.get("d_e2e", []):
        print(f"(d) predict end to end, {scale.size_tag(d['shape_zyx'])}, {d['rotations']} "
              f"scoring pass(es), 2 workers: {d['seconds']:.1f} s, peak RSS per worker "
              f"{'/'.join(f'{x:.0f}' for x in d['peak_rss_mb_per_worker'])} MB, "
              f"{d['particles']} particles")
        print("    task time by kind: " + ", ".join(
            f"{k} {v['seconds']:.1f} s ({v['tasks']} tasks)"
            for k, v in sorted(d.get("task_seconds", {}).items())))


def report_a(doc: dict) -> None:
    a = doc["a_stream_vs_stages"]
    margin = doc.get("refine_margin")
    cascade = "" if doc["rotations"] == 1 else (
        "; every turn for every cube" if margin is None else f"; turn cascade, margin {margin}")
    if doc.get("screen"):
        cascade += f"; spatial screen, {doc['screen']} voxels"
    print(f"\n(a) {doc['rotations']} scoring passes{cascade}; 1 CPU worker + 1 inference worker")
    print(f"{'flow':24s} {'wall s':>8s} {'busy CPU':>9s} {'busy inf':>9s} {'store/arrays':>13s}")
    for name in (n for n in (*VARIANTS, *PER_MEMBRANE) if n in a):
        r = a[name]
        print(f"{name:24s} {r['wall_s']:8.1f} {r['busy']['cpu_worker']:9.2f} "
              f"{r['busy']['inference_worker']:9.2f} {r['store_over_arrays']:13.2f}")
    ok = a["stream_over_stages"] <= STREAM_TARGET
    print(f"streaming / stage by stage: {a['stream_over_stages']:.3f} "
          f"(target <= {STREAM_TARGET}: {'yes' if ok else 'no'}); same STARs: {a['same_stars']}")
    if "per_membrane_stream_over_stages" in a:
        print(f"one task per membrane: streaming / stage by stage "
              f"{a['per_membrane_stream_over_stages']:.3f}")
    worst = max(a[n]["store_over_arrays"] for n in ("stream_cut_cpu", "stream_cut_inference"))
    print(f"(b) store / (tomogram + label arrays) without cubes: {worst:.2f} "
          f"(target <= {STORE_TARGET}: {'yes' if worst <= STORE_TARGET else 'no'}); "
          f"with cubes (stages): {a['stages']['store_over_arrays']:.2f}")


if __name__ == "__main__":
    main()
