"""Benchmark of CNN training from one annotated tomogram: balanced epochs vs full epochs.

Usage::

    python benchmarks/training.py [--seed 1] [--n-test 3] [--work DIR] [--keep]

One synthetic campaign (:func:`membrain_dist.synth.generate_campaign`) of 128 x 256 x 256
tomograms with 5 membranes each: ``synth_000`` is annotated and trains, the next ``--n-test``
are held out. Convert and geometry run once (:func:`membrain_dist.pipeline.prepare_sequential`);
then, in this one process and one after the other so that neither slows the other,

* the trainer as it ships (``TrainConfig()`` defaults: balanced epochs, stratified validation
  subsample, its patience and epoch bound), and
* the naive reference: the full-epoch trainer of before (``epoch="full"``: every epoch draws as
  many cubes as there are training rows, validation on all held-out rows, constant learning
  rate), with the patience and epoch bound the demo used (6 and 25; the old defaults 30 and 300
  take an hour and more),

each train from the same training set with the same seed through
:func:`membrain_dist.pipeline.fit_model`, then predict the held-out tomograms
(:func:`membrain_dist.pipeline.predict_sequential`, one scoring pass) and are scored with
:func:`membrain_dist.evaluation.evaluate_campaign` (hit radius 4.5 voxels, C2).

Prints a table and writes ``benchmarks/results/training.json``: per trainer the wall time of
``fit_model`` (training set read, training, model written), the time to the chosen checkpoint
(epochs up to the best one), epochs run, best epoch, cubes per second, held-out F1 / P / R,
one-to-one F1 and in-plane error; and the ratio of the two wall times. Run nothing else heavy
beside it: a second training slows it 2-10x on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from membrain_dist import pipeline
from membrain_dist.config import PipelineConfig
from membrain_dist.evaluation import evaluate_campaign
from membrain_dist.manifest import read_manifest, write_manifest
from membrain_dist.synth import SynthConfig, generate_campaign

log = logging.getLogger("benchmarks.training")
OUT = Path(__file__).parent / "results" / "training.json"

#: One annotated tomogram as a user brings it: 128 x 256 x 256, 5 membranes of 3-27 k points.
TOMOGRAM = SynthConfig(shape_zyx=(128, 256, 256), n_membranes=5, vesicle_radius=(35.0, 60.0),
                       sheet_radius=(60.0, 110.0), sheet_min_curvature_radius=80.0)
REFERENCE = {"epoch": "full", "val_cubes": 0, "lr_factor": 1.0, "patience": 6, "max_epochs": 25}


def _trainers(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    name = "balanced (defaults)" if not overrides else "balanced (--set)"
    return {name: overrides, "full-epoch reference": REFERENCE}


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs of TrainConfig fields (values parsed as JSON, else kept as text)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def run_trainer(name: str, overrides: dict[str, Any], cfg: PipelineConfig, store: Path,
                train: list, test: list, gt: Path, work: Path) -> dict[str, Any]:
    """Train with ``cfg.train`` + ``overrides``, predict and score the held-out rows."""
    tcfg = replace(cfg.train, **overrides)
    run_cfg = replace(cfg, train=tcfg)
    slug = name.split()[0]
    model_dir, pred_dir = work / f"model_{slug}", work / f"pred_{slug}"
    history = []
    t0 = time.perf_counter()
    metrics = pipeline.fit_model(store, train, [], run_cfg, model_dir, history.append)
    fit_s = time.perf_counter() - t0
    for h in history:
        log.info("%s: %s", slug, h.line())
    best = metrics["best_epoch"]
    t1 = time.perf_counter()
    pipeline.predict_sequential(test, store, model_dir, pred_dir, run_cfg)
    predict_s = time.perf_counter() - t1
    _, overall = evaluate_campaign(pred_dir, gt, radius=4.5, symmetry=2)
    trained = [h for h in history if h.epoch > 0]
    return {
        "trainer": name,
        "train_config": {k: getattr(tcfg, k) for k in
                         ("epoch", "balance", "min_epoch_cubes", "max_epoch_cubes", "val_cubes",
                          "patience",
                          "max_epochs", "lr_factor", "lr_patience", "rotation", "batch_size",
                          "lr", "channels")},
        "fit_seconds": round(fit_s, 1),
        "seconds_to_best": round(sum(h.seconds for h in history[: best + 1]), 1),
        "training_seconds": round(sum(h.seconds for h in history), 1),
        "epochs_run": metrics["epochs_run"],
        "best_epoch": best,
        "best_val_loss": round(metrics["best_val_loss"], 4),
        "cubes_per_epoch": trained[-1].cubes if trained else 0,
        "cubes_per_s": round(sum(h.cubes for h in trained) / sum(h.seconds for h in trained)),
        "predict_seconds": round(predict_s, 1),
        "f1": overall["f1"], "precision": overall["precision"], "recall": overall["recall"],
        "f1_one_to_one": overall["f1_matched"], "angle_mean_deg": overall["angle_mean"],
        "n_gt": overall.get("n_gt"),
        "history": [[h.epoch, round(h.train_loss, 4), round(h.val_loss, 4), round(h.seconds, 2)]
                    for h in history],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1,
                    help="campaign seed (defaults were tuned on seed 0: report on others)")
    ap.add_argument("--n-test", type=int, default=3, help="held-out tomograms")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    ap.add_argument("--only", choices=("balanced", "full"), default=None,
                    help="run one trainer (for experiments; the comparison needs both)")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="TrainConfig overrides for the balanced trainer (experiments)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("membrain_dist",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    work = args.work or Path(tempfile.mkdtemp(prefix="membrain-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        manifest = work / "data" / "manifest.csv"
        t0 = time.perf_counter()
        if not manifest.is_file():
            generate_campaign(work / "data", n_tomos=1 + args.n_test, seed=args.seed,
                              cfg=TOMOGRAM, n_train=1)
        entries = read_manifest(manifest)
        train = [e for e in entries if e.split == "train"]
        test = [e for e in entries if e.split == "test"]
        gt = work / "test_rows.csv"
        write_manifest(test, gt)
        cfg = PipelineConfig().with_overrides("labels", template=str(work / "data" / "template.mrc"))
        store = work / "campaign.zarr"
        pipeline.prepare_sequential(entries, store, cfg)
        ts = pipeline.training_set(store, train, cfg.labels, cfg.geometry)
        log.info("campaign seed %d ready in %.0f s: %d training points on %d membranes",
                 args.seed, time.perf_counter() - t0, len(ts), len(ts.membranes))
        results = []
        for name, overrides in _trainers(_parse_set(args.set)).items():
            if args.only and not name.startswith(args.only):
                continue
            results.append(run_trainer(name, overrides, cfg, store, train, test, gt, work))
            r = results[-1]
            log.info("%s: fit %.0f s (best epoch %d of %d, %.0f s to it), F1 %.3f",
                     name, r["fit_seconds"], r["best_epoch"], r["epochs_run"],
                     r["seconds_to_best"], r["f1"])
        report = {
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": f"{platform.node()} ({os.cpu_count()} cpus), torch {torch.__version__}, "
                    f"{torch.get_num_threads()} threads",
            "seed": args.seed, "shape_zyx": list(TOMOGRAM.shape_zyx),
            "train_points": len(ts), "train_membranes": len(ts.membranes),
            "near_points": int((ts.labels < cfg.labels.max_distance - 1e-4).sum()),
            "n_test": len(test), "trainers": results,
        }
        if len(results) == 2:
            new, ref = results
            report["fit_speedup"] = round(ref["fit_seconds"] / new["fit_seconds"], 2)
            report["f1_difference"] = round(new["f1"] - ref["f1"], 4)
        _print(report)
        if not args.only and not args.set:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            runs = json.loads(args.out.read_text()) if args.out.is_file() else {}
            runs[f"seed_{args.seed}"] = report
            args.out.write_text(json.dumps(runs, indent=2) + "\n")
            print(f"written to {args.out}")
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _print(report: dict[str, Any]) -> None:
    print(f"\nseed {report['seed']}: {report['train_points']} training points "
          f"({report['near_points']} near a particle), {report['n_test']} held-out tomograms")
    print(f"{'trainer':<22} {'fit s':>7} {'to best s':>9} {'epochs':>7} {'best':>5} "
          f"{'cubes/ep':>8} {'cubes/s':>7} {'F1':>6} {'P':>6} {'R':>6} {'1:1 F1':>6} {'angle':>6}")
    for r in report["trainers"]:
        angle = r["angle_mean_deg"] if r["angle_mean_deg"] is not None else float("nan")
        print(f"{r['trainer']:<22} {r['fit_seconds']:>7.0f} {r['seconds_to_best']:>9.0f} "
              f"{r['epochs_run']:>7} {r['best_epoch']:>5} {r['cubes_per_epoch']:>8} "
              f"{r['cubes_per_s']:>7} {r['f1']:>6.3f} {r['precision']:>6.3f} {r['recall']:>6.3f} "
              f"{r['f1_one_to_one']:>6.3f} {angle:>6.1f}")
    if "fit_speedup" in report:
        print(f"full-epoch / balanced wall time: {report['fit_speedup']:.2f}x; "
              f"F1 difference (balanced - full): {report['f1_difference']:+.4f}")


if __name__ == "__main__":
    main()
