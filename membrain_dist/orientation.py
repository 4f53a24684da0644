"""Stage 5: particle orientations from cluster shape (PCA) and the membrane normal.

For each cluster (stage 4) the membrane normal ``n`` at its centre is voted from the normals of
the nearest sampled membrane points; the cluster's points are projected into the plane
perpendicular to ``n`` and their first principal axis is the particle's long in-plane axis ``u``
(paper section 5, v1: "first principal axis of the cluster's points, taken into the membrane
frame"). ``v`` completes a right-handed frame in tomogram XYZ.

In-plane reference (rot = 0)
----------------------------
With RELION's convention (CONVENTIONS.md) the particle's first axis at ``rot = 0`` is
``u0 = (Z - n_Z n) / |Z - n_Z n|``: the tomogram Z axis projected into the membrane plane. At
``n = +Z`` (tilt 0) ``u0 = +X``, at ``n = -Z`` (tilt 180) ``u0 = -X`` (psi = 0). Round clusters
and clusters with too few points get ``u = u0`` (source ``"normal"``). A PCA axis is only
defined modulo 180°: its sign is chosen so that ``u . u0 >= 0``, i.e. rot in [-90°, 90°].

Matrices are the in-code convention (ARCHITECTURE.md): ``(K, 3, 3)`` with columns ``u, v, n``,
each in ``zyx`` order; ``axes.matrix_zyx_to_xyz`` gives CONVENTIONS.md's ``M`` (det +1).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.spatial import cKDTree

__all__ = [
    "OrientationConfig",
    "cluster_orientations",
    "vote_normals",
    "reference_axis",
    "frame_from_axes",
]

log = logging.getLogger(__name__)

#: below this |n x Z| the normal is treated as parallel to the tomogram Z axis
_POLE_EPS = 1e-6


@dataclass(frozen=True)
class OrientationConfig:
    """Parameters of :func:`cluster_orientations`.

    Attributes
    ----------
    k_normal : int
        Membrane points whose normals vote for the normal at a centre (default 16: with points
        ~1.5 voxels apart, a patch of radius ~3 voxels, smaller than a particle).
    max_roundness : float
        Clusters with in-plane eigenvalue ratio ``lambda_2 / lambda_1`` above this are too round
        for a PCA axis (default 0.7).
    min_points : int
        Clusters with fewer points get the reference axis (default 3: two points define no
        covariance worth trusting).
    in_plane : str
        ``"average"`` (default): when the model holds an average of its annotated particles
        (``train`` makes one when the STARs carry angles), each pick's in-plane angle is the
        one that correlates best with it (:mod:`membrain_dist.average`), else PCA;
        ``"pca"``: always the cluster's principal axis.
    average_size : int
        Edge (voxels) of the average's cube (default 16: a PSII dimer, ~200 Å, at 13.7 Å).
    angle_step : float
        In-plane search step (degrees; refined between steps by a parabola).
    search_shift : int
        The search also moves the cut centre by whole-voxel offsets up to this many voxels along
        both in-plane axes (default 2: a pick lies a few voxels off the particle's centre; on
        the hard phantom's tuning campaign the mean in-plane error at the picks fell from
        19.1° to 12.8° over four one-membrane models, see
        :func:`membrain_dist.average.search_in_plane`); 0 searches at the pick only.
    min_average_particles : int
        ``train`` keeps an average of at least this many annotated particles (default 5).
    """

    k_normal: int = 16
    max_roundness: float = 0.7
    min_points: int = 3
    in_plane: Literal["average", "pca"] = "average"
    average_size: int = 16
    angle_step: float = 5.0
    search_shift: int = 2
    min_average_particles: int = 5

    def __post_init__(self) -> None:
        if self.k_normal < 1 or self.min_points < 1:
            raise ValueError("k_normal and min_points must be >= 1")
        if not 0 < self.max_roundness <= 1:
            raise ValueError(f"max_roundness must be in (0, 1], got {self.max_roundness}")
        if self.in_plane not in ("average", "pca"):
            raise ValueError(f"in_plane must be 'average' or 'pca', got {self.in_plane!r}")
        if self.average_size < 4 or not 0 < self.angle_step <= 90:
            raise ValueError("need average_size >= 4 and 0 < angle_step <= 90")
        if not 0 <= self.search_shift <= 8:
            raise ValueError(f"search_shift must be in 0..8 voxels, got {self.search_shift}")

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable parameters (for provenance)."""
        return dataclasses.asdict(self)


def vote_normals(
    centres: np.ndarray,
    membrane_points: np.ndarray,
    membrane_normals: np.ndarray,
    k: int = 16,
) -> np.ndarray:
    """Membrane normal at each centre from the ``k`` nearest membrane points.

    The axis is the top eigenvector of ``sum_i w_i n_i n_i^T`` with ``w_i = 1 / (1 + d_i)``
    (``d_i`` in voxels), so a few flipped neighbours do not cancel it; its sign follows the
    weighted sum of the neighbours' normals (the side the points sample).

    Parameters
    ----------
    centres : (K, 3)
        Voxels ``(z, y, x)``.
    membrane_points, membrane_normals : (M, 3)
        Sampled points (voxels, zyx) and their unit normals ``(dz, dy, dx)``, oriented to the
        picked side.

    Returns
    -------
    (K, 3) float64 unit normals, zyx.
    """
    c = np.asarray(centres, dtype=np.float64).reshape(-1, 3)
    mp = np.asarray(membrane_points, dtype=np.float64).reshape(-1, 3)
    mn = np.asarray(membrane_normals, dtype=np.float64).reshape(-1, 3)
    if mp.shape[0] == 0:
        raise ValueError("no membrane points to vote normals from")
    if c.shape[0] == 0:
        return np.zeros((0, 3))
    kk = min(int(k), mp.shape[0])
    d, idx = cKDTree(mp).query(c, k=kk)
    d, idx = d.reshape(c.shape[0], kk), idx.reshape(c.shape[0], kk)
    nb = mn[idx]  # (K, k, 3)
    nb = nb / np.maximum(np.linalg.norm(nb, axis=2, keepdims=True), 1e-12)
    w = 1.0 / (1.0 + d)
    tensor = np.einsum("kn,kni,knj->kij", w, nb, nb)
    axis = np.linalg.eigh(tensor)[1][:, :, -1]
    mean = np.einsum("kn,kni->ki", w, nb)
    sign = np.where(np.einsum("ki,ki->k", axis, mean) < 0, -1.0, 1.0)
    return axis * sign[:, None]


def reference_axis(normals: np.ndarray) -> np.ndarray:
    """In-plane axis at rot = 0 for each unit normal (K, 3) zyx -> (K, 3) zyx (module docstring)."""
    n = np.asarray(normals, dtype=np.float64).reshape(-1, 3)
    z = np.array([1.0, 0.0, 0.0])  # tomogram Z in zyx order
    u0 = z[None, :] - n[:, :1] * n
    norm = np.linalg.norm(u0, axis=1)
    pole = norm < _POLE_EPS
    u0[~pole] /= norm[~pole, None]
    # n = +Z: u0 = +X; n = -Z: u0 = -X (RELION tilt 0 / 180 with psi = 0)
    x = np.where(n[pole, :1] > 0, 1.0, -1.0) * np.array([0.0, 0.0, 1.0])
    x -= np.einsum("ki,ki->k", x, n[pole])[:, None] * n[pole]  # exactly perpendicular to n
    u0[pole] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return u0


def frame_from_axes(u: np.ndarray, n: np.ndarray) -> np.ndarray:
    """In-code matrices (K, 3, 3) with columns ``u, v, n`` (zyx) from unit ``u`` ⟂ ``n`` (K, 3).

    ``v = n x u`` in XYZ; reversing component order flips the cross product's sign, so in zyx
    components ``v = u x n``. ``axes.matrix_zyx_to_xyz`` of the result has det +1.
    """
    u = np.asarray(u, dtype=np.float64).reshape(-1, 3)
    n = np.asarray(n, dtype=np.float64).reshape(-1, 3)
    v = np.cross(u, n)
    return np.stack([u, v, n], axis=2)


def _as_points_labels(
    clusters: Sequence[np.ndarray] | tuple[np.ndarray, np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated member points (P, 3) and their cluster index (P,) from either input form."""
    if (
        isinstance(clusters, tuple)
        and len(clusters) == 2
        and np.ndim(clusters[1]) == 1
        and np.ndim(clusters[0]) == 2
        and len(clusters[0]) == len(clusters[1])
    ):  # (points, labels): labels are 1-D, a point cloud is (n_k, 3)
        pts = np.asarray(clusters[0], dtype=np.float64).reshape(-1, 3)
        lab = np.asarray(clusters[1]).astype(np.int64)
        sel = (lab >= 0) & (lab < k)
        return pts[sel], lab[sel]
    arrays = [np.asarray(c, dtype=np.float64).reshape(-1, 3) for c in clusters]
    if len(arrays) != k:
        raise ValueError(f"{len(arrays)} point clouds for {k} centres")
    lab = np.repeat(np.arange(k), [a.shape[0] for a in arrays])
    pts = np.concatenate(arrays, axis=0) if arrays else np.zeros((0, 3))
    return pts, lab


def cluster_orientations(
    clusters: Sequence[np.ndarray] | tuple[np.ndarray, np.ndarray],
    centres: np.ndarray,
    membrane_points: np.ndarray,
    membrane_normals: np.ndarray,
    cfg: OrientationConfig | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Orientation of each cluster (stage 5).

    Parameters
    ----------
    clusters
        Either a list of K member point clouds ``(n_k, 3)``, or ``(points (N, 3), labels (N,))``
        with labels in ``[0, K)`` (``-1`` ignored), e.g. ``(points, Clusters.labels)``.
        Voxels, zyx.
    centres : (K, 3)
        Cluster centres, voxels, zyx.
    membrane_points, membrane_normals : (M, 3)
        The membrane's sampled points and unit normals (zyx), oriented to the picked side.
    cfg : OrientationConfig

    Returns
    -------
    matrices : (K, 3, 3) float32
        Columns ``u, v, n`` in zyx (in-code convention).
    source : (K,) str
        ``"pca"`` where ``u`` is the cluster's principal axis, ``"normal"`` where it is the
        rot = 0 reference axis (round or tiny cluster).
    """
    cfg = cfg or OrientationConfig()
    c = np.asarray(centres, dtype=np.float64).reshape(-1, 3)
    k = c.shape[0]
    if k == 0:
        return np.zeros((0, 3, 3), np.float32), np.zeros(0, dtype="<U6")
    pts, lab = _as_points_labels(clusters, k)
    n = vote_normals(c, membrane_points, membrane_normals, cfg.k_normal)
    u0 = reference_axis(n)
    v0 = np.cross(u0, n)  # second reference axis, zyx (see frame_from_axes)

    # 2D PCA in the membrane plane, all clusters at once: coordinates (a, b) in (u0, v0)
    count = np.bincount(lab, minlength=k).astype(np.float64)
    rel = pts - c[lab]
    a = np.einsum("pi,pi->p", rel, u0[lab])
    b = np.einsum("pi,pi->p", rel, v0[lab])
    safe = np.maximum(count, 1.0)
    ma = np.bincount(lab, weights=a, minlength=k) / safe
    mb = np.bincount(lab, weights=b, minlength=k) / safe
    da, db = a - ma[lab], b - mb[lab]
    saa = np.bincount(lab, weights=da * da, minlength=k) / safe
    sbb = np.bincount(lab, weights=db * db, minlength=k) / safe
    sab = np.bincount(lab, weights=da * db, minlength=k) / safe
    half_diff = 0.5 * (saa - sbb)
    radius = np.hypot(half_diff, sab)
    mid = 0.5 * (saa + sbb)
    lam1, lam2 = mid + radius, mid - radius
    theta = 0.5 * np.arctan2(2.0 * sab, saa - sbb)  # in (-90°, 90°]: u . u0 = cos(theta) >= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        roundness = np.where(lam1 > 0, lam2 / lam1, 1.0)
    use_pca = (count >= cfg.min_points) & (lam1 > 1e-12) & (roundness <= cfg.max_roundness)
    th = np.where(use_pca, theta, 0.0)
    u = np.cos(th)[:, None] * u0 + np.sin(th)[:, None] * v0
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    mats = frame_from_axes(u, n).astype(np.float32)
    source = np.where(use_pca, "pca", "normal").astype("<U6")
    log.debug(  # per side and class: the membrane's line is its particles
        "orientations: %d clusters, %d from PCA, %d from the normal only",
        k,
        int(use_pca.sum()),
        int(k - use_pca.sum()),
    )
    return mats, source
