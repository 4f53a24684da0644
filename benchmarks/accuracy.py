"""Picking accuracy on hard-phantom campaigns: one annotated tomogram vs one annotated membrane.

For each campaign seed (none of them used to tune a default) a hard-phantom campaign
(``synth.hard_config``: raw-data SNR, CTF-like band-pass, damaged segmentations, grana stacks,
edge-on sheets, targets and distractors on both faces, centres off the face, real PSII map) of
one training, one validation and ``--n-test`` held-out tomograms is generated. Two settings are
trained and predicted through the library's sequential path (the reference the flows are tested
against):

* ``tomogram``: every annotated membrane of the training tomogram; validation = the val row;
* ``membrane``: the most populated annotated membrane only (the paper's one-membrane case);
  validation = one membrane of the val row.
* ``real``: MemBrain v1's real annotated thylakoid membrane (real segmentation, the 48
  annotated PSII and 32 b6f in their annotated frames, imaged as the hard preset:
  :mod:`membrain_dist.synth_real`) as the only training row; validation = the val row. The
  setting of an outside benchmark that trains on that membrane.

Beside them, in the same run, a non-learning **density picker**: each point's score is minus
the mean normalised intensity of the cube's slab 1.5-4.5 voxels above the face (protein is
dense), clustered with the same Mean Shift, its threshold chosen on the same validation rows
by the same F1 calibration. Figures per setting and per membrane scenario (vesicle, sheet,
stack, edge-on): one-to-one F1 / P / R within 4.5 voxels, in-plane error (C2), normal (tilt)
error of matched picks, duplicate rate (picks with another pick within 4.5 voxels). A pick's
scenario is that of the nearest annotated particle.

    python benchmarks/accuracy.py --seeds 101 102
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
from scipy.spatial import cKDTree

from membrain_dist import pipeline, synth
from membrain_dist import store as mstore
from membrain_dist.calibration import calibrate
from membrain_dist.config import PipelineConfig
from membrain_dist.evaluation import DEFAULT_RADIUS, in_plane_error, match_particles
from membrain_dist.geometry import membrane_cubes, read_geometry
from membrain_dist.manifest import read_manifest
from membrain_dist.picks import cluster_points, concat_picks, reduce_picks
from membrain_dist.star import particles_matrices, particles_zyx, read_particles
from membrain_dist.synth_real import write_real_membrane

log = logging.getLogger("accuracy")
OUT = Path(__file__).parent / "results" / "accuracy.json"
SHAPE = (128, 256, 256)


# --------------------------------------------------------------------------- scoring
def score_picks(pred: pd.DataFrame, gt: pd.DataFrame, symmetry: int = 2) -> dict[str, Any]:
    """One-to-one figures of one tomogram's picks against its ground truth (both STAR tables),
    overall and per scenario (``mbScenario`` of the ground truth)."""
    pz, gz = particles_zyx(pred), particles_zyx(gt)
    pm, gm = particles_matrices(pred), particles_matrices(gt)
    mt = match_particles(pz, gz, DEFAULT_RADIUS)
    pairs = mt["pairs"]
    scen_gt = gt["mbScenario"].astype(str).to_numpy() if "mbScenario" in gt else \
        np.full(len(gt), "all")
    scen_pred = np.full(len(pred), "all", dtype=object)
    if len(pred) and len(gt):
        scen_pred = scen_gt[cKDTree(gz).query(pz)[1]]
    dup = np.zeros(len(pred), bool)
    if len(pred) > 1:
        d, _ = cKDTree(pz).query(pz, k=2)
        dup = d[:, 1] <= DEFAULT_RADIUS
    inplane = tilt = np.zeros(0)
    if len(pairs) and pm is not None and gm is not None:
        inplane = in_plane_error(pm[pairs[:, 0]], gm[pairs[:, 1]], symmetry)
        cos = np.abs(np.einsum("ki,ki->k", pm[pairs[:, 0], :, 2], gm[pairs[:, 1], :, 2]))
        tilt = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    rows = []
    matched_scen = scen_gt[pairs[:, 1]] if len(pairs) else np.zeros(0, dtype=object)
    for s in sorted(set(scen_gt.tolist()) | set(scen_pred.tolist())):
        sel = matched_scen == s
        rows.append({"scenario": s, "n_pred": int((scen_pred == s).sum()),
                     "n_gt": int((scen_gt == s).sum()), "matched": int(sel.sum()),
                     "duplicates": int(dup[scen_pred == s].sum()),
                     "inplane": inplane[sel].tolist() if len(inplane) else [],
                     "tilt": tilt[sel].tolist() if len(tilt) else []})
    return {"rows": rows}


def summarise(per_tomo: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pool the per-scenario counts of several tomograms into figures (and ``all``)."""
    pooled: dict[str, dict[str, Any]] = {}
    for t in per_tomo:
        for r in t["rows"]:
            for key in (r["scenario"], "all"):
                acc = pooled.setdefault(key, {"n_pred": 0, "n_gt": 0, "matched": 0,
                                              "duplicates": 0, "inplane": [], "tilt": []})
                for k in ("n_pred", "n_gt", "matched", "duplicates"):
                    acc[k] += r[k]
                acc["inplane"] += r["inplane"]
                acc["tilt"] += r["tilt"]
    out = {}
    for key, a in pooled.items():
        p = a["matched"] / a["n_pred"] if a["n_pred"] else 0.0
        r = a["matched"] / a["n_gt"] if a["n_gt"] else 0.0
        out[key] = {
            "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0,
            "precision": round(p, 4), "recall": round(r, 4),
            "n_pred": a["n_pred"], "n_gt": a["n_gt"],
            "inplane_deg": round(float(np.mean(a["inplane"])), 1) if a["inplane"] else None,
            "tilt_deg": round(float(np.mean(a["tilt"])), 1) if a["tilt"] else None,
            "duplicate_rate": round(a["duplicates"] / a["n_pred"], 4) if a["n_pred"] else 0.0,
        }
    return out


def evaluate_dir(pred_dir: Path, test: list, gt_all: pd.DataFrame) -> dict[str, dict[str, Any]]:
    per = []
    for e in test:
        pred = read_particles(pred_dir / f"{e.name}.star")
        gt = gt_all[gt_all["rlnTomoName"].astype(str) == e.name].reset_index(drop=True)
        per.append(score_picks(pred, gt))
    return summarise(per)


# --------------------------------------------------------------------------- density picker
def density_scores(cubes: np.ndarray) -> np.ndarray:
    """Minus the mean intensity of the slab 1.5-4.5 voxels above the face, +-1.5 in plane
    (cube axis 0 along the normal, centre (s - 1) / 2); shifted to start at 0."""
    s = cubes.shape[1]
    c = (s - 1) / 2
    k = [i for i in range(s) if 1.5 <= i - c <= 4.5]
    j = [i for i in range(s) if abs(i - c) <= 1.5]
    v = -cubes[:, k][:, :, j][:, :, :, j].mean(axis=(1, 2, 3))
    return (v - v.min()).astype(np.float32)


def _membrane_scores(store: Path, name: str, mid: int,
                     cfg: PipelineConfig) -> tuple[dict, np.ndarray]:
    geo = read_geometry(store, name, mid)
    return geo, density_scores(membrane_cubes(store, name, mid, cfg.geometry))


def density_picker(store: Path, val: list, test: list, cfg: PipelineConfig,
                   out_dir: Path) -> dict[str, Any]:
    """Calibrate the density score's threshold on the val rows, pick the test rows."""
    from membrain_dist.star import particles_frame, write_particles

    vs = pipeline.training_set(store, val, cfg.labels, cfg.geometry)
    scores = density_scores(vs.cubes)
    rows = pipeline.calibration_rows(vs, np.arange(len(vs)), scores)
    grid = np.quantile(scores, np.linspace(0.01, 0.3, 30))
    cal = calibrate(rows, cfg.cluster, cfg.orientation, cfg.picks, grid, (1.0,))
    ccfg = replace(cfg.cluster, score_threshold=cal.score_threshold)
    out_dir.mkdir(parents=True, exist_ok=True)
    for e in test:
        parts = []
        for mid in pipeline.membrane_ids(store, e.name):
            geo, sc = _membrane_scores(store, e.name, mid, cfg)
            if len(sc):
                parts.append(cluster_points(geo["zyx"], geo["normal"], geo["side"], sc, ccfg,
                                            cfg.orientation))
        picks, _ = reduce_picks(concat_picks(parts), cfg.picks)
        meta = mstore.read_meta(store, e.name)
        write_particles(out_dir / f"{e.name}.star",
                        particles_frame(e.name, picks.zyx, picks.matrices, meta.shape_zyx,
                                        meta.voxel_size_A))
    return {"calibration": cal.summary()}


# --------------------------------------------------------------------------- one setting
def run_setting(name: str, cfg: PipelineConfig, store: Path, train: list, val: list,
                test: list, gt_all: pd.DataFrame, work: Path) -> dict[str, Any]:
    model_dir, pred_dir = work / f"model_{name}", work / f"pred_{name}"
    t0 = time.perf_counter()
    metrics = pipeline.fit_model(store, train, val, cfg, model_dir)
    fit_s = time.perf_counter() - t0
    pcfg = pipeline.model_pipeline_config(model_dir)
    run_cfg = pipeline.over_model(cfg, model_dir)
    pipeline.predict_sequential(test, store, model_dir, pred_dir, run_cfg)
    res = evaluate_dir(pred_dir, test, gt_all)
    cal = metrics.get("calibration") or {}
    log.info("%s: fit %.0f s, threshold %s, height %.2f, F1 %.3f", name, fit_s,
             cal.get("score_threshold"), pcfg.picks.height, res["all"]["f1"])
    return {"setting": name, "fit_seconds": round(fit_s, 1), "best_epoch": metrics["best_epoch"],
            "epochs_run": metrics["epochs_run"], "train_points": metrics["train_points"],
            "members": len(metrics.get("members", [])) or 1,
            "train_membranes": len(metrics["train_membranes"]),
            "calibration": {k: v for k, v in cal.items() if k != "table"},
            "pick_height": pcfg.picks.height, "scores": res}


def run_seed(seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    manifest = work / "data" / "manifest.csv"
    tcfg = synth.hard_config(shape_zyx=SHAPE, voxel_size_A=args.voxel_size)
    t0 = time.perf_counter()
    if not manifest.is_file():
        synth.generate_campaign(work / "data", n_tomos=2 + args.n_test, seed=seed, cfg=tcfg,
                                n_train=1, n_val=1)
    entries = read_manifest(manifest)
    train = [e for e in entries if e.split == "train"]
    val = [e for e in entries if e.split == "val"]
    test = [e for e in entries if e.split == "test"]
    gt_all = read_particles(work / "data" / "ground_truth.star")
    cfg = PipelineConfig().with_overrides("labels", template=str(work / "data" / "template.mrc"))
    for section, values in args.overrides.items():
        cfg = cfg.with_overrides(section, **values)
    store = work / "campaign.zarr"
    pipeline.prepare_sequential(entries, store, cfg)
    log.info("seed %d: campaign ready in %.0f s", seed, time.perf_counter() - t0)
    out: dict[str, Any] = {"seed": seed, "settings": []}
    settings = {"tomogram": cfg,
                "membrane": cfg.with_overrides("labels", max_membranes=1)}
    for name, scfg in settings.items():
        if args.only and name not in args.only:
            continue
        out["settings"].append(run_setting(name, scfg, store, train, val, test, gt_all, work))
    if not args.only or "real" in args.only:
        # the real annotated thylakoid membrane (48 PSII) as the only training row
        real, _ = write_real_membrane(work / "data", seed, tcfg)
        pipeline.prepare_sequential([real], store, cfg)
        out["settings"].append(run_setting("real", cfg, store, [real], val, test, gt_all, work))
    if not args.no_density:
        dens_dir = work / "pred_density"
        dens = density_picker(store, val, test, cfg, dens_dir)
        out["density"] = {**dens, "scores": evaluate_dir(dens_dir, test, gt_all)}
    return out


def _print(report: dict[str, Any]) -> None:
    for run in report["runs"]:
        print(f"\nseed {run['seed']}")
        print(f"{'setting':<10} {'scenario':<9} {'F1':>6} {'P':>6} {'R':>6} {'in-pl':>6} "
              f"{'tilt':>5} {'dup':>6} {'picks':>5} {'gt':>4} {'dens F1':>7}")
        dens = run.get("density", {}).get("scores", {})
        for s in run["settings"]:
            for scen, m in s["scores"].items():
                d = dens.get(scen, {}).get("f1", float("nan"))
                ip = m["inplane_deg"] if m["inplane_deg"] is not None else float("nan")
                tl = m["tilt_deg"] if m["tilt_deg"] is not None else float("nan")
                print(f"{s['setting']:<10} {scen:<9} {m['f1']:>6.3f} {m['precision']:>6.3f} "
                      f"{m['recall']:>6.3f} {ip:>6.1f} {tl:>5.1f} {m['duplicate_rate']:>6.3f} "
                      f"{m['n_pred']:>5} {m['n_gt']:>4} {d:>7.3f}")


def _parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """``section.field=value`` overrides (values parsed as JSON when they parse)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, _, raw = item.partition("=")
        section, _, field = key.partition(".")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out.setdefault(section, {})[field] = tuple(value) if isinstance(value, list) else value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[101, 102],
                    help="campaign seeds (report on seeds no default was tuned on)")
    ap.add_argument("--n-test", type=int, default=2, help="held-out tomograms per seed")
    ap.add_argument("--voxel-size", type=float, default=13.68, help="Å per voxel")
    ap.add_argument("--only", nargs="*", choices=("tomogram", "membrane", "real"), default=None)
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                    help="pipeline overrides (experiments; not written to the results)")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: temp)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    ap.add_argument("--no-density", action="store_true",
                    help="skip the density picker (quicker experiments)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.overrides = _parse_set(args.set)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("membrain_dist").setLevel(logging.WARNING)
    with work_dir(args.work, args.keep, "membrain-accuracy-") as base:
        t0 = time.perf_counter()
        report: dict[str, Any] = {
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": f"{platform.node()} ({os.cpu_count()} cpus), torch {torch.__version__}",
            "shape_zyx": list(SHAPE), "voxel_size_A": args.voxel_size, "n_test": args.n_test,
            "overrides": args.set, "only": args.only, "runs": [],
        }
        for seed in args.seeds:
            work = base / f"seed_{seed}"
            work.mkdir(parents=True, exist_ok=True)
            report["runs"].append(run_seed(seed, args, work))
        report["seconds"] = round(time.perf_counter() - t0)
        _print(report)
        if not args.set and not args.no_density:  # experiments are not results
            write_report(report, args.out)


if __name__ == "__main__":
    main()
