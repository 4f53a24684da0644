"""Two particle classes in one pass: one two-output model against two single-class models.

A hard-phantom campaign (``synth.hard_config``: raw-data SNR, CTF, damaged segmentations,
grana stacks, the real PSII map as the target and the real b6f map as the large protein on
the same faces) of one training, one validation and ``--n-test`` held-out tomograms is
generated; every tomogram's STAR annotates both kinds, ``mbClassName`` ``PSII`` / ``b6f``
(``rlnClassNumber`` 1 / 2). With the same training settings (short: ``--max-epochs``) three
models are trained through the library's sequential path, each with the class's own template
covariance (the real maps rendered in their frames):

* ``two``: ``labels.classes = ["PSII", "b6f"]``, one network with two outputs;
* ``PSII`` and ``b6f``: ``labels.classes = [name]``, one network each, trained on that
  class's annotations only.

The held-out tomograms are predicted with each (geometry computed once, beforehand, so the
timed predictions differ only in the CNN scoring and the clustering), and the picks of each
class scored one-to-one against that class's annotations within 4.5 voxels (F1 / P / R). The
inference time of the two-output model (CNN scoring of every membrane point, 4 quarter turns)
is set against the sum of the two single-class models', measured in the same run. Each
class's in-plane error (C2, matched picks) is given with the angles from that class's
annotations' average (as ``predict`` writes them) and, for reference, from the clusters' PCA.
``--models two`` trains the two-output model alone (no comparison).

    python benchmarks/multiclass.py            # writes benchmarks/results/multiclass.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from common import work_dir, write_report

from membrain_dist import pipeline, synth
from membrain_dist.config import GeometryConfig, PipelineConfig
from membrain_dist.evaluation import DEFAULT_RADIUS, in_plane_error, match_particles
from membrain_dist.manifest import read_manifest, write_manifest
from membrain_dist.mrc import write_volume
from membrain_dist.star import (
    particles_frame,
    particles_matrices,
    particles_zyx,
    read_particles,
    write_particles,
)

log = logging.getLogger("multiclass")
OUT = Path(__file__).parent / "results" / "multiclass.json"
CLASSES = ("PSII", "b6f")


# --------------------------------------------------------------------------- campaign
def make_campaign(out: Path, seed: int, n_test: int, cfg: synth.SynthConfig) -> Path:
    """Hard-phantom tomograms (train, val, tests) whose STARs annotate PSII (the targets)
    and b6f (the large proteins) with their class; the two templates; the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(2 + n_test):
        name = f"synth_{i:03d}"
        st = synth.generate_tomogram(synth.tomogram_rng(seed, i), cfg)
        split = ("train", "val")[i] if i < 2 else "test"
        entry, psii = synth.write_synth_tomogram(out, name, st, cfg.voxel_size_A, split)
        b6f = particles_frame(name, st.large_zyx, st.large_matrices_zyx, st.tomogram.shape,
                              cfg.voxel_size_A)
        frames = []
        for k, df in enumerate((psii, b6f)):
            df = df.drop(columns=[c for c in ("mbMembrane", "mbScenario") if c in df])
            df["rlnClassNumber"] = k + 1
            df["mbClassName"] = np.full(len(df), CLASSES[k], dtype=object)
            frames.append(df)
        write_particles(out / f"{name}_particles.star", pd.concat(frames, ignore_index=True))
        entries.append(entry)
        log.info("%s: %d PSII, %d b6f", name, len(psii), len(b6f))
        del st
    write_volume(out / "PSII.mrc", synth.render_template(cfg), cfg.voxel_size_A)
    write_volume(out / "b6f.mrc", synth.render_template(replace(cfg, target_map=cfg.distractor_map)),
                 cfg.voxel_size_A)
    manifest = out / "manifest.csv"
    write_manifest(entries, manifest)
    return manifest


# --------------------------------------------------------------------------- scoring
def class_scores(pred_dir: Path, test: list, klass: str) -> dict[str, Any]:
    """One-to-one F1 / P / R of the picks of ``klass`` against the annotations of ``klass``,
    counts summed over the test tomograms."""
    n_pred = n_gt = hits = 0
    errors: list[float] = []
    for e in test:
        pred = read_particles(pred_dir / f"{e.name}.star")
        gt = read_particles(e.particles)
        if len(pred) and "mbClassName" in pred:
            pred = pred[pred["mbClassName"].astype(str) == klass]
        gt = gt[gt["mbClassName"].astype(str) == klass]
        pairs = match_particles(particles_zyx(pred), particles_zyx(gt), DEFAULT_RADIUS)["pairs"]
        hits += pairs.shape[0]
        n_pred += len(pred)
        n_gt += len(gt)
        if len(pairs):  # both maps are C2 dimers
            errors += in_plane_error(particles_matrices(pred)[pairs[:, 0]],
                                     particles_matrices(gt)[pairs[:, 1]], 2).tolist()
    p = hits / n_pred if n_pred else 0.0
    r = hits / n_gt if n_gt else 0.0
    return {"f1": round(2 * p * r / (p + r), 4) if p + r else 0.0, "precision": round(p, 4),
            "recall": round(r, 4), "n_pred": n_pred, "n_gt": n_gt, "matched": hits,
            "inplane_deg": round(float(np.mean(errors)), 2) if errors else None}


def pca_angles(store: Path, test: list, model_dir: Path, out_dir: Path) -> Path:
    """The model's picks with the clusters' PCA in-plane angles (no search against the
    annotations' averages) as ``<out_dir>/<name>.star``: the reference of the averages."""
    pcfg = pipeline.model_pipeline_config(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for e in test:
        write_particles(out_dir / f"{e.name}.star",
                        pipeline.tomogram_particles(store, e.name, pcfg.picks))
    return out_dir


def predict_timed(store: Path, test: list, model_dir: Path, out_dir: Path,
                  cfg: PipelineConfig) -> dict[str, float]:
    """Predict the test rows (their geometry already stored): seconds of CNN scoring (every
    membrane, timed on its own) and of the whole predict chain."""
    import shutil

    run_cfg = pipeline.over_model(cfg, model_dir)
    for e in test:  # scores of an earlier run (--reuse) would be current: score anew
        for mid in pipeline.membrane_ids(store, e.name):
            shutil.rmtree(store / pipeline.scores_key(e.name, mid), ignore_errors=True)
    t0 = time.perf_counter()
    for e in test:
        for mid in pipeline.membrane_ids(store, e.name):
            pipeline.score_membrane(store, e.name, mid, model_dir, run_cfg.inference)
    score_s = time.perf_counter() - t0
    pipeline.predict_sequential(test, store, model_dir, out_dir, run_cfg)  # scores current
    return {"score_seconds": round(score_s, 1),
            "predict_seconds": round(time.perf_counter() - t0, 1)}


def cnn_timing(store: Path, test: list, model_dirs: dict[str, Path], n_cubes: int,
               geometry: GeometryConfig, repeats: int = 3) -> dict[str, float]:
    """Seconds of CNN inference (4 quarter turns, this machine's default batch) of each model
    on the same ``n_cubes`` test cubes (cut once, beforehand), best of ``repeats`` rounds taken
    in turn (the models alternate, so a load change on the machine hits all of them alike)."""
    from membrain_dist.geometry import membrane_cubes
    from membrain_dist.inference import predict_distances
    from membrain_dist.model import load_model

    parts, total = [], 0
    for e in test:
        for mid in pipeline.membrane_ids(store, e.name):
            if total >= n_cubes:
                break
            stop = min(n_cubes - total, pipeline.n_points(store, e.name, mid))
            parts.append(membrane_cubes(store, e.name, mid, geometry, 0, stop))
            total += len(parts[-1])
    cubes = np.concatenate(parts)
    models = {k: load_model(d, "cpu")[0] for k, d in model_dirs.items()}
    best = dict.fromkeys(models, float("inf"))
    cpu = dict.fromkeys(models, float("inf"))
    for _ in range(repeats):
        for k, m in models.items():
            t, c = time.perf_counter(), time.process_time()
            predict_distances(m, cubes, rotations=4)
            best[k] = min(best[k], time.perf_counter() - t)
            cpu[k] = min(cpu[k], time.process_time() - c)
    return {"cubes": int(len(cubes)), **{k: round(v, 2) for k, v in best.items()},
            "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()}}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    tcfg = synth.hard_config(shape_zyx=tuple(args.shape), voxel_size_A=args.voxel_size)
    t0 = time.perf_counter()
    manifest = work / "data" / "manifest.csv"
    if not manifest.is_file():
        make_campaign(work / "data", args.seed, args.n_test, tcfg)
    entries = read_manifest(manifest)
    train = [e for e in entries if e.split == "train"]
    val = [e for e in entries if e.split == "val"]
    test = [e for e in entries if e.split == "test"]
    templates = {k: str(work / "data" / f"{k}.mrc") for k in CLASSES}
    base = PipelineConfig()
    base = replace(base, train=replace(base.train, max_epochs=args.max_epochs,
                                       patience=args.patience, seed=args.train_seed))
    # models of another training seed live beside the default's (seed 0: model_<name>)
    sfx = f"_s{args.train_seed}" if args.train_seed else ""

    def at(kind: str, name: str, ext: str = "") -> Path:
        return work / f"{kind}_{name}{sfx}{ext}"

    store = work / "campaign.zarr"
    pipeline.prepare_sequential(entries, store, base)  # geometry of every row, once
    prep_s = time.perf_counter() - t0
    log.info("campaign ready in %.0f s", prep_s)
    settings = {k: v for k, v in {"two": CLASSES, "PSII": ("PSII",), "b6f": ("b6f",)}.items()
                if k in args.models}
    models: dict[str, Any] = {}
    reused: list[str] = []
    for name, classes in settings.items():
        cfg = replace(base, labels=replace(base.labels, classes=classes, class_templates=tuple(
            templates[k] for k in classes)))
        model_dir, pred_dir = at("model", name), at("pred", name)
        fit_file = at("fit", name, ".json")
        if args.reuse and fit_file.is_file() and (model_dir / "model.json").is_file():
            # a model of an earlier run in this folder (same campaign and settings)
            metrics = json.loads((model_dir / "model.json").read_text())["metrics"]
            fit_s = json.loads(fit_file.read_text())["fit_seconds"]
            reused.append(name)
        else:
            t = time.perf_counter()
            metrics = pipeline.fit_model(store, train, val, cfg, model_dir)
            fit_s = time.perf_counter() - t
            fit_file.write_text(json.dumps({"fit_seconds": fit_s}))
        timing = predict_timed(store, test, model_dir, pred_dir, cfg)
        models[name] = {
            "classes": list(classes), "fit_seconds": round(fit_s, 1),
            "best_epoch": metrics["best_epoch"], "epochs_run": metrics["epochs_run"],
            "train_points": metrics["train_points"], **timing,
            "scores": {k: class_scores(pred_dir, test, k) for k in classes},
            "scores_pca_inplane": {k: class_scores(pca_angles(
                store, test, model_dir, at("pred", name, "_pca")), test, k)["inplane_deg"]
                for k in classes},
        }
        log.info("%s: fit %.0f s, scoring %.1f s, %s", name, fit_s, timing["score_seconds"],
                 {k: v["f1"] for k, v in models[name]["scores"].items()})
    if set(settings) != {"two", *CLASSES}:
        return {"seed": args.seed, "prepare_seconds": round(prep_s), "models": models,
                "reused_models": reused}
    single = {k: models[k] for k in CLASSES}
    comparison = {
        "f1_two": {k: models["two"]["scores"][k]["f1"] for k in CLASSES},
        "f1_single": {k: single[k]["scores"][k]["f1"] for k in CLASSES},
        "score_seconds_two": models["two"]["score_seconds"],
        "score_seconds_singles": round(sum(m["score_seconds"] for m in single.values()), 1),
        "predict_seconds_two": models["two"]["predict_seconds"],
        "predict_seconds_singles": round(sum(m["predict_seconds"] for m in single.values()), 1),
    }
    cnn = cnn_timing(store, test, {k: at("model", k) for k in settings},
                     args.timing_cubes, base.geometry)
    comparison["cnn_seconds"] = cnn
    comparison["cnn_time_ratio"] = round(cnn["two"] / (cnn["PSII"] + cnn["b6f"]), 3)
    c = cnn["cpu_seconds"]
    comparison["cnn_cpu_time_ratio"] = round(c["two"] / (c["PSII"] + c["b6f"]), 3)
    comparison["f1_difference"] = {k: round(comparison["f1_two"][k] - comparison["f1_single"][k],
                                            4) for k in CLASSES}
    comparison["score_time_ratio"] = round(
        comparison["score_seconds_two"] / comparison["score_seconds_singles"], 3)
    comparison["predict_time_ratio"] = round(
        comparison["predict_seconds_two"] / comparison["predict_seconds_singles"], 3)
    return {"seed": args.seed, "prepare_seconds": round(prep_s), "models": models,
            "reused_models": reused,
            "comparison": comparison}


def _print(res: dict[str, Any]) -> None:
    print(f"\n{'model':<6} {'class':<5} {'F1':>6} {'P':>6} {'R':>6} {'picks':>5} {'gt':>4} "
          f"{'in-pl':>6} {'PCA':>6} {'fit s':>6} {'score s':>8} {'predict s':>9}")
    for name, m in res["models"].items():
        for k, s in m["scores"].items():
            ip, pca = s["inplane_deg"], m["scores_pca_inplane"][k]
            print(f"{name:<6} {k:<5} {s['f1']:>6.3f} {s['precision']:>6.3f} {s['recall']:>6.3f} "
                  f"{s['n_pred']:>5} {s['n_gt']:>4} {ip if ip is not None else float('nan'):>6.1f} "
                  f"{pca if pca is not None else float('nan'):>6.1f} {m['fit_seconds']:>6.0f} "
                  f"{m['score_seconds']:>8.1f} {m['predict_seconds']:>9.1f}")
    if "comparison" not in res:
        return
    c = res["comparison"]
    print(f"\nF1 two-output minus single-class: {c['f1_difference']}")
    print(f"CNN scoring: {c['score_seconds_two']} s against {c['score_seconds_singles']} s "
          f"(ratio {c['score_time_ratio']}); whole predict: {c['predict_seconds_two']} s "
          f"against {c['predict_seconds_singles']} s (ratio {c['predict_time_ratio']})")
    t = c["cnn_seconds"]
    print(f"CNN alone on {t['cubes']} cubes (best of 3, interleaved): two {t['two']} s, PSII "
          f"{t['PSII']} s + b6f {t['b6f']} s (ratio {c['cnn_time_ratio']}); CPU time ratio "
          f"{c['cnn_cpu_time_ratio']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=103, help="campaign seed (not a tuning seed)")
    ap.add_argument("--n-test", type=int, default=2, help="held-out tomograms")
    ap.add_argument("--shape", type=int, nargs=3, default=[128, 256, 256], help="z y x voxels")
    ap.add_argument("--voxel-size", type=float, default=13.68, help="Å per voxel")
    ap.add_argument("--max-epochs", type=int, default=12, help="training epochs at most")
    ap.add_argument("--patience", type=int, default=4, help="early-stop patience (epochs)")
    ap.add_argument("--timing-cubes", type=int, default=16384,
                    help="test cubes of the interleaved CNN timing")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: temp)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    ap.add_argument("--reuse", action="store_true",
                    help="with --work: keep the models an earlier run there trained (delete a "
                         "model's folder to train it again); predictions and timings are redone")
    ap.add_argument("--train-seed", type=int, default=0,
                    help="training seed of the models (seed noise: a few seeds per model)")
    ap.add_argument("--models", nargs="+", choices=("two", *CLASSES),
                    default=["two", *CLASSES],
                    help="models to train (default all three; the comparison needs all)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"results file (default: {OUT} for the full comparison at training "
                         "seed 0; other runs only print theirs)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("membrain_dist").setLevel(logging.WARNING)
    with work_dir(args.work, args.keep, "membrain-multiclass-") as base:
        t0 = time.perf_counter()
        res = run(args, base)
        report = {
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": f"{platform.node()} ({os.cpu_count()} cpus), torch {torch.__version__}",
            "shape_zyx": list(args.shape), "voxel_size_A": args.voxel_size,
            "n_test": args.n_test, "max_epochs": args.max_epochs, "patience": args.patience,
            "train_seed": args.train_seed,
            **res, "seconds": round(time.perf_counter() - t0),
        }
        _print(report)
        full = set(args.models) == {"two", *CLASSES} and args.train_seed == 0
        out = args.out or (OUT if full else None)
        if out is not None:
            write_report(report, out)


if __name__ == "__main__":
    main()
