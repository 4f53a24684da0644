"""Training labels: distance from each sampled point to the nearest particle centre.

MemBrain regresses, for every sampled membrane point, the distance to the nearest annotated
particle centre (paper section 3; v1 capped it at 7 voxels). The distance is Mahalanobis with the
particle's shape covariance (from a low-pass template or an ellipsoid), rotated into the
tomogram by the particle's orientation; the Euclidean distance is the ablation baseline.

Frames and axes
---------------
All points, centres and covariances in this module are in voxels, axis order ``(z, y, x)``.

A template volume is indexed ``[z, y, x]`` in the *particle* frame: template ``x`` is the
particle's long in-plane axis ``u``, template ``y`` its second in-plane axis ``v`` and template
``z`` the membrane normal ``n``. An orientation ``R`` (see ARCHITECTURE.md) is a ``(3, 3)``
matrix whose **columns** are ``u, v, n``, each in tomogram ``zyx``. A template offset with
components ``(a_z, a_y, a_x) = (a_n, a_v, a_u)`` therefore sits at the tomogram offset
``a_u u + a_v v + a_n n = R[:, ::-1] @ (a_z, a_y, a_x)``: the matrix that carries template
``zyx`` to tomogram ``zyx`` is ``R`` with its columns reversed, ``Q = R[:, ::-1]`` (columns
``n, v, u``), and a template covariance ``S`` becomes ``Q S Q^T`` in the tomogram.
With no orientation (``rotations=None``) the covariance is used as given, i.e. template axes
equal tomogram axes; this is the same as the identity orientation ``u = x, v = y, n = z``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

__all__ = [
    "template_covariance",
    "ellipsoid_covariance",
    "shape_metric",
    "rotate_metric",
    "distance_labels",
    "Placement",
    "place_on_faces",
    "normal_frames",
    "in_plane_isotropic",
    "face_labels",
]

log = logging.getLogger(__name__)

#: points per KD-tree query block in :func:`distance_labels` (bounds the pair list's memory)
_POINT_BLOCK = 1 << 20


def template_covariance(
    template: np.ndarray,
    threshold: float = 0.1,
    invert: bool = False,
) -> np.ndarray:
    """Spatial covariance of a template's positive density.

    Background removal: the median of the template's outer one-voxel shell is taken as the
    background level and subtracted. Thresholding: voxels below ``threshold`` times the maximum of
    the background-subtracted density are dropped (low-pass ringing and noise would otherwise
    inflate the covariance). The remaining densities are the weights of a weighted covariance of
    the voxel coordinates about their weighted centroid.

    Parameters
    ----------
    template : (Z, Y, X) array
        Template density in the particle frame (x = long in-plane axis u, y = v, z = normal n),
        sampled at the tomogram's voxel size. Protein is assumed bright (positive density, the
        EM map convention); pass ``invert=True`` for a protein-dark template.
    threshold : float
        Fraction of the maximum (after background removal) below which voxels get weight 0.
    invert : bool
        Negate the template first.

    Returns
    -------
    (3, 3) float64 array
        Covariance in voxels^2, template ``zyx`` order.
    """
    t = np.asarray(template, dtype=np.float64)
    if t.ndim != 3 or min(t.shape) < 3:
        raise ValueError(f"template must be a 3D volume of at least 3^3 voxels, got {t.shape}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    if invert:
        t = -t
    shell = np.ones(t.shape, dtype=bool)
    shell[1:-1, 1:-1, 1:-1] = False
    t = t - np.median(t[shell])
    peak = t.max()
    if not np.isfinite(peak) or peak <= 0:
        raise ValueError("template has no density above its background")
    w = np.where(t >= threshold * peak, t, 0.0)
    w = np.clip(w, 0.0, None)
    coords = np.indices(t.shape, dtype=np.float64).reshape(3, -1)  # (3, V) zyx
    wf = w.ravel()
    total = wf.sum()
    centroid = coords @ wf / total
    d = coords - centroid[:, None]
    return (d * wf) @ d.T / total


def ellipsoid_covariance(radii_zyx: np.ndarray | tuple[float, float, float]) -> np.ndarray:
    """Covariance of a uniform solid ellipsoid with semi-axes ``radii_zyx`` (voxels).

    A uniform solid ellipsoid with semi-axis ``a`` has variance ``a^2 / 5`` along that axis.
    Use it when the particle's extent is known but no template is.

    Returns
    -------
    (3, 3) float64 diagonal array, voxels^2, same (template) ``zyx`` order as the radii.
    """
    r = np.asarray(radii_zyx, dtype=np.float64)
    if r.shape != (3,) or np.any(r <= 0):
        raise ValueError(f"radii_zyx must be three positive numbers, got {radii_zyx!r}")
    return np.diag(r**2 / 5.0)


def shape_metric(cov: np.ndarray) -> np.ndarray:
    """Mahalanobis metric of a shape covariance, normalised to unit determinant.

    ``M = cov^-1 * det(cov)^(1/3)``, so ``det(M) = 1``. The Mahalanobis distance
    ``sqrt(d^T M d)`` then only encodes the *shape* of the particle, not its size: an isotropic
    covariance gives exactly the Euclidean distance, and for an anisotropic one the geometric mean
    of the principal scalings is 1, so distances stay in voxel units on average and the clip
    (7 voxels) and the clustering threshold keep their meaning whatever the particle's size.
    (The raw inverse covariance would measure distance in standard deviations instead.)

    Parameters
    ----------
    cov : (3, 3) array
        Symmetric positive-definite covariance (voxels^2).

    Returns
    -------
    (3, 3) float64 array, symmetric positive-definite, determinant 1, same axis order as ``cov``.
    """
    c = np.asarray(cov, dtype=np.float64)
    if c.shape != (3, 3) or not np.allclose(c, c.T, rtol=1e-6, atol=1e-9):
        raise ValueError("cov must be a symmetric (3, 3) matrix")
    evals, evecs = np.linalg.eigh(c)
    if evals[0] <= 0:
        raise ValueError(f"cov must be positive definite, eigenvalues {evals}")
    scale = np.exp(np.mean(np.log(evals)))  # det(cov)^(1/3)
    m = (evecs * (scale / evals)) @ evecs.T
    return (m + m.T) / 2


def rotate_metric(metric: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """Carry a template-frame metric into the tomogram frame, one per particle.

    Parameters
    ----------
    metric : (3, 3) array
        Metric (or covariance: the rule is the same) in template ``zyx``.
    rotations : (K, 3, 3) array
        Orientations, columns ``u, v, n`` in tomogram ``zyx``.

    Returns
    -------
    (K, 3, 3) float64 array: ``Q M Q^T`` with ``Q = R[:, ::-1]`` (columns ``n, v, u``); see the
    module docstring.
    """
    r = np.asarray(rotations, dtype=np.float64)
    if r.ndim != 3 or r.shape[1:] != (3, 3):
        raise ValueError(f"rotations must have shape (K, 3, 3), got {r.shape}")
    q = r[:, :, ::-1]
    return np.einsum("kij,jl,kml->kim", q, np.asarray(metric, dtype=np.float64), q)


def distance_labels(
    points_zyx: np.ndarray,
    centres_zyx: np.ndarray,
    rotations: np.ndarray | None = None,
    cov: np.ndarray | None = None,
    max_distance: float = 7.0,
) -> np.ndarray:
    """Distance from each point to the nearest particle centre, clipped at ``max_distance``.

    With ``cov`` the distance to centre ``k`` is ``sqrt(d^T M_k d)``, ``d = p - c_k``, where
    ``M_k`` is :func:`shape_metric` of ``cov`` rotated by particle ``k``'s orientation (see the
    module docstring for the frames; ``rotations=None`` uses ``cov`` as given). Without ``cov``
    it is Euclidean. "Nearest" is in that same distance.

    Candidate centres come from a KD-tree with Euclidean radius
    ``max_distance / sqrt(lambda_min(M))``: since ``d^T M d >= lambda_min(M) |d|^2`` for every
    rotation of ``M``, any centre outside that radius is farther than ``max_distance`` and would
    be clipped anyway, so the result is exact. Only the (point, centre) pairs within the radius
    are evaluated, in blocks of points, never an N x K matrix.

    Parameters
    ----------
    points_zyx : (N, 3) array
        Sampled points, voxels, ``zyx``.
    centres_zyx : (K, 3) array
        Particle centres, voxels, ``zyx``. ``K = 0`` gives ``max_distance`` everywhere.
    rotations : (K, 3, 3) array or None
        Particle orientations (columns ``u, v, n`` in ``zyx``); ignored when ``cov`` is None.
    cov : (3, 3) array or None
        Particle shape covariance in template ``zyx`` (voxels^2), e.g. from
        :func:`template_covariance` or :func:`ellipsoid_covariance`.
    max_distance : float
        Clip (voxels); v1 used 7.

    Returns
    -------
    (N,) float32 array of distances in voxels, in ``[0, max_distance]``.
    """
    p = np.asarray(points_zyx, dtype=np.float64).reshape(-1, 3)
    c = np.asarray(centres_zyx, dtype=np.float64).reshape(-1, 3)
    if max_distance <= 0:
        raise ValueError(f"max_distance must be positive, got {max_distance}")
    out = np.full(len(p), max_distance, dtype=np.float64)
    if len(p) == 0 or len(c) == 0:
        return out.astype(np.float32)

    metrics: np.ndarray | None = None
    radius = float(max_distance)
    if cov is not None:
        m = shape_metric(cov)
        if rotations is None:
            metrics = np.broadcast_to(m, (len(c), 3, 3))
        else:
            r = np.asarray(rotations, dtype=np.float64)
            if r.shape != (len(c), 3, 3):
                raise ValueError(f"rotations must have shape ({len(c)}, 3, 3), got {r.shape}")
            metrics = rotate_metric(m, r)
        # eigenvalues are rotation-invariant: the smallest one bounds every M_k from below
        radius = max_distance / np.sqrt(np.linalg.eigvalsh(m)[0])
    radius *= 1.0 + 1e-9  # the KD-tree's <= test must not drop a centre at the boundary

    tree_c = cKDTree(c)
    max_sq = max_distance**2
    best_sq = np.full(len(p), max_sq, dtype=np.float64)
    for start in range(0, len(p), _POINT_BLOCK):
        block = p[start : start + _POINT_BLOCK]
        pairs = cKDTree(block).sparse_distance_matrix(tree_c, radius, output_type="ndarray")
        if len(pairs) == 0:
            continue
        i = pairs["i"].astype(np.intp)  # point within block
        k = pairs["j"].astype(np.intp)  # centre
        if metrics is None:
            sq = pairs["v"] ** 2
        else:
            d = block[i] - c[k]
            sq = np.einsum("ni,nij,nj->n", d, metrics[k], d)
        np.minimum.at(best_sq, start + i, sq)
    np.sqrt(np.minimum(best_sq, max_sq), out=out)
    log.debug(
        "labels: %d points, %d centres, search radius %.2f voxels, %d within %.1f",
        len(p),
        len(c),
        radius,
        int((out < max_distance).sum()),
        max_distance,
    )
    return out.astype(np.float32)


# --------------------------------------------------------------------------- particle placement
#: a centre up to this far behind a face (voxels, against its normal) still belongs to it: an
#: annotation clicked on the mid-plane of a thick segmentation lies inside the mask
FACE_TOLERANCE = 1.5


@dataclass(frozen=True)
class Placement:
    """Where each annotated centre sits on the sampled membrane faces of its tomogram.

    Attributes
    ----------
    point : (K,) int64
        Index of the face point the centre stands on (-1: no face point within the search
        radius; such a centre labels nothing).
    height : (K,) float64
        Signed offset of the centre from that point along the point's normal (voxels; positive
        = away from the membrane on the point's side).
    foot_zyx : (K, 3) float64
        The centre projected onto the face: ``centre - height * normal`` (voxels, zyx).
    """

    point: np.ndarray
    height: np.ndarray
    foot_zyx: np.ndarray

    @property
    def placed(self) -> np.ndarray:
        """(K,) bool: centres that stand on a face."""
        return self.point >= 0


def place_on_faces(
    centres_zyx: np.ndarray,
    points_zyx: np.ndarray,
    normals: np.ndarray,
    search_radius: float = 12.0,
    tolerance: float = FACE_TOLERANCE,
) -> Placement:
    """Stand each annotated centre on the membrane face it belongs to.

    Real annotations sit a few voxels off the segmentation face (a protein's centre, not its
    footprint), and in a stack or a narrow lumen they lie within reach of other faces too. A
    centre belongs to the nearest sampled point whose face it is in front of
    (``(c - p) . n >= -tolerance``); when no point within ``search_radius`` qualifies, to the
    nearest point. That point's membrane and side are the particle's; the centre's height
    along the point's normal is what prediction puts back (``PickConfig.height``).

    Parameters
    ----------
    centres_zyx : (K, 3)
        Annotated centres, voxels, zyx.
    points_zyx, normals : (N, 3)
        Sampled face points of every membrane of the tomogram (voxels, zyx) and their unit
        normals, pointing away from the membrane on the point's face.
    search_radius : float
        Voxels; centres with no point this close are left unplaced.
    tolerance : float
        Voxels a centre may lie behind a face and still count as in front of it.

    Returns
    -------
    Placement
    """
    c = np.asarray(centres_zyx, dtype=np.float64).reshape(-1, 3)
    p = np.asarray(points_zyx, dtype=np.float64).reshape(-1, 3)
    n = np.asarray(normals, dtype=np.float64).reshape(-1, 3)
    k_total = c.shape[0]
    point = np.full(k_total, -1, np.int64)
    height = np.zeros(k_total)
    if k_total == 0 or p.shape[0] == 0:
        return Placement(point, height, c.copy())
    k = min(64, p.shape[0])
    dist, idx = cKDTree(p).query(c, k=k, distance_upper_bound=search_radius)
    dist, idx = dist.reshape(k_total, k), idx.reshape(k_total, k)
    valid = np.isfinite(dist)
    safe = np.where(valid, idx, 0)
    h = np.einsum("kmi,kmi->km", c[:, None, :] - p[safe], n[safe])
    in_front = valid & (h >= -tolerance)
    # first (nearest) qualifying neighbour, else the nearest one
    first = np.where(in_front.any(axis=1), np.argmax(in_front, axis=1), 0)
    rows = np.arange(k_total)
    ok = valid[rows, first]
    point[ok] = safe[rows, first][ok]
    height[ok] = h[rows, first][ok]
    foot = c.copy()
    foot[ok] -= height[ok, None] * n[point[ok]]
    return Placement(point, height, foot)


def normal_frames(normals: np.ndarray) -> np.ndarray:
    """Orientations ``(K, 3, 3)`` (columns u, v, n in zyx) with ``n`` the given normal and an
    arbitrary in-plane ``u``: for shapes made in-plane isotropic (:func:`in_plane_isotropic`),
    where ``u`` does not matter. ``v = n x u`` in the right-handed xyz frame, as everywhere."""
    n = np.asarray(normals, dtype=np.float64).reshape(-1, 3)
    n = n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    ref = np.where(np.abs(n[:, 2:3]) < 0.9, [[0.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]])  # zyx: x, y
    u = ref - np.sum(ref * n, axis=1, keepdims=True) * n
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = np.cross(u, n)  # zyx arrays: the xyz cross product n x u, reversed
    return np.stack([u, v, n], axis=2)


def in_plane_isotropic(cov: np.ndarray) -> np.ndarray:
    """A template-frame covariance averaged over all rotations about its normal (template z).

    For annotations without angles the particle's in-plane direction is unknown: its shape
    about the membrane normal is replaced by its rotational average (normal variance kept,
    in-plane variances averaged, cross terms zero)."""
    c = np.asarray(cov, dtype=np.float64)
    if c.shape != (3, 3):
        raise ValueError(f"cov must be (3, 3), got {c.shape}")
    m = (c[1, 1] + c[2, 2]) / 2
    return np.diag([c[0, 0], m, m])


def face_labels(
    points_zyx: np.ndarray,
    normals: np.ndarray,
    membrane: np.ndarray,
    side: np.ndarray,
    centres_zyx: np.ndarray,
    rotations: np.ndarray | None = None,
    cov: np.ndarray | None = None,
    max_distance: float = 7.0,
) -> tuple[np.ndarray, Placement]:
    """Distance labels of every face point of a tomogram, each particle on its own face only.

    Each centre is stood on one face (:func:`place_on_faces`: a membrane id and a side) and
    labels only the points of that membrane and side, measured from its foot on the face: the
    other face of its membrane and the faces of stacked neighbours see it as absent, so the CNN
    is not taught to fire on a neighbour membrane across a narrow gap. Without ``rotations``
    (a STAR without angles) a shape ``cov`` is made in-plane isotropic and aligned with the
    membrane normal at the foot (:func:`in_plane_isotropic`, :func:`normal_frames`), not applied
    in tomogram axes.

    Parameters
    ----------
    points_zyx, normals : (N, 3)
        Face points of all membranes of the tomogram (voxels, zyx) and their unit normals.
    membrane, side : (N,) int
        Membrane id and side (+1 / -1) of each point.
    centres_zyx : (K, 3)
        Annotated centres (voxels, zyx); ``rotations`` (K, 3, 3) their orientations or None.
    cov, max_distance
        As :func:`distance_labels`.

    Returns
    -------
    labels : (N,) float32 voxels in ``[0, max_distance]``; the :class:`Placement` of the centres.
    """
    p = np.asarray(points_zyx, dtype=np.float64).reshape(-1, 3)
    n = np.asarray(normals, dtype=np.float64).reshape(-1, 3)
    mem = np.asarray(membrane).ravel()
    sd = np.asarray(side).ravel()
    placed = place_on_faces(centres_zyx, p, n, search_radius=2 * max_distance)
    ok = placed.placed
    pt = np.maximum(placed.point, 0)
    shape = cov
    rot = rotations
    if cov is not None and rot is None:
        rot = normal_frames(n[pt])
        shape = in_plane_isotropic(cov)
    out = np.full(p.shape[0], max_distance, np.float32)
    face_of_centre = np.stack([mem[pt], sd[pt]], axis=1)
    for m_id, s in {tuple(f) for f in face_of_centre[ok].tolist()}:
        mine = ok & (face_of_centre[:, 0] == m_id) & (face_of_centre[:, 1] == s)
        face = (mem == m_id) & (sd == s)
        out[face] = distance_labels(p[face], placed.foot_zyx[mine],
                                    None if rot is None else np.asarray(rot)[mine], shape,
                                    max_distance)
    return out, placed
