"""Tests of stage 2: rotation-normalised cube extraction."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from membrain_dist.axes import matrix_zyx_to_xyz
from membrain_dist.extraction import (
    Intensity,
    _reference_extract_loop,
    _sample_coords,
    _trilinear_cubes,
    extract_cubes,
    normalise_intensity,
    rotation_frames,
)


def _unit(rng, n):
    v = rng.normal(size=(n, 3)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_frames_are_proper_rotations():
    rng = np.random.default_rng(0)
    nrm = np.concatenate([_unit(rng, 50), np.float32([[0, 0, 1], [0, 0, -1], [1, 0, 0]])])
    f = rotation_frames(nrm)
    np.testing.assert_allclose(np.einsum("nji,njk->nik", f, f), np.broadcast_to(np.eye(3), f.shape),
                               atol=1e-5)
    np.testing.assert_allclose(f[:, :, 2], nrm, atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(matrix_zyx_to_xyz(f)), 1, atol=1e-5)
    np.testing.assert_array_equal(rotation_frames(nrm), f)  # deterministic


def test_constant_gradient_is_exact():
    rng = np.random.default_rng(1)
    a = np.float32([0.3, -0.5, 0.8])
    vol = (np.indices((48, 48, 48), dtype=np.float32) * a[:, None, None, None]).sum(0) + 1
    pts = (rng.random((300, 3)) * 20 + 14).astype(np.float32)
    nrm = _unit(rng, 300)
    f = rotation_frames(nrm)
    o = np.arange(12, dtype=np.float32) - 5.5
    exp = (1 + (pts @ a)[:, None, None, None]
           + (f[:, :, 2] @ a)[:, None, None, None] * o[:, None, None]
           + (f[:, :, 1] @ a)[:, None, None, None] * o[None, :, None]
           + (f[:, :, 0] @ a)[:, None, None, None] * o[None, None, :])
    for order in (1, 3):
        cubes = extract_cubes(vol, pts, nrm, order=order, batch_size=64)
        assert cubes.dtype == np.float32 and cubes.shape == (300, 12, 12, 12)
        np.testing.assert_allclose(cubes, exp, atol=2e-4)
    ref = _reference_extract_loop(vol, pts[:20], nrm[:20])
    np.testing.assert_allclose(ref, exp[:20], atol=1e-2)


def test_feature_above_membrane_lands_on_plus_z():
    rng = np.random.default_rng(2)
    n = 64
    g = np.indices((n, n, n), dtype=np.float32)
    c = np.float32([31.3, 32.6, 30.9])
    for nrm in _unit(rng, 6):
        h = np.einsum("a,azyx->zyx", nrm, g - c[:, None, None, None])
        plane = np.exp(-h * h / 2)
        dot_at = c + 5 * nrm
        r2 = ((g - dot_at[:, None, None, None]) ** 2).sum(0)
        vol = (plane + 3 * np.exp(-r2 / 2)).astype(np.float32)
        cube = extract_cubes(vol, c[None], nrm[None], size=16)[0]
        k, j, i = np.unravel_index(np.argmax(cube), cube.shape)
        # offsets: index 13 -> +5.5 along z; dot at +5 along the normal, centred in x, y
        assert (j, i) in {(7, 7), (7, 8), (8, 7), (8, 8)} and k in (12, 13), (k, j, i)
        # membrane plane in the cube's x-y plane at z offset 0 (indices 7, 8)
        prof = cube[:, 2:5, 2:5].mean(axis=(1, 2))
        assert set(np.argsort(prof)[-2:]) == {7, 8}


def test_reference_agrees_with_batched_cubic():
    rng = np.random.default_rng(3)
    from scipy.ndimage import gaussian_filter

    vol = gaussian_filter(rng.normal(size=(40, 40, 40)), 1.5).astype(np.float32)
    pts = (rng.random((10, 3)) * 10 + 15).astype(np.float32)
    nrm = _unit(rng, 10)
    ours = extract_cubes(vol, pts, nrm, order=3)
    ref = _reference_extract_loop(vol, pts, nrm)
    assert np.abs(ours - ref).max() < 0.02 * np.abs(ref).max()


def test_intensity_normalisation():
    x = np.float32([0, 1, 2, 100, -100])
    out = normalise_intensity(x, Intensity(center=1.0, scale=0.5, polarity=-1.0))
    np.testing.assert_allclose(out, [2, 0, -2, -3, 3])
    assert out.dtype == np.float32
    assert Intensity.from_attrs({"center": 1, "scale": 2, "polarity": -1}).scale == 2.0
    vol = np.full((20, 20, 20), 5, np.float32)
    cubes = extract_cubes(vol, np.float32([[10, 10, 10]]), np.float32([[0, 1, 0]]),
                          intensity=Intensity(4.0, 2.0, 1.0))
    np.testing.assert_allclose(cubes, 0.5)


def test_trilinear_equals_map_coordinates_order1():
    """The default order-1 path equals scipy's map_coordinates(order=1, mode="nearest")."""
    rng = np.random.default_rng(7)
    for shape, n, chunk in (((37, 41, 29), 173, 48), ((20, 23, 25), 50, 7), ((1, 30, 30), 9, 4)):
        block = rng.normal(size=shape).astype(np.float32)
        # points inside, near and beyond the faces (clamped like mode="nearest")
        pts = (rng.random((n, 3)) * (np.float32(shape) + 16) - 8).astype(np.float32)
        frames = rotation_frames(_unit(rng, n))
        got = _trilinear_cubes(block, pts, frames, 12, chunk=chunk)
        coords = _sample_coords(pts, frames, 12)
        want = ndimage.map_coordinates(block, coords.reshape(3, -1), order=1, mode="nearest",
                                       prefilter=False, output=np.float32).reshape(got.shape)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # and through the public batched API, on a whole volume
    vol = rng.normal(size=(40, 50, 60)).astype(np.float32)
    pts = (rng.random((300, 3)) * np.float32([40, 50, 60])).astype(np.float32)
    nrm = _unit(rng, 300)
    got = extract_cubes(vol, pts, nrm, batch_size=64)
    coords = _sample_coords(pts, rotation_frames(nrm), 12)
    want = ndimage.map_coordinates(vol, coords.reshape(3, -1), order=1, mode="nearest",
                                   prefilter=False, output=np.float32).reshape(got.shape)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_trilinear_cubes_do_not_depend_on_the_block_origin():
    """A cube cut from any block that holds it is the same to the bit: the same points cut
    from blocks shifted by whole voxels, and through batches of any size (different read
    boxes), give equal cubes (the sample positions' fractions do not depend on the origin)."""
    rng = np.random.default_rng(3)
    vol = rng.normal(size=(60, 70, 80)).astype(np.float32)
    pts = (rng.random((400, 3)) * 30 + np.float32([15, 20, 25])).astype(np.float32)
    frames = rotation_frames(_unit(rng, 400))
    ref = _trilinear_cubes(vol, pts, frames, 12)
    for off in ((3, 5, 2), (0, 0, 1), (5, 4, 5)):  # within 10 voxels: every sample inside
        got = _trilinear_cubes(vol[off[0]:, off[1]:, off[2]:], pts - np.float32(off), frames, 12)
        np.testing.assert_array_equal(got, ref)
    nrm = frames[:, :, 2]
    for bs in (1, 37, 400):
        np.testing.assert_array_equal(extract_cubes(vol, pts, nrm, batch_size=bs, frames=frames), ref)


def test_lowpass_blocks_equal_filtering_the_whole_volume():
    """Per-block low-pass (with the kernel's margin) gives the cubes of a volume filtered as a
    whole, however the points are batched; and it removes white noise as the kernel says."""
    rng = np.random.default_rng(5)
    vol = rng.normal(size=(64, 64, 64)).astype(np.float32)
    pts = (rng.random((200, 3)) * 24 + 20).astype(np.float32)
    nrm = _unit(rng, 200)
    inten = Intensity(0.0, 1.0, 1.0, clip=10.0, lowpass=1.0)
    whole = ndimage.gaussian_filter(vol, 1.0, mode="nearest", truncate=3.0)
    want = extract_cubes(whole, pts, nrm)
    for bs in (7, 64, 200):
        got = extract_cubes(vol, pts, nrm, batch_size=bs, intensity=inten)
        np.testing.assert_allclose(got, want, atol=1e-5)
    # variance of filtered unit white noise = sum of the squared 3D kernel = (sum k_1d^2)^3
    x = np.arange(-3, 4, dtype=np.float64)
    k = np.exp(-x**2 / 2)
    k /= k.sum()
    expected = float((k**2).sum() ** 3)
    var = float(normalise_intensity(vol, inten)[8:-8, 8:-8, 8:-8].var())
    assert abs(var - expected) < 0.1 * expected, (var, expected)
    # off: exactly the plain normalisation
    plain = Intensity(0.0, 1.0, 1.0, clip=10.0)
    np.testing.assert_array_equal(normalise_intensity(vol, plain), vol)


class _LinearVolume:
    """A virtual tomogram ``v(z, y, x) = 1 + a . (z, y, x)`` of any shape: blocks are computed
    when read (nothing of the whole is allocated); every read's size is recorded."""

    def __init__(self, shape: tuple[int, int, int], a: np.ndarray) -> None:
        self.shape, self.a, self.reads = shape, np.asarray(a, np.float64), []

    def __getitem__(self, sl: tuple[slice, slice, slice]) -> np.ndarray:
        idx = np.ogrid[tuple(slice(s.start, s.stop) for s in sl)]
        self.reads.append(int(np.prod([s.stop - s.start for s in sl], dtype=np.int64)))
        return (1 + sum(self.a[k] * idx[k] for k in range(3))).astype(np.float32)


def test_extraction_beyond_2_31_voxels_reads_bounded_blocks():
    """An unbinned-size index space (1600 x 1600 x 1024 = 2.6e9 voxels > 2^31): points near
    opposite corners in one batch are cut exactly (linear volume: trilinear is exact) and no
    read exceeds the block bound (one min/max box would span the whole volume)."""
    from membrain_dist.extraction import bounded_batches, extract_batches

    shape = (1600, 1600, 1024)
    assert np.prod(shape, dtype=np.int64) > 2**31
    a = np.float32([0.25, -0.125, 0.5])
    vol = _LinearVolume(shape, a)
    rng = np.random.default_rng(5)
    far = np.float32(shape) - 20
    pts = np.concatenate([rng.uniform(10, 30, (40, 3)), far + rng.uniform(0, 10, (40, 3)),
                          rng.uniform(10, 30, (20, 3))]).astype(np.float32)
    nrm = _unit(rng, pts.shape[0])
    limit = 64**3
    got = np.empty((pts.shape[0], 12, 12, 12), np.float32)
    for start, cubes in extract_batches(vol.__getitem__, shape, pts, nrm, batch_size=100,
                                        max_block_voxels=limit):
        got[start : start + cubes.shape[0]] = cubes
    assert max(vol.reads) <= limit and len(vol.reads) >= 3
    f = rotation_frames(nrm)
    o = np.arange(12, dtype=np.float32) - 5.5
    exp = (1 + (pts.astype(np.float64) @ a)[:, None, None, None]
           + (f[:, :, 2] @ a)[:, None, None, None] * o[:, None, None]
           + (f[:, :, 1] @ a)[:, None, None, None] * o[None, :, None]
           + (f[:, :, 0] @ a)[:, None, None, None] * o[None, None, :])
    np.testing.assert_allclose(got, exp, atol=2e-3)
    # the ranges cover every row once, in order, each within the bound (or a single point)
    ranges = bounded_batches(pts, shape, 12, 100, limit)
    rows = np.concatenate([np.arange(a0, b0) for a0, b0, _, _ in ranges])
    np.testing.assert_array_equal(rows, np.arange(pts.shape[0]))
    assert all(lo.dtype == np.int64 and np.prod(hi - lo) <= limit for _, _, lo, hi in ranges)



def test_flat_indices_widen_past_int32():
    """The corner gathers index the padded block flat: int32 while it fits, int64 beyond."""
    from membrain_dist.extraction import _index_dtype

    assert _index_dtype(2**31 - 1) == np.int32
    assert _index_dtype(2**31) == np.int64
    assert _index_dtype(3 * 2**31) == np.int64
