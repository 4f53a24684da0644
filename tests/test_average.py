"""Tests of stage 5b: the particles' average and in-plane angles from it (analytic blobs)."""

from __future__ import annotations

import numpy as np

from membrain_dist.average import (
    _compact_groups,
    accumulate_average,
    in_plane_frames,
    search_in_plane,
)
from membrain_dist.axes import matrix_zyx_to_xyz
from membrain_dist.extraction import Intensity, cube_offsets
from membrain_dist.orientation import frame_from_axes

SIGMA = np.array([3.5, 1.5, 1.2])  # along u (long axis), v, n


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _blob_volume(shape, centres, frames) -> np.ndarray:
    """Sum of anisotropic Gaussians: long along each frame's u, flat along its n."""
    g = np.indices(shape, dtype=np.float64).reshape(3, -1).T
    vol = np.zeros(g.shape[0])
    for c, f in zip(centres, frames, strict=True):
        d = g - c
        q = sum((d @ f[:, i]) ** 2 / SIGMA[i] ** 2 for i in range(3))
        vol += np.exp(-0.5 * q)
    return vol.reshape(shape).astype(np.float32)


def _blob_cube(size: int) -> np.ndarray:
    """The same Gaussian in its own frame: cube axes (n, v, u) = (z, y, x)."""
    o = cube_offsets(size).astype(np.float64)
    h, b, a = np.meshgrid(o, o, o, indexing="ij")
    return np.exp(-0.5 * (a**2 / SIGMA[0] ** 2 + b**2 / SIGMA[1] ** 2
                          + h**2 / SIGMA[2] ** 2)).astype(np.float32)


def _particles(rng, k: int, shape):
    normals = _unit(rng.normal(size=(k, 3)) * [1.0, 0.6, 0.6] + [0.8, 0, 0])
    angles = rng.uniform(0, 2 * np.pi, k)
    frames = in_plane_frames(normals, angles)[np.arange(k), np.arange(k)]  # k-th at angle k
    # spread on a grid so the blobs do not overlap
    grid = np.stack(np.meshgrid(*(np.arange(14, s - 13, 20) for s in shape), indexing="ij"),
                    -1).reshape(-1, 3).astype(np.float64)
    centres = grid[rng.permutation(grid.shape[0])[:k]] + rng.uniform(-0.5, 0.5, (k, 3))
    return centres, frames, angles


def _angle_error(u_pred: np.ndarray, frames_true: np.ndarray, period: float = 180.0):
    a = np.einsum("ki,ki->k", u_pred, frames_true[:, :, 0])
    b = np.einsum("ki,ki->k", u_pred, frames_true[:, :, 1])
    ang = np.mod(np.degrees(np.arctan2(b, a)), period)
    return np.minimum(ang, period - ang)


def test_search_recovers_known_in_plane_angles():
    rng = np.random.default_rng(0)
    shape = (56, 76, 76)
    centres, frames, _ = _particles(rng, 12, shape)
    vol = _blob_volume(shape, centres, frames)
    vol += rng.normal(scale=0.05, size=shape).astype(np.float32)
    mats, peak = search_in_plane(vol.__getitem__, shape, centres, frames[:, :, 2],
                                 _blob_cube(16), None, angle_step=10.0)
    assert mats.shape == (12, 3, 3) and peak.shape == (12,)
    err = _angle_error(mats[:, :, 0].astype(np.float64), frames)
    assert err.max() < 3.0, err  # 10-degree steps, parabola-refined
    np.testing.assert_allclose(mats[:, :, 2], frames[:, :, 2], atol=1e-5)  # normals kept
    np.testing.assert_allclose(np.linalg.det(matrix_zyx_to_xyz(mats)), 1.0, atol=1e-4)
    assert (peak > 0.8).all()
    # a wrong reference (its long axis along v) finds angles 90 degrees off
    wrong = np.swapaxes(_blob_cube(16), 1, 2)
    mats_w, _ = search_in_plane(vol.__getitem__, shape, centres, frames[:, :, 2], wrong, None,
                                angle_step=10.0)
    assert (_angle_error(mats_w[:, :, 0].astype(np.float64), frames) > 80).all()


def test_search_over_in_plane_offsets_finds_off_centre_particles():
    """Picks 2 voxels off their particles (along u and v): the offset search finds the centre
    (the correlation of the true centre, the right angle); without it the peak is lower."""
    rng = np.random.default_rng(3)
    shape = (56, 76, 76)
    centres, frames, _ = _particles(rng, 12, shape)
    vol = _blob_volume(shape, centres, frames)
    vol += rng.normal(scale=0.05, size=shape).astype(np.float32)
    ref = _blob_cube(16)
    _, peak_true = search_in_plane(vol.__getitem__, shape, centres, frames[:, :, 2], ref, None,
                                   angle_step=10.0)
    # off by (+2, -1) voxels along the frame's (u, v) at angle 0 of the search: on the grid
    f0 = in_plane_frames(frames[:, :, 2], np.zeros(1))[:, 0]
    picks = centres + 2.0 * f0[:, :, 0] - 1.0 * f0[:, :, 1]
    _, peak_off = search_in_plane(vol.__getitem__, shape, picks, frames[:, :, 2], ref, None,
                                  angle_step=10.0)
    mats, peak = search_in_plane(vol.__getitem__, shape, picks, frames[:, :, 2], ref, None,
                                 angle_step=10.0, shift=2)
    np.testing.assert_allclose(peak, peak_true, atol=0.01)
    assert (peak > peak_off + 0.02).all(), (peak, peak_off)
    assert _angle_error(mats[:, :, 0].astype(np.float64), frames).max() < 3.0


def test_average_of_particles_in_their_frames_is_the_particle():
    rng = np.random.default_rng(1)
    shape = (56, 76, 76)
    centres, frames, _ = _particles(rng, 10, shape)
    vol = _blob_volume(shape, centres, frames)
    # the annotated axes tilted out of the plane: projected back into it
    axes = _unit(frames[:, :, 0] + 0.3 * frames[:, :, 2])
    inten = Intensity(0.0, 1.0, 1.0, clip=10.0)
    acc = accumulate_average(vol.__getitem__, shape, centres, axes, frames[:, :, 2], 16, inten)
    assert acc.count == 10
    avg, want = acc.mean(), _blob_cube(16)
    assert avg.shape == (16, 16, 16)
    r = np.corrcoef(avg.ravel(), want.ravel())[0, 1]
    assert r > 0.99, r
    # its long axis is the cube's x: second moments of the density along x > y > z
    o = cube_offsets(16)
    m = [float((avg * o.reshape(s) ** 2).sum()) for s in ((-1, 1, 1), (1, -1, 1), (1, 1, -1))]
    assert m[2] > m[1] > m[0]
    # particles without an axis, or an axis along the normal, are left out
    axes[:3] = np.nan
    axes[3] = frames[3, :, 2]
    assert accumulate_average(vol.__getitem__, shape, centres, axes, frames[:, :, 2], 16,
                              inten).count == 6


def test_compact_groups_bound_the_region_read():
    rng = np.random.default_rng(2)
    pts = rng.uniform(0, 1000, (300, 3))
    margin, cap = 20, 120**3
    groups = _compact_groups(pts, margin, cap)
    idx = np.sort(np.concatenate(groups))
    np.testing.assert_array_equal(idx, np.arange(300))
    for g in groups:
        lo, hi = pts[g].min(0) - margin, pts[g].max(0) + margin
        assert len(g) == 1 or np.prod(hi - lo + 1) <= cap
    assert len(groups) < 300  # neighbours share a read


def test_frames_of_in_plane_search_are_proper():
    n = _unit(np.array([[1.0, 0, 0], [-1.0, 0, 0], [0.3, 0.4, -0.5]]))
    f = in_plane_frames(n, np.radians([0.0, 33.0, 90.0]))
    assert f.shape == (3, 3, 3, 3)
    eye = np.broadcast_to(np.eye(3), f.shape)
    np.testing.assert_allclose(np.einsum("kjab,kjac->kjbc", f, f), eye, atol=1e-12)
    ref = frame_from_axes(f[:, 0, :, 0], n)
    np.testing.assert_allclose(f[:, 0], ref)
    cos = np.einsum("ki,ki->k", f[:, 0, :, 0], f[:, 1, :, 0])
    np.testing.assert_allclose(cos, np.cos(np.radians(33.0)), atol=1e-12)


def test_trained_model_keeps_the_average_and_its_picks_turn_better_than_pca(
        trained_model, sequential_prediction, test_manifest):
    """``train`` writes ``average.mrc`` from the annotated (angled) particles; ``predict``
    gives its picks in-plane angles from it, closer to the truth than the clusters' PCA."""
    import json

    from membrain_dist import pipeline
    from membrain_dist.average import AVERAGE_FILE, read_average
    from membrain_dist.evaluation import in_plane_error, match_particles
    from membrain_dist.manifest import read_manifest
    from membrain_dist.star import particles_matrices, particles_zyx, read_particles

    avg = read_average(trained_model / AVERAGE_FILE)
    assert avg is not None and avg.shape == (16, 16, 16)
    assert (trained_model / AVERAGE_FILE).is_file()
    assert json.loads((trained_model / "model.json").read_text())["metrics"][
        "average_particles"] >= 5
    cfg = pipeline.model_pipeline_config(trained_model)
    store = sequential_prediction.parent / "store.zarr"
    errs = {"average": [], "pca": []}
    for e in read_manifest(test_manifest):
        gt = read_particles(e.particles)
        got = read_particles(sequential_prediction / f"{e.name}.star")
        assert set(got["mbOrientationFrom"]) == {"average"}
        pca = pipeline.tomogram_particles(store, e.name, cfg.picks)  # no search: PCA angles
        assert set(pca["mbOrientationFrom"]) <= {"pca", "normal"}
        for key, df in (("average", got), ("pca", pca)):
            pairs = match_particles(particles_zyx(df), particles_zyx(gt), 4.5)["pairs"]
            errs[key] += in_plane_error(particles_matrices(df)[pairs[:, 0]],
                                        particles_matrices(gt)[pairs[:, 1]], 2).tolist()
    assert len(errs["average"]) >= 10
    assert np.mean(errs["average"]) < np.mean(errs["pca"]), errs


def test_the_average_pools_the_training_and_validation_annotations(
        trained_model, sequential_prediction, test_manifest, tmp_path):
    """``fit_model`` writes the average of every annotated set it was given: two sets'
    particles counted together, the written map their particle-weighted mean."""
    from membrain_dist import pipeline
    from membrain_dist.average import AVERAGE_FILE, read_average
    from membrain_dist.manifest import read_manifest

    cfg = pipeline.model_pipeline_config(trained_model)
    cfg = cfg.with_overrides("labels", template=str(trained_model / "template.mrc"))
    store = sequential_prediction.parent / "store.zarr"
    a, b = read_manifest(test_manifest)[:2]
    sa = pipeline.training_set(store, [a], cfg.labels, cfg.geometry)
    sb = pipeline.training_set(store, [b], cfg.labels, cfg.geometry)
    acc_a = pipeline.particle_average(store, sa, cfg)
    acc_b = pipeline.particle_average(store, sb, cfg)
    assert acc_a.count >= 5 and acc_b.count >= 5
    metrics: dict = {}
    pipeline._write_average(store, [sa, sb], cfg, tmp_path, 10.0, metrics)
    assert metrics["average_particles"] == acc_a.count + acc_b.count
    both = read_average(tmp_path / AVERAGE_FILE)
    want = (acc_a.count * acc_a.mean() + acc_b.count * acc_b.mean()) / (acc_a.count + acc_b.count)
    np.testing.assert_allclose(both, want, rtol=1e-4, atol=1e-5)
