"""Spatial screen: analytic cases for the pure functions, then the scoring paths of a store."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from membrain_dist.screen import near_rows, screen_rows, screened_scores


def _plane(n: int = 30, z: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Points of a 1-voxel grid on the plane z = ``z`` (both sides), and their sides."""
    y, x = np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32),
                       indexing="ij")
    one = np.stack([np.full(n * n, z, np.float32), y.ravel(), x.ravel()], axis=1)
    zyx = np.concatenate([one, one])
    side = np.repeat(np.array([1, -1], np.int8), n * n)
    return zyx, side


def test_screen_rows_keep_the_first_point_of_every_cell_and_side():
    zyx, side = _plane(30)
    rows = screen_rows(zyx, side, 3.0)
    assert rows.size == 2 * 10 * 10  # 30 / 3 cells along y and x, two sides
    assert np.all(np.diff(rows) > 0)
    # the first point in row order of a cell has y and x multiples of 3 here
    assert np.all(zyx[rows, 1] % 3 == 0) and np.all(zyx[rows, 2] % 3 == 0)
    assert set(np.unique(side[rows])) == {-1, 1}
    with pytest.raises(ValueError, match="cell"):
        screen_rows(zyx, side, 0.0)


def test_near_rows_are_within_the_radius_on_the_seed_side_only():
    zyx, side = _plane(30)
    seed = int(np.flatnonzero((side == 1) & (zyx[:, 1] == 15) & (zyx[:, 2] == 15))[0])
    near = near_rows(zyx, side, np.array([seed]), 3.0)
    d = np.linalg.norm(zyx - zyx[seed], axis=1)
    np.testing.assert_array_equal(near, (d <= 3.0) & (side == 1))
    assert near.sum() == 29  # lattice points in a disk of radius 3


def test_screened_scores_score_every_point_near_a_centre_and_few_others():
    """An exact distance field to two centres on the plane: every point closer than the
    threshold gets its exact score, unscored points (NaN) lie at or above it, and the
    screen scores a fraction of the points."""
    zyx, side = _plane(40)
    centres = np.array([[10.0, 8.0, 9.5], [10.0, 30.2, 25.0]], np.float32)
    truth = np.linalg.norm(zyx[:, None] - centres[None], axis=2).min(axis=1)
    thr, margin = 3.0, 1.0
    calls = []

    def score(rows):
        calls.append(len(rows))
        return truth[rows]

    got = screened_scores(score, zyx, side, [thr + margin], 3.0)
    scored = np.isfinite(got)
    np.testing.assert_array_equal(got[scored], truth[scored])
    assert np.all(scored[truth < thr])  # nothing the clustering keeps is lost
    assert np.all(truth[~scored] >= thr)
    assert len(calls) == 2 and scored.mean() < 0.25  # 12 % screened, 10 % near
    # no screened point below the cutoff: only the screen is scored
    far = screened_scores(score, zyx, side, [0.5], 3.0)
    assert np.isfinite(far).sum() == screen_rows(zyx, side, 3.0).size


def test_screened_scores_per_class_cutoffs():
    """(N, C) scores: a point is low when below the cutoff of some class."""
    zyx, side = _plane(30)
    centre = np.array([10.0, 15.0, 15.0], np.float32)
    d = np.linalg.norm(zyx - centre, axis=1)
    two = np.stack([d, np.full_like(d, 50.0)], axis=1)  # class 2 never near
    got = screened_scores(lambda rows: two[rows], zyx, side, [4.0, 4.0], 3.0)
    assert got.shape == two.shape
    assert np.all(np.isfinite(got[d < 3.0]).all(axis=1))
    with pytest.raises(ValueError, match="3 screen cutoffs for 2 classes"):
        screened_scores(lambda rows: two[rows], zyx, side, [4.0, 4.0, 4.0], 3.0)


def test_with_refinement_gives_the_screen_its_cutoffs_at_one_pass():
    from membrain_dist.config import InferenceConfig, PipelineConfig
    from membrain_dist.pipeline import with_refinement

    cfg = PipelineConfig().with_overrides("cluster", score_threshold=4.0)
    one = cfg.with_overrides("inference", rotations=1)
    off = replace(one, inference=replace(one.inference, screen=None))
    assert with_refinement(off).inference.refine_below == ()
    screened = with_refinement(one).inference  # the default screen, 3 voxels
    assert screened.refine_below == (5.0,) and screened.screening and screened.screen == 3.0
    assert not InferenceConfig(screen=3.0).screening  # no cutoffs yet: off
    margin_off = replace(one, inference=replace(one.inference, refine_margin=None))
    assert not with_refinement(margin_off).inference.screening
    with pytest.raises(ValueError, match="screen"):
        InferenceConfig(screen=0.0)


def test_screen_in_every_scoring_path(trained_model: Path, test_manifest: Path,
                                      tmp_path: Path):
    """With the screen, host cutting, device cutting (``grid_sample``, on the CPU here; in
    float32), stored cubes and cubes handed over in memory give the same scores (NaN where unscored),
    in three parts as in one, equal to scoring every point where scored; the provenance
    names the screen, and clustering refuses a threshold above its cutoff."""
    from membrain_dist import pipeline
    from membrain_dist.geometry import membrane_cubes
    from membrain_dist.inference import predict_distances
    from membrain_dist.manifest import read_manifest
    from membrain_dist.model import load_model

    entry = read_manifest(test_manifest)[0]
    base = pipeline.model_pipeline_config(trained_model).with_overrides(
        "inference", rotations=1, screen=3.0)
    cfg = pipeline.with_refinement(base)
    root, name = tmp_path / "store.zarr", entry.name
    pipeline.prepare_sequential([entry], root, cfg)
    mid = max(pipeline.membrane_ids(root, name), key=lambda m: pipeline.n_points(root, name, m))
    n = pipeline.n_points(root, name, mid)
    parts = 3  # several parts: the screen runs per part
    part_points = -(-n // parts)

    def drop(r: Path) -> None:  # the cutter is not in the provenance: score again
        shutil.rmtree(r.joinpath(*pipeline.scores_key(name, mid).split("/")), ignore_errors=True)

    def scores(icfg, r=root, parts=part_points) -> np.ndarray:
        drop(r)
        pipeline.score_membrane(r, name, mid, trained_model, icfg, cfg.geometry, parts)
        return pipeline.read_scores(r, name, mid)

    host = scores(replace(cfg.inference, cutter="host"))
    full = predict_distances(load_model(trained_model, "cpu")[0],
                             membrane_cubes(root, name, mid, cfg.geometry),
                             precision=cfg.inference.precision)
    scored = np.isfinite(host)
    assert 0 < scored.sum() < n
    np.testing.assert_allclose(host[scored], full[scored], atol=1e-5, rtol=0)
    prov = pipeline.store.node_attrs(root, pipeline.scores_key(name, mid))["provenance"]
    assert prov["params"]["screen"] == 3.0
    assert prov["params"]["refine_below"] == list(cfg.inference.refine_below)

    # the parts score the screened points of their neighbours: the same outcome in one part
    one = scores(replace(cfg.inference, cutter="host"), parts=n)
    np.testing.assert_allclose(one, host, atol=1e-5, rtol=0)  # other blocks, the same cubes
    # the device cutter (grid_sample) agrees with the host's to float32 round-off, which
    # bfloat16 (the default where native) rounds into steps of 1/32 voxel: both in float32
    host32, dev32 = (scores(replace(cfg.inference, cutter=c, precision="float32"))
                     for c in ("host", "device"))
    np.testing.assert_allclose(dev32, host32, atol=1e-4, rtol=0)

    kept = tmp_path / "kept.zarr"  # the same membrane with its cubes stored
    pipeline.prepare_sequential([entry], kept, cfg)
    pipeline.geometry_membrane(kept, name, mid, cfg.geometry,
                               pipeline.side_specs(entry, [mid])[mid], keep_cubes=True)
    np.testing.assert_allclose(scores(cfg.inference, kept), host, atol=1e-5, rtol=0)

    for a, b in pipeline.point_parts(n, part_points):  # handed over in memory
        cubes = pipeline.part_cubes(root, name, mid, cfg.geometry, cfg.inference, a, b)
        assert cubes.shape[0] >= b - a
        pipeline.score_part(cubes, root, name, mid, trained_model, cfg.inference, a, b)
    drop(root)
    pipeline.assemble_scores(root, name, mid, trained_model, cfg.inference, part_points)
    np.testing.assert_allclose(pipeline.read_scores(root, name, mid), host, atol=1e-5, rtol=0)

    pipeline.cluster_membrane(root, name, mid, cfg.cluster, cfg.orientation)
    with pytest.raises(ValueError, match="refined only below"):
        pipeline.cluster_membrane(root, name, mid, replace(
            cfg.cluster, score_threshold=cfg.inference.refine_below[0] + 0.5), cfg.orientation)


def test_reach_rows_make_the_screen_independent_of_the_parts():
    """Scoring a plane in parts, each with the screened points of other parts within reach,
    scores the same points, with the same values, as scoring it in one piece."""
    from membrain_dist.screen import reach_rows

    zyx, side = _plane(40)
    centres = np.array([[10.0, 19.6, 9.5], [10.0, 30.2, 25.0]], np.float32)
    truth = np.linalg.norm(zyx[:, None] - centres[None], axis=2).min(axis=1)
    whole = screened_scores(lambda rows: truth[rows], zyx, side, [4.0], 3.0)
    first = screen_rows(zyx, side, 3.0)
    for size in (700, 1000, 1601):
        got = []
        for a in range(0, len(zyx), size):
            b = min(a + size, len(zyx))
            extra = reach_rows(zyx, side, a, b, 3.0)
            assert not np.any((extra >= a) & (extra < b)) and np.isin(extra, first).all()
            rows = np.concatenate([np.arange(a, b), extra])
            own = first[(first >= a) & (first < b)] - a
            screen = np.concatenate([own, (b - a) + np.arange(extra.size)])
            got.append(screened_scores(lambda local, rows=rows: truth[rows[local]], zyx[rows],
                                       side[rows], [4.0], 3.0, screen=screen, n=b - a))
        np.testing.assert_array_equal(np.concatenate(got), whole)
