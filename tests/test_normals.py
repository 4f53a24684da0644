"""Tests of stage 1b: normal voting and consistent orientation."""

from __future__ import annotations

import numpy as np

from membrain_dist.geometry import GeometryConfig
from membrain_dist.normals import orient_consistently, vote_normals
from membrain_dist.sampling import sample_membrane

CFG = GeometryConfig()
VOTE = dict(vote_radius=CFG.vote_radius, vote_sigma=CFG.vote_sigma,
            vote_neighbours=CFG.vote_neighbours, min_vote_weight=CFG.min_vote_weight)


def _angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip(np.einsum("ij,ij->i", a, b), -1, 1)))


def sphere_case(n=64, radius=20.0, thickness=4.0):
    c = (n - 1) / 2
    g = np.indices((n, n, n), dtype=np.float32) - np.float32(c)
    r = np.sqrt((g * g).sum(0))
    lab = ((r >= radius - thickness / 2) & (r < radius + thickness / 2)).astype(np.int32)
    sp = sample_membrane(lab.__getitem__, 1, [0, n] * 3, lab.shape)
    d = sp.zyx - np.float32(c)
    true = d / np.linalg.norm(d, axis=1, keepdims=True)
    true *= np.sign(np.einsum("ij,ij->i", true, sp.raw_normal))[:, None]
    return sp, true


def plane_case(seed=0, n=56, thickness=4.0):
    rng = np.random.default_rng(seed)
    nrm = rng.normal(size=3)
    nrm /= np.linalg.norm(nrm)
    c = (n - 1) / 2
    g = np.indices((n, n, n), dtype=np.float32) - np.float32(c)
    h = np.einsum("a,azyx->zyx", nrm.astype(np.float32), g)
    lab = (np.abs(h) < thickness / 2).astype(np.int32)
    sp = sample_membrane(lab.__getitem__, 1, [0, n] * 3, lab.shape, edge_trim=16)
    true = np.where(np.einsum("ij,j->i", sp.raw_normal, nrm)[:, None] > 0, nrm, -nrm)
    return sp, true.astype(np.float32)


def test_sphere_voted_beats_raw_and_is_accurate():
    sp, true = sphere_case()
    voted = vote_normals(sp.zyx, sp.raw_normal, sp.weight, **VOTE)
    e_raw, e_vote = _angles(sp.raw_normal, true), _angles(voted, true)
    assert voted.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(voted, axis=1), 1, atol=1e-5)
    assert np.median(e_vote) < 2 and np.percentile(e_vote, 95) < 4
    assert np.median(e_vote) < 0.5 * np.median(e_raw)
    assert np.percentile(e_vote, 95) < 0.5 * np.percentile(e_raw, 95)
    # signs agree with the raw (outward) normals
    assert np.all(np.einsum("ij,ij->i", voted, sp.raw_normal) > 0)


def test_tilted_planes():
    for seed in range(3):
        sp, true = plane_case(seed)
        voted = vote_normals(sp.zyx, sp.raw_normal, sp.weight, **VOTE)
        e = _angles(voted, true)
        assert len(e) > 400
        assert np.median(e) < 2 and np.percentile(e, 95) < 4, (seed, np.median(e))


def test_reflection_is_exact_on_a_circle():
    # noiseless normals of an evenly sampled (Fibonacci) sphere: voting must reproduce them
    # despite the strong curvature (radius 10 vs vote radius 6)
    i = np.arange(3000) + 0.5
    phi, th = np.arccos(1 - 2 * i / 3000), np.pi * (1 + 5**0.5) * i
    d = np.c_[np.cos(phi), np.sin(phi) * np.cos(th), np.sin(phi) * np.sin(th)].astype(np.float32)
    pts = 10 * d
    voted = vote_normals(pts, d, np.full(3000, 5, np.float32), vote_radius=6, vote_sigma=3)
    assert _angles(voted, d).max() < 0.1


def test_unreliable_votes_are_ignored():
    rng = np.random.default_rng(2)
    pts = np.c_[np.zeros(400), rng.uniform(0, 20, (400, 2))].astype(np.float32)
    raw = np.tile(np.float32([1, 0, 0]), (400, 1))
    w = np.full(400, 5, np.float32)
    bad = rng.random(400) < 0.3
    raw[bad] = np.float32([0.6, 0.8, 0])  # tilted estimates, but made by adjacent voxels only
    w[bad] = 1.0
    voted = vote_normals(pts, raw, w, vote_radius=6, vote_sigma=3, min_vote_weight=1.5)
    assert _angles(voted, np.tile(np.float32([1, 0, 0]), (400, 1))).max() < 0.01


def test_orient_consistently_sphere_and_components():
    rng = np.random.default_rng(3)
    d = rng.normal(size=(2000, 3)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    pts = np.concatenate([15 * d[:1000], 15 * d[1000:] + 100])
    true = d
    flips = np.where(rng.random(2000) < 0.5, -1, 1).astype(np.float32)[:, None]
    field, comp = orient_consistently(pts, true * flips, neighbours=8)
    assert comp.shape == (2000,) and len(np.unique(comp)) == 2
    for k in np.unique(comp):
        s = np.einsum("ij,ij->i", field[comp == k], true[comp == k])
        assert np.all(s > 0.999) or np.all(s < -0.999)


def test_empty_inputs():
    z = np.empty((0, 3), np.float32)
    assert vote_normals(z, z, np.empty(0, np.float32)).shape == (0, 3)
    f, c = orient_consistently(z, z)
    assert f.shape == (0, 3) and c.shape == (0,)



def test_voters_cover_the_whole_radius_on_densely_sampled_membranes():
    """A plane sampled every 0.5 voxel holds ~1250 points within 10 voxels: the 96 nearest
    reach only ~2.8 voxels; the voter subset gives each point ~96 voters spread over the
    whole radius."""
    from scipy.spatial import cKDTree

    from membrain_dist.normals import _voters

    g = np.arange(0, 60, 0.5, dtype=np.float32)
    y, x = np.meshgrid(g, g, indexing="ij")
    pts = np.c_[np.zeros(y.size), y.ravel(), x.ravel()].astype(np.float32)
    tree = cKDTree(pts)
    ids = _voters(tree, pts, 96, 10.0)
    assert ids is not None and 0.05 < len(ids) / len(pts) < 0.1
    inner = pts[(np.abs(pts[:, 1:] - 30) < 15).all(1)]
    vt = cKDTree(pts[ids])
    counts = vt.query_ball_point(inner, 10.0, return_length=True)
    assert 80 < np.median(counts) < 112
    d, _ = vt.query(inner, k=96, distance_upper_bound=10.0)
    assert np.median(np.nanmax(np.where(np.isinf(d), np.nan, d), axis=1)) > 9.0
    d_near, _ = tree.query(inner, k=96)
    assert np.median(d_near[:, -1]) < 3.0
    # sparse sampling: every point votes
    assert _voters(cKDTree(pts[::40]), pts[::40], 96, 10.0) is None
