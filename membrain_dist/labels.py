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

import numpy as np
from scipy.spatial import cKDTree

__all__ = [
    "template_covariance",
    "ellipsoid_covariance",
    "shape_metric",
    "rotate_metric",
    "distance_labels",
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
