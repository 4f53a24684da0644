"""Stage 4: weighted hierarchical Mean Shift on synthetic scored membrane points."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.spatial import cKDTree

from membrain_dist.clustering import (
    ClusterConfig,
    cluster_extent,
    hierarchical_mean_shift,
    score_weights,
    weighted_mean_shift,
)


def _plane_grid(z: float = 30.0, size: int = 60, spacing: float = 1.0) -> np.ndarray:
    """Membrane points on the plane z = const, (N, 3) zyx."""
    yy, xx = np.mgrid[0:size:spacing, 0:size:spacing]
    return np.stack([np.full(yy.size, z), yy.ravel(), xx.ravel()], axis=1)


def _scores(points: np.ndarray, centres: np.ndarray, rng=None, noise: float = 0.0) -> np.ndarray:
    d = cKDTree(centres).query(points)[0]
    if rng is not None and noise:
        d = d + rng.normal(0.0, noise, d.shape)
    return d


def test_config_from_particle_size_and_angstrom():
    cfg = ClusterConfig.from_particle_size(10.0)
    assert cfg.bandwidth == 5.0 and cfg.max_extent == 10.0 and cfg.merge_distance == 2.5
    assert cfg.min_bandwidth == pytest.approx(1.25) and cfg.score_threshold == 4.0
    assert cfg == ClusterConfig()  # the class defaults are those of a 10-voxel particle
    assert ClusterConfig.from_particle_size(4.0).max_extent == 8.0  # 2 x threshold wins
    assert ClusterConfig.from_particle_size(10.0, min_points=6).min_points == 6
    a = dataclasses.replace(cfg, units="A", bandwidth=50.0, score_threshold=30.0)
    v = a.in_voxels(10.0)
    assert v.units == "voxel" and v.bandwidth == 5.0 and v.score_threshold == 3.0
    assert cfg.in_voxels(10.0) is cfg
    with pytest.raises(ValueError):
        hierarchical_mean_shift(np.zeros((1, 3)), np.zeros(1), a)
    with pytest.raises(ValueError):
        ClusterConfig(bandwidth_factor=1.0)


def test_known_centres_recovered():
    rng = np.random.default_rng(0)
    centres = np.array(
        [[30.0, 12.3, 14.1], [30.0, 40.6, 15.2], [30.0, 25.4, 44.8], [30.0, 47.2, 47.9]]
    )
    pts = _plane_grid()
    pts = pts + rng.normal(0.0, 0.2, pts.shape)
    scores = _scores(pts, centres, rng, noise=0.3)
    cfg = ClusterConfig.from_particle_size(10.0)
    res = hierarchical_mean_shift(pts, scores, cfg)
    assert len(res) == 4
    d, nearest = cKDTree(res.centres).query(centres)
    assert np.all(d < 1.0), d
    assert sorted(nearest) == [0, 1, 2, 3]
    assert res.centres.dtype == np.float32 and res.labels.shape == (len(pts),)
    # labels: members of cluster k lie near centre k; far points unlabelled
    for k, members in enumerate(res.members(pts)):
        assert members.shape[0] == res.n_points[k]
        assert np.all(np.linalg.norm(members - res.centres[k], axis=1) < 5.0)
    assert np.all(res.labels[scores >= cfg.score_threshold] == -1)
    assert np.all(res.mean_score < cfg.score_threshold) and np.all(res.min_score <= res.mean_score)


def test_touching_particles_split_by_hierarchy():
    centres = np.array([[30.0, 30.0, 26.5], [30.0, 30.0, 33.5]])  # 7 voxels apart
    pts = _plane_grid()
    scores = _scores(pts, centres)
    keep = scores < 3.0
    # one coarse bandwidth merges the two
    modes, labels = weighted_mean_shift(
        pts[keep], score_weights(scores[keep]), 6.0, merge_distance=2.0
    )
    assert len(modes) == 1
    flat = ClusterConfig.from_particle_size(8.0, bandwidth=6.0, max_extent=1e6)
    assert len(hierarchical_mean_shift(pts, scores, flat)) == 1
    # the hierarchy re-clusters the too-wide cluster and splits it
    cfg = ClusterConfig.from_particle_size(8.0, bandwidth=6.0)
    res = hierarchical_mean_shift(pts, scores, cfg)
    assert len(res) == 2
    d, nearest = cKDTree(res.centres).query(centres)
    assert np.all(d < 1.0), res.centres
    assert sorted(nearest) == [0, 1]
    assert np.all(res.bandwidth < 6.0)
    assert np.all(res.extent <= cfg.max_extent)


def test_tiny_clusters_dropped():
    rng = np.random.default_rng(1)
    big = np.array([30.0, 20.0, 20.0]) + rng.normal(0.0, 1.0, (40, 3)) * [0, 1, 1]
    tiny = np.array([30.0, 50.0, 50.0]) + rng.normal(0.0, 0.5, (3, 3)) * [0, 1, 1]
    pts = np.concatenate([big, tiny])
    scores = np.concatenate([np.full(40, 1.0), np.full(3, 0.5)])
    res = hierarchical_mean_shift(pts, scores, ClusterConfig.from_particle_size(10.0))
    assert len(res) == 1
    assert np.linalg.norm(res.centres[0] - [30.0, 20.0, 20.0]) < 1.0
    assert np.all(res.labels[40:] == -1) and np.all(res.labels[:40] == 0)
    res4 = hierarchical_mean_shift(
        pts, scores, ClusterConfig.from_particle_size(10.0, min_points=3)
    )
    assert len(res4) == 2


def test_weights_pull_mode_to_weighted_mean():
    rng = np.random.default_rng(2)
    pts = rng.normal(0.0, 1.0, (60, 3))
    w = rng.uniform(0.1, 1.0, 60)
    w[:10] *= 20.0  # heavy points
    wmean = (w[:, None] * pts).sum(0) / w.sum()
    modes, labels = weighted_mean_shift(pts, w, bandwidth=200.0)  # kernel ~flat over the cloud
    assert modes.shape == (1, 3) and np.all(labels == 0)
    assert np.linalg.norm(modes[0] - wmean) < 0.01
    assert np.linalg.norm(wmean - pts.mean(0)) > 0.2  # the test can tell weights apart
    modes_u, _ = weighted_mean_shift(pts, np.ones(60), bandwidth=200.0)
    assert np.linalg.norm(modes_u[0] - pts.mean(0)) < 0.01


def test_mean_shift_seeds_and_edge_cases():
    pts = np.array([[0.0, 0, 0], [0, 0, 1], [0, 0, 20], [0, 0, 21]])
    modes, labels = weighted_mean_shift(pts, np.ones(4), 1.0)
    assert len(modes) == 2 and labels[0] == labels[1] != labels[2] == labels[3]
    modes_s, labels_s = weighted_mean_shift(pts, np.ones(4), 1.0, seeds=[[0, 0, 0.2]])
    assert len(modes_s) == 1 and np.allclose(modes_s[0], [0, 0, 0.5], atol=0.02)
    assert np.all(labels_s == 0)
    m0, l0 = weighted_mean_shift(np.zeros((0, 3)), np.zeros(0), 1.0)
    assert m0.shape == (0, 3) and l0.shape == (0,)
    empty = hierarchical_mean_shift(pts, np.full(4, 9.0))
    assert len(empty) == 0 and empty.centres.shape == (0, 3) and np.all(empty.labels == -1)
    with pytest.raises(ValueError):
        weighted_mean_shift(pts, -np.ones(4), 1.0)


def test_cluster_extent_disk():
    rng = np.random.default_rng(3)
    r = 3.0 * np.sqrt(rng.uniform(0, 1, 20000))
    t = rng.uniform(0, 2 * np.pi, 20000)
    disk = np.stack([np.zeros_like(r), r * np.sin(t), r * np.cos(t)], axis=1)
    assert cluster_extent(disk) == pytest.approx(6.0, rel=0.02)  # the disk's diameter
    assert cluster_extent(disk[:1]) == 0.0
