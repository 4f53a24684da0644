"""Stage 4b: one tomogram's picks, from the clusters of each membrane face to particles.

Mean Shift runs per membrane and per face (:func:`membrain_dist.pipeline.cluster_points`), so a
particle the CNN sees from both faces of its membrane, or from the facing face of a stacked
neighbour, comes out twice. Here the clusters of all membranes of a tomogram are reduced:

1. **Duplicates** (:func:`suppress_duplicates`): of any picks closer than ``nms_distance``
   (voxels, between the cluster centres on the faces), only the best-scored one (lowest
   predicted distance) is kept. Two faces of one membrane are its thickness apart (3-7 voxels
   in real segmentations), a stack's facing faces the gap (4-7); two distinct particles of one
   kind cannot stand closer than their own diameter (PSII dimer ~15 voxels at 13.7 Å).
2. **Height** (:func:`lift`): the clusters lie on the segmentation face, while annotated
   centres sit a few voxels off it (a protein's centre, not its footprint). Each pick is moved
   ``height`` voxels along its normal; ``train`` learns the height from the training
   annotations (their median offset from the face, :func:`membrain_dist.labels.place_on_faces`).

All positions are voxels, axis order ``(z, y, x)``; matrices have columns ``u, v, n`` (zyx).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from .clustering import ClusterConfig, hierarchical_mean_shift
from .orientation import OrientationConfig, cluster_orientations

__all__ = ["PickConfig", "Picks", "cluster_points", "cluster_classes", "reduce_picks",
           "suppress_duplicates", "lift"]

_FIELDS = ("zyx", "matrices", "score", "n_points", "side", "from_pca", "klass")


@dataclass(frozen=True)
class PickConfig:
    """Tomogram-level pick rules.

    Attributes
    ----------
    height : float
        Voxels each pick is moved along its membrane normal (set by ``train``: the median
        height of the training annotations above their face). Default 0: on the face.
    nms_distance : float
        Picks closer than this (voxels, on the faces) are one particle; the best-scored is
        kept. 0 turns suppression off. Default 8: above a membrane's thickness and a stack's
        gap, below a particle's diameter.
    calibrate : bool
        ``train`` chooses ``cluster.score_threshold`` by clustering F1 on the validation rows
        (:mod:`membrain_dist.calibration`) and stores it with the model; False keeps the
        configured one.
    learn_height : bool
        ``train`` sets ``height`` from the annotations; False keeps the configured one.
    min_calibration_particles : int
        Calibrate only when the validation rows hold at least this many annotated particles
        (default 10). Fewer make the F1 curve a coin toss: on the demo campaign without a
        ``val`` row (``--n-val 0``) the one held-out membrane holds 3 and chose 3.25 where
        the test rows peak at 4.0 (F1 0.75 against 0.83); the training rows are no substitute
        (the fitted model scores them lower: they chose 3.5). Give a ``val`` row to
        calibrate.
    class_heights : tuple of float
        Per particle class (a model with several outputs): the height of each class (set by
        ``train``); empty: ``height`` for every class.
    """

    height: float = 0.0
    nms_distance: float = 8.0
    calibrate: bool = True
    learn_height: bool = True
    min_calibration_particles: int = 10
    class_heights: tuple[float, ...] = ()

    def for_class(self, c: int) -> PickConfig:
        """The rules of class ``c`` (0-based): its own height where ``class_heights`` has one."""
        out = dataclasses.replace(self, class_heights=())
        if c < len(self.class_heights):
            out = dataclasses.replace(out, height=float(self.class_heights[c]))
        return out

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_heights", tuple(self.class_heights))
        if not self.nms_distance >= 0:
            raise ValueError(f"nms_distance must be >= 0, got {self.nms_distance}")
        if not np.isfinite(self.height):
            raise ValueError(f"height must be finite, got {self.height}")

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def suppress_duplicates(zyx: np.ndarray, score: np.ndarray, distance: float) -> np.ndarray:
    """Greedy non-maximum suppression: keep mask of picks, best (lowest) score first.

    A pick is dropped when a kept pick with a better score lies within ``distance`` voxels;
    ties are broken by input order. ``distance <= 0`` keeps every pick.

    Parameters
    ----------
    zyx : (K, 3) voxels
    score : (K,) predicted distance of each pick (lower = more confident)
    distance : float, voxels

    Returns
    -------
    (K,) bool
    """
    p = np.asarray(zyx, dtype=np.float64).reshape(-1, 3)
    s = np.asarray(score, dtype=np.float64).ravel()
    if s.shape[0] != p.shape[0]:
        raise ValueError(f"{p.shape[0]} picks but {s.shape[0]} scores")
    keep = np.ones(p.shape[0], dtype=bool)
    if distance <= 0 or p.shape[0] < 2:
        return keep
    pairs = cKDTree(p).query_pairs(distance, output_type="ndarray")
    if len(pairs) == 0:
        return keep
    order = np.lexsort((np.arange(len(s)), s))  # best first
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    # each pair points from the better-ranked pick to the worse one
    a, b = pairs[:, 0], pairs[:, 1]
    swap = rank[a] > rank[b]
    better, worse = np.where(swap, b, a), np.where(swap, a, b)
    by_better = np.argsort(rank[better], kind="stable")
    better, worse = better[by_better], worse[by_better]
    starts = np.searchsorted(rank[better], np.arange(len(s)))
    ends = np.searchsorted(rank[better], np.arange(len(s)), side="right")
    for i in order:  # suppressed picks suppress nothing
        r = rank[i]
        if keep[i] and starts[r] < ends[r]:
            keep[worse[starts[r]:ends[r]]] = False
    return keep


def lift(zyx: np.ndarray, matrices: np.ndarray, height: float) -> np.ndarray:
    """Positions moved ``height`` voxels along each pick's normal (matrix column ``n``).

    Returns (K, 3) float32, voxels zyx."""
    p = np.asarray(zyx, dtype=np.float64).reshape(-1, 3)
    if height == 0 or p.shape[0] == 0:
        return p.astype(np.float32)
    n = np.asarray(matrices, dtype=np.float64).reshape(-1, 3, 3)[:, :, 2]
    return (p + float(height) * n).astype(np.float32)


# --------------------------------------------------------------------------- per membrane
@dataclass(frozen=True)
class Picks:
    """Particles found on one membrane (K rows): voxels zyx, in-code matrices."""

    zyx: np.ndarray  # (K, 3) float32
    matrices: np.ndarray  # (K, 3, 3) float32, columns u, v, n in zyx
    score: np.ndarray  # (K,) float32: mean predicted distance of the cluster's points (voxels)
    n_points: np.ndarray  # (K,) int32
    side: np.ndarray  # (K,) int8
    from_pca: np.ndarray  # (K,) bool: in-plane angle from PCA (else rot = 0 from the normal)
    klass: np.ndarray | None = None  # (K,) int16: particle class (0-based model output); 0s

    def __post_init__(self) -> None:
        if self.klass is None:
            object.__setattr__(self, "klass", np.zeros(len(self.zyx), np.int16))


def cluster_points(
    zyx: np.ndarray,
    normal: np.ndarray,
    side: np.ndarray,
    scores: np.ndarray,
    ccfg: ClusterConfig,
    ocfg: OrientationConfig,
    klass: int = 0,
) -> Picks:
    """Stages 4 + 5 on one membrane's points, each side clustered on its own (pure); the
    picks are of class ``klass``."""
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
            klass=np.full(len(cl), klass, np.int16),
        ))
    return concat_picks(parts)


def cluster_classes(
    zyx: np.ndarray,
    normal: np.ndarray,
    side: np.ndarray,
    scores: np.ndarray,
    ccfg: ClusterConfig,
    ocfg: OrientationConfig,
) -> Picks:
    """:func:`cluster_points` for each class on its own column of ``scores`` ((N,) one
    class, (N, C) several), with that class's threshold and bandwidth
    (:meth:`ClusterConfig.for_class`): picks of different classes may overlap in space."""
    if scores.ndim == 1:
        return cluster_points(zyx, normal, side, scores, ccfg, ocfg)
    return concat_picks([cluster_points(zyx, normal, side, scores[:, c], ccfg.for_class(c),
                                        ocfg, c) for c in range(scores.shape[1])])


def empty_picks() -> Picks:
    return Picks(np.zeros((0, 3), np.float32), np.zeros((0, 3, 3), np.float32),
                 np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(0, np.int8),
                 np.zeros(0, bool), np.zeros(0, np.int16))


def concat_picks(parts: list[Picks]) -> Picks:
    """One :class:`Picks` of several (empty when none)."""
    if not parts:
        return empty_picks()
    return Picks(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))


def select_picks(picks: Picks, keep: np.ndarray) -> Picks:
    return Picks(*(getattr(picks, f)[keep] for f in _FIELDS))


# --------------------------------------------------------------------------- per tomogram
def reduce_picks(picks: Picks, cfg: PickConfig) -> tuple[Picks, np.ndarray]:
    """A tomogram's picks (all membranes) without duplicates, moved to the annotated height.

    Returns the kept picks (positions lifted by ``cfg.height``) and the keep mask over the
    input rows. Picks of several classes are reduced class by class (a PSII and a b6f may
    stand closer than ``nms_distance``), each lifted by its own height
    (:meth:`PickConfig.for_class`); the kept rows stay in input order."""
    classes = np.unique(picks.klass)
    if len(classes) > 1 or cfg.class_heights:
        keep = np.zeros(len(picks.klass), bool)
        zyx = np.zeros_like(picks.zyx)
        for c in classes:
            rows = np.flatnonzero(picks.klass == c)
            part, k = reduce_picks(select_picks(picks, rows), cfg.for_class(int(c)))
            keep[rows[k]] = True
            zyx[rows[k]] = part.zyx
        return dataclasses.replace(select_picks(picks, keep), zyx=zyx[keep]), keep
    keep = suppress_duplicates(picks.zyx, picks.score, cfg.nms_distance)
    kept = select_picks(picks, keep)
    return dataclasses.replace(kept, zyx=lift(kept.zyx, kept.matrices, cfg.height)), keep
