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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from . import mrc, store
from .average import (
    AVERAGE_GLOB,
    AverageSum,
    accumulate_average,
    model_averages,
    read_average,
    search_in_plane,
    write_average,
)
from .calibration import CalibrationRows
from .clustering import ClusterConfig
from .config import (
    InferenceConfig,
    LabelConfig,
    PipelineConfig,
    check_types,
    config_from_dict,
)
from .convert import BlockMap, ConvertConfig, convert_tomogram, validate_entry
from .errors import InputError
from .geometry import (
    GeometryConfig,
    cube_intensity,
    geometry_key,
    membrane_cubes,
    membrane_source,
    process_membrane,
    read_geometry,
    source_cubes,
    stored_cubes,
)
from .labels import ellipsoid_covariance, face_labels, template_covariance
from .manifest import TomogramEntry
from .napari_points import write_points_csv
from .orientation import OrientationConfig
from .picks import PickConfig, Picks, cluster_classes, concat_picks, reduce_picks
from .sides import SideSpec, parse_sides
from .star import (
    CLASS_NAME_COLUMN,
    CLASS_NUMBER_COLUMN,
    particles_frame,
    particles_matrices,
    particles_zyx,
    read_particles,
    to_tomogram_voxels,
    tomostar_name,
    write_particles,
    write_star_blocks,
)

log = logging.getLogger(__name__)

PICKS_KEY = "picks"
#: ``<geometry group>/score_parts/<start>-<stop>``: scores of parts of a membrane's points
SCORE_PARTS = "score_parts"
#: scores of one membrane spanning less than this (voxels) carry no signal: no picks
MIN_SCORE_SPREAD = 1e-3
PIPELINE_FILE = "pipeline.json"
CAMPAIGN_STAR = "particles.star"
TOMOGRAMS_STAR = "tomograms.star"
#: ``<out>/napari/<name>.csv``: the picks as a napari points layer (Å, score, membrane, side)
NAPARI_DIR = "napari"


# --------------------------------------------------------------------------- conversion
def validate_entries(entries: Sequence[TomogramEntry]) -> None:
    """Header-level checks of every manifest row before any work starts (InputError)."""
    for entry in entries:
        validate_entry(entry)


def convert_entry(entry: TomogramEntry, root: str | os.PathLike, cfg: ConvertConfig,
                  fan_out: BlockMap | None = None) -> list[int]:
    """Convert one tomogram (skipped when current); return its membrane ids. ``fan_out``:
    how a large tomogram's blocks are mapped (:func:`~membrain_dist.convert.convert_tomogram`)."""
    meta = convert_tomogram(entry, root, cfg, fan_out)
    return [int(m["id"]) for m in meta.membranes]


def harmonise_polarity(root: str | os.PathLike, names: Sequence[str],
                       sign: int | None = None) -> int | None:
    """One membrane contrast for a campaign; returns its sign (None: no tomogram to vote).

    Each converted tomogram measured its own sign (``convert.decide_polarity``); at SNR ~0.3,
    on a small or badly segmented membrane, one can come out wrong. The campaign's sign is the
    sign of the sum of the data-decided margins; tomograms that disagree are switched to it
    with a warning (their geometry, whose provenance holds the intensity, is then recomputed).
    Tomograms whose polarity the manifest forced are neither counted nor changed. A given
    ``sign`` (the campaign's, decided on its first tomograms by a streaming run) is applied
    without a vote."""
    metas = {n: store.read_meta(root, n) for n in names}
    voting = {n: m for n, m in metas.items()
              if m is not None and m.intensity.get("polarity_from") in ("data", "campaign")}
    if not voting:
        return sign
    total = sum(float(m.intensity.get("polarity_margin", 0.0)) for m in voting.values())
    if sign is None:
        sign = 1 if total >= 0 else -1
    for n, m in voting.items():
        if int(m.intensity["polarity"]) != sign:
            log.warning("%s: membrane contrast %+d disagrees with the campaign's %+d (margin %.2f "
                        "against a sum of %.2f over %d tomograms): using the campaign's", n,
                        int(m.intensity["polarity"]), sign, m.intensity.get("polarity_margin"),
                        total, len(voting))
            g = zarr.open_group(store=str(root), path=n, mode="r+")
            g.attrs["intensity"] = {**m.intensity, "polarity": sign, "polarity_from": "campaign"}
    return sign


def membrane_ids(root: str | os.PathLike, name: str) -> list[int]:
    meta = store.read_meta(root, name)
    if meta is None:
        raise KeyError(f"{root}: tomogram {name!r} is not converted")
    return [int(m["id"]) for m in meta.membranes]


#: labelled voxels up to which small membranes are grouped into one task per stage: a few
#: seconds of CPU work (geometry ~17 us, scoring at 4 turns ~45 us a voxel on one core)
GROUP_VOXELS = 2**17


def group_membranes(voxels: Mapping[int, int], ids: Sequence[int],
                    max_voxels: int = GROUP_VOXELS) -> list[tuple[int, ...]]:
    """Membranes ``ids`` in groups of at most ``max_voxels`` labelled voxels (``voxels``: id
    -> labelled voxels), one task per group and stage, so that a tomogram of many small
    membranes is not many tiny tasks. First fit, largest membrane first; a membrane of
    ``max_voxels`` or more, and every membrane when ``max_voxels`` is 0, is a group of its
    own. Groups come largest first, each its members' ids largest first."""
    order = sorted((int(i) for i in ids), key=lambda i: (-int(voxels.get(i, 0)), i))
    groups: list[list[int]] = []
    totals: list[int] = []
    for i in order:
        v = int(voxels.get(i, 0))
        slot = next((k for k, t in enumerate(totals)
                     if v < max_voxels and t < max_voxels and t + v <= max_voxels), None)
        if slot is None:
            groups.append([i])
            totals.append(v)
        else:
            groups[slot].append(i)
            totals[slot] += v
    return [tuple(g) for _, g in sorted(zip(totals, groups, strict=True),
                                        key=lambda tg: -tg[0])]


def membrane_groups(root: str | os.PathLike, name: str, ids: Sequence[int],
                    max_voxels: int = GROUP_VOXELS) -> list[tuple[int, ...]]:
    """:func:`group_membranes` of a converted tomogram's membranes (sizes from its metadata)."""
    meta = store.read_meta(root, name)
    voxels = {int(m["id"]): int(m.get("voxels", 0)) for m in (meta.membranes if meta else [])}
    return group_membranes(voxels, ids, max_voxels)


def side_specs(entry: TomogramEntry, ids: Sequence[int]) -> dict[int, SideSpec]:
    """The side selection of each membrane of a manifest row."""
    lookup = parse_sides(entry.sides, entry.tomogram.parent)
    return {int(i): lookup(int(i)) for i in ids}


# --------------------------------------------------------------------------- geometry
def geometry_membrane(
    root: str | os.PathLike, name: str, membrane_id: int, cfg: GeometryConfig, side: SideSpec,
    keep_cubes: bool = False,
) -> int:
    """Stages 1 + 2 for one membrane (see :func:`membrain_dist.geometry.process_membrane`)."""
    return process_membrane(root, name, membrane_id, cfg, side, keep_cubes=keep_cubes)


# --------------------------------------------------------------------------- scoring
def scores_key(name: str, membrane_id: int) -> str:
    """Store key of one membrane's scores (an array beside its geometry)."""
    return f"{geometry_key(name, membrane_id)}/scores"


def _model_json(model_dir: str | os.PathLike, key: str | None = None) -> dict:
    """A model directory's ``model.json`` (InputError naming it when unreadable, or when
    ``key`` is missing)."""
    path = Path(model_dir) / "model.json"
    try:
        meta = json.loads(path.read_text())
        if key is not None:
            meta[key]  # noqa: B018 - presence check
        return meta
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"not a membrain-dist model directory ({exc})") from exc


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """The weights' SHA-256 as recorded in ``model.json`` (what makes two models differ)."""
    return str(_model_json(model_dir, "weights_sha256")["weights_sha256"])


#: points cut and scored together when cubes are cut in memory: 16,384 cubes of 12^3 float32
#: are 113 MB (the unit of work of a streaming campaign's cut and score tasks)
PART_POINTS = 16384


def point_parts(n_points: int, part_points: int = PART_POINTS) -> list[tuple[int, int]]:
    """Row ranges ``[(start, stop), ...]`` of at most ``part_points`` covering ``n_points``."""
    if part_points < 1:
        raise ValueError(f"part_points must be >= 1, got {part_points}")
    return [(a, min(a + part_points, n_points)) for a in range(0, n_points, part_points)]


def _scores_provenance(root: str | os.PathLike, name: str, membrane_id: int,
                       model_dir: str | os.PathLike, cfg: InferenceConfig
                       ) -> tuple[dict, dict]:
    """``(geometry attrs, provenance of the scores)`` of one membrane (KeyError: no geometry).

    The scores depend on the model, the passes (and the cutoffs of a turn cascade) and the
    geometry (whose provenance holds the cube parameters), not on whether the cubes were
    stored or cut in memory."""
    gkey = geometry_key(name, membrane_id)
    gattrs = store.node_attrs(root, gkey)
    if gattrs is None:
        raise KeyError(f"{root}: no geometry for {gkey}")
    params: dict[str, Any] = {"model": model_fingerprint(model_dir), "rotations": cfg.rotations}
    if cfg.refine_below and (cfg.rotations > 1 or cfg.screening):
        params["refine_below"] = list(cfg.refine_below)
    if cfg.screening:
        params["screen"] = float(cfg.screen)
    if cfg.precision != "float32":  # as asked (auto: resolved on each scoring worker)
        params["precision"] = cfg.precision
    prov = store.provenance("scores", params, {"geometry": gattrs["provenance"]})
    return gattrs, prov


def scores_current(root: str | os.PathLike, name: str, membrane_id: int,
                   model_dir: str | os.PathLike, cfg: InferenceConfig) -> bool:
    """Whether the stored scores of one membrane were made by this model from this geometry."""
    return _scores_current_at(root, scores_key(name, membrane_id), name,
                              membrane_id, model_dir, cfg)


def _scores_current_at(root: str | os.PathLike, key: str, name: str, membrane_id: int,
                       model_dir: str | os.PathLike, cfg: InferenceConfig) -> bool:
    """Whether the array at ``key`` holds scores of this model from this geometry."""
    try:
        _, prov = _scores_provenance(root, name, membrane_id, model_dir, cfg)
    except KeyError:
        return False
    attrs = store.node_attrs(root, key)
    return attrs is not None and store.is_current(attrs, prov)


def n_points(root: str | os.PathLike, name: str, membrane_id: int) -> int:
    """Points of one membrane's stored geometry (KeyError: none)."""
    attrs = store.node_attrs(root, geometry_key(name, membrane_id))
    if attrs is None:
        raise KeyError(f"{root}: no geometry for {geometry_key(name, membrane_id)}")
    return int(attrs["n_points"])


def _scoring_model(root: str | os.PathLike, name: str, model_dir: str | os.PathLike,
                   cfg: InferenceConfig):
    """``(model, device)`` of this worker process, checked against the tomogram's voxel size."""
    from .inference import configure_threads, get_model, resolve_device

    device = resolve_device(cfg.device)
    configure_threads()
    meta = store.read_meta(root, name)
    model, _ = get_model(model_dir, device)
    _check_model(model_dir, meta.voxel_size_A if meta else None)
    return model, device


def score_cubes(cubes: np.ndarray, root: str | os.PathLike, name: str,
                model_dir: str | os.PathLike, cfg: InferenceConfig = InferenceConfig()
                ) -> np.ndarray:
    """Predicted distances ``(n,)`` float32 of in-memory cubes of tomogram ``name`` (the
    inference half of a streaming campaign: cubes cut by ``membrane_cubes`` on another
    worker)."""
    from .inference import predict_distances

    model, device = _scoring_model(root, name, model_dir, cfg)
    return predict_distances(model, cubes, batch_size=cfg.batch_size, device=device,
                             rotations=cfg.rotations, refine_below=cfg.refine_below,
                             precision=cfg.precision).astype(np.float32)


def store_scores(root: str | os.PathLike, name: str, membrane_id: int,
                 model_dir: str | os.PathLike, cfg: InferenceConfig,
                 parts: Sequence[np.ndarray]) -> int:
    """Write the scores of one membrane, given as consecutive parts ((n,) or (n, C) each),
    with provenance and the model's class names."""
    gattrs, prov = _scores_provenance(root, name, membrane_id, model_dir, cfg)
    classes = model_classes(model_dir)
    scores = (np.concatenate([np.asarray(p, np.float32) for p in parts]) if parts
              else np.zeros((0,) if len(classes) <= 1 else (0, len(classes)), np.float32))
    n = int(scores.shape[0])
    if n != int(gattrs["n_points"]):
        raise ValueError(f"{name} m{membrane_id}: {n} scores for {gattrs['n_points']} points")
    return write_scores(root, scores_key(name, membrane_id), scores, prov,
                        classes)


def _part_key(name: str, membrane_id: int, start: int, stop: int) -> str:
    return f"{geometry_key(name, membrane_id)}/{SCORE_PARTS}/{int(start)}-{int(stop)}"


def part_current(root: str | os.PathLike, name: str, membrane_id: int,
                 model_dir: str | os.PathLike, cfg: InferenceConfig, start: int, stop: int
                 ) -> bool:
    """Whether the scores of points ``start:stop`` are stored as a current part."""
    return _scores_current_at(root, _part_key(name, membrane_id, start, stop), name,
                              membrane_id, model_dir, cfg)


def score_part(cubes: np.ndarray, root: str | os.PathLike, name: str, membrane_id: int,
               model_dir: str | os.PathLike, cfg: InferenceConfig, start: int, stop: int) -> int:
    """Score the cubes of points ``start:stop`` of one membrane (cut elsewhere by
    :func:`part_cubes`, handed over in memory) and store them as a part of its scores (joined
    by :func:`assemble_scores`). Parts outlive an interrupted run: a rerun scores only the
    missing ones."""
    _, prov = _scores_provenance(root, name, membrane_id, model_dir, cfg)
    plan = _part_plan(root, name, membrane_id, cfg, start, stop)
    if cubes.shape[0] != plan.rows.size:
        raise ValueError(f"{name} m{membrane_id}: {cubes.shape[0]} cubes for the "
                         f"{plan.rows.size} rows that scoring points {start}:{stop} needs")
    scores = _part_scores(cfg, plan, lambda rows: score_cubes(
        cubes if rows is None else cubes[rows], root, name, model_dir, cfg))
    store.write_array_atomic(root, _part_key(name, membrane_id, start, stop), scores,
                             chunks=None, attrs={"provenance": prov})
    return int(scores.shape[0])


def part_cubes(root: str | os.PathLike, name: str, membrane_id: int, gcfg: GeometryConfig,
               cfg: InferenceConfig, start: int, stop: int) -> np.ndarray:
    """The cubes :func:`score_part` needs for the points ``start:stop``: theirs, then (with
    the spatial screen) those of the screened points of other parts within reach."""
    plan = _part_plan(root, name, membrane_id, cfg, start, stop)
    return membrane_cubes(root, name, membrane_id, gcfg, start, stop, plan.extra_rows)


def assemble_scores(root: str | os.PathLike, name: str, membrane_id: int,
                    model_dir: str | os.PathLike, cfg: InferenceConfig,
                    part_points: int = PART_POINTS) -> int:
    """Join the stored parts of one membrane's scores into ``.../scores`` (skipped when those
    are current) and remove the parts. KeyError names a part that is missing or stale."""
    import shutil

    if scores_current(root, name, membrane_id, model_dir, cfg):
        return n_points(root, name, membrane_id)
    ranges = point_parts(n_points(root, name, membrane_id), part_points)
    parts = []
    for a, b in ranges:
        if not part_current(root, name, membrane_id, model_dir, cfg, a, b):
            raise KeyError(f"{root}: scores of rows {a}:{b} of {name} m{membrane_id} missing")
        key = _part_key(name, membrane_id, a, b)
        parts.append(np.asarray(zarr.open_array(store=str(root), path=key, mode="r")[...]))
    n = store_scores(root, name, membrane_id, model_dir, cfg, parts)
    shutil.rmtree(Path(root).joinpath(*geometry_key(name, membrane_id).split("/"), SCORE_PARTS),
                  ignore_errors=True)
    return n


@dataclass(frozen=True)
class ScoreParts:
    """How a membrane's scores were made in parts (what :func:`assemble_scores` needs)."""

    model_dir: str
    inference: InferenceConfig
    part_points: int = PART_POINTS


def cuts_on_device(cfg: InferenceConfig, device: str, gcfg: GeometryConfig) -> bool:
    """Whether scoring cuts its cubes on the inference device (``InferenceConfig.cutter``)."""
    if gcfg.order != 1 or cfg.cutter == "host":
        return False
    return cfg.cutter == "device" or str(device).startswith("cuda")


def score_membrane(
    root: str | os.PathLike,
    name: str,
    membrane_id: int,
    model_dir: str | os.PathLike,
    cfg: InferenceConfig = InferenceConfig(),
    gcfg: GeometryConfig | None = None,
    part_points: int = PART_POINTS,
) -> int:
    """Predict the distance of every point of one membrane; write ``.../scores``.

    The cubes are read from the geometry group when it kept them, else cut here part by part
    (``part_points`` at a time, :func:`~membrain_dist.geometry.membrane_cubes`, with ``gcfg``
    the geometry's configuration): one task cuts and scores. Runs on whichever worker gets
    it: CUDA when the worker has a GPU and ``cfg.device`` is ``auto``; the model is loaded once
    per worker process (``inference.get_model``). With the spatial screen
    (``cfg.screening``) only some points are scored, the rest stored as NaN
    (:mod:`membrain_dist.screen`). Returns the number of points of the membrane.
    Skipped when the stored scores were made by the same model from the same geometry.
    """
    from .inference import predict_distances, predict_points

    gattrs, prov = _scores_provenance(root, name, membrane_id, model_dir, cfg)
    gkey = geometry_key(name, membrane_id)
    skey = scores_key(name, membrane_id)
    sattrs = store.node_attrs(root, skey)
    if sattrs is not None and store.is_current(sattrs, prov):
        log.info("%s: current, skipped", skey)
        return int(gattrs["n_points"])
    model, device = _scoring_model(root, name, model_dir, cfg)
    gcfg = gcfg or GeometryConfig()
    kw = dict(batch_size=cfg.batch_size, device=device, rotations=cfg.rotations,
              refine_below=cfg.refine_below, precision=cfg.precision)
    ranges = point_parts(int(gattrs["n_points"]), part_points)
    stored = stored_cubes(root, name, membrane_id)
    if stored and not cfg.screening:  # read chunk by chunk, in one call
        cubes = zarr.open_array(store=str(root), path=f"{gkey}/cubes", mode="r")
        parts = [predict_distances(model, cubes, **kw)]
    else:
        on_device = not stored and cuts_on_device(cfg, device, gcfg)
        membrane = _membrane_screen(root, name, membrane_id, cfg) if cfg.screening else None
        parts = []
        for a, b in ranges:
            plan = _part_plan(root, name, membrane_id, cfg, a, b, membrane)
            if stored:
                part = membrane_cubes(root, name, membrane_id, gcfg, a, b, plan.extra_rows)

                def score(local, part=part):
                    return predict_distances(model, part if local is None else part[local], **kw)
            else:
                src = membrane_source(root, name, membrane_id, gcfg, a, b, plan.extra_rows)

                def score(local, src=src):
                    sel = src.rows(local)
                    if on_device:
                        return predict_points(model, sel.read_volume, sel.shape_zyx, sel.zyx,
                                              sel.normal, size=gcfg.cube_size,
                                              intensity=sel.intensity, **kw)
                    return predict_distances(model, source_cubes(sel, gcfg), **kw)
            parts.append(_part_scores(cfg, plan, score))
    n = store_scores(root, name, membrane_id, model_dir, cfg, parts)
    log.info("%s: %d points scored on %s", skey, n, device)
    return n


@dataclass(frozen=True)
class _PartPlan:
    """What scoring the points ``start:stop`` of a membrane needs: ``rows``, the membrane rows
    whose cubes are scored (the part's, then with the spatial screen the screened points of
    other parts within reach); for the screen, the points (zyx, side) of those rows and the
    screened ones among them (indices into ``rows``)."""

    start: int
    stop: int
    rows: np.ndarray
    zyx: np.ndarray | None = None
    side: np.ndarray | None = None
    screen: np.ndarray | None = None

    @property
    def extra_rows(self) -> np.ndarray | None:
        """``rows`` when they reach beyond the part (what ``membrane_cubes(rows=...)`` reads),
        None when they are just ``start:stop`` (read as a slice)."""
        return None if self.rows.size == self.stop - self.start else self.rows


def _part_plan(root: str | os.PathLike, name: str, membrane_id: int, cfg: InferenceConfig,
               start: int, stop: int,
               membrane: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> _PartPlan:
    """``membrane``: the membrane's (zyx, side, screen rows) when already read (one membrane
    scored in several parts reads and screens it once)."""
    own = np.arange(start, stop, dtype=np.int64)
    if not cfg.screening:
        return _PartPlan(start, stop, own)
    zyx, side, screened = membrane or _membrane_screen(root, name, membrane_id, cfg)
    from .screen import reach_rows

    extra = reach_rows(zyx, side, start, stop, cfg.screen, screen=screened)
    rows = np.concatenate([own, extra])
    inside = screened[(screened >= start) & (screened < stop)] - start
    screen = np.concatenate([inside, own.size + np.arange(extra.size)])
    return _PartPlan(start, stop, rows, zyx[rows], side[rows], screen)


def _membrane_screen(root: str | os.PathLike, name: str, membrane_id: int, cfg: InferenceConfig
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(zyx, side, screened rows) of one membrane's stored geometry."""
    from .screen import screen_rows

    g = zarr.open_group(store=str(root), path=geometry_key(name, membrane_id), mode="r")
    zyx, side = np.asarray(g["zyx"][...]), np.asarray(g["side"][...])
    return zyx, side, screen_rows(zyx, side, cfg.screen)


def _part_scores(cfg: InferenceConfig, plan: _PartPlan,
                 score: Callable[[np.ndarray | None], np.ndarray]) -> np.ndarray:
    """Scores of the points ``plan.start:plan.stop``: ``score(None)`` (every point), or with
    ``cfg.screening`` the spatial screen over ``score(local)`` (``local``: indices into
    ``plan.rows``; NaN for the points it leaves unscored,
    :func:`membrain_dist.screen.screened_scores`)."""
    if not cfg.screening:
        return score(None)
    from .screen import screened_scores

    return screened_scores(score, plan.zyx, plan.side, cfg.refine_below, cfg.screen,
                           screen=plan.screen, n=plan.stop - plan.start)


def model_classes(model_dir: str | os.PathLike) -> list[str]:
    """The class names a model directory records (``[]``: one unnamed class)."""
    return list(_model_json(model_dir).get("classes") or [])


def _check_model(model_dir: str | os.PathLike, voxel_size_A: float | None) -> None:
    """Refuse a model trained at another voxel size (never silently wrong picks)."""
    from .model import VOXEL_SIZE_RTOL, load_model

    trained = _model_json(model_dir).get("voxel_size_A")
    if trained and voxel_size_A and abs(trained - voxel_size_A) > VOXEL_SIZE_RTOL * trained:
        # load_model raises the InputError with the file named
        load_model(model_dir, "cpu", voxel_size_A=voxel_size_A)


#: attribute of a scores array naming the model's classes (one per column; absent: unnamed)
CLASSES_ATTR = "classes"


def write_scores(root: str | os.PathLike, key: str, scores: np.ndarray, prov: dict,
                 classes: Sequence[str] = ()) -> int:
    """Store one membrane's predicted distances at ``key``: (N,) for one class, (N, C) for a
    model of several (``classes``, their names, in the attrs when given); returns N."""
    n = int(scores.shape[0])
    attrs: dict = {"provenance": prov}
    if classes:
        attrs[CLASSES_ATTR] = list(classes)
    store.write_array_atomic(root, key, np.asarray(scores, np.float32),
                             chunks=(max(1, min(n, 65536)), *scores.shape[1:]), attrs=attrs)
    return n


def read_scores(root: str | os.PathLike, name: str, membrane_id: int) -> np.ndarray:
    """One membrane's stored scores as written: (N,) one class, (N, C) several; NaN for the
    points the spatial screen left unscored."""
    key = scores_key(name, membrane_id)
    return np.asarray(zarr.open_array(store=str(root), path=key, mode="r")[...])


def read_class_scores(root: str | os.PathLike, name: str, membrane_id: int
                      ) -> tuple[np.ndarray, list[str]]:
    """One membrane's scores with a class axis, (N, C), and the class names (``[]``: one
    unnamed class, as every store written before classes existed)."""
    key = scores_key(name, membrane_id)
    arr = zarr.open_array(store=str(root), path=key, mode="r")
    scores = np.asarray(arr[...])
    return scores.reshape(scores.shape[0], -1), list(arr.attrs.get(CLASSES_ATTR, []))


# --------------------------------------------------------------------------- clustering
def picks_key(name: str, membrane_id: int) -> str:
    return f"{name}/{PICKS_KEY}/m{int(membrane_id)}"


def cluster_membrane(
    root: str | os.PathLike,
    name: str,
    membrane_id: int,
    ccfg: ClusterConfig,
    ocfg: OrientationConfig,
) -> int:
    """Stages 4 + 5 for one membrane from the stored scores; writes ``<name>/picks/m<id>``."""
    gkey = geometry_key(name, membrane_id)
    sattrs = store.node_attrs(root, scores_key(name, membrane_id))
    if sattrs is None:
        raise KeyError(f"{root}: membrane {gkey} has no scores yet")
    prov = store.provenance("picks", {"cluster": ccfg.to_dict(), "orientation": ocfg.to_dict()},
                            {"scores": sattrs["provenance"]})
    key = picks_key(name, membrane_id)
    attrs = store.node_attrs(root, key)
    if attrs is not None and store.is_current(attrs, prov):
        return int(attrs["n_picks"])
    _check_refined(sattrs["provenance"], ccfg, gkey)
    geo = read_geometry(root, name, membrane_id)
    scores = read_scores(root, name, membrane_id)
    scored = scores[np.isfinite(scores)]  # NaN: left unscored by the spatial screen
    if scored.size and not float(np.ptp(scored)) > MIN_SCORE_SPREAD:
        # every point scores the same: the network saw nothing to tell them apart (a blank
        # or near-blank tomogram); Mean Shift would turn that into evenly spread "particles"
        log.warning("%s: all %d scores are %.4g (no spread): no particles picked on this "
                    "membrane", gkey, scored.size, float(scored[0]))
        geo = {k: v[:0] for k, v in geo.items() if k in ("zyx", "normal", "side")}
        scores = scores[:0]
    picks = cluster_classes(geo["zyx"], geo["normal"], geo["side"], scores, ccfg, ocfg)
    with store.atomic_group(root, key) as g:
        for field_name in PICK_FIELDS:
            data = getattr(picks, field_name)
            g.create_array(field_name, data=data, chunks=tuple(max(1, c) for c in data.shape))
        g.attrs.update({"provenance": prov, "n_picks": int(picks.zyx.shape[0]),
                        CLASSES_ATTR: list(sattrs.get(CLASSES_ATTR, []))})
    log.info("%s: %d particles", key, picks.zyx.shape[0])
    return int(picks.zyx.shape[0])


def _thresholds(ccfg: ClusterConfig) -> tuple[float, ...]:
    """The score thresholds clustering applies: one per class where calibrated per class,
    else the one of every class."""
    return ccfg.class_score_thresholds or (ccfg.score_threshold,)


def _check_refined(score_prov: dict, ccfg: ClusterConfig, where: str) -> None:
    """Refuse to cluster scores of a turn cascade at a threshold above its cutoff: points
    between the two kept a single pass (ValueError naming the membrane)."""
    below = score_prov.get("params", {}).get("refine_below")
    if not below:
        return
    thresholds = _thresholds(ccfg)
    cut = list(below) * len(thresholds) if len(below) == 1 else list(below)
    if len(cut) != len(thresholds) or any(
            t > c for t, c in zip(thresholds, cut, strict=True)):
        raise ValueError(
            f"{where}: scores were refined only below {below} voxels (turn cascade, screen), "
            f"but the clustering threshold is {list(thresholds)}: score again with it "
            "(pipeline.with_refinement) or without the cutoffs (refine_margin None)")


def with_refinement(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with the cutoffs of the turn cascade and the spatial screen
    (``InferenceConfig.refine_below``, voxels) set from the clustering thresholds (per class
    where calibrated per class) plus ``refine_margin``; none when the margin is None, at one
    pass without a screen, or when the thresholds are not in voxels. Called where a
    prediction's settings are final (``flows.predict.predict_entries``,
    :func:`predict_sequential`), so a ``--threshold`` moves the cutoffs with it."""
    from dataclasses import replace

    icfg, ccfg = cfg.inference, cfg.cluster
    below: tuple[float, ...] = ()
    if (icfg.refine_margin is not None and (icfg.rotations > 1 or icfg.screen is not None)
            and ccfg.units == "voxel"):
        below = tuple(float(t) + float(icfg.refine_margin) for t in _thresholds(ccfg))
    if below == icfg.refine_below:
        return cfg
    return replace(cfg, inference=replace(icfg, refine_below=below))


#: arrays of a picks group (``klass``: absent in stores written before classes, read as 0)
PICK_FIELDS = ("zyx", "matrices", "score", "n_points", "side", "from_pca", "klass")


def read_picks(root: str | os.PathLike, name: str, membrane_id: int) -> Picks:
    g = zarr.open_group(store=str(root), path=picks_key(name, membrane_id), mode="r")
    return Picks(*(np.asarray(g[f][...]) if f in g else None for f in PICK_FIELDS))


def picks_classes(root: str | os.PathLike, name: str) -> list[str]:
    """Class names of a tomogram's picks (``[]``: one unnamed class), from its first
    membrane's picks group (every membrane is scored by the same model)."""
    for mid in membrane_ids(root, name):
        attrs = store.node_attrs(root, picks_key(name, mid))
        if attrs is not None:
            return list(attrs.get(CLASSES_ATTR, []))
    return []


# --------------------------------------------------------------------------- outputs
def tomogram_particles(
    root: str | os.PathLike, name: str, pcfg: PickConfig = PickConfig(),
    in_plane: InPlaneSearch | None = None,
) -> pd.DataFrame:
    """All picks of one tomogram as a STAR table (CONVENTIONS.md columns), duplicates across
    faces and membranes suppressed and centres lifted to the annotated height
    (:func:`membrain_dist.picks.reduce_picks`); with ``in_plane`` their in-plane angles come
    from the model's average (``mbOrientationFrom`` = ``average``). Picks of a model with
    named classes carry ``rlnClassNumber`` (1-based) and ``mbClassName``; each class is
    reduced on its own (:func:`membrain_dist.picks.reduce_picks`)."""
    meta = store.read_meta(root, name)
    if meta is None:
        raise KeyError(f"{root}: tomogram {name!r} is not converted")
    parts, mids = [], []
    for mid in membrane_ids(root, name):
        p = read_picks(root, name, mid)
        parts.append(p)
        mids.append(np.full(p.zyx.shape[0], mid, np.int32))
    picks, keep = reduce_picks(concat_picks(parts), pcfg)
    membrane = np.concatenate(mids)[keep] if mids else np.zeros(0, np.int32)
    source = np.where(picks.from_pca, "pca", "normal")
    matrices = picks.matrices
    if in_plane is not None and len(picks.zyx):
        matrices, _, searched = align_in_plane(root, name, picks.zyx, matrices, in_plane,
                                               picks.klass)
        source = np.where(searched, "average", source)
    df = particles_frame(
        name, picks.zyx, matrices, meta.shape_zyx, meta.voxel_size_A,
        extra={"mbScore": picks.score, "mbPoints": picks.n_points, "mbMembrane": membrane,
               "mbSide": picks.side, "mbOrientationFrom": source,
               # Warp routes picks to tomograms by micrograph name; the coordinates' pixel size
               "rlnMicrographName": np.full(picks.zyx.shape[0], tomostar_name(name), object),
               "rlnMicrographPixelSize": np.full(picks.zyx.shape[0], float(meta.voxel_size_A))},
    )
    classes = picks_classes(root, name)
    if classes:
        df[CLASS_NUMBER_COLUMN] = picks.klass.astype(np.int64) + 1
        df[CLASS_NAME_COLUMN] = np.array([classes[k] for k in picks.klass], dtype=object)
    if not len(df):
        for c in ("mbOrientationFrom", "rlnMicrographName", CLASS_NAME_COLUMN):
            if c in df:
                df[c] = df[c].astype(object)
    return df


def write_tomogram_outputs(
    root: str | os.PathLike,
    name: str,
    out_dir: str | os.PathLike,
    gt_star: str | os.PathLike | None = None,
    score_threshold: float | None = None,
    qc: bool = True,
    pcfg: PickConfig = PickConfig(),
    in_plane: InPlaneSearch | None = None,
) -> dict:
    """Write ``<out>/qc/<name>.png`` and then ``<out>/<name>.star`` (last: a STAR in the
    folder means the tomogram is done); return a small summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = tomogram_particles(root, name, pcfg, in_plane)
    n_points = 0
    if qc:
        from .qc import qc_figure

        (out / "qc").mkdir(exist_ok=True)
        pts, sc = [], []
        for mid in membrane_ids(root, name):
            pts.append(read_geometry(root, name, mid)["zyx"])
            sc.append(read_class_scores(root, name, mid)[0].min(axis=1))  # nearest class
        pts_a = np.concatenate(pts) if pts else np.zeros((0, 3), np.float32)
        sc_a = np.concatenate(sc) if sc else np.zeros(0, np.float32)
        n_points = int(pts_a.shape[0])
        tomo = store.tomogram_array(root, name)
        z = tomo.shape[0] // 2
        gt = None
        if gt_star is not None and Path(gt_star).is_file():
            meta = store.read_meta(root, name)
            gt = particles_zyx(to_tomogram_voxels(_particles_of(gt_star, name), gt_star,
                                                  meta.shape_zyx, meta.voxel_size_A,
                                                  strict=False))
        qc_figure(out / "qc" / f"{name}.png", pts_a, sc_a, particles_zyx(df) if len(df) else
                  np.zeros((0, 3), np.float32), gt, image=np.asarray(tomo[z]), image_z=z,
                  score_threshold=score_threshold, title=name)
    meta = store.read_meta(root, name)
    write_points_csv(out / NAPARI_DIR / f"{name}.csv",
                     particles_zyx(df) if len(df) else np.zeros((0, 3)), meta.voxel_size_A,
                     {"score": df["mbScore"].to_numpy(), "membrane": df["mbMembrane"].to_numpy(),
                      "side": df["mbSide"].to_numpy(),
                      **({"class": df[CLASS_NUMBER_COLUMN].to_numpy()}
                         if CLASS_NUMBER_COLUMN in df else {})})
    write_particles(out / f"{name}.star", df)
    return {"name": name, "particles": int(len(df)), "points": n_points}


def remove_tomogram_outputs(out_dir: str | os.PathLike, name: str) -> list[str]:
    """Delete ``<out>/<name>.star`` and its QC figure (a row that failed in this run keeps no
    output of an earlier run that ``particles.star`` would not match); returns what went."""
    out = Path(out_dir)
    gone = []
    for p in (out / f"{name}.star", out / "qc" / f"{name}.png", out / NAPARI_DIR / f"{name}.csv"):
        if p.is_file():
            p.unlink()
            gone.append(str(p))
    return gone


def write_campaign_star(out_dir: str | os.PathLike, names: Sequence[str],
                        root: str | os.PathLike | None = None) -> Path:
    """Concatenate ``<out>/<name>.star`` into ``<out>/particles.star``; with the store
    ``root`` also write ``<out>/tomograms.star`` (:func:`write_tomograms_star`)."""
    out = Path(out_dir)
    frames = [read_particles(out / f"{n}.star") for n in names if (out / f"{n}.star").is_file()]
    frames = [f for f in frames if len(f)]
    df = pd.concat(frames, ignore_index=True) if frames else read_particles(out / f"{names[0]}.star")
    write_particles(out / CAMPAIGN_STAR, df)
    if root is not None:
        write_tomograms_star(out / TOMOGRAMS_STAR, root, names)
    return out / CAMPAIGN_STAR


def write_tomograms_star(path: str | os.PathLike, root: str | os.PathLike,
                         names: Sequence[str]) -> Path:
    """A RELION 5 ``tomograms.star`` (block ``global``) of the converted tomograms ``names``:
    ``rlnTomoName``, ``rlnTomoTiltSeriesPixelSize`` (the tomogram's voxel size: the tilt
    series' own pixel size is not known here, so ``rlnTomoTomogramBinning`` is 1),
    ``rlnTomoSizeX/Y/Z`` (voxels; RELION's centre is half of them, the centre of the
    centred-Å coordinates in ``particles.star``), ``rlnTomoReconstructedTomogram`` (the
    source) and Warp's ``rlnMicrographName`` (``<name>.tomostar``)."""
    rows = []
    for n in names:
        meta = store.read_meta(root, n)
        if meta is None:
            continue
        nz, ny, nx = meta.shape_zyx
        rows.append({"rlnTomoName": n, "rlnTomoTiltSeriesPixelSize": float(meta.voxel_size_A),
                     "rlnTomoTomogramBinning": 1.0, "rlnTomoSizeX": int(nx),
                     "rlnTomoSizeY": int(ny), "rlnTomoSizeZ": int(nz),
                     "rlnTomoReconstructedTomogram":
                         str(meta.source.get("tomogram", {}).get("path", "")) or n,
                     "rlnMicrographName": tomostar_name(n)})
    write_star_blocks(path, {"global": pd.DataFrame(rows)})
    return Path(path)


# --------------------------------------------------------------------------- training
def _particles_of(path: str | os.PathLike, name: str) -> pd.DataFrame:
    """Rows of a STAR for tomogram ``name`` (a single-tomogram STAR under another name too;
    a STAR without rows: none, a tomogram annotated as holding no particle)."""
    df = read_particles(path)
    names = df["rlnTomoName"].astype(str)
    if (names == name).any():
        return df[names == name].reset_index(drop=True)
    if names.nunique() <= 1:
        return df.reset_index(drop=True)
    found = sorted(set(names))[:5]
    raise InputError(path, f"no particles with rlnTomoName {name!r} (found {found})")


def annotated_particles(entry: TomogramEntry, shape_zyx: tuple[int, int, int],
                        voxel_size_A: float, strict: bool = True) -> pd.DataFrame:
    """The annotated particles of a manifest row in voxels of its tomogram (shape, voxel size
    in Å): voxel or RELION 5 centred-Å coordinates, at the STAR's pixel size or the row's
    ``particles_angpix`` (:func:`membrain_dist.star.to_tomogram_voxels`)."""
    if entry.particles is None:
        raise InputError(entry.tomogram, f"manifest row {entry.name!r} has no particles STAR")
    return to_tomogram_voxels(_particles_of(entry.particles, entry.name), entry.particles,
                              shape_zyx, voxel_size_A, entry.particles_angpix, strict=strict)


def label_covariance(cfg: LabelConfig) -> np.ndarray | None:
    """Particle shape covariance (zyx, voxels^2) from the template or radii; None: Euclidean."""
    return _shape_covariance(cfg.template, cfg.ellipsoid_radii_zyx)


def _shape_covariance(template: str | None, radii: Sequence[float] | None) -> np.ndarray | None:
    if template:
        info = mrc.read_info(template)
        return template_covariance(np.asarray(mrc.open_volume(info.path), dtype=np.float32))
    if radii:
        return ellipsoid_covariance(tuple(radii))
    return None


def class_covariances(cfg: LabelConfig) -> list[np.ndarray | None]:
    """One shape covariance per class (:attr:`LabelConfig.n_classes`): the class's own
    template, else its own radii, else :func:`label_covariance` (shared)."""
    shared = label_covariance(cfg)
    out = []
    for c in range(cfg.n_classes):
        if c < len(cfg.class_templates) and cfg.class_templates[c]:
            out.append(_shape_covariance(cfg.class_templates[c], None))
        elif c < len(cfg.class_radii_zyx):
            out.append(_shape_covariance(None, cfg.class_radii_zyx[c]))
        else:
            out.append(shared)
    return out


def annotation_classes(df: pd.DataFrame, classes: Sequence[str],
                       source: str | os.PathLike) -> np.ndarray:
    """(K,) int: the class (0-based into ``classes``) of each annotation, -1 for a class not
    in the list; all 0 when ``classes`` is empty (one unnamed class). Read from
    ``mbClassName`` (names) or, without it, ``rlnClassNumber`` (1-based); InputError when
    ``classes`` are named and the STAR has neither column."""
    if not classes:
        return np.zeros(len(df), np.int64)
    if CLASS_NAME_COLUMN in df.columns:
        lookup = {n: i for i, n in enumerate(classes)}
        return np.array([lookup.get(str(v), -1) for v in df[CLASS_NAME_COLUMN]], np.int64)
    if CLASS_NUMBER_COLUMN in df.columns:
        num = pd.to_numeric(df[CLASS_NUMBER_COLUMN], errors="coerce").to_numpy()
        ok = np.isfinite(num) & (num >= 1) & (num <= len(classes))
        return np.where(ok, np.nan_to_num(num) - 1, -1).astype(np.int64)
    raise InputError(source, f"[labels] classes {list(classes)} are named but the STAR has "
                             f"no {CLASS_NAME_COLUMN} or {CLASS_NUMBER_COLUMN} column")


@dataclass
class TrainingSet:
    """Labelled cubes of some membranes, in memory (training sets are a few membranes).

    ``truth_zyx`` / ``truth_row`` are the annotated particles standing on these rows' faces:
    each centre projected onto its face (voxels, zyx) and the row of the point it stands on
    (what threshold calibration scores picks against); ``heights`` are the centres' offsets
    from their faces along the normal (voxels), of every placed particle of the annotated
    tomograms. ``truth_centre`` / ``truth_axis`` are the same particles' annotated centres
    and long in-plane axes (zyx; NaN where the STAR has no angles), for the average.
    ``labels`` has one column per class for a multi-class config (``LabelConfig.classes``);
    ``truth_class`` and ``height_class`` give the class (0-based) of each truth row and
    height."""

    cubes: np.ndarray  # (N, s, s, s) float32
    labels: np.ndarray  # (N,) or (N, C) float32, voxels
    groups: np.ndarray  # (N,) int64: one id per (tomogram, membrane)
    zyx: np.ndarray  # (N, 3) float32
    membranes: list[tuple[str, int, int]]  # (tomogram, membrane id, points)
    normal: np.ndarray  # (N, 3) float32
    side: np.ndarray  # (N,) int8
    truth_zyx: np.ndarray  # (K, 3) float32
    truth_row: np.ndarray  # (K,) int64
    heights: np.ndarray  # (H,) float32
    truth_centre: np.ndarray | None = None  # (K, 3) float32: the annotated centres
    truth_axis: np.ndarray | None = None  # (K, 3) float32: annotated long axes (NaN: none)
    truth_class: np.ndarray | None = None  # (K,) int64: class of each truth row
    height_class: np.ndarray | None = None  # (H,) int64: class of each height

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_labels(self, c: int) -> np.ndarray:
        """(N,) labels of class ``c``."""
        return self.labels if self.labels.ndim == 1 else self.labels[:, c]


@dataclass
class _Labelled:
    """One membrane's labelled points (before the cubes are read)."""

    near: int
    tomo: int
    name: str
    mid: int
    geo: dict[str, np.ndarray]
    labels: np.ndarray  # (n,) or (n, C)
    truth_zyx: np.ndarray
    truth_point: np.ndarray  # index into this membrane's points
    truth_centre: np.ndarray  # (k, 3) annotated centres
    truth_axis: np.ndarray  # (k, 3) annotated long axes, NaN without angles
    truth_class: np.ndarray  # (k,) class of each


def _label_tomogram(
    root: str | os.PathLike, t: int, entry: TomogramEntry, cfg: LabelConfig,
    covs: Sequence[np.ndarray | None],
) -> tuple[list[_Labelled], np.ndarray, np.ndarray]:
    """Labels of every membrane of one annotated tomogram, and the placed centres' heights
    and classes.

    Each centre is stood on one membrane face (:func:`labels.place_on_faces`) and labels only
    that face's points, from its foot on the face: the other face of its membrane and the
    faces of neighbouring membranes see it as absent. Without angles in the STAR the shape is
    made in-plane isotropic about the membrane normal at the foot (:func:`labels.face_labels`).
    With several classes (``covs``: one covariance each) every class is labelled on its own,
    from its own annotations (:func:`annotation_classes`) and shape: labels ``(n, C)``."""
    meta = store.read_meta(root, entry.name)
    if meta is None:
        raise KeyError(f"{root}: tomogram {entry.name!r} is not converted")
    df = annotated_particles(entry, meta.shape_zyx, meta.voxel_size_A)
    klass = annotation_classes(df, cfg.classes, entry.particles)
    centres = particles_zyx(df)
    mats = particles_matrices(df)
    # the long axis only where the STAR gives the in-plane angle (rot) too
    axis = (mats[:, :, 0] if mats is not None and "rlnAngleRot" in df.columns
            else np.full_like(centres, np.nan, dtype=np.float32))
    mids, geos = [], []
    for mid in membrane_ids(root, entry.name):
        geo = read_geometry(root, entry.name, mid)
        if geo["zyx"].shape[0]:
            mids.append(mid)
            geos.append(geo)
    if not geos:
        return [], np.zeros(0, np.float32), np.zeros(0, np.int64)
    sizes = np.array([g["zyx"].shape[0] for g in geos])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    member = np.repeat(np.arange(len(geos)), sizes)
    points = np.concatenate([g["zyx"] for g in geos])
    normals = np.concatenate([g["normal"] for g in geos])
    sides = np.concatenate([g["side"] for g in geos])
    labs, truth, heights, height_class = [], [], [], []
    for c, cov in enumerate(covs):
        sel = klass == c
        rot = mats[sel] if cov is not None and mats is not None else None
        lab, placed = face_labels(points, normals, member, sides, centres[sel], rot, cov,
                                  cfg.max_distance)
        ok = placed.placed
        if (~ok).any():
            log.warning("%s: %d of %d annotated centres%s are farther than %.0f voxels from "
                        "every membrane face and label nothing", entry.particles,
                        int((~ok).sum()), len(ok), f" of {cfg.classes[c]}" if cfg.classes
                        else "", 2 * cfg.max_distance)
        labs.append(lab)
        truth.append((c, ok, placed, member[np.maximum(placed.point, 0)], np.flatnonzero(sel)))
        heights.append(placed.height[ok])
        height_class.append(np.full(int(ok.sum()), c, np.int64))
    lab = labs[0] if len(labs) == 1 else np.stack(labs, axis=1)
    out = []
    for j, (mid, geo) in enumerate(zip(mids, geos, strict=True)):
        part = lab[offsets[j]:offsets[j + 1]]
        near = part < cfg.max_distance / 2
        rows = [(c, ok & (cm == j), placed, idx) for c, ok, placed, cm, idx in truth]
        out.append(_Labelled(
            int((near.any(1) if near.ndim == 2 else near).sum()), t, entry.name, mid, geo,
            part, np.concatenate([p.foot_zyx[m] for _, m, p, _ in rows]).astype(np.float32),
            np.concatenate([p.point[m] - offsets[j] for _, m, p, _ in rows]),
            np.concatenate([centres[i[m]] for _, m, _, i in rows]).astype(np.float32),
            np.concatenate([axis[i[m]] for _, m, _, i in rows]).astype(np.float32),
            np.concatenate([np.full(int(m.sum()), c, np.int64) for c, m, _, _ in rows])))
    return out, np.concatenate(heights).astype(np.float32), np.concatenate(height_class)


def training_set(
    root: str | os.PathLike, entries: Sequence[TomogramEntry], cfg: LabelConfig,
    gcfg: GeometryConfig | None = None,
) -> TrainingSet:
    """Labels for the stored points of annotated tomograms (stage 3 labels) and their cubes
    (cut with ``gcfg``, the geometry's configuration, unless the geometry kept them).

    Membranes without any point closer than ``cfg.max_distance`` to an annotated centre are
    left out when ``cfg.annotated_only``; ``cfg.max_membranes`` keeps the most populated.
    With several ``cfg.classes`` the labels have one column per class.
    """
    covs = class_covariances(cfg)
    candidates: list[_Labelled] = []
    heights, height_class = [], []
    for t, entry in enumerate(entries):
        if entry.particles is None:
            raise InputError(entry.particles or entry.tomogram,
                             f"manifest row {entry.name!r} ({entry.split}) has no particles STAR")
        labelled, h, hc = _label_tomogram(root, t, entry, cfg, covs)
        heights.append(h)
        height_class.append(hc)
        candidates += [c for c in labelled if c.near or not cfg.annotated_only]
    if not candidates:
        raise InputError(entries[0].particles or entries[0].tomogram,
                         "no membrane carries an annotated particle: check the STAR coordinates "
                         "(voxels, X = column) and rlnTomoName")
    if cfg.max_membranes is not None:
        candidates = sorted(candidates, key=lambda c: (-c.near, c.tomo, c.mid))[: cfg.max_membranes]
    cubes, rows = [], 0
    truth_row = []
    for c in candidates:
        cubes.append(membrane_cubes(root, c.name, c.mid, gcfg))
        truth_row.append(c.truth_point.astype(np.int64) + rows)
        rows += c.labels.shape[0]

    def cat(key: str, dtype: type) -> np.ndarray:
        return np.concatenate([c.geo[key] for c in candidates]).astype(dtype)

    return TrainingSet(
        cubes=np.concatenate(cubes),
        labels=np.concatenate([c.labels for c in candidates]).astype(np.float32),
        groups=np.concatenate([np.full(c.labels.shape[0], c.tomo * 1_000_000 + c.mid, np.int64)
                               for c in candidates]),
        zyx=cat("zyx", np.float32),
        membranes=[(c.name, c.mid, int(c.labels.shape[0])) for c in candidates],
        normal=cat("normal", np.float32),
        side=cat("side", np.int8),
        truth_zyx=np.concatenate([c.truth_zyx for c in candidates]).reshape(-1, 3),
        truth_row=np.concatenate(truth_row),
        heights=np.concatenate(heights).astype(np.float32),
        truth_centre=np.concatenate([c.truth_centre for c in candidates]).reshape(-1, 3),
        truth_axis=np.concatenate([c.truth_axis for c in candidates]).reshape(-1, 3),
        truth_class=np.concatenate([c.truth_class for c in candidates]),
        height_class=np.concatenate(height_class),
    )


def particle_average(
    root: str | os.PathLike, ts: TrainingSet, cfg: PipelineConfig, klass: int | None = None
) -> AverageSum:
    """The annotated particles of a training set (of class ``klass`` only, when given)
    averaged in their membrane frames (:func:`membrain_dist.average.accumulate_average`), from
    each tomogram's normalised (and low-passed, as the cubes) volume in the store; particles
    without angles are left out."""
    acc = AverageSum.empty(cfg.orientation.average_size)
    if ts.truth_centre is None or ts.truth_axis is None or not len(ts.truth_row):
        return acc
    mine = np.isfinite(ts.truth_axis).all(1)
    if klass is not None and ts.truth_class is not None:
        mine &= ts.truth_class == klass
    names = {name for name, _, _ in ts.membranes}
    row_name = np.concatenate([np.full(n, name, dtype=object) for name, _, n in ts.membranes])
    for name in sorted(names):
        sel = (row_name[ts.truth_row] == name) & mine
        if not sel.any():
            continue
        meta = store.read_meta(root, name)
        acc += accumulate_average(
            store.tomogram_array(root, name).__getitem__, tuple(meta.shape_zyx),
            ts.truth_centre[sel], ts.truth_axis[sel], ts.normal[ts.truth_row[sel]],
            cfg.orientation.average_size, cube_intensity(meta.intensity, cfg.geometry))
    return acc


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
    """Train the CNN on stored geometry, calibrate the picking on the validation rows and
    write the model directory; return its metrics.

    Besides the weights the model directory's ``pipeline.json`` carries what prediction needs
    to reproduce the training's picking: the score threshold and bandwidth chosen by
    validation F1 (:mod:`membrain_dist.calibration`, when ``cfg.picks.calibrate``) and the
    annotations' median height above their face (``cfg.picks.learn_height``)."""
    from .model import ModelMeta, save_model
    from .training import config_dict, train

    ts = training_set(root, train_entries, cfg.labels, cfg.geometry)
    vs = (training_set(root, val_entries, cfg.labels, cfg.geometry) if val_entries
          else None)
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
    cfg = ensemble_rotations(cfg)
    if vs is None:  # the rows train() held out
        cal_set, cal_rows = ts, np.flatnonzero(result.held_out)
    else:
        cal_set, cal_rows = vs, np.arange(len(vs))
    cfg = _learn_picking(result.model, cal_set, cal_rows, ts.heights, cfg, metrics)
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_average(root, [ts] if vs is None else [ts, vs], cfg, out, voxel_size, metrics)
    save_model(result.model, out, ModelMeta(
        cube_size=cfg.geometry.cube_size, channels=cfg.train.channels, voxel_size_A=voxel_size,
        train_config=config_dict(cfg.train), metrics=metrics, classes=list(cfg.labels.classes),
    ))
    cfg = _with_template_copy(cfg, out)
    _write_json_atomic(out / PIPELINE_FILE, cfg.to_dict())
    return metrics


def ensemble_rotations(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with the prediction's quarter turns per network divided by the ensemble's
    members (at least 1): the members score their own turns
    (:class:`~membrain_dist.model.MemBrainEnsemble`), so four members at ``rotations`` 1 make
    the four passes of one network at ``rotations`` 4."""
    from dataclasses import replace

    members = cfg.train.members
    if members <= 1:
        return cfg
    turns = max(1, cfg.inference.rotations // members)
    return replace(cfg, inference=replace(cfg.inference, rotations=turns))


def _write_average(root: str | os.PathLike, sets: Sequence[TrainingSet], cfg: PipelineConfig,
                   out: Path, voxel_size: float, metrics: dict) -> None:
    """``out/average.mrc`` (one per class for a model with named classes:
    :func:`membrain_dist.average.average_file`) from the annotations of the training and
    validation rows (when they carry angles and ``cfg.orientation.in_plane`` is ``average``);
    a stale one is removed otherwise. The validation annotations are annotated particles too:
    with one training membrane (13-20 particles) adding the validation membrane's lowered the
    picks' in-plane error by 2-5 degrees in each of five models (hard phantom, tuning seeds)."""
    files = model_averages(cfg.labels.n_classes)
    mine = {f for _, f in files}
    for stale in out.glob(AVERAGE_GLOB):
        if stale.name not in mine:  # an earlier model's in this folder, of other classes
            stale.unlink(missing_ok=True)
    counts = {}
    for klass, file in files:
        path = out / file
        what = "" if klass is None else f" of class {cfg.labels.classes[klass]}"
        acc = None
        if cfg.orientation.in_plane == "average":
            acc = AverageSum.empty(cfg.orientation.average_size)
            for ts in sets:
                acc += particle_average(root, ts, cfg, klass)
        if acc is None or acc.count < cfg.orientation.min_average_particles:
            path.unlink(missing_ok=True)
            if acc is not None:
                log.info("average: %d annotated particles%s with angles (fewer than %d): "
                         "in-plane angles from PCA", acc.count, what,
                         cfg.orientation.min_average_particles)
            continue
        write_average(path, acc.mean(), voxel_size)
        counts[None if klass is None else cfg.labels.classes[klass]] = acc.count
        log.info("average of %d annotated particles%s written to %s: in-plane angles of its "
                 "picks from it", acc.count, what, path)
    if counts:
        metrics["average_particles"] = counts[None] if None in counts else counts


@dataclass(frozen=True)
class InPlaneSearch:
    """How a tomogram's picks get their in-plane angles from a model's average (small and
    picklable: what an outputs task receives). ``average_paths``: one per class (None: that
    class keeps its PCA angles); a single-class model has one. ``angle_step`` (degrees) and
    ``shift`` (in-plane offsets searched, voxels) as :func:`membrain_dist.average.search_in_plane`
    takes them; their defaults are :class:`OrientationConfig`'s (one place)."""

    average_paths: tuple[str | None, ...]
    geometry: GeometryConfig
    angle_step: float = OrientationConfig.angle_step
    shift: int = OrientationConfig.search_shift


def in_plane_search(model_dir: str | os.PathLike, cfg: PipelineConfig) -> InPlaneSearch | None:
    """The search for picks of a model, or None (PCA angles): no average, or ``pca`` asked."""
    if cfg.orientation.in_plane != "average":
        return None
    paths = [Path(model_dir) / f for _, f in model_averages(cfg.labels.n_classes)]
    found = tuple(str(p) if p.is_file() else None for p in paths)
    if not any(found):
        return None
    return InPlaneSearch(found, cfg.geometry, cfg.orientation.angle_step,
                         cfg.orientation.search_shift)


def align_in_plane(root: str | os.PathLike, name: str, zyx: np.ndarray, matrices: np.ndarray,
                   search: InPlaneSearch, klass: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matrices of picks at ``zyx`` (K, 3) with in-plane angles from the model's average of
    their class (``klass`` (K,) 0-based; None: all of class 0), normals kept, the correlation
    at each (NaN where not searched) and whether each was searched (a class without an
    average keeps ``matrices``); reads the tomogram region by region."""
    meta = store.read_meta(root, name)
    read = store.tomogram_array(root, name).__getitem__
    klass = np.zeros(len(zyx), np.int64) if klass is None else np.asarray(klass)
    out = np.array(matrices, dtype=np.float64, copy=True)
    corr = np.full(len(zyx), np.nan)
    done = np.zeros(len(zyx), bool)
    for k, path in enumerate(search.average_paths):
        sel = np.flatnonzero(klass == k)
        if path is None or not len(sel):
            continue
        out[sel], corr[sel] = search_in_plane(
            read, tuple(meta.shape_zyx), zyx[sel], out[sel][:, :, 2], read_average(path),
            cube_intensity(meta.intensity, search.geometry), search.angle_step, search.shift)
        done[sel] = True
    return out, corr, done


MODEL_TEMPLATE = "template.mrc"


def _with_template_copy(cfg: PipelineConfig, model_dir: Path) -> PipelineConfig:
    """The template copied into the model directory, and ``labels.template`` naming that
    copy relative to the directory: the model stays usable when moved, shared or run from
    another working directory (calibrate reads the template). Each class template
    (``labels.class_templates``) likewise, as ``template_<k>.mrc`` (k 1-based)."""
    from dataclasses import replace

    labels = cfg.labels
    if labels.template:
        labels = replace(labels, template=_copy_template(labels.template, model_dir,
                                                         MODEL_TEMPLATE))
    if any(labels.class_templates):
        labels = replace(labels, class_templates=tuple(
            _copy_template(t, model_dir, f"template_{k + 1}.mrc") if t else t
            for k, t in enumerate(labels.class_templates)))
    return replace(cfg, labels=labels)


def _copy_template(template: str, model_dir: Path, name: str) -> str:
    """Copy ``template`` to ``model_dir/name`` (unless it is that file); returns ``name``."""
    src = Path(template)
    if not src.is_absolute() and not src.is_file() and (model_dir / src).is_file():
        src = model_dir / src  # already relative to the model (calibrate rewrites the file)
    dst = model_dir / name
    if src.resolve() != dst.resolve():
        from .model import atomic_write_bytes

        try:
            atomic_write_bytes(dst, src.read_bytes())
        except OSError as exc:
            raise InputError(src, f"cannot copy the template into the model: {exc}") from exc
    return name


def calibrate_model(
    root: str | os.PathLike,
    entries: Sequence[TomogramEntry],
    model_dir: str | os.PathLike,
    device: str = "auto",
) -> dict:
    """Calibrate a model's picking (threshold, bandwidth, height) on annotated rows.

    For a model trained elsewhere (``import-v1``) or on other data: the rows' geometry is
    computed with the model's own settings, their points scored, and the result written into
    the model's ``pipeline.json`` (atomically; the weights are not touched) and
    ``calibration.json``. Returns the figures."""
    from dataclasses import replace

    from .inference import resolve_device
    from .model import load_model

    cfg = model_pipeline_config(model_dir)
    cfg = replace(cfg, picks=replace(cfg.picks, calibrate=True, learn_height=True))
    validate_entries(entries)
    prepare_sequential(entries, root, cfg)
    voxel_size = common_voxel_size(root, [e.name for e in entries])
    model, _ = load_model(model_dir, resolve_device(device), voxel_size_A=voxel_size)
    vs = training_set(root, entries, cfg.labels, cfg.geometry)
    metrics: dict = {"rows": [e.name for e in entries], "points": len(vs)}
    cfg = _learn_picking(model, vs, np.arange(len(vs)), vs.heights, cfg, metrics)
    out = Path(model_dir)
    cfg = _with_template_copy(cfg, out)
    _write_json_atomic(out / PIPELINE_FILE, cfg.to_dict())
    _write_json_atomic(out / "calibration.json", metrics)
    return metrics


def calibration_rows(ts: TrainingSet, rows: np.ndarray, scores: np.ndarray,
                     klass: int | None = None) -> CalibrationRows:
    """The scored ``rows`` of a training set and the annotated particles standing on them
    (of class ``klass`` only, when given; ``scores`` (n,) are that class's)."""
    sel = np.zeros(len(ts), dtype=bool)
    sel[rows] = True
    on = sel[ts.truth_row]
    if klass is not None and ts.truth_class is not None:
        on &= ts.truth_class == klass
    return CalibrationRows(
        zyx=ts.zyx[rows], normal=ts.normal[rows], side=ts.side[rows], scores=scores,
        groups=ts.groups[rows], truth_zyx=ts.truth_zyx[on],
        truth_group=ts.groups[ts.truth_row[on]])


def _learn_picking(model, cal_set: TrainingSet, rows: np.ndarray, heights: np.ndarray,
                   cfg: PipelineConfig, metrics: dict) -> PipelineConfig:
    """``cfg`` with the picking learnt from the annotations (height, threshold, bandwidth);
    the figures go into ``metrics``. A multi-class model learns them class by class (into
    the ``class_*`` fields of ``cluster`` and ``picks``; figures under ``classes``)."""
    from dataclasses import replace

    from .inference import predict_distances

    scores = None
    if cfg.picks.calibrate:
        device = next(model.parameters()).device
        scores = predict_distances(model, cal_set.cubes[rows], device=device,
                                   rotations=cfg.inference.rotations,
                                   precision=cfg.inference.precision)
    if scores is None or scores.ndim == 1:
        return _learn_class(cal_set, rows, heights, scores, None, cfg, metrics)
    learnt, per_class = [], {}
    for c, name in enumerate(cfg.labels.classes):
        hc = cal_set.height_class
        mine = heights if hc is None or len(hc) != len(heights) else heights[hc == c]
        per_class[name] = {}
        learnt.append(_learn_class(cal_set, rows, mine, scores[:, c], c, cfg, per_class[name]))
    metrics["classes"] = per_class
    return replace(
        cfg,
        cluster=replace(cfg.cluster, class_score_thresholds=tuple(
            k.cluster.score_threshold for k in learnt), class_bandwidth_scales=tuple(
            round(k.cluster.bandwidth / cfg.cluster.bandwidth, 6) for k in learnt)),
        picks=replace(cfg.picks, class_heights=tuple(k.picks.height for k in learnt)))


def _learn_class(cal_set: TrainingSet, rows: np.ndarray, heights: np.ndarray,
                 scores: np.ndarray | None, klass: int | None, cfg: PipelineConfig,
                 metrics: dict) -> PipelineConfig:
    """Height, threshold and bandwidth of one class (``klass`` None: the only one) from its
    placed ``heights`` and its ``scores`` of the calibration ``rows`` (None: not calibrated)."""
    from dataclasses import replace

    from .calibration import calibrate, scaled_bandwidth, threshold_grid

    pcfg = cfg.picks
    if pcfg.learn_height and heights.size:
        height = round(float(np.median(heights)), 2)
        pcfg = replace(pcfg, height=height)
        metrics["pick_height"] = height
        log.info("picks: annotated centres stand a median %.2f voxels off their face", height)
    cfg = replace(cfg, picks=pcfg)
    if scores is None:
        return cfg
    cal_rows = calibration_rows(cal_set, rows, scores, klass)
    n_truth = int(cal_rows.truth_zyx.shape[0])
    if n_truth < pcfg.min_calibration_particles:
        log.warning("%d annotated particles on the validation rows (fewer than %d): score "
                    "threshold %.2f kept uncalibrated; a val row in the manifest calibrates it",
                    n_truth, pcfg.min_calibration_particles, cfg.cluster.score_threshold)
        metrics["calibration"] = {"annotated": n_truth, "score_threshold": None}
        return cfg
    ccfg = cfg.cluster
    cal = calibrate(cal_rows, ccfg, cfg.orientation, pcfg, threshold_grid(cfg.labels.max_distance))
    metrics["calibration"] = {**cal.summary(), "annotated": n_truth, "table": cal.table}
    ccfg = replace(scaled_bandwidth(ccfg, cal.bandwidth_scale), score_threshold=cal.score_threshold)
    return replace(cfg, cluster=ccfg)


def _write_json_atomic(path: Path, data: dict) -> None:
    from .model import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True, default=str).encode())


#: sections a model's prediction settings come from (training-only ones are not merged)
PREDICT_SECTIONS = ("convert", "geometry", "inference", "cluster", "orientation", "picks")


def over_model(cfg: PipelineConfig, model_dir: str | os.PathLike) -> PipelineConfig:
    """The settings to predict with: the model's own (:func:`model_pipeline_config`: its
    geometry, scoring passes, calibrated threshold and bandwidth, learnt height) with every
    field of ``cfg`` that differs from the defaults on top (what a ``--config`` file or a
    deployment set), section by section; ``cfg``'s ``train`` and ``labels`` are kept."""
    from dataclasses import fields, replace

    out = model_pipeline_config(model_dir)
    default = PipelineConfig()
    for section in PREDICT_SECTIONS:
        mine, base = getattr(cfg, section), getattr(default, section)
        changed = {f.name: getattr(mine, f.name) for f in fields(mine)
                   if getattr(mine, f.name) != getattr(base, f.name)}
        if changed:
            out = replace(out, **{section: replace(getattr(out, section), **changed)})
    return replace(out, train=cfg.train, labels=cfg.labels)


def predict_config(model_dir: str | os.PathLike, cfg: PipelineConfig | None = None,
                   settings: dict[str, dict[str, Any]] | None = None) -> PipelineConfig:
    """The settings of a predict run: ``cfg`` (default: the model's own) with ``settings``
    (``{stage: {field: value}}``, exactly the fields given) on top; unknown stages or
    fields are an InputError naming them."""
    cfg = cfg if cfg is not None else model_pipeline_config(model_dir)
    if settings:
        cfg = PipelineConfig.from_dict(settings, source="predict settings", base=cfg)
    return cfg


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
    for section in ("convert", "geometry", "labels", "inference", "cluster", "orientation",
                    "picks"):
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

    cfg = replace(base, **kw)
    def own(template: str | None) -> str | None:
        # the model's own copy (fit_model), wherever the model directory is now
        if template and not Path(template).is_absolute() and (Path(model_dir) / template).is_file():
            return str((Path(model_dir) / template).absolute())
        return template

    return replace(cfg, labels=replace(
        cfg.labels, template=own(cfg.labels.template),
        class_templates=tuple(own(t) or "" for t in cfg.labels.class_templates)))


# --------------------------------------------------------------------------- sequential path
def prepare_sequential(
    entries: Sequence[TomogramEntry], root: str | os.PathLike, cfg: PipelineConfig
) -> dict[str, list[int]]:
    """Stages 0-2 (convert, sampling, voting, sides, extraction) for every entry in this
    process; returns the membrane ids per tomogram. Finished work is skipped."""
    ids_of = {entry.name: convert_entry(entry, root, cfg.convert) for entry in entries}
    harmonise_polarity(root, list(ids_of))
    membranes = {}
    for entry in entries:
        ids = ids_of[entry.name]
        sides = side_specs(entry, ids)
        for mid in ids:
            geometry_membrane(root, entry.name, mid, cfg.geometry, sides[mid])
        membranes[entry.name] = ids
    store.write_index(root)
    return membranes


def predict_sequential(
    entries: Sequence[TomogramEntry],
    root: str | os.PathLike,
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: PipelineConfig,
) -> list[dict]:
    """The whole predict chain in this process, no dask, no Prefect (reference path)."""
    cfg = with_refinement(cfg)
    validate_entries(entries)
    ids_of = {entry.name: convert_entry(entry, root, cfg.convert) for entry in entries}
    harmonise_polarity(root, list(ids_of))
    summaries = []
    for entry in entries:
        ids = ids_of[entry.name]
        sides = side_specs(entry, ids)
        for mid in ids:
            geometry_membrane(root, entry.name, mid, cfg.geometry, sides[mid])
            score_membrane(root, entry.name, mid, model_dir, cfg.inference, cfg.geometry)
            cluster_membrane(root, entry.name, mid, cfg.cluster, cfg.orientation)
        summaries.append(write_tomogram_outputs(root, entry.name, out_dir, entry.particles,
                                                cfg.cluster.score_threshold, pcfg=cfg.picks,
                                                in_plane=in_plane_search(model_dir, cfg)))
    store.sweep_orphans(root, [e.name for e in entries])
    store.write_index(root)
    write_campaign_star(out_dir, [e.name for e in entries], root)
    return summaries
