"""Stage 6: precision, recall, F1 and in-plane angle error of picked particles.

Two ways of counting hits, both reported:

``paper`` (Lamm et al. 2022)
    precision = fraction of predictions within ``radius`` of some ground-truth particle,
    recall = fraction of ground-truth particles within ``radius`` of some prediction,
    F1 = 2 P R / (P + R). Two predictions on one particle both count as hits.
``matched`` (one-to-one)
    predictions and ground truth paired by a minimum-total-distance assignment among pairs
    closer than ``radius`` (maximum number of pairs first); precision = pairs / predictions,
    recall = pairs / ground truth. Duplicated predictions count as false positives.

In-plane angle error (matched pairs with orientations): the prediction's long axis ``u`` is
projected into the ground truth's membrane plane, its angle to the ground truth's ``u`` taken
modulo ``360 / symmetry`` and folded into ``[0, 180 / symmetry]`` degrees.

Positions are voxels ``(z, y, x)``; orientations in-code matrices (columns u, v, n in zyx).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from . import star
from .errors import InputError

__all__ = [
    "Metrics",
    "match_particles",
    "in_plane_error",
    "evaluate_tomogram",
    "evaluate_campaign",
    "format_table",
]

log = logging.getLogger(__name__)

#: paper's hit radius, voxels
DEFAULT_RADIUS = 4.5


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else math.nan


def _f1(p: float, r: float) -> float:
    if math.isnan(p) or math.isnan(r):
        return math.nan
    return 2.0 * p * r / (p + r) if p + r > 0 else 0.0


@dataclass(frozen=True)
class Metrics:
    """Scores of one tomogram (or a campaign's summed counts).

    Counts are integers; ratios are ``nan`` where undefined (0 / 0); angles in degrees,
    ``nan`` with no oriented matched pair.
    """

    n_pred: int
    n_gt: int
    pred_hits: int
    gt_hits: int
    precision: float
    recall: float
    f1: float
    n_matched: int
    precision_matched: float
    recall_matched: float
    f1_matched: float
    mean_match_distance: float
    n_angles: int
    angle_mean: float
    angle_median: float

    @classmethod
    def from_counts(
        cls,
        n_pred: int,
        n_gt: int,
        pred_hits: int,
        gt_hits: int,
        n_matched: int,
        match_distances: np.ndarray,
        angles: np.ndarray,
    ) -> Metrics:
        """Ratios from counts; ``angles`` (A,) degrees, ``match_distances`` (n_matched,) voxels."""
        p, r = _ratio(pred_hits, n_pred), _ratio(gt_hits, n_gt)
        pm, rm = _ratio(n_matched, n_pred), _ratio(n_matched, n_gt)
        ang = np.asarray(angles, dtype=np.float64)
        dist = np.asarray(match_distances, dtype=np.float64)
        return cls(
            n_pred=int(n_pred),
            n_gt=int(n_gt),
            pred_hits=int(pred_hits),
            gt_hits=int(gt_hits),
            precision=p,
            recall=r,
            f1=_f1(p, r),
            n_matched=int(n_matched),
            precision_matched=pm,
            recall_matched=rm,
            f1_matched=_f1(pm, rm),
            mean_match_distance=float(dist.mean()) if dist.size else math.nan,
            n_angles=int(ang.size),
            angle_mean=float(ang.mean()) if ang.size else math.nan,
            angle_median=float(np.median(ang)) if ang.size else math.nan,
        )

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-serialisable: ``nan`` becomes ``None``."""
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in dataclasses.asdict(self).items()
        }


def match_particles(pred_zyx: np.ndarray, gt_zyx: np.ndarray, radius: float) -> dict:
    """Hits of both kinds between predicted and ground-truth positions.

    Parameters
    ----------
    pred_zyx : (N, 3), gt_zyx : (M, 3)
        Voxels, zyx.
    radius : float
        Hit radius, voxels (a distance equal to it is a hit).

    Returns
    -------
    dict
        ``pred_hit`` (N,) bool and ``gt_hit`` (M,) bool (paper definition); ``pairs`` (P, 2)
        int64 one-to-one (prediction, ground-truth) index pairs, at most ``radius`` apart,
        sorted by prediction; ``distances`` (P,) float64 voxels.
    """
    pred = np.asarray(pred_zyx, dtype=np.float64).reshape(-1, 3)
    gt = np.asarray(gt_zyx, dtype=np.float64).reshape(-1, 3)
    n, m = pred.shape[0], gt.shape[0]
    empty = {
        "pred_hit": np.zeros(n, bool),
        "gt_hit": np.zeros(m, bool),
        "pairs": np.zeros((0, 2), np.int64),
        "distances": np.zeros(0),
    }
    if n == 0 or m == 0:
        return empty
    cand = cKDTree(pred).sparse_distance_matrix(cKDTree(gt), radius, output_type="ndarray")
    i, j, d = cand["i"].astype(np.int64), cand["j"].astype(np.int64), cand["v"]
    if i.size == 0:
        return empty
    pred_hit = np.bincount(i, minlength=n) > 0
    gt_hit = np.bincount(j, minlength=m) > 0

    # one-to-one: assignment per connected component of the bipartite candidate graph
    graph = coo_matrix((np.ones(i.size, np.int8), (i, n + j)), shape=(n + m, n + m))
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[i]
    order = np.argsort(edge_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
    big = radius * (min(n, m) + 2) + 1.0  # any invalid pair costs more than all valid ones
    pairs: list[np.ndarray] = []
    for grp in np.split(order, bounds):  # loop over components (groups of nearby particles)
        gi, gj, gd = i[grp], j[grp], d[grp]
        if grp.size == 1:
            pairs.append(np.array([[gi[0], gj[0]]]))
            continue
        rows, ri = np.unique(gi, return_inverse=True)
        cols, ci = np.unique(gj, return_inverse=True)
        cost = np.full((rows.size, cols.size), big)
        cost[ri, ci] = gd
        r, c = linear_sum_assignment(cost)
        ok = cost[r, c] < big
        pairs.append(np.stack([rows[r[ok]], cols[c[ok]]], axis=1))
    pr = np.concatenate(pairs, axis=0).astype(np.int64)
    pr = pr[np.argsort(pr[:, 0], kind="stable")]
    dist = np.linalg.norm(pred[pr[:, 0]] - gt[pr[:, 1]], axis=1)
    return {"pred_hit": pred_hit, "gt_hit": gt_hit, "pairs": pr, "distances": dist}


def in_plane_error(pred_mats: np.ndarray, gt_mats: np.ndarray, symmetry: int = 1) -> np.ndarray:
    """In-plane angle between paired orientations, degrees in ``[0, 180 / symmetry]``.

    Parameters
    ----------
    pred_mats, gt_mats : (P, 3, 3)
        In-code matrices (columns u, v, n; any consistent component order).
    symmetry : int
        Cn symmetry of the particle about its normal (PSII: 2).
    """
    if symmetry < 1:
        raise ValueError(f"symmetry must be >= 1, got {symmetry}")
    p = np.asarray(pred_mats, dtype=np.float64).reshape(-1, 3, 3)
    g = np.asarray(gt_mats, dtype=np.float64).reshape(-1, 3, 3)
    up = p[:, :, 0]
    a = np.einsum("pi,pi->p", up, g[:, :, 0])
    b = np.einsum("pi,pi->p", up, g[:, :, 1])
    ang = np.degrees(np.arctan2(b, a))
    period = 360.0 / symmetry
    ang = np.mod(ang, period)
    return np.minimum(ang, period - ang)


def evaluate_tomogram(
    pred_zyx: np.ndarray,
    gt_zyx: np.ndarray,
    pred_mats: np.ndarray | None = None,
    gt_mats: np.ndarray | None = None,
    radius: float = DEFAULT_RADIUS,
    symmetry: int = 1,
) -> Metrics:
    """Scores of one tomogram; angles only when both orientation arrays are given.

    Parameters
    ----------
    pred_zyx : (N, 3), gt_zyx : (M, 3)
        Voxels, zyx.
    pred_mats : (N, 3, 3) or None, gt_mats : (M, 3, 3) or None
        In-code orientation matrices.
    radius : float
        Hit radius in voxels (paper: 4.5).
    symmetry : int
        Particle symmetry about the normal for the angle error.
    """
    mt = match_particles(pred_zyx, gt_zyx, radius)
    return _metrics(mt, pred_mats, gt_mats, symmetry)[0]


def _metrics(
    mt: dict, pred_mats: np.ndarray | None, gt_mats: np.ndarray | None, symmetry: int
) -> tuple[Metrics, np.ndarray]:
    pr = mt["pairs"]
    if pred_mats is not None and gt_mats is not None and pr.shape[0]:
        pm = np.asarray(pred_mats).reshape(-1, 3, 3)
        gm = np.asarray(gt_mats).reshape(-1, 3, 3)
        angles = in_plane_error(pm[pr[:, 0]], gm[pr[:, 1]], symmetry)
    else:
        angles = np.zeros(0)
    met = Metrics.from_counts(
        n_pred=mt["pred_hit"].size,
        n_gt=mt["gt_hit"].size,
        pred_hits=int(mt["pred_hit"].sum()),
        gt_hits=int(mt["gt_hit"].sum()),
        n_matched=pr.shape[0],
        match_distances=mt["distances"],
        angles=angles,
    )
    return met, angles


def _star_tables(path: Path) -> dict[str, pd.DataFrame]:
    """Particles per tomogram name from a STAR file (grouped by ``rlnTomoName``) or a folder
    of ``<name>.star`` files (the file's stem is the name)."""
    if path.is_dir():
        out: dict[str, pd.DataFrame] = {}
        campaign: list[pd.DataFrame] = []
        for f in sorted(path.glob("*.star")):
            if f.name == "tomograms.star":  # predict's RELION 5 tomogram table, no particles
                continue
            df = star.read_particles(f)
            names = set(df["rlnTomoName"].astype(str).unique())
            others = names - {f.stem}
            if len(names) > 1 or (others and all((path / f"{n}.star").is_file() for n in others)):
                campaign.append(df)  # a campaign table (predict's particles.star): files win
                continue
            if names - {f.stem}:
                log.warning(
                    "%s: rlnTomoName %s differs from the file name; using %r",
                    f,
                    sorted(names),
                    f.stem,
                )
            out[f.stem] = df
        for df in campaign:
            for k, g in df.groupby(df["rlnTomoName"].astype(str), sort=True):
                out.setdefault(str(k), g.reset_index(drop=True))
        return out
    df = star.read_particles(path)
    return {str(k): g.reset_index(drop=True) for k, g in df.groupby("rlnTomoName", sort=True)}


def _ground_truth_star(path: Path) -> dict[str, pd.DataFrame]:
    tables = _star_tables(path)
    for name, df in tables.items():
        if not all(c in df.columns for c in star.VOXEL_COLUMNS):
            raise InputError(path, f"the ground truth of {name!r} has only RELION 5 centred Å "
                                   "coordinates: give --gt the manifest CSV instead (its "
                                   "tomograms give the shape and voxel size they need)")
        _warn_outside(path, name, df, None)
    return tables


def _ground_truth(path: Path) -> dict[str, pd.DataFrame]:
    """Ground truth per tomogram: a STAR file, a folder of STAR files, or a manifest CSV
    (rows with a ``particles`` file; rows of that file whose ``rlnTomoName`` is the manifest
    name, or all its rows when none is)."""
    if path.suffix.lower() != ".csv":
        return _ground_truth_star(path)
    from .convert import resolve_voxel_size, validate_entry
    from .manifest import read_manifest

    out: dict[str, pd.DataFrame] = {}
    for entry in read_manifest(path):
        if entry.particles is None:
            continue
        df = star.read_particles(entry.particles)
        own = df[df["rlnTomoName"] == entry.name]
        tinfo, sinfo = validate_entry(entry)
        out[entry.name] = star.to_tomogram_voxels(
            (own if len(own) else df).reset_index(drop=True), entry.particles, tinfo.shape_zyx,
            resolve_voxel_size(entry, tinfo, sinfo), entry.particles_angpix, strict=False)
        _warn_outside(entry.particles, entry.name, out[entry.name], tinfo.shape_zyx)
    return out


def _warn_outside(path: str | os.PathLike, name: str, df: pd.DataFrame,
                  shape_zyx: tuple[int, ...] | None) -> int:
    """Warn about ground-truth particles outside the volume (``shape_zyx``, voxels; None:
    only negative coordinates are known to be outside); returns how many."""
    zyx = star.particles_zyx(df)
    if not len(zyx):
        return 0
    outside = (zyx < -0.5).any(axis=1)
    if shape_zyx is not None:
        outside |= (zyx > np.asarray(shape_zyx, dtype=np.float64) - 0.5).any(axis=1)
    n = int(outside.sum())
    if n:
        vol = f"the volume (z, y, x) {tuple(shape_zyx)}" if shape_zyx is not None else \
            "the volume (negative coordinates)"
        log.warning("%s: %d of %d ground-truth particles of %s lie outside %s; they can "
                    "never be matched: check that the coordinates are voxels of this "
                    "tomogram (rlnCoordinateX = column)", path, n, len(zyx), name, vol)
    return n


def evaluate_campaign(
    pred: str | os.PathLike,
    gt: str | os.PathLike,
    radius: float = DEFAULT_RADIUS,
    symmetry: int = 1,
) -> tuple[pd.DataFrame, dict]:
    """Score a campaign's predictions against ground truth.

    Parameters
    ----------
    pred
        A folder of ``<name>.star`` (what ``predict`` writes) or one STAR with ``rlnTomoName``.
    gt
        One STAR with ``rlnTomoName`` for many tomograms, a folder of ``<name>.star``, or a
        manifest CSV whose ``particles`` column names the ground truth.
    radius, symmetry
        As in :func:`evaluate_tomogram`.

    Returns
    -------
    per_tomogram : pandas.DataFrame
        One row per ground-truth tomogram (``tomogram`` then the :class:`Metrics` fields); a
        tomogram without predictions scores with zero predictions.
    overall : dict
        JSON-serialisable :class:`Metrics` of the summed counts (not a mean of per-tomogram
        ratios; angles pooled over all pairs) plus ``n_tomograms``, ``radius``, ``symmetry``;
        when both sides carry particle classes (:func:`particle_classes`), ``classes``: the
        same figures per class, each class's picks matched to that class's truth only.
    """
    pred_p, gt_p = Path(pred), Path(gt)
    if not pred_p.exists():
        raise InputError(pred_p, "predictions not found")
    if not gt_p.exists():
        raise InputError(gt_p, "ground truth not found")
    preds, gts = _star_tables(pred_p), _ground_truth(gt_p)
    extra = sorted(set(preds) - set(gts))
    if extra:
        log.warning("predictions without ground truth ignored: %s", ", ".join(extra))
    rows: list[dict] = []
    scored = []
    for name in sorted(gts):
        gdf = gts[name]
        pdf = preds.get(name)
        if pdf is None:
            log.warning("%s: no predictions; scored as empty", name)
        scored.append(_score_table(pdf, gdf, radius, symmetry))
        rows.append({"tomogram": name, **dataclasses.asdict(scored[-1][0])})
    overall_m = _pooled(scored)
    overall: dict = {
        "n_tomograms": len(rows),
        "radius": float(radius),
        "symmetry": int(symmetry),
        **overall_m.to_dict(),
    }
    per_class = _class_metrics(preds, gts, radius, symmetry)
    if per_class:
        overall["classes"] = per_class
    columns = ["tomogram"] + [f.name for f in dataclasses.fields(Metrics)]
    return pd.DataFrame(rows, columns=columns), overall


def _score_table(pdf: pd.DataFrame | None, gdf: pd.DataFrame, radius: float, symmetry: int
                 ) -> tuple[Metrics, np.ndarray, np.ndarray]:
    """Figures of one table of picks (None: no picks) against one of ground truth, with the
    matched pairs' in-plane errors (degrees) and distances (voxels)."""
    p_zyx = star.particles_zyx(pdf) if pdf is not None else np.zeros((0, 3), np.float32)
    p_mat = star.particles_matrices(pdf) if pdf is not None else None
    mt = match_particles(p_zyx, star.particles_zyx(gdf), radius)
    met, ang = _metrics(mt, p_mat, star.particles_matrices(gdf), symmetry)
    return met, ang, mt["distances"]


def _pooled(scored: list[tuple[Metrics, np.ndarray, np.ndarray]]) -> Metrics:
    """:class:`Metrics` of summed counts (angles and distances pooled) of several tables."""
    totals = np.zeros(5, dtype=np.int64)  # n_pred, n_gt, pred_hits, gt_hits, n_matched
    for met, _, _ in scored:
        totals += [met.n_pred, met.n_gt, met.pred_hits, met.gt_hits, met.n_matched]
    return Metrics.from_counts(
        *(int(t) for t in totals),
        match_distances=np.concatenate([d for _, _, d in scored]) if scored else np.zeros(0),
        angles=np.concatenate([a for _, a, _ in scored]) if scored else np.zeros(0),
    )


def _class_metrics(preds: dict[str, pd.DataFrame], gts: dict[str, pd.DataFrame],
                   radius: float, symmetry: int) -> dict[str, dict]:
    """Figures per class (summed over tomograms) when the truth and the picks name classes
    the same way (both ``mbClassName`` or both ``rlnClassNumber``); ``{}`` otherwise. Each
    class's picks are matched to that class's truth only."""
    col = next((c for c in ("mbClassName", "rlnClassNumber")
                if any(c in g.columns for g in gts.values())
                and any(c in p.columns for p in preds.values())), None)
    if col is None:
        return {}
    scored: dict[str, list] = {}
    for name, gdf in gts.items():
        pdf = preds.get(name)
        gk = gdf[col].astype(str).to_numpy() if col in gdf else np.full(len(gdf), "")
        pk = (np.zeros(0, str) if pdf is None else pdf[col].astype(str).to_numpy()
              if col in pdf else np.full(len(pdf), ""))
        for k in sorted(set(gk.tolist()) | set(pk.tolist())):
            scored.setdefault(k, []).append(_score_table(
                pdf[pk == k] if pdf is not None else None, gdf[gk == k], radius, symmetry))
    return {k: _pooled(v).to_dict() for k, v in scored.items()}


_TABLE_COLUMNS = (
    ("tomogram", "tomogram", "{}"),
    ("n_pred", "pred", "{:d}"),
    ("n_gt", "gt", "{:d}"),
    ("precision", "P", "{:.3f}"),
    ("recall", "R", "{:.3f}"),
    ("f1", "F1", "{:.3f}"),
    ("precision_matched", "P 1:1", "{:.3f}"),
    ("recall_matched", "R 1:1", "{:.3f}"),
    ("f1_matched", "F1 1:1", "{:.3f}"),
    ("angle_mean", "ang mean", "{:.1f}"),
    ("angle_median", "ang med", "{:.1f}"),
)


def format_table(df: pd.DataFrame, overall: dict | None = None) -> str:
    """Plain-text table of :func:`evaluate_campaign`'s results (one line per tomogram, then
    the overall line when given); undefined values print as ``-``."""

    def cell(v: object, fmt: str) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if fmt == "{:d}":
            return fmt.format(int(v))  # type: ignore[call-overload]
        return fmt.format(v)

    records = [dict(r) for _, r in df.iterrows()]
    if overall is not None:
        records.append({"tomogram": "ALL", **overall})
    body = [[cell(r.get(k), fmt) for k, _, fmt in _TABLE_COLUMNS] for r in records]
    head = [h for _, h, _ in _TABLE_COLUMNS]
    widths = [max([len(h)] + [len(row[c]) for row in body]) for c, h in enumerate(head)]
    lines = [
        "  ".join(
            h.ljust(w) if c == 0 else h.rjust(w)
            for c, (h, w) in enumerate(zip(head, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in body:
        lines.append(
            "  ".join(
                v.ljust(w) if c == 0 else v.rjust(w)
                for c, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)
