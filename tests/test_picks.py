"""Placement of annotations on faces, per-face labels, duplicate suppression, the lift back to
the annotated height, and threshold calibration: analytic cases."""

from __future__ import annotations

import numpy as np
import pytest

from membrain_dist.calibration import CalibrationRows, calibrate, threshold_grid
from membrain_dist.clustering import ClusterConfig
from membrain_dist.labels import face_labels, in_plane_isotropic, normal_frames, place_on_faces
from membrain_dist.orientation import OrientationConfig
from membrain_dist.picks import PickConfig, Picks, lift, reduce_picks, suppress_duplicates


def slab(z_top: float, z_bottom: float, size: int = 40, spacing: float = 1.0):
    """Two faces of a flat membrane between z_bottom and z_top: points, normals, sides."""
    yy, xx = np.meshgrid(np.arange(size) * spacing, np.arange(size) * spacing, indexing="ij")
    grid = np.stack([yy.ravel(), xx.ravel()], axis=1)
    top = np.column_stack([np.full(len(grid), z_top), grid])
    bottom = np.column_stack([np.full(len(grid), z_bottom), grid])
    pts = np.concatenate([top, bottom])
    normals = np.concatenate([np.tile([1.0, 0, 0], (len(grid), 1)),
                              np.tile([-1.0, 0, 0], (len(grid), 1))])
    side = np.concatenate([np.ones(len(grid), np.int8), -np.ones(len(grid), np.int8)])
    return pts, normals, side


def test_centre_above_a_plane_stands_on_its_face_and_comes_back_at_its_height() -> None:
    pts, nrm, side = slab(10.0, 5.0)
    placed = place_on_faces(np.array([[13.0, 20.3, 19.6]]), pts, nrm)
    assert placed.placed.all()
    assert side[placed.point[0]] == 1  # the top face, whose normal points at the centre
    assert placed.height[0] == pytest.approx(3.0)
    np.testing.assert_allclose(placed.foot_zyx[0], [10.0, 20.3, 19.6])
    # the pick on the face, lifted by the learned height along its normal: back at 3 voxels
    back = lift(placed.foot_zyx, normal_frames(nrm[placed.point]), float(placed.height[0]))
    np.testing.assert_allclose(back[0], [13.0, 20.3, 19.6], atol=1e-5)


def test_centre_inside_a_thick_segmentation_belongs_to_the_face_it_is_nearest() -> None:
    pts, nrm, side = slab(10.0, 4.0)
    # 1 voxel inside the top face (an annotation on the mid-plane side of the mask)
    placed = place_on_faces(np.array([[9.0, 20.0, 20.0]]), pts, nrm)
    assert side[placed.point[0]] == 1
    assert placed.height[0] == pytest.approx(-1.0)


def test_two_membranes_five_voxels_apart_label_only_the_annotated_one() -> None:
    a_pts, a_n, a_side = slab(10.0, 5.0)  # membrane A: faces at z = 10 (up) and 5
    b_pts, b_n, b_side = slab(20.0, 15.0)  # membrane B: its lower face 5 voxels above A's top
    pts = np.concatenate([a_pts, b_pts])
    nrm = np.concatenate([a_n, b_n])
    side = np.concatenate([a_side, b_side])
    mem = np.repeat([1, 2], len(a_pts))
    centre = np.array([[12.0, 20.0, 20.0]])  # 2 above A's top face, 3 below B's lower face
    lab, placed = face_labels(pts, nrm, mem, side, centre, max_distance=7.0)
    own = (mem == 1) & (side == 1)
    assert lab[own].min() == pytest.approx(0.0, abs=1e-6)
    assert (lab[~own] == 7.0).all()  # A's other face and both faces of B: nothing
    # Euclidean distance to the foot on A's top face: 5 voxels along y gives 5
    i = np.flatnonzero(own & np.all(np.isclose(pts, [10.0, 25.0, 20.0]), axis=1))
    assert lab[i[0]] == pytest.approx(5.0)
    assert placed.height[0] == pytest.approx(2.0)


def test_no_angles_shape_follows_the_membrane_normal_not_tomogram_z() -> None:
    # an edge-on membrane: normal along x; the particle is flat (small extent along its normal)
    yy, zz = np.meshgrid(np.arange(30.0), np.arange(30.0), indexing="ij")
    pts = np.column_stack([zz.ravel(), yy.ravel(), np.full(yy.size, 10.0)])
    nrm = np.tile([0.0, 0, 1.0], (len(pts), 1))
    cov = np.diag([1.0, 4.0, 9.0])  # template zyx: normal variance 1, in-plane 4 and 9
    centre = np.array([[15.0, 15.0, 12.0]])
    lab, _ = face_labels(pts, nrm, np.ones(len(pts), int), np.ones(len(pts), np.int8), centre,
                         None, cov, max_distance=7.0)
    at = {tuple(p): v for p, v in zip(pts.tolist(), lab.tolist(), strict=True)}
    # in the membrane plane (z and y here) the in-plane isotropic shape gives equal distances
    assert at[(18.0, 15.0, 10.0)] == pytest.approx(at[(15.0, 18.0, 10.0)], rel=1e-6)
    np.testing.assert_allclose(in_plane_isotropic(cov), np.diag([1.0, 6.5, 6.5]))


def picks_of(zyx, score, normal=(1.0, 0, 0)) -> Picks:
    k = len(zyx)
    mats = normal_frames(np.tile(normal, (k, 1)))
    return Picks(np.asarray(zyx, np.float32), mats.astype(np.float32),
                 np.asarray(score, np.float32), np.full(k, 10, np.int32),
                 np.ones(k, np.int8), np.ones(k, bool))


def test_particle_seen_from_both_faces_gives_one_pick() -> None:
    # one particle: picks on the top face (z = 10) and the bottom face (z = 5), 1 voxel aside;
    # a distinct neighbour 15 voxels away on the top face
    zyx = [[10.0, 20.0, 20.0], [5.0, 21.0, 20.0], [10.0, 35.0, 20.0]]
    keep = suppress_duplicates(np.array(zyx), np.array([2.0, 1.5, 2.5]), 8.0)
    assert keep.tolist() == [False, True, True]  # the better-scored of the pair survives
    out, mask = reduce_picks(picks_of(zyx, [2.0, 1.5, 2.5]), PickConfig(height=2.0))
    assert mask.tolist() == [False, True, True] and len(out.zyx) == 2
    np.testing.assert_allclose(out.zyx[1], [12.0, 35.0, 20.0], atol=1e-5)
    assert suppress_duplicates(np.array(zyx), np.zeros(3), 0.0).all()


def test_suppression_is_greedy_by_score() -> None:
    # a chain a - b - c, 6 apart: b is best, suppresses both; with c best, c and a stay
    zyx = np.array([[0.0, 0, 0], [0.0, 6, 0], [0.0, 12, 0]])
    assert suppress_duplicates(zyx, np.array([2.0, 1.0, 3.0]), 7.0).tolist() == [False, True, False]
    assert suppress_duplicates(zyx, np.array([2.0, 3.0, 1.0]), 7.0).tolist() == [True, False, True]


def test_calibrated_threshold_is_the_one_that_maximises_validation_f1() -> None:
    """Three particles whose points score 1.5 at their centres, rising with distance, and one
    false blob scoring 3.2 at its core: thresholds below ~1.5 find nothing, thresholds between
    ~2 and 3.2 find exactly the three (F1 1), higher ones add the false blob (F1 0.86)."""
    yy, xx = np.meshgrid(np.arange(0, 80.0), np.arange(0, 30.0), indexing="ij")
    pts = np.column_stack([np.full(yy.size, 10.0), yy.ravel(), xx.ravel()])
    truth = np.array([[10.0, 10, 15], [10.0, 30, 15], [10.0, 50, 15]])
    false = np.array([10.0, 68, 15])
    d_true = np.min(np.linalg.norm(pts[:, None] - truth[None], axis=2), axis=1)
    d_false = np.linalg.norm(pts - false, axis=1)
    scores = np.minimum(np.minimum(1.5 + 0.5 * d_true, 3.2 + 0.5 * d_false), 7.0)
    rows = CalibrationRows(zyx=pts, normal=np.tile([1.0, 0, 0], (len(pts), 1)),
                           side=np.ones(len(pts), np.int8), scores=scores.astype(np.float32),
                           groups=np.zeros(len(pts), np.int64), truth_zyx=truth,
                           truth_group=np.zeros(3, np.int64))
    grid = threshold_grid(7.0)
    cal = calibrate(rows, ClusterConfig(), OrientationConfig(), PickConfig(), grid,
                    bandwidth_scales=(1.0,))
    f1 = {r["score_threshold"]: r["f1"] for r in cal.table}
    assert cal.f1 == pytest.approx(1.0) and f1[cal.score_threshold] == max(f1.values())
    assert 2.0 <= cal.score_threshold < 3.2
    assert f1[1.0] == 0.0 and f1[4.0] == pytest.approx(2 * 0.75 / 1.75)
    # the compared F1 is each step's mean over +-2 grid steps; the choice maximises it
    raw = np.array([r["f1"] for r in cal.table])
    window = np.array([raw[max(0, i - 2) : i + 3].mean() for i in range(len(raw))])
    np.testing.assert_allclose([r["f1_smoothed"] for r in cal.table], window)
    assert f1[cal.score_threshold] == 1.0
    assert window[list(grid).index(cal.score_threshold)] == pytest.approx(window.max())
    # without smoothing, the plateau's centre of the raw F1
    raw_cal = calibrate(rows, ClusterConfig(), OrientationConfig(), PickConfig(), grid,
                        bandwidth_scales=(1.0,), smooth=0)
    tied = [t for t, v in f1.items() if v == 1.0]
    assert raw_cal.score_threshold == tied[(len(tied) - 1) // 2]


def test_smoothed_calibration_prefers_a_broad_optimum_to_a_spike() -> None:
    """A raw F1 curve with a lone spike (0.95 at one step) beside a broad plateau of 0.8:
    the raw choice is the spike, the smoothed one the plateau's middle."""
    from membrain_dist.calibration import _smoothed_choice

    thresholds = [1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.25]
    f1 = [0.0, 0.3, 0.95, 0.3, 0.6, 0.8, 0.8, 0.8, 0.8, 0.6]
    table = [{"score_threshold": t, "bandwidth_scale": 1.0, "f1": v}
             for t, v in zip(thresholds, f1, strict=True)]
    assert _smoothed_choice(table, (1.0,), 0)["score_threshold"] == 1.5
    assert _smoothed_choice(table, (1.0,), 2)["score_threshold"] == 2.5


def test_thresholds_that_keep_most_points_are_not_clustered() -> None:
    """A model that scores every point low: no threshold keeps a picking (all skipped, F1 0)."""
    yy, xx = np.meshgrid(np.arange(0, 40.0), np.arange(0, 40.0), indexing="ij")
    pts = np.column_stack([np.full(yy.size, 10.0), yy.ravel(), xx.ravel()])
    rows = CalibrationRows(zyx=pts, normal=np.tile([1.0, 0, 0], (len(pts), 1)),
                           side=np.ones(len(pts), np.int8),
                           scores=np.full(len(pts), 0.5, np.float32),
                           groups=np.zeros(len(pts), np.int64),
                           truth_zyx=np.array([[10.0, 20, 20]]), truth_group=np.zeros(1, np.int64))
    cal = calibrate(rows, ClusterConfig(), OrientationConfig(), PickConfig(), threshold_grid(7.0),
                    bandwidth_scales=(1.0,))
    assert all(r.get("skipped") for r in cal.table) and cal.f1 == 0.0
