"""Stage 5: orientations from cluster PCA and membrane normals, and their Euler round trip."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from membrain_dist import axes
from membrain_dist.orientation import (
    OrientationConfig,
    cluster_orientations,
    frame_from_axes,
    reference_axis,
    vote_normals,
)


def _membrane_frame(seed: int):
    """A random membrane: unit normal n and in-plane basis e1, e2 (zyx), right-handed in XYZ."""
    r = Rotation.random(random_state=seed).as_matrix()  # columns e1, e2, n in XYZ
    return r[::-1, 0], r[::-1, 1], r[::-1, 2]


def _synthetic(seed: int, round_: bool = False, n_pts: int = 80):
    """One elongated (or round) cluster on a tilted planar membrane patch, all zyx."""
    rng = np.random.default_rng(seed)
    e1, e2, n = _membrane_frame(seed)
    angle = rng.uniform(0.0, np.pi)
    along = np.cos(angle) * e1 + np.sin(angle) * e2
    across = np.cross(along, n)  # in-plane, perpendicular to along
    centre = np.array([60.0, 50.0, 40.0])
    s_along, s_across = (1.5, 1.5) if round_ else (3.0, 0.8)
    pts = (
        centre
        + rng.normal(0, s_along, (n_pts, 1)) * along
        + rng.normal(0, s_across, (n_pts, 1)) * across
        + rng.normal(0, 0.2, (n_pts, 1)) * n
    )
    g = rng.uniform(-20, 20, (400, 2))
    mem = centre + g[:, :1] * e1 + g[:, 1:] * e2
    normals = np.tile(n, (400, 1)) + rng.normal(0, 0.05, (400, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    return pts, centre, mem, normals, along, n


@pytest.mark.parametrize("seed", range(8))
def test_elongated_cluster_axis_recovered(seed):
    pts, centre, mem, normals, along, n = _synthetic(seed)
    mats, source = cluster_orientations([pts], centre[None], mem, normals)
    assert mats.shape == (1, 3, 3) and mats.dtype == np.float32
    assert source.tolist() == ["pca"]
    m = mats[0].astype(np.float64)
    assert np.degrees(np.arccos(min(1.0, m[:, 2] @ n))) < 3.0  # normal, same side
    err = np.degrees(np.arccos(min(1.0, abs(m[:, 0] @ along))))  # modulo 180
    assert err < 5.0, err
    mx = axes.matrix_zyx_to_xyz(m)
    assert np.allclose(mx.T @ mx, np.eye(3), atol=1e-5)
    assert np.linalg.det(mx) == pytest.approx(1.0, abs=1e-5)
    # deterministic sign: rot within [-90, 90]
    rot = axes.matrix_to_euler(mx[None])[0, 0]
    assert -90.001 <= rot <= 90.001


def test_points_labels_input_matches_list_input():
    a = _synthetic(11)
    b = _synthetic(12)
    pts = np.concatenate([a[0], b[0], [[0.0, 0.0, 0.0]]])
    labels = np.repeat([0, 1, -1], [len(a[0]), len(b[0]), 1])
    centres = np.stack([a[1], b[1] + 30.0])
    b_pts = b[0] + 30.0
    pts[labels == 1] = b_pts
    mem = np.concatenate([a[2], b[2] + 30.0])
    nor = np.concatenate([a[3], b[3]])
    m1, s1 = cluster_orientations((pts, labels), centres, mem, nor)
    m2, s2 = cluster_orientations([a[0], b_pts], centres, mem, nor)
    assert np.allclose(m1, m2, atol=1e-6) and s1.tolist() == s2.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_round_and_tiny_clusters_use_rot_zero(seed):
    pts, centre, mem, normals, _, n = _synthetic(100 + seed, round_=True, n_pts=400)
    tiny = pts[:2]
    mats, source = cluster_orientations([pts, tiny], np.stack([centre, centre]), mem, normals)
    assert source.tolist() == ["normal", "normal"]
    for m in mats.astype(np.float64):
        mx = axes.matrix_zyx_to_xyz(m)
        rot, tilt, psi = axes.matrix_to_euler(mx[None])[0]
        assert abs(rot) < 1e-3
        expect = axes.euler_to_matrix(np.array([[0.0, tilt, psi]]))[0]
        assert np.allclose(mx, expect, atol=1e-5)
    # the same cluster counts as elongated with a permissive roundness threshold
    _, src = cluster_orientations(
        [pts], centre[None], mem, normals, OrientationConfig(max_roundness=1.0)
    )
    assert src.tolist() == ["pca"]


def test_reference_axis_is_relion_rot_zero():
    rng = np.random.default_rng(5)
    tilt = rng.uniform(1.0, 179.0, 50)
    psi = rng.uniform(-180.0, 180.0, 50)
    m = axes.euler_to_matrix(np.stack([np.zeros(50), tilt, psi], axis=1)).astype(np.float64)
    n_zyx = m[:, ::-1, 2]
    assert np.allclose(reference_axis(n_zyx), m[:, ::-1, 0], atol=1e-5)
    # poles: tilt 0 -> +X, tilt 180 -> -X (psi = 0)
    poles = axes.euler_to_matrix(np.array([[0.0, 0.0, 0.0], [0.0, 180.0, 0.0]]))
    u = reference_axis(np.array([[1.0, 0, 0], [-1.0, 0, 0]]))
    assert np.allclose(u, poles[:, ::-1, 0], atol=1e-6)
    f = frame_from_axes(u, np.array([[1.0, 0, 0], [-1.0, 0, 0]]))
    assert np.allclose(axes.matrix_zyx_to_xyz(f), poles, atol=1e-6)


def test_vote_normals_sign_and_robustness():
    rng = np.random.default_rng(6)
    mem = np.stack([np.zeros(200), rng.uniform(-10, 10, 200), rng.uniform(-10, 10, 200)], 1)
    nor = np.tile([1.0, 0.0, 0.0], (200, 1))
    nor[::7] *= -1.0  # a few flipped estimates
    n = vote_normals(np.zeros((1, 3)), mem, nor, k=16)
    assert np.allclose(n, [[1.0, 0.0, 0.0]], atol=1e-9)
    assert np.allclose(vote_normals(np.zeros((1, 3)), mem, -nor, k=16), -n)


def test_euler_round_trip_and_star(tmp_path):
    seeds = range(6)
    clouds, centres, mems, nors = [], [], [], []
    for s in seeds:
        pts, c, mem, nor, _, _ = _synthetic(200 + s)
        off = np.array([0.0, 0.0, 100.0 * s])
        clouds.append(pts + off)
        centres.append(c + off)
        mems.append(mem + off)
        nors.append(nor)
    mats, source = cluster_orientations(
        clouds, np.stack(centres), np.concatenate(mems), np.concatenate(nors)
    )
    mx = axes.matrix_zyx_to_xyz(mats)
    back = axes.matrix_xyz_to_zyx(axes.euler_to_matrix(axes.matrix_to_euler(mx)))
    assert np.allclose(back, mats, atol=1e-5)

    from membrain_dist import star

    df = star.particles_frame(
        "t1", np.stack(centres), mats, (200, 200, 700), 10.0, extra={"mbOrientationFrom": source}
    )
    path = tmp_path / "t1.star"
    star.write_particles(path, df)
    rd = star.read_particles(path)
    assert np.allclose(star.particles_zyx(rd), np.stack(centres), atol=1e-4)
    assert np.allclose(star.particles_matrices(rd), mats, atol=1e-4)
    assert rd["mbOrientationFrom"].tolist() == source.tolist()


@settings(max_examples=200, deadline=None)
@given(
    st.tuples(*[st.floats(-1.0, 1.0, allow_nan=False) for _ in range(3)]).filter(
        lambda v: np.linalg.norm(v) > 1e-3
    ),
    st.floats(-np.pi, np.pi),
)
def test_frame_is_proper_rotation_for_any_normal(nv, angle):
    n = np.asarray(nv) / np.linalg.norm(nv)
    u0 = reference_axis(n[None])[0]
    assert abs(u0 @ n) < 1e-9 and np.linalg.norm(u0) == pytest.approx(1.0)
    u = np.cos(angle) * u0 + np.sin(angle) * np.cross(u0, n)
    mx = axes.matrix_zyx_to_xyz(frame_from_axes(u[None], n[None])[0])
    assert np.allclose(mx.T @ mx, np.eye(3), atol=1e-9)
    assert np.linalg.det(mx) == pytest.approx(1.0)
    assert np.allclose(mx[:, 2], n[::-1])
