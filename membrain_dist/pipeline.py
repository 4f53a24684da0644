"""Store-level stage functions: what one task runs.

Every function here takes store paths, names, ids and small frozen configs, reads what it needs
from the campaign store, writes its result back atomically with provenance, and returns only
small values. The Prefect flows map them over dask workers; :func:`predict_sequential` chains
them in one process (the reference the distributed run is tested against).

Store keys written here (besides the geometry groups of :mod:`membrain_dist.geometry`):
``<name>/geometry/m<id>/scores`` (predicted distance per point) and ``<name>/picks/m<id>``
(particle centres, orientations and scores of one membrane).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from . import mrc, store
from .clustering import ClusterConfig, hierarchical_mean_shift
from .config import (
    InferenceConfig,
    LabelConfig,
    PipelineConfig,
    check_types,
    config_from_dict,
)
from .convert import ConvertConfig, convert_tomogram, validate_entry
from .errors import InputError
from .geometry import GeometryConfig, geometry_key, process_membrane, read_geometry
from .labels import distance_labels, ellipsoid_covariance, template_covariance
from .manifest import TomogramEntry
from .orientation import OrientationConfig, cluster_orientations
from .sides import SideSpec, parse_sides
from .star import (
    particles_frame,
    particles_matrices,
    particles_zyx,
    read_particles,
    write_particles,
)

log = logging.getLogger(__name__)

PICKS_KEY = "picks"
#: scores of one membrane spanning less than this (voxels) carry no signal: no picks
MIN_SCORE_SPREAD = 1e-3
PIPELINE_FILE = "pipeline.json"
CAMPAIGN_STAR = "particles.star"


# --------------------------------------------------------------------------- conversion
def validate_entries(entries: Sequence[TomogramEntry]) -> None:
    """Header-level checks of every manifest row before any work starts (InputError)."""
    for entry in entries:
        validate_entry(entry)


def convert_entry(entry: TomogramEntry, root: str | os.PathLike, cfg: ConvertConfig) -> list[int]:
    """Convert one tomogram (skipped when current); return its membrane ids."""
    meta = convert_tomogram(entry, root, cfg)
    return [int(m["id"]) for m in meta.membranes]


def membrane_ids(root: str | os.PathLike, name: str) -> list[int]:
    meta = store.read_meta(root, name)
    if meta is None:
        raise KeyError(f"{root}: tomogram {name!r} is not converted")
    return [int(m["id"]) for m in meta.membranes]


def side_specs(entry: TomogramEntry, ids: Sequence[int]) -> dict[int, SideSpec]:
    """The side selection of each membrane of a manifest row."""
    lookup = parse_sides(entry.sides, entry.tomogram.parent)
    return {int(i): lookup(int(i)) for i in ids}


# --------------------------------------------------------------------------- geometry
def geometry_membrane(
    root: str | os.PathLike, name: str, membrane_id: int, cfg: GeometryConfig, side: SideSpec
) -> int:
    """Stages 1 + 2 for one membrane (see :func:`membrain_dist.geometry.process_membrane`)."""
    return process_membrane(root, name, membrane_id, cfg, side)


def _group_attrs(root: str | os.PathLike, key: str) -> dict | None:
    path = Path(root).joinpath(*key.split("/"))
    if not (path / "zarr.json").is_file():
        return None
    return dict(zarr.open_group(store=str(root), path=key, mode="r").attrs)


def _array_attrs(root: str | os.PathLike, key: str) -> dict | None:
    path = Path(root).joinpath(*key.split("/"))
    if not (path / "zarr.json").is_file():
        return None
    return dict(zarr.open_array(store=str(root), path=key, mode="r").attrs)


# --------------------------------------------------------------------------- scoring
def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """The weights' SHA-256 as recorded in ``model.json`` (what makes two models differ)."""
    path = Path(model_dir) / "model.json"
    try:
        return str(json.loads(path.read_text())["weights_sha256"])
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(path, f"not a membrain-dist model directory ({exc})") from exc


def score_membrane(
    root: str | os.PathLike,
    name: str,
    membrane_id: int,
    model_dir: str | os.PathLike,
    cfg: InferenceConfig = InferenceConfig(),
) -> int:
    """Predict the distance of every stored cube of one membrane; write ``.../scores``.

    Runs on whichever worker gets it: CUDA when the worker has a GPU and ``cfg.device`` is
    ``auto``; the model is loaded once per worker process (``inference.get_model``).
    Returns the number of points scored. Skipped when the stored scores were made by the same
    model from the same geometry.
    """
    from .inference import configure_threads, get_model, predict_distances, resolve_device

    gkey = geometry_key(name, membrane_id)
    gattrs = _group_attrs(root, gkey)
    if gattrs is None:
        raise KeyError(f"{root}: no geometry for {gkey}")
    prov = store.provenance(
        "scores", {"model": model_fingerprint(model_dir), "rotations": cfg.rotations},
        {"geometry": gattrs["provenance"]}
    )
    skey = f"{gkey}/scores"
    sattrs = _array_attrs(root, skey)
    if sattrs is not None and store.is_current(sattrs, prov):
        log.info("%s: current, skipped", skey)
        return int(gattrs["n_points"])
    device = resolve_device(cfg.device)
    configure_threads()
    meta = store.read_meta(root, name)
    model, _ = get_model(model_dir, device)
    _check_model(model_dir, meta.voxel_size_A if meta else None)
    cubes = zarr.open_array(store=str(root), path=f"{gkey}/cubes", mode="r")
    scores = predict_distances(model, cubes, batch_size=cfg.batch_size, device=device,
                               rotations=cfg.rotations)
    n = int(scores.shape[0])
    store.write_array_atomic(root, skey, scores.astype(np.float32),
                             chunks=(max(1, min(n, 65536)),), attrs={"provenance": prov})
    log.info("%s: %d points scored on %s", skey, n, device)
    return n


def _check_model(model_dir: str | os.PathLike, voxel_size_A: float | None) -> None:
    """Refuse a model trained at another voxel size (never silently wrong picks)."""
    from .model import VOXEL_SIZE_RTOL, load_model

    meta = json.loads((Path(model_dir) / "model.json").read_text())
    trained = meta.get("voxel_size_A")
    if trained and voxel_size_A and abs(trained - voxel_size_A) > VOXEL_SIZE_RTOL * trained:
        # load_model raises the InputError with the file named
        load_model(model_dir, "cpu", voxel_size_A=voxel_size_A)


def read_scores(root: str | os.PathLike, name: str, membrane_id: int) -> np.ndarray:
    key = f"{geometry_key(name, membrane_id)}/scores"
    return np.asarray(zarr.open_array(store=str(root), path=key, mode="r")[...])


# --------------------------------------------------------------------------- clustering
def picks_key(name: str, membrane_id: int) -> str:
    return f"{name}/{PICKS_KEY}/m{int(membrane_id)}"


@dataclass(frozen=True)
class Picks:
    """Particles found on one membrane (K rows): voxels zyx, in-code matrices."""

    zyx: np.ndarray  # (K, 3) float32
    matrices: np.ndarray  # (K, 3, 3) float32, columns u, v, n in zyx
    score: np.ndarray  # (K,) float32: mean predicted distance of the cluster's points (voxels)
    n_points: np.ndarray  # (K,) int32
    side: np.ndarray  # (K,) int8
    from_pca: np.ndarray  # (K,) bool: in-plane angle from PCA (else rot = 0 from the normal)


def cluster_points(
    zyx: np.ndarray,
    normal: np.ndarray,
    side: np.ndarray,
    scores: np.ndarray,
    ccfg: ClusterConfig,
    ocfg: OrientationConfig,
) -> Picks:
    """Stages 4 + 5 on one membrane's points, each side clustered on its own (pure)."""
    parts = []
    for s in np.unique(side):
        m = side == s
        pts, nrm = zyx[m], normal[m]
        cl = hierarchical_mean_shift(pts, scores[m], ccfg)
        if len(cl) == 0:
            continue
        mats, src = cluster_orientations((pts, cl.labels), cl.centres, pts, nrm, ocfg)
        parts.append(Picks(
            zyx=cl.centres.astype(np.float32), matrices=mats.astype(np.float32),
            score=cl.mean_score.astype(np.float32), n_points=cl.n_points.astype(np.int32),
            side=np.full(len(cl), s, np.int8), from_pca=np.asarray(src) == "pca",
        ))
    if not parts:
        return Picks(np.zeros((0, 3), np.float32), np.zeros((0, 3, 3), np.float32),
                     np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(0, np.int8),
                     np.zeros(0, bool))
    return Picks(*(np.concatenate([getattr(p, f) for p in parts])
                   for f in ("zyx", "matrices", "score", "n_points", "side", "from_pca")))


def cluster_membrane(
    root: str | os.PathLike,
    name: str,
    membrane_id: int,
    ccfg: ClusterConfig,
    ocfg: OrientationConfig,
) -> int:
    """Stages 4 + 5 for one membrane from the stored scores; writes ``<name>/picks/m<id>``."""
    gkey = geometry_key(name, membrane_id)
    sattrs = _array_attrs(root, f"{gkey}/scores")
    if sattrs is None:
        raise KeyError(f"{root}: membrane {gkey} has no scores yet")
    prov = store.provenance("picks", {"cluster": ccfg.to_dict(), "orientation": ocfg.to_dict()},
                            {"scores": sattrs["provenance"]})
    key = picks_key(name, membrane_id)
    attrs = _group_attrs(root, key)
    if attrs is not None and store.is_current(attrs, prov):
        return int(attrs["n_picks"])
    geo = read_geometry(root, name, membrane_id)
    scores = read_scores(root, name, membrane_id)
    if scores.size and not float(np.ptp(scores)) > MIN_SCORE_SPREAD:
        # every point scores the same: the network saw nothing to tell them apart (a blank
        # or near-blank tomogram); Mean Shift would turn that into evenly spread "particles"
        log.warning("%s: all %d scores are %.4g (no spread): no particles picked on this "
                    "membrane", gkey, scores.size, float(scores[0]))
        geo = {k: v[:0] for k, v in geo.items() if k in ("zyx", "normal", "side")}
        scores = scores[:0]
    picks = cluster_points(geo["zyx"], geo["normal"], geo["side"], scores, ccfg, ocfg)
    with store.atomic_group(root, key) as g:
        for field_name in ("zyx", "matrices", "score", "n_points", "side", "from_pca"):
            data = getattr(picks, field_name)
            g.create_array(field_name, data=data, chunks=tuple(max(1, c) for c in data.shape))
        g.attrs.update({"provenance": prov, "n_picks": int(picks.zyx.shape[0])})
    log.info("%s: %d particles", key, picks.zyx.shape[0])
    return int(picks.zyx.shape[0])


def read_picks(root: str | os.PathLike, name: str, membrane_id: int) -> Picks:
    g = zarr.open_group(store=str(root), path=picks_key(name, membrane_id), mode="r")
    return Picks(*(np.asarray(g[f][...]) for f in
                   ("zyx", "matrices", "score", "n_points", "side", "from_pca")))


# --------------------------------------------------------------------------- outputs
def tomogram_particles(root: str | os.PathLike, name: str) -> pd.DataFrame:
    """All picks of one tomogram as a STAR table (CONVENTIONS.md columns)."""
    meta = store.read_meta(root, name)
    if meta is None:
        raise KeyError(f"{root}: tomogram {name!r} is not converted")
    frames = []
    for mid in membrane_ids(root, name):
        p = read_picks(root, name, mid)
        if p.zyx.shape[0] == 0:
            continue
        frames.append(particles_frame(
            name, p.zyx, p.matrices, meta.shape_zyx, meta.voxel_size_A,
            extra={"mbScore": p.score, "mbPoints": p.n_points,
                   "mbMembrane": np.full(p.zyx.shape[0], mid, np.int32), "mbSide": p.side,
                   "mbOrientationFrom": np.where(p.from_pca, "pca", "normal")},
        ))
    if frames:
        return pd.concat(frames, ignore_index=True)
    empty = particles_frame(name, np.zeros((0, 3), np.float32), np.zeros((0, 3, 3), np.float32),
                            meta.shape_zyx, meta.voxel_size_A)
    for col in ("mbScore", "mbPoints", "mbMembrane", "mbSide", "mbOrientationFrom"):
        empty[col] = pd.Series(dtype=object if col == "mbOrientationFrom" else float)
    return empty


def write_tomogram_outputs(
    root: str | os.PathLike,
    name: str,
    out_dir: str | os.PathLike,
    gt_star: str | os.PathLike | None = None,
    score_threshold: float | None = None,
    qc: bool = True,
) -> dict:
    """Write ``<out>/qc/<name>.png`` and then ``<out>/<name>.star`` (last: a STAR in the
    folder means the tomogram is done); return a small summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = tomogram_particles(root, name)
    n_points = 0
    if qc:
        from .qc import qc_figure

        (out / "qc").mkdir(exist_ok=True)
        pts, sc = [], []
        for mid in membrane_ids(root, name):
            pts.append(read_geometry(root, name, mid)["zyx"])
            sc.append(read_scores(root, name, mid))
        pts_a = np.concatenate(pts) if pts else np.zeros((0, 3), np.float32)
        sc_a = np.concatenate(sc) if sc else np.zeros(0, np.float32)
        n_points = int(pts_a.shape[0])
        tomo = store.tomogram_array(root, name)
        z = tomo.shape[0] // 2
        gt = None
        if gt_star is not None and Path(gt_star).is_file():
            gt = particles_zyx(_particles_of(gt_star, name))
        qc_figure(out / "qc" / f"{name}.png", pts_a, sc_a, particles_zyx(df) if len(df) else
                  np.zeros((0, 3), np.float32), gt, image=np.asarray(tomo[z]), image_z=z,
                  score_threshold=score_threshold, title=name)
    write_particles(out / f"{name}.star", df)
    return {"name": name, "particles": int(len(df)), "points": n_points}


def remove_tomogram_outputs(out_dir: str | os.PathLike, name: str) -> list[str]:
    """Delete ``<out>/<name>.star`` and its QC figure (a row that failed in this run keeps no
    output of an earlier run that ``particles.star`` would not match); returns what went."""
    out = Path(out_dir)
    gone = []
    for p in (out / f"{name}.star", out / "qc" / f"{name}.png"):
        if p.is_file():
            p.unlink()
            gone.append(str(p))
    return gone


def write_campaign_star(out_dir: str | os.PathLike, names: Sequence[str]) -> Path:
    """Concatenate ``<out>/<name>.star`` into ``<out>/particles.star``."""
    out = Path(out_dir)
    frames = [read_particles(out / f"{n}.star") for n in names if (out / f"{n}.star").is_file()]
    frames = [f for f in frames if len(f)]
    df = pd.concat(frames, ignore_index=True) if frames else read_particles(out / f"{names[0]}.star")
    write_particles(out / CAMPAIGN_STAR, df)
    return out / CAMPAIGN_STAR


# --------------------------------------------------------------------------- training
def _particles_of(path: str | os.PathLike, name: str) -> pd.DataFrame:
    """Rows of a STAR for tomogram ``name`` (a single-tomogram STAR under another name too)."""
    df = read_particles(path)
    names = df["rlnTomoName"].astype(str)
    if (names == name).any():
        return df[names == name].reset_index(drop=True)
    if names.nunique() == 1:
        return df.reset_index(drop=True)
    found = sorted(set(names))[:5]
    raise InputError(path, f"no particles with rlnTomoName {name!r} (found {found})")


def label_covariance(cfg: LabelConfig) -> np.ndarray | None:
    """Particle shape covariance (zyx, voxels^2) from the template or radii; None: Euclidean."""
    if cfg.template:
        info = mrc.read_info(cfg.template)
        return template_covariance(np.asarray(mrc.open_volume(info.path), dtype=np.float32))
    if cfg.ellipsoid_radii_zyx:
        return ellipsoid_covariance(cfg.ellipsoid_radii_zyx)
    return None


@dataclass
class TrainingSet:
    """Labelled cubes of some membranes, in memory (training sets are a few membranes)."""

    cubes: np.ndarray  # (N, s, s, s) float32
    labels: np.ndarray  # (N,) float32, voxels
    groups: np.ndarray  # (N,) int64: one id per (tomogram, membrane)
    zyx: np.ndarray  # (N, 3) float32
    membranes: list[tuple[str, int, int]]  # (tomogram, membrane id, points)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def training_set(
    root: str | os.PathLike, entries: Sequence[TomogramEntry], cfg: LabelConfig
) -> TrainingSet:
    """Labels for the stored points of annotated tomograms (stage 3 labels).

    Membranes without any point closer than ``cfg.max_distance`` to an annotated centre are
    left out when ``cfg.annotated_only``; ``cfg.max_membranes`` keeps the most populated.
    """
    cov = label_covariance(cfg)
    candidates = []
    for t, entry in enumerate(entries):
        if entry.particles is None:
            raise InputError(entry.particles or entry.tomogram,
                             f"manifest row {entry.name!r} ({entry.split}) has no particles STAR")
        df = _particles_of(entry.particles, entry.name)
        centres = particles_zyx(df)
        rot = particles_matrices(df) if cov is not None else None
        for mid in membrane_ids(root, entry.name):
            geo = read_geometry(root, entry.name, mid)
            if geo["zyx"].shape[0] == 0:
                continue
            lab = distance_labels(geo["zyx"], centres, rot, cov, cfg.max_distance)
            near = int((lab < cfg.max_distance / 2).sum())
            if cfg.annotated_only and near == 0:
                continue
            candidates.append((near, t, entry.name, mid, geo["zyx"], lab))
    if not candidates:
        raise InputError(entries[0].particles or entries[0].tomogram,
                         "no membrane carries an annotated particle: check the STAR coordinates "
                         "(voxels, X = column) and rlnTomoName")
    if cfg.max_membranes is not None:
        candidates = sorted(candidates, key=lambda c: (-c[0], c[1], c[3]))[: cfg.max_membranes]
    cubes, labels, groups, zyx, used = [], [], [], [], []
    for _, t, name, mid, pts, lab in candidates:
        g = zarr.open_array(store=str(root), path=f"{geometry_key(name, mid)}/cubes", mode="r")
        cubes.append(np.asarray(g[...], dtype=np.float32))
        labels.append(lab.astype(np.float32))
        groups.append(np.full(lab.shape[0], t * 1_000_000 + mid, np.int64))
        zyx.append(pts)
        used.append((name, mid, int(lab.shape[0])))
    return TrainingSet(np.concatenate(cubes), np.concatenate(labels), np.concatenate(groups),
                       np.concatenate(zyx).astype(np.float32), used)


def common_voxel_size(root: str | os.PathLike, names: Sequence[str]) -> float:
    """The voxel size shared by ``names`` (5 % tolerance), else InputError."""
    sizes = {n: store.read_meta(root, n).voxel_size_A for n in names}
    ref = next(iter(sizes.values()))
    off = {n: v for n, v in sizes.items() if abs(v - ref) > 0.05 * ref}
    if off:
        shown = {n: float(f"{v:.4g}") for n, v in sizes.items()}
        raise InputError(root, f"training tomograms have different voxel sizes {shown}; "
                               "train one model per voxel size")
    return float(ref)


def fit_model(
    root: str | os.PathLike,
    train_entries: Sequence[TomogramEntry],
    val_entries: Sequence[TomogramEntry],
    cfg: PipelineConfig,
    model_dir: str | os.PathLike,
    progress: Callable | None = None,
) -> dict:
    """Train the CNN on stored geometry and write the model directory; return its metrics."""
    from .model import ModelMeta, save_model
    from .training import config_dict, train

    ts = training_set(root, train_entries, cfg.labels)
    vs = training_set(root, val_entries, cfg.labels) if val_entries else None
    log.info("training on %d points of %d membranes %s; validation: %s", len(ts),
             len(ts.membranes), ts.membranes,
             f"{len(vs)} points of the val rows" if vs else "held-out points")
    names = [e.name for e in (*train_entries, *val_entries)]
    voxel_size = common_voxel_size(root, names)
    result = train(ts.cubes, ts.labels, vs.cubes if vs else None, vs.labels if vs else None,
                   cfg.train, progress, groups=ts.groups, zyx=ts.zyx)
    metrics = {**result.metrics(), "train_points": len(ts),
               "train_membranes": [list(m) for m in ts.membranes],
               "val_points": len(vs) if vs else None}
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(result.model, out, ModelMeta(
        cube_size=cfg.geometry.cube_size, channels=cfg.train.channels, voxel_size_A=voxel_size,
        train_config=config_dict(cfg.train), metrics=metrics,
    ))
    _write_json_atomic(out / PIPELINE_FILE, cfg.to_dict())
    return metrics


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def model_pipeline_config(model_dir: str | os.PathLike) -> PipelineConfig:
    """The geometry/cluster settings a model was trained with (defaults when absent).

    Of the inference section only ``rotations`` is taken: batch size and device belong to the
    machine that predicts, not to the model."""
    path = Path(model_dir) / PIPELINE_FILE
    if not path.is_file():
        return PipelineConfig()
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(path, f"malformed JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(path, f"expected a JSON object of config sections, got a "
                               f"{type(data).__name__}")
    base = PipelineConfig()
    kw = {}
    for section in ("convert", "geometry", "labels", "inference", "cluster", "orientation"):
        if section in data:
            values = data[section]
            if not isinstance(values, dict):
                raise InputError(path, f"section {section!r} is a {type(values).__name__}, "
                                       "expected a JSON object")
            if section == "inference":
                values = {k: v for k, v in values.items() if k == "rotations"}
            cls = type(getattr(base, section))
            check_types(cls, values, path, section)
            try:
                kw[section] = config_from_dict(cls, values)
            except (TypeError, ValueError) as exc:
                raise InputError(path, f"[{section}]: {exc}") from exc
    from dataclasses import replace

    return replace(base, **kw)


# --------------------------------------------------------------------------- sequential path
def prepare_sequential(
    entries: Sequence[TomogramEntry], root: str | os.PathLike, cfg: PipelineConfig
) -> dict[str, list[int]]:
    """Stages 0-2 (convert, sampling, voting, sides, extraction) for every entry in this
    process; returns the membrane ids per tomogram. Finished work is skipped."""
    membranes = {}
    for entry in entries:
        ids = convert_entry(entry, root, cfg.convert)
        sides = side_specs(entry, ids)
        for mid in ids:
            geometry_membrane(root, entry.name, mid, cfg.geometry, sides[mid])
        membranes[entry.name] = ids
    return membranes


def predict_sequential(
    entries: Sequence[TomogramEntry],
    root: str | os.PathLike,
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: PipelineConfig,
) -> list[dict]:
    """The whole predict chain in this process, no dask, no Prefect (reference path)."""
    validate_entries(entries)
    summaries = []
    for entry in entries:
        ids = convert_entry(entry, root, cfg.convert)
        sides = side_specs(entry, ids)
        for mid in ids:
            geometry_membrane(root, entry.name, mid, cfg.geometry, sides[mid])
            score_membrane(root, entry.name, mid, model_dir, cfg.inference)
            cluster_membrane(root, entry.name, mid, cfg.cluster, cfg.orientation)
        summaries.append(write_tomogram_outputs(root, entry.name, out_dir, entry.particles,
                                                cfg.cluster.score_threshold))
    store.sweep_orphans(root, [e.name for e in entries])
    write_campaign_star(out_dir, [e.name for e in entries])
    return summaries
