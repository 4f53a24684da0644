"""Distance labels: hand-computed Mahalanobis distances, frames, Euclidean fallback, clipping."""

from __future__ import annotations

import numpy as np
import pytest

from membrain_dist.labels import (
    distance_labels,
    ellipsoid_covariance,
    rotate_metric,
    shape_metric,
    template_covariance,
)

# Template-frame covariance, template zyx = (n, v, u): sigma^2 = 1 along n, 4 along v, 16 along u.
# det = 64, det^(1/3) = 4, so the unit-determinant metric is diag(4, 1, 1/4):
# an offset a_n along the normal counts 2 a_n, a_v counts a_v, a_u counts a_u / 2.
COV = np.diag([1.0, 4.0, 16.0])
CENTRE = np.array([[10.0, 10.0, 10.0]])


def test_shape_metric_is_unit_determinant_inverse():
    m = shape_metric(COV)
    np.testing.assert_allclose(m, np.diag([4.0, 1.0, 0.25]), atol=1e-12)
    assert np.linalg.det(shape_metric(np.diag([2.0, 3.0, 7.0]))) == pytest.approx(1.0)
    np.testing.assert_allclose(shape_metric(np.eye(3) * 9.0), np.eye(3), atol=1e-12)
    with pytest.raises(ValueError):
        shape_metric(np.diag([1.0, 0.0, 1.0]))


def test_mahalanobis_with_axis_permuting_rotation_hand_computed():
    # u along tomogram z, v along tomogram x, n along tomogram y (right-handed in XYZ:
    # u = Z, v = X, n = Y and Z x X = Y). Columns u, v, n in zyx:
    r = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # rows z, y, x
    assert np.allclose(r[:, 0], [1, 0, 0]) and np.allclose(r[:, 1], [0, 0, 1])
    pts = CENTRE + np.array(
        [
            [4.0, 0.0, 0.0],  # 4 along u -> 4/2 = 2
            [0.0, 1.0, 0.0],  # 1 along n -> 2*1 = 2
            [0.0, 0.0, 3.0],  # 3 along v -> 3
            [2.0, 1.0, 0.0],  # u=2, n=1 -> sqrt(2^2/4 + 4*1) = sqrt(5)
            [0.0, 5.0, 0.0],  # 5 along n -> 10, clipped at 7
        ]
    )
    got = distance_labels(pts, CENTRE, r[None], COV, max_distance=7.0)
    np.testing.assert_allclose(got, [2.0, 2.0, 3.0, np.sqrt(5.0), 7.0], rtol=1e-6)
    assert got.dtype == np.float32
    # without the rotation the template axes are the tomogram axes: 4 along z is along n -> 8
    flat = distance_labels(pts, CENTRE, None, COV, max_distance=7.0)
    np.testing.assert_allclose(flat, [7.0, 1.0, 1.5, np.sqrt(4 * 4 + 1), 5.0], rtol=1e-6)


def test_mahalanobis_with_in_plane_rotation_hand_computed():
    # membrane normal along tomogram z, particle long axis 30 degrees from x towards y
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    u = np.array([0.0, s, c])  # zyx of (cos, sin, 0) xyz
    v = np.array([0.0, c, -s])  # zyx of (-sin, cos, 0) xyz
    n = np.array([1.0, 0.0, 0.0])
    r = np.stack([u, v, n], axis=1)
    pts = CENTRE + np.array([4 * u, 2 * v, 1.5 * n, 4 * u + 2 * v, [0.0, 0.0, 4.0]])
    # 4u -> 2; 2v -> 2; 1.5n -> 3; 4u+2v -> sqrt(4+4);
    # 4 along x: a_u = 4c = 2 sqrt(3), a_v = -4s = -2 -> sqrt(12/4 + 4) = sqrt(7)
    got = distance_labels(pts, CENTRE, r[None], COV, max_distance=7.0)
    np.testing.assert_allclose(got, [2.0, 2.0, 3.0, np.sqrt(8.0), np.sqrt(7.0)], rtol=1e-6)


def test_identity_orientation_equals_no_rotation():
    ident = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # u=x, v=y, n=z (zyx)
    rng = np.random.default_rng(1)
    pts = rng.uniform(0, 20, (500, 3))
    a = distance_labels(pts, CENTRE, ident[None], COV)
    b = distance_labels(pts, CENTRE, None, COV)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_nearest_is_in_metric_and_search_is_exact_against_brute_force():
    rng = np.random.default_rng(0)
    k = 25
    centres = rng.uniform(0, 40, (k, 3))
    q, _ = np.linalg.qr(rng.normal(size=(k, 3, 3)))
    pts = rng.uniform(-5, 45, (3000, 3))
    cov = np.diag([1.0, 6.0, 30.0])  # strongly anisotropic: search radius >> 7
    got = distance_labels(pts, centres, q, cov, max_distance=7.0)
    m = rotate_metric(shape_metric(cov), q)  # (K, 3, 3)
    d = pts[:, None, :] - centres[None]  # dense on purpose: the reference
    brute = np.sqrt(np.einsum("nki,kij,nkj->nk", d, m, d)).min(axis=1)
    np.testing.assert_allclose(got, np.minimum(brute, 7.0), rtol=1e-5, atol=1e-5)
    assert (got < 7.0).sum() > 100  # the test exercises the unclipped range
    # the Euclidean-nearest centre is not always the metric-nearest one
    eucl_arg = np.linalg.norm(d, axis=2).argmin(axis=1)
    assert (eucl_arg != np.sqrt(np.einsum("nki,kij,nkj->nk", d, m, d)).argmin(axis=1)).any()


def test_euclidean_fallback_and_clipping():
    centres = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 20.0]])
    pts = np.array([[0.0, 3.0, 4.0], [0.0, 0.0, 14.0], [0.0, 0.0, 10.0], [1.0, 1.0, 19.0]])
    got = distance_labels(pts, centres, None, None, max_distance=7.0)
    np.testing.assert_allclose(got, [5.0, 6.0, 7.0, np.sqrt(3.0)], rtol=1e-6)
    got4 = distance_labels(pts, centres, max_distance=4.0)
    np.testing.assert_allclose(got4, [4.0, 4.0, 4.0, np.sqrt(3.0)], rtol=1e-6)
    assert np.all(distance_labels(pts, np.zeros((0, 3))) == 7.0)


def test_template_covariance_of_gaussian_with_background():
    sig = np.array([1.5, 2.5, 4.0])  # zyx
    shape = (20, 30, 44)
    grid = np.indices(shape, dtype=np.float64)
    centre = (np.array(shape) - 1) / 2 + np.array([0.3, -0.4, 0.5])
    r2 = sum(((grid[i] - centre[i]) / sig[i]) ** 2 for i in range(3))
    t = 5.0 + 2.0 * np.exp(-r2 / 2)  # positive background level to be removed
    cov = template_covariance(t, threshold=0.0)
    np.testing.assert_allclose(np.diag(cov), sig**2, rtol=0.03)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 1e-6
    # protein-dark template: invert
    cov_dark = template_covariance(10.0 - t, threshold=0.0, invert=True)
    np.testing.assert_allclose(cov_dark, cov, rtol=1e-9, atol=1e-9)
    # thresholding drops the tails: smaller, still ordered
    cov_t = np.diag(template_covariance(t, threshold=0.3))
    assert np.all(cov_t < sig**2) and cov_t[0] < cov_t[1] < cov_t[2]


def test_voxelised_ellipsoid_matches_ellipsoid_covariance():
    radii = np.array([4.5, 6.0, 10.0])
    shape = (13, 17, 25)
    grid = np.indices(shape, dtype=np.float64)
    c = (np.array(shape) - 1) / 2
    inside = sum(((grid[i] - c[i]) / radii[i]) ** 2 for i in range(3)) <= 1
    cov = template_covariance(inside.astype(np.float32), threshold=0.5)
    np.testing.assert_allclose(np.diag(cov), np.diag(ellipsoid_covariance(radii)), rtol=0.05)
