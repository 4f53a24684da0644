"""Stage 6: precision / recall / F1 (paper and one-to-one) and in-plane angle error."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from membrain_dist import axes, star
from membrain_dist.evaluation import (
    Metrics,
    evaluate_campaign,
    evaluate_tomogram,
    format_table,
    in_plane_error,
    match_particles,
)

GT = np.array([[10.0, 10.0, 10.0], [10.0, 10.0, 30.0], [10.0, 10.0, 60.0]])
# two predictions on GT 0 (one 1 voxel off, one 2 voxels off), one on GT 1 (3 voxels off,
# inside the 4.5 radius), one far from everything
PRED = np.array([[10.0, 10.0, 11.0], [10.0, 12.0, 10.0], [10.0, 13.0, 30.0], [10.0, 40.0, 40.0]])


def test_hand_made_counts_both_variants():
    m = evaluate_tomogram(PRED, GT, radius=4.5)
    # paper: 3 of 4 predictions hit some GT; 2 of 3 GT hit
    assert (m.n_pred, m.n_gt, m.pred_hits, m.gt_hits) == (4, 3, 3, 2)
    assert m.precision == pytest.approx(3 / 4) and m.recall == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(2 * 0.75 * (2 / 3) / (0.75 + 2 / 3))
    # one-to-one: GT 0 takes the closer prediction only; 2 pairs
    assert m.n_matched == 2
    assert m.precision_matched == pytest.approx(2 / 4) and m.recall_matched == pytest.approx(2 / 3)
    assert m.f1_matched == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m.mean_match_distance == pytest.approx((1.0 + 3.0) / 2)
    mt = match_particles(PRED, GT, 4.5)
    assert mt["pairs"].tolist() == [[0, 0], [2, 1]]
    assert mt["pred_hit"].tolist() == [True, True, True, False]
    assert mt["gt_hit"].tolist() == [True, True, False]
    # radius is inclusive, and shrinking it loses the 3-voxel hit
    assert evaluate_tomogram(PRED, GT, radius=3.0).n_matched == 2
    assert evaluate_tomogram(PRED, GT, radius=2.5).gt_hits == 1


def test_assignment_maximises_pairs():
    # greedy nearest matching would pair P0-G1 (distance 1) and leave G0 unmatched
    gt = np.array([[0.0, 0, 0], [0.0, 0, 4]])
    pred = np.array([[0.0, 0, 3], [0.0, 0, 8]])
    m = evaluate_tomogram(pred, gt, radius=4.5)
    assert m.n_matched == 2 and m.precision_matched == 1.0 and m.recall_matched == 1.0


def test_empty_inputs_and_json():
    m = evaluate_tomogram(np.zeros((0, 3)), GT)
    assert m.n_pred == 0 and m.recall == 0.0 and math.isnan(m.precision)
    d = m.to_dict()
    assert d["precision"] is None and d["angle_mean"] is None
    json.dumps(d, allow_nan=False)
    assert Metrics.from_counts(0, 0, 0, 0, 0, np.zeros(0), np.zeros(0)).to_dict()["f1"] is None


def _mats_with_rot(rot_deg, tilt=40.0, psi=25.0):
    rot = np.asarray(rot_deg, dtype=np.float64)
    ang = np.stack([rot, np.full_like(rot, tilt), np.full_like(rot, psi)], axis=1)
    return axes.matrix_xyz_to_zyx(axes.euler_to_matrix(ang))


def test_in_plane_error_folding():
    gt = _mats_with_rot([0.0, 0.0, 0.0, 0.0, 30.0])
    pred = _mats_with_rot([170.0, -170.0, 10.0, 95.0, 20.0])
    e1 = in_plane_error(pred, gt, symmetry=1)
    e2 = in_plane_error(pred, gt, symmetry=2)
    assert e1 == pytest.approx([170.0, 170.0, 10.0, 95.0, 10.0], abs=1e-3)
    assert e2 == pytest.approx([10.0, 10.0, 10.0, 85.0, 10.0], abs=1e-3)
    assert np.all(e2 <= 90.0) and np.all(e1 <= 180.0)
    # prediction on a slightly different membrane plane: projected into the GT plane
    tilted = axes.matrix_xyz_to_zyx(axes.euler_to_matrix(np.array([[20.0, 45.0, 25.0]])))
    assert in_plane_error(tilted, gt[:1], 1)[0] == pytest.approx(20.0, abs=3.0)


def test_angles_in_tomogram_metrics():
    gt_m = _mats_with_rot([0.0, 0.0, 0.0])
    pred_m = _mats_with_rot([170.0, 0.0, 30.0, 0.0])
    m = evaluate_tomogram(PRED, GT, pred_m, gt_m, radius=4.5, symmetry=2)
    # matched pairs (0, 0) and (2, 1): errors 10 and 30 degrees
    assert m.n_angles == 2
    assert m.angle_mean == pytest.approx(20.0, abs=1e-3)
    assert m.angle_median == pytest.approx(20.0, abs=1e-3)
    assert evaluate_tomogram(PRED, GT, None, gt_m).n_angles == 0


def _write(path, name, zyx, mats=None):
    df = star.particles_frame(name, zyx, mats, (100, 100, 100), 10.0)
    star.write_particles(path, df)


def test_campaign_sums_counts(tmp_path, caplog):
    import pandas as pd

    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    _write(pred_dir / "a.star", "a", PRED)
    _write(pred_dir / "b.star", "b", GT[:1])  # b: 1 prediction, a hit
    _write(pred_dir / "c.star", "c", np.zeros((0, 3)))  # an empty prediction file
    _write(pred_dir / "extra.star", "extra", GT)  # no ground truth: ignored
    # predict's campaign table beside them: the per-tomogram files win over its rows
    star.write_particles(pred_dir / "particles.star", pd.concat(
        [star.particles_frame(n, GT, None, (100, 100, 100), 10.0) for n in ("a", "b")],
        ignore_index=True))
    gt_a = star.particles_frame("a", GT, None, (100, 100, 100), 10.0)
    gt_b = star.particles_frame("b", GT, None, (100, 100, 100), 10.0)
    gt_c = star.particles_frame("c", GT[:2], None, (100, 100, 100), 10.0)  # no predictions
    gt_path = tmp_path / "gt.star"
    star.write_particles(gt_path, pd.concat([gt_a, gt_b, gt_c], ignore_index=True))

    df, overall = evaluate_campaign(pred_dir, gt_path, radius=4.5, symmetry=2)
    assert "differs from the file name" not in caplog.text
    # a campaign of one tomogram: its particles.star names only that tomogram
    one = tmp_path / "one"
    one.mkdir()
    _write(one / "a.star", "a", PRED)
    _write(one / "particles.star", "a", PRED)
    df_one, _ = evaluate_campaign(one, gt_path, radius=4.5, symmetry=2)
    assert "differs from the file name" not in caplog.text
    assert df_one.set_index("tomogram").loc["a", "n_pred"] == 4
    assert df["tomogram"].tolist() == ["a", "b", "c"]
    assert df["n_pred"].tolist() == [4, 1, 0] and df["n_gt"].tolist() == [3, 3, 2]
    # summed counts: predictions 5, hits 3 + 1; GT 8, hit 2 + 1
    assert overall["n_tomograms"] == 3
    assert overall["precision"] == pytest.approx(4 / 5)
    assert overall["recall"] == pytest.approx(3 / 8)
    assert overall["precision_matched"] == pytest.approx(3 / 5)
    assert overall["recall_matched"] == pytest.approx(3 / 8)
    # not the mean of per-tomogram ratios
    assert overall["recall"] != pytest.approx(df["recall"].mean())
    json.dumps(overall, allow_nan=False)
    text = format_table(df, overall)
    assert text.splitlines()[0].startswith("tomogram") and text.splitlines()[-1].startswith("ALL")
    assert len(text.splitlines()) == 2 + 3 + 1

    # a single campaign STAR for the predictions (no row for c) gives the same answer
    pred_one = tmp_path / "pred.star"
    star.write_particles(
        pred_one,
        pd.concat(
            [
                star.particles_frame("a", PRED, None, (100, 100, 100), 10.0),
                star.particles_frame("b", GT[:1], None, (100, 100, 100), 10.0),
            ],
            ignore_index=True,
        ),
    )
    df2, overall2 = evaluate_campaign(pred_one, gt_path, radius=4.5, symmetry=2)
    assert overall2 == overall
