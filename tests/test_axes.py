import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from membrain_dist import axes


def _relion_euler_matrix(rot, tilt, psi):
    """RELION's Euler_angles2matrix written out (src/euler.cpp)."""
    a, b, g = np.radians([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array([
        [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
        [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
        [sc, ss, cb],
    ])


def test_vector_axis_reversal():
    a = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
    np.testing.assert_array_equal(axes.zyx_to_xyz(a), [[3, 2, 1], [6, 5, 4]])
    np.testing.assert_array_equal(axes.xyz_to_zyx(axes.zyx_to_xyz(a)), a)


def test_matrix_axis_reversal_reverses_rows_only():
    m = np.arange(9, dtype=np.float32).reshape(3, 3)
    out = axes.matrix_zyx_to_xyz(m)
    np.testing.assert_array_equal(out, m[::-1, :])
    np.testing.assert_array_equal(axes.matrix_xyz_to_zyx(out), m)
    # each column (a vector in zyx) becomes the same vector in xyz
    for k in range(3):
        np.testing.assert_array_equal(out[:, k], axes.zyx_to_xyz(m[:, k]))


@pytest.mark.parametrize("rot,tilt,psi", [(0, 0, 0), (30, 60, -40), (-170, 120, 95), (45, 90, 180)])
def test_euler_to_matrix_matches_relion_formula(rot, tilt, psi):
    m = axes.euler_to_matrix(np.array([[rot, tilt, psi]], dtype=float))[0]
    np.testing.assert_allclose(m, _relion_euler_matrix(rot, tilt, psi), atol=1e-6)


def test_normal_column_formula():
    rng = np.random.default_rng(1)
    ang = np.column_stack([rng.uniform(-180, 180, 50), rng.uniform(0, 180, 50),
                           rng.uniform(-180, 180, 50)])
    m = axes.euler_to_matrix(ang)
    t, p = np.radians(ang[:, 1]), np.radians(ang[:, 2])
    expected = np.column_stack([-np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)])
    np.testing.assert_allclose(m[:, :, 2], expected, atol=1e-6)


def test_random_matrix_round_trip():
    mats = Rotation.random(200, random_state=3).as_matrix()
    ang = axes.matrix_to_euler(mats)
    assert ang.shape == (200, 3)
    assert np.all((ang[:, 1] >= 0) & (ang[:, 1] <= 180))
    np.testing.assert_allclose(axes.euler_to_matrix(ang), mats, atol=2e-5)


def test_round_trip_at_gimbal_lock():
    mats = axes.euler_to_matrix(np.array([[40.0, 0.0, 0.0], [10.0, 180.0, 0.0]]))
    np.testing.assert_allclose(axes.euler_to_matrix(axes.matrix_to_euler(mats)), mats, atol=1e-5)


def test_centered_angstrom_relion5_centre():
    shape_zyx = (10, 21, 64)
    # centre is N/2 (float division) per axis: x 32, y 10.5, z 5
    xyz = np.array([[32.0, 10.5, 5.0], [0.0, 0.0, 0.0], [63.0, 20.0, 9.0]])
    out = axes.centered_angstrom(xyz, shape_zyx, 2.0)
    np.testing.assert_allclose(out, [[0, 0, 0], [-64.0, -21.0, -10.0], [62.0, 19.0, 8.0]])
    np.testing.assert_allclose(axes.from_centered_angstrom(out, shape_zyx, 2.0), xyz)
