"""Benchmark of batched CNN inference (stage 3) in cubes per second.

Usage::

    python benchmarks/inference.py [--device cpu|cuda|all] [--n N] [--batch-sizes 64 256 ...]

For each device: a random-weight :class:`~membrain_dist.model.MemBrainCNN` (12^3 cubes, 32
channels, float32, eval mode) scores ``N`` random cubes held in host memory with
:func:`~membrain_dist.inference.predict_distances` (host -> device transfer included, as in the
pipeline) at each batch size; the naive reference in the same run feeds one cube per forward call
(batch size 1, result fetched each time). On CPU the figures are also given per torch thread
(``torch.get_num_threads``); on CUDA the GPU name is recorded, timings are bracketed by
``torch.cuda.synchronize`` and the throughput with the cubes already on the GPU is reported too.
Per device also the cutting of the cubes from a volume, on the host (numpy trilinear) and on the
device (``grid_sample``), alone and followed by scoring (``InferenceConfig.cutter``).

Prints a table and writes ``benchmarks/results/inference.json``: ``cubes_per_s[device][batch]``,
``reference_cubes_per_s[device]``, ``threads``, ``device_name``, ... Entries of devices not
measured in this run are kept from the existing file (so a GPU run adds to a CPU run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from membrain_dist.inference import predict_distances
from membrain_dist.model import MemBrainCNN

log = logging.getLogger("benchmarks.inference")
OUT = Path(__file__).parent / "results" / "inference.json"
KEYS = (
    "cubes_per_s",
    "per_thread_cubes_per_s",
    "reference_cubes_per_s",
    "resident_cubes_per_s",
    "speedup_vs_reference",
    "threads",
    "device_name",
    "host",
    "n",
    "measured_at",
    "load_average",
)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn: Callable[[], Any], dev: torch.device, repeats: int) -> float:
    """Median wall time (s) of ``fn`` over ``repeats`` runs, synchronised on CUDA."""
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _reference(model: MemBrainCNN, cubes: np.ndarray, dev: torch.device) -> np.ndarray:
    """Naive inference: one cube per forward call, result fetched to the host each time."""
    out = np.empty(len(cubes), np.float32)
    with torch.inference_mode():
        for i in range(len(cubes)):
            out[i] = model(torch.from_numpy(cubes[i : i + 1]).to(dev)).item()
    return out


def bench_cutting(model: MemBrainCNN, dev: torch.device, n: int, cube: int, repeats: int
                  ) -> dict[str, Any]:
    """Cubes/s of cutting ``n`` cubes from a 96 x 256 x 256 volume on the host (numpy
    trilinear, ``extract_cubes``) and on the device (``grid_sample``, ``cut_cubes_torch``), and
    of cutting + scoring both ways (``predict_distances`` of host cubes against
    ``predict_points``): where a scoring worker should cut (``InferenceConfig.cutter``)."""
    from membrain_dist.extraction import extract_cubes, rotation_frames
    from membrain_dist.inference import cut_cubes_torch, default_batch_size, predict_points

    rng = np.random.default_rng(1)
    vol = rng.normal(size=(96, 256, 256)).astype(np.float32)
    pts = (rng.uniform(0.1, 0.9, (n, 3)) * vol.shape).astype(np.float32)
    pts = pts[np.lexsort(pts.T[::-1])]  # sampling order: compact blocks
    nrm = rng.normal(size=(n, 3)).astype(np.float32)
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    bs = default_batch_size(dev)
    blk = torch.from_numpy(vol).to(dev)
    p_dev, f_dev = torch.from_numpy(pts).to(dev), torch.from_numpy(rotation_frames(nrm)).to(dev)

    def device_cut() -> None:
        for s in range(0, n, bs):
            cut_cubes_torch(blk, p_dev[s : s + bs], f_dev[s : s + bs], cube)

    def host_score() -> None:
        predict_distances(model, extract_cubes(vol, pts, nrm, size=cube), bs, dev)

    def device_score() -> None:
        predict_points(model, vol.__getitem__, vol.shape, pts, nrm, size=cube, batch_size=bs,
                       device=dev)

    device_cut()  # warm-up
    out = {"n": n, "batch_size": bs,
           "host_cut_cubes_per_s": n / _time(lambda: extract_cubes(vol, pts, nrm, size=cube),
                                             dev, repeats),
           "device_cut_cubes_per_s": n / _time(device_cut, dev, repeats),
           "host_cut_then_score_cubes_per_s": n / _time(host_score, dev, repeats),
           "device_cut_and_score_cubes_per_s": n / _time(device_score, dev, repeats)}
    log.info("%s cutting: host %.0f, device %.0f cubes/s; cut + score: host cut %.0f, device "
             "cut %.0f cubes/s", dev, out["host_cut_cubes_per_s"], out["device_cut_cubes_per_s"],
             out["host_cut_then_score_cubes_per_s"], out["device_cut_and_score_cubes_per_s"])
    return out


def bench_precision(model: MemBrainCNN, cubes: np.ndarray, dev: torch.device, repeats: int
                    ) -> dict[str, Any]:
    """Cubes/s of ``predict_distances`` at the device's default batch size in float32 and in
    bfloat16 (``InferenceConfig.precision``), timed in turns (best of ``repeats`` each), and
    the largest difference of the bfloat16 scores from the float32 ones. ``native``: whether
    the device computes bfloat16 natively (:func:`~membrain_dist.inference.native_bfloat16`;
    where it does not, ``precision="auto"`` keeps float32)."""
    from membrain_dist.inference import default_batch_size, native_bfloat16

    bs = default_batch_size(dev)
    best = {"float32": float("inf"), "bfloat16": float("inf")}
    for prec in best:  # warm-up: each dtype's prepared model and kernels
        predict_distances(model, cubes[: 2 * bs], bs, dev, precision=prec)
    for _ in range(repeats):
        for prec in best:
            best[prec] = min(best[prec], _time(
                lambda prec=prec: predict_distances(model, cubes, bs, dev, precision=prec), dev, 1))
    ref = predict_distances(model, cubes, bs, dev)
    diff = np.abs(predict_distances(model, cubes, bs, dev, precision="bfloat16") - ref)
    out = {"batch_size": bs, "native": native_bfloat16(dev),
           "cubes_per_s": {k: len(cubes) / v for k, v in best.items()},
           "bfloat16_over_float32": best["float32"] / best["bfloat16"],
           "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
           "score_range": [float(ref.min()), float(ref.max())]}
    log.info("%s precision: float32 %.0f, bfloat16 %.0f cubes/s (%.2fx; native %s); scores "
             "differ by %.4f on average, %.4f at most", dev, out["cubes_per_s"]["float32"],
             out["cubes_per_s"]["bfloat16"], out["bfloat16_over_float32"], out["native"],
             out["mean_abs_diff"], out["max_abs_diff"])
    return out


def bench_device(
    device: str, n: int, n_ref: int, batch_sizes: list[int], repeats: int, cube: int, channels: int
) -> dict[str, Any]:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = MemBrainCNN(cube, channels).to(dev).eval()
    cubes = np.random.default_rng(0).normal(size=(n, cube, cube, cube)).astype(np.float32)
    res: dict[str, Any] = {"cubes_per_s": {}, "n": n, "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        res["device_name"] = torch.cuda.get_device_name(dev)
    else:
        res["device_name"] = f"{_cpu_name()} ({os.cpu_count()} logical CPUs)"
    predict_distances(model, cubes[: min(n, 64)], 64, device)  # warm-up: allocator, kernels
    for bs in batch_sizes:
        if dev.type == "cuda":  # cuDNN picks algorithms per shape: warm up every batch size
            predict_distances(model, cubes[: min(n, 2 * bs)], bs, device)
        t = _time(lambda bs=bs: predict_distances(model, cubes, bs, device), dev, repeats)
        res["cubes_per_s"][str(bs)] = n / t
        log.info("%s batch %5d: %10.1f cubes/s", device, bs, n / t)
    sub = cubes[:n_ref]
    _reference(model, sub[:8], dev)
    t_ref = _time(lambda: _reference(model, sub, dev), dev, 1)
    res["reference_cubes_per_s"] = n_ref / t_ref
    res["reference_n"] = n_ref
    best = max(res["cubes_per_s"].values())
    res["speedup_vs_reference"] = best / res["reference_cubes_per_s"]
    # consistency: batched and naive agree
    batched = predict_distances(model, sub, max(batch_sizes), device)
    ref = _reference(model, sub, dev)
    res["max_abs_diff_vs_reference"] = float(np.abs(batched - ref).max())
    if dev.type == "cuda":
        on_gpu = torch.from_numpy(cubes).to(dev)
        bs = max(batch_sizes)

        def resident() -> None:
            with torch.inference_mode():
                for s in range(0, n, bs):
                    model(on_gpu[s : s + bs])

        resident()
        res["resident_cubes_per_s"] = n / _time(resident, dev, repeats)
        res["resident_batch_size"] = bs
        del on_gpu
    else:
        res["per_thread_cubes_per_s"] = {
            k: v / res["threads"] for k, v in res["cubes_per_s"].items()
        }
        res["load_average"] = os.getloadavg()[0]
    res["cut_and_score"] = bench_cutting(model, dev, n, cube, repeats)
    res["precision"] = bench_precision(model, cubes, dev, repeats)
    res["host"] = platform.node()
    res["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    res["torch"] = torch.__version__
    return res


def _merge(path: Path, runs: dict[str, dict[str, Any]], cube: int, channels: int) -> dict:
    doc: dict[str, Any] = {}
    if path.exists():
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError:
            doc = {}
        if doc.get("cube_size") != cube or doc.get("channels") != channels:
            doc = {}
    doc.update(
        {
            "benchmark": "inference",
            "cube_size": cube,
            "channels": channels,
            "dtype": "float32",
            "unit": "cubes/s",
        }
    )
    for dev, r in runs.items():
        for k in KEYS + (
            "reference_n",
            "max_abs_diff_vs_reference",
            "resident_batch_size",
            "torch",
            "cut_and_score",
            "precision",
        ):
            if k in r:
                doc.setdefault(k, {})[dev] = r[k]
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--device",
        choices=("cpu", "cuda", "all"),
        default="all",
        help="all = cpu, plus cuda when available",
    )
    p.add_argument(
        "--n",
        type=int,
        default=None,
        help="cubes per timed run (default 4096 on CPU, 131072 on CUDA)",
    )
    p.add_argument(
        "--n-ref",
        type=int,
        default=None,
        help="cubes for the batch-1 reference (default 256 CPU, 2048 CUDA)",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cube-size", type=int, default=12)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    devices = ["cpu", "cuda"] if a.device == "all" else [a.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if a.device == "cuda":
            p.error("--device cuda: torch sees no CUDA device")
        devices.remove("cuda")
    runs = {}
    for d in devices:
        gpu = d == "cuda"
        n = a.n or (131072 if gpu else 4096)
        n = max(n, max(a.batch_sizes))
        n_ref = a.n_ref or (2048 if gpu else 256)
        runs[d] = bench_device(
            d,
            n,
            min(n_ref, n),
            sorted(a.batch_sizes),
            a.repeats if gpu else min(a.repeats, 2),
            a.cube_size,
            a.channels,
        )

    head = f"{'device':<6} {'threads':>7} " + " ".join(
        f"{'bs ' + str(b):>10}" for b in sorted(a.batch_sizes)
    )
    print(head + f" {'ref (bs 1)':>11} {'speed-up':>9}")
    for d, r in runs.items():
        row = f"{d:<6} {r['threads']:>7} " + " ".join(
            f"{r['cubes_per_s'][str(b)]:>10.0f}" for b in sorted(a.batch_sizes)
        )
        print(row + f" {r['reference_cubes_per_s']:>11.0f} {r['speedup_vs_reference']:>8.1f}x")
        c = r["cut_and_score"]
        print(f"  cutting {c['n']} cubes: host (numpy) {c['host_cut_cubes_per_s']:.0f} cubes/s, "
              f"{d} (grid_sample) {c['device_cut_cubes_per_s']:.0f}; cut + score: host cut "
              f"{c['host_cut_then_score_cubes_per_s']:.0f}, {d} cut "
              f"{c['device_cut_and_score_cubes_per_s']:.0f} cubes/s")
        q = r["precision"]
        print(f"  precision (batch {q['batch_size']}): float32 {q['cubes_per_s']['float32']:.0f}, "
              f"bfloat16 {q['cubes_per_s']['bfloat16']:.0f} cubes/s "
              f"({q['bfloat16_over_float32']:.2f}x, native {q['native']}); scores differ by "
              f"{q['mean_abs_diff']:.4f} on average, {q['max_abs_diff']:.4f} at most "
              f"(range {q['score_range'][0]:.2f} to {q['score_range'][1]:.2f})")
        if d == "cpu":
            print(
                f"{'':<6} {'/thread':>7} "
                + " ".join(
                    f"{r['per_thread_cubes_per_s'][str(b)]:>10.0f}" for b in sorted(a.batch_sizes)
                )
            )
        else:
            print(
                f"  {r['device_name']}: {r['resident_cubes_per_s']:.0f} cubes/s with the cubes "
                f"already on the GPU (batch {r['resident_batch_size']})"
            )
    doc = _merge(a.out, runs, a.cube_size, a.channels)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
