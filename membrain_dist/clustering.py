"""Stage 4: weighted hierarchical Mean Shift, from scored membrane points to particle centres.

Every sampled membrane point carries a predicted distance to the nearest particle centre (stage
3). Points predicted close to a centre (``score < score_threshold``) are clustered with a
Gaussian-kernel Mean Shift in which each point's kernel is multiplied by a weight that rises as
its predicted distance falls, so points near a centre pull the modes harder (paper section 4).
Clusters wider than a particle are re-clustered with a smaller bandwidth, recursively, so that
neighbouring particles merged at the coarse bandwidth split at a finer one.

Weights
-------
``w = 1 / (max(d, 0) + weight_eps)`` with ``d`` the predicted distance in voxels
(``weight_eps = 0.5`` by default: a point predicted on a centre weighs 2, one at the default
threshold of 3 voxels about 0.29). Negative CNN outputs are clipped to 0.

Cluster width
-------------
``extent = 4 sqrt(lambda_1)`` with ``lambda_1`` the largest eigenvalue of the unweighted
covariance of the cluster's points (voxels^2): the diameter of a uniformly filled disk, the
+-2 sigma span of a Gaussian blob. A cluster with ``extent > max_extent`` is re-clustered.

All coordinates are voxels, axis order ``(z, y, x)``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

__all__ = [
    "ClusterConfig",
    "Clusters",
    "weighted_mean_shift",
    "hierarchical_mean_shift",
    "score_weights",
    "cluster_extent",
]

log = logging.getLogger(__name__)

#: seeds moved per KD-tree pair query (bounds the pair list's memory)
_SEED_BLOCK = 4096

#: the Gaussian kernel is cut off at this many bandwidths (exp(-4.5) ~ 1 %)
_KERNEL_CUTOFF = 3.0

_LENGTH_FIELDS = (
    "score_threshold",
    "bandwidth",
    "min_bandwidth",
    "max_extent",
    "merge_distance",
    "weight_eps",
    "tol",
)


#: predicted distance (voxels) below which points are clustered, unless configured
DEFAULT_SCORE_THRESHOLD = 4.0


@dataclass(frozen=True)
class ClusterConfig:
    """Parameters of :func:`hierarchical_mean_shift`. Lengths in voxels (or Å, see ``units``).

    The defaults are :meth:`from_particle_size` for a 10-voxel particle.

    Attributes
    ----------
    score_threshold : float
        Keep points whose predicted distance is below this (v1: 3.0). Default 4.0: class-
        balanced training predicts near-particle points a little higher than v1's loss; on two
        synthetic campaigns the best threshold was 3.5 and 4.5 (README, Figures). Tune it per
        model (``--config``: ``[cluster] score_threshold``); ``evaluate`` on annotated data tells.
    bandwidth : float
        Gaussian kernel sigma of the first, coarsest level (default: particle radius).
    min_bandwidth : float
        Re-clustering stops once the next bandwidth would fall below this
        (default: max(1, diameter / 8)).
    bandwidth_factor : float
        Each re-clustering level multiplies the bandwidth by this (0 < f < 1; default 0.7).
    max_extent : float
        Expected width of one particle's cluster, see the module docstring
        (default: max(diameter, 2 x score_threshold): one particle's kept points span about the
        particle, or a disk of radius ``score_threshold`` with Euclidean labels).
    merge_distance : float
        Converged modes closer than this are fused (default: diameter / 4).
    min_points : int
        Clusters with fewer points are dropped (default 4: v1 dropped clusters of <= 3 points).
    weight_eps : float
        The ``eps`` of the weight ``1 / (d + eps)`` (default 0.5).
    max_iter : int
        Mean Shift iterations at most (default 300).
    tol : float
        A seed that moves less than this in one iteration has converged (default 0.01).
    units : str
        ``"voxel"`` (all pipeline functions expect this) or ``"A"``; :meth:`in_voxels` converts.
    class_score_thresholds, class_bandwidth_scales : tuple of float
        Per particle class (a model with several outputs): the score threshold (voxels) and
        the factor on every Mean Shift length (:meth:`scaled`) of each class, as calibrated by
        ``train``; empty: ``score_threshold`` and these lengths for every class
        (:meth:`for_class`).
    """

    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    bandwidth: float = 5.0
    min_bandwidth: float = 1.25
    bandwidth_factor: float = 0.7
    max_extent: float = 10.0
    merge_distance: float = 2.5
    min_points: int = 4
    weight_eps: float = 0.5
    max_iter: int = 300
    tol: float = 0.01
    units: str = "voxel"
    class_score_thresholds: tuple[float, ...] = ()
    class_bandwidth_scales: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_score_thresholds", tuple(self.class_score_thresholds))
        object.__setattr__(self, "class_bandwidth_scales", tuple(self.class_bandwidth_scales))
        if self.units not in ("voxel", "A"):
            raise ValueError(f"units must be 'voxel' or 'A', got {self.units!r}")
        for name in ("bandwidth", "min_bandwidth", "max_extent", "weight_eps", "tol"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.merge_distance < 0:
            raise ValueError(f"merge_distance must be >= 0, got {self.merge_distance}")
        if not 0 < self.bandwidth_factor < 1:
            raise ValueError(f"bandwidth_factor must be in (0, 1), got {self.bandwidth_factor}")
        if self.min_points < 1 or self.max_iter < 1:
            raise ValueError("min_points and max_iter must be >= 1")

    @classmethod
    def from_particle_size(cls, diameter_vox: float, **overrides: object) -> ClusterConfig:
        """Defaults derived from the particle diameter (voxels); keyword overrides win."""
        d = float(diameter_vox)
        if not d > 0:
            raise ValueError(f"particle diameter must be > 0, got {diameter_vox}")
        thr = float(overrides.get("score_threshold", DEFAULT_SCORE_THRESHOLD))  # type: ignore[arg-type]
        params: dict[str, object] = dict(
            score_threshold=thr,
            bandwidth=d / 2,
            min_bandwidth=max(1.0, d / 8),
            max_extent=max(d, 2 * thr),
            merge_distance=d / 4,
        )
        params.update(overrides)
        return cls(**params)  # type: ignore[arg-type]

    def in_voxels(self, voxel_size_A: float) -> ClusterConfig:
        """This configuration with every length in voxels (a no-op when already in voxels).

        ``score_threshold`` converts too: predicted distances are lengths.
        """
        if self.units == "voxel":
            return self
        if not voxel_size_A > 0:
            raise ValueError(f"voxel size must be > 0 Å, got {voxel_size_A}")
        scaled = {k: getattr(self, k) / voxel_size_A for k in _LENGTH_FIELDS}
        thresholds = tuple(t / voxel_size_A for t in self.class_score_thresholds)
        return dataclasses.replace(self, units="voxel", class_score_thresholds=thresholds,
                                   **scaled)

    def scaled(self, scale: float) -> ClusterConfig:
        """Mean Shift lengths (bandwidth, its floor, the particle extent, the merge distance)
        multiplied by ``scale``: the same clustering for a particle ``scale`` times as wide."""
        if scale == 1.0:
            return self
        return dataclasses.replace(
            self, bandwidth=self.bandwidth * scale, min_bandwidth=self.min_bandwidth * scale,
            max_extent=self.max_extent * scale, merge_distance=self.merge_distance * scale)

    def for_class(self, c: int) -> ClusterConfig:
        """The clustering of class ``c`` (0-based): its calibrated threshold and bandwidth
        scale where given (``class_*`` fields), else this configuration; without the
        ``class_*`` fields."""
        out = dataclasses.replace(self, class_score_thresholds=(), class_bandwidth_scales=())
        if c < len(self.class_bandwidth_scales):
            out = out.scaled(float(self.class_bandwidth_scales[c]))
        if c < len(self.class_score_thresholds):
            out = dataclasses.replace(out,
                                      score_threshold=float(self.class_score_thresholds[c]))
        return out

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable parameters (for provenance; the ``class_*`` fields only when set,
        so a single-class configuration's provenance is as before they existed)."""
        data = dataclasses.asdict(self)
        for key in ("class_score_thresholds", "class_bandwidth_scales"):
            if not data[key]:
                del data[key]
        return data


@dataclass(frozen=True)
class Clusters:
    """Result of :func:`hierarchical_mean_shift`.

    Attributes
    ----------
    centres : (K, 3) float32
        Cluster modes, voxels ``(z, y, x)``, ordered by decreasing total weight.
    labels : (N,) int64
        Cluster index of each input point; -1 for points above the threshold or in dropped
        clusters.
    n_points : (K,) int64
        Member count.
    mean_score, min_score : (K,) float32
        Mean and minimum predicted distance of the members (voxels).
    bandwidth : (K,) float32
        Bandwidth of the level that produced the cluster.
    extent : (K,) float32
        Cluster width ``4 sqrt(lambda_1)`` (voxels).
    """

    centres: np.ndarray
    labels: np.ndarray
    n_points: np.ndarray
    mean_score: np.ndarray
    min_score: np.ndarray
    bandwidth: np.ndarray
    extent: np.ndarray

    def __len__(self) -> int:
        return int(self.centres.shape[0])

    def members(self, points: np.ndarray) -> list[np.ndarray]:
        """Member points of each cluster: K arrays of shape (n_k, 3)."""
        order = np.argsort(self.labels, kind="stable")
        sorted_labels = self.labels[order]
        bounds = np.searchsorted(sorted_labels, np.arange(len(self) + 1))
        return [points[order[bounds[k] : bounds[k + 1]]] for k in range(len(self))]


def score_weights(scores: np.ndarray, eps: float = 0.5) -> np.ndarray:
    """Mean Shift weight of each point: ``1 / (max(d, 0) + eps)``, (N,) float64."""
    return 1.0 / (np.maximum(np.asarray(scores, dtype=np.float64), 0.0) + eps)


def cluster_extent(points: np.ndarray) -> float:
    """Width of a point cloud: ``4 sqrt(lambda_1)`` of its covariance (voxels); 0 below 2 points."""
    p = np.asarray(points, dtype=np.float64)
    if p.shape[0] < 2:
        return 0.0
    cov = np.cov(p, rowvar=False, bias=True)
    return float(4.0 * np.sqrt(max(np.linalg.eigvalsh(cov)[-1], 0.0)))


def _shift_step(
    seeds: np.ndarray, tree: cKDTree, points: np.ndarray, weights: np.ndarray, bandwidth: float
) -> np.ndarray:
    """One Mean Shift step for all ``seeds`` (S, 3): weighted kernel means, vectorised."""
    out = seeds.copy()
    radius = _KERNEL_CUTOFF * bandwidth
    inv2s2 = 0.5 / bandwidth**2
    for start in range(0, seeds.shape[0], _SEED_BLOCK):
        block = seeds[start : start + _SEED_BLOCK]
        pairs = cKDTree(block).sparse_distance_matrix(tree, radius, output_type="ndarray")
        i, j, d = pairs["i"], pairs["j"], pairs["v"]
        k = weights[j] * np.exp(-(d * d) * inv2s2)
        n = block.shape[0]
        denom = np.bincount(i, weights=k, minlength=n)
        num = np.stack(
            [np.bincount(i, weights=k * points[j, a], minlength=n) for a in range(3)], axis=1
        )
        ok = denom > 0
        out[start : start + n][ok] = num[ok] / denom[ok, None]
    return out


def _fuse(
    positions: np.ndarray, weights: np.ndarray, merge_distance: float
) -> tuple[np.ndarray, np.ndarray]:
    """Fuse positions closer than ``merge_distance`` (connected components of the radius graph).

    Returns (modes (M, 3) weighted means, ordered by decreasing total weight; labels (S,)).
    """
    s = positions.shape[0]
    if merge_distance > 0 and s > 1:
        pairs = cKDTree(positions).query_pairs(merge_distance, output_type="ndarray")
        graph = coo_matrix(
            (np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(s, s)
        )
        m, comp = connected_components(graph, directed=False)
    else:
        m, comp = s, np.arange(s)
    wsum = np.bincount(comp, weights=weights, minlength=m)
    modes = (
        np.stack(
            [np.bincount(comp, weights=weights * positions[:, a], minlength=m) for a in range(3)],
            axis=1,
        )
        / wsum[:, None]
    )
    order = np.argsort(-wsum, kind="stable")
    rank = np.empty(m, dtype=np.int64)
    rank[order] = np.arange(m)
    return modes[order], rank[comp]


def _refine_on_members(
    centres: np.ndarray,
    labels: np.ndarray,
    points: np.ndarray,
    weights: np.ndarray,
    bandwidths: np.ndarray,
    max_iter: int,
    tol: float,
) -> np.ndarray:
    """Move each centre (K, 3) to the mode of its own members' weighted kernel density.

    At the level where two neighbours split, each mode is still pulled towards the other
    cluster's points; restricting the kernel sum to the cluster's members removes that bias.
    All clusters move at once: the (cluster, member) pairs are the labelled points.
    """
    x = centres.copy()
    if x.shape[0] == 0:
        return x
    sel = np.flatnonzero(labels >= 0)
    lab, p, w = labels[sel], points[sel], weights[sel]
    k = x.shape[0]
    inv2s2 = 0.5 / bandwidths**2
    for _ in range(max_iter):
        r2 = np.sum((p - x[lab]) ** 2, axis=1)
        kw = w * np.exp(-r2 * inv2s2[lab])
        denom = np.bincount(lab, weights=kw, minlength=k)
        num = np.stack([np.bincount(lab, weights=kw * p[:, a], minlength=k) for a in range(3)], 1)
        ok = denom > 0
        new = x.copy()
        new[ok] = num[ok] / denom[ok, None]
        moved = np.linalg.norm(new - x, axis=1).max()
        x = new
        if moved < tol:
            break
    return x


def weighted_mean_shift(
    points: np.ndarray,
    weights: np.ndarray,
    bandwidth: float,
    seeds: np.ndarray | None = None,
    *,
    merge_distance: float | None = None,
    max_iter: int = 300,
    tol: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted Gaussian-kernel Mean Shift.

    Each seed moves to ``sum_j w_j K(x - p_j) p_j / sum_j w_j K(x - p_j)`` with
    ``K(r) = exp(-|r|^2 / (2 bandwidth^2))`` cut off at 3 bandwidths, all unconverged seeds at
    once per iteration (KD-tree pair lists and weighted bincounts). Converged seeds closer than
    ``merge_distance`` are fused into one mode (weighted mean of the fused seeds).

    Parameters
    ----------
    points : (N, 3) float
        Voxels, ``(z, y, x)``.
    weights : (N,) float
        Non-negative per-point weights multiplying the kernel.
    bandwidth : float
        Kernel sigma, voxels.
    seeds : (S, 3) float, optional
        Starting positions; default: the points themselves.
    merge_distance : float, optional
        Default ``bandwidth / 2``.
    max_iter, tol
        Iteration limit; a seed moving less than ``tol`` voxels has converged.

    Returns
    -------
    modes : (M, 3) float32
        Ordered by decreasing total weight of the seeds that reached them.
    labels : (N,) int64
        Mode of each point: the mode its own seed converged to when ``seeds`` is None,
        otherwise the nearest mode.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != pts.shape[0]:
        raise ValueError(f"{pts.shape[0]} points but {w.shape[0]} weights")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite and >= 0")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    merge = 0.5 * bandwidth if merge_distance is None else float(merge_distance)
    if pts.shape[0] == 0:
        return np.zeros((0, 3), np.float32), np.zeros(0, np.int64)

    own_seeds = seeds is None
    x = pts.copy() if own_seeds else np.asarray(seeds, dtype=np.float64).reshape(-1, 3).copy()
    seed_w = w if own_seeds else np.ones(x.shape[0])
    tree = cKDTree(pts)
    active = np.arange(x.shape[0])
    it = 0
    while active.size and it < max_iter:
        new = _shift_step(x[active], tree, pts, w, bandwidth)
        moved = np.linalg.norm(new - x[active], axis=1)
        x[active] = new
        active = active[moved >= tol]
        it += 1
    if active.size:
        log.debug(
            "mean shift: %d of %d seeds unconverged after %d iterations",
            active.size,
            x.shape[0],
            max_iter,
        )
    modes, seed_labels = _fuse(x, seed_w, merge)
    if own_seeds:
        labels = seed_labels
    else:
        labels = cKDTree(modes).query(pts)[1].astype(np.int64)
    return modes.astype(np.float32), labels


def hierarchical_mean_shift(
    points: np.ndarray, scores: np.ndarray, cfg: ClusterConfig | None = None
) -> Clusters:
    """Particle centres from scored membrane points (stage 4).

    Points with ``score < cfg.score_threshold`` are clustered by :func:`weighted_mean_shift` at
    ``cfg.bandwidth`` with weights :func:`score_weights`. Each cluster wider than
    ``cfg.max_extent`` is re-clustered alone at ``bandwidth x bandwidth_factor``, recursively,
    while the bandwidth stays >= ``cfg.min_bandwidth``; a cluster still too wide at the finest
    bandwidth is kept. Clusters with fewer than ``cfg.min_points`` points are dropped.

    Parameters
    ----------
    points : (N, 3) float
        Sampled membrane points, voxels ``(z, y, x)``.
    scores : (N,) float
        Predicted distance to the nearest particle centre, voxels.
    cfg : ClusterConfig
        In voxels (see :meth:`ClusterConfig.in_voxels`).
    """
    cfg = cfg or ClusterConfig()
    if cfg.units != "voxel":
        raise ValueError("ClusterConfig must be in voxels: call cfg.in_voxels(voxel_size_A)")
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    sc = np.asarray(scores, dtype=np.float64).reshape(-1)
    if sc.shape[0] != pts.shape[0]:
        raise ValueError(f"{pts.shape[0]} points but {sc.shape[0]} scores")
    keep = np.flatnonzero(np.isfinite(sc) & (sc < cfg.score_threshold))
    w = score_weights(sc, cfg.weight_eps)

    found: list[tuple[np.ndarray, np.ndarray, float, float, float]] = []
    stack: list[tuple[np.ndarray, float]] = [(keep, cfg.bandwidth)] if keep.size else []
    n_dropped = 0
    while stack:
        idx, bw = stack.pop()
        modes, labels = weighted_mean_shift(
            pts[idx],
            w[idx],
            bw,
            merge_distance=cfg.merge_distance,
            max_iter=cfg.max_iter,
            tol=cfg.tol,
        )
        finer = bw * cfg.bandwidth_factor
        for k in range(modes.shape[0]):  # loop over clusters, not points
            members = idx[labels == k]
            if members.size < cfg.min_points:
                n_dropped += 1
                continue
            ext = cluster_extent(pts[members])
            if ext > cfg.max_extent and finer >= cfg.min_bandwidth:
                stack.append((members, finer))
            else:
                found.append((modes[k], members, bw, ext, float(w[members].sum())))

    found.sort(key=lambda f: -f[4])
    labels_out = np.full(pts.shape[0], -1, dtype=np.int64)
    for k, (_, members, _, _, _) in enumerate(found):
        labels_out[members] = k
    kk = len(found)
    centres = np.array([f[0] for f in found], dtype=np.float64).reshape(kk, 3)
    bws = np.array([f[2] for f in found], dtype=np.float64)
    centres = _refine_on_members(centres, labels_out, pts, w, bws, cfg.max_iter, cfg.tol)
    log.debug(  # per side and class: the membrane's line is its particles
        "clustering: %d of %d points below threshold -> %d clusters (%d tiny dropped)",
        keep.size,
        pts.shape[0],
        kk,
        n_dropped,
    )

    def col(i: int, dtype: type) -> np.ndarray:
        return np.array([f[i] for f in found], dtype=dtype)

    return Clusters(
        centres=centres.astype(np.float32),
        labels=labels_out,
        n_points=np.array([f[1].size for f in found], dtype=np.int64),
        mean_score=np.array([sc[f[1]].mean() for f in found], dtype=np.float32),
        min_score=np.array([sc[f[1]].min() for f in found], dtype=np.float32),
        bandwidth=col(2, np.float32),
        extent=col(3, np.float32),
    )
