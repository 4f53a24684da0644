"""Tests of stage 1a: blockwise band sampling and raw normals."""

from __future__ import annotations

import numpy as np
import pytest

from membrain_dist.sampling import block_slices, sample_membrane


def _sphere(n: int = 64, radius: float = 20.0, thickness: float = 4.0, label: int = 3):
    c = (n - 1) / 2
    g = np.indices((n, n, n), dtype=np.float32) - np.float32(c)
    r = np.sqrt((g * g).sum(0))
    lab = ((r >= radius - thickness / 2) & (r < radius + thickness / 2)).astype(np.int32) * label
    return lab, np.full(3, c, np.float32)


def _full_bbox(shape):
    return [0, shape[0], 0, shape[1], 0, shape[2]]


def _sorted(a, *others):
    o = np.lexsort(a.T)
    return (a[o], *(x[o] for x in others))


def test_points_on_surface_and_raw_normals_point_away():
    lab, c = _sphere()
    sp = sample_membrane(lab.__getitem__, 3, _full_bbox(lab.shape), lab.shape)
    assert len(sp) > 1000
    assert sp.zyx.dtype == np.float32 and sp.raw_normal.dtype == np.float32
    r = np.linalg.norm(sp.zyx - c, axis=1)
    # point = mean of boundary voxels of one cell: close to one of the two faces
    assert np.all((np.abs(r - 18) < 1.5) | (np.abs(r - 22) < 1.5))
    radial = (sp.zyx - c) / r[:, None]
    dots = np.einsum("ij,ij->i", sp.raw_normal, radial)
    outer = r > 20
    assert np.all(dots[outer] > 0.5) and np.all(dots[~outer] < -0.5)
    np.testing.assert_allclose(np.linalg.norm(sp.raw_normal, axis=1), 1, atol=1e-5)
    assert sp.weight.min() >= 1 - 1e-6 and sp.weight.max() <= 15 + 1e-5


def test_blockwise_equals_single_block():
    lab, _ = _sphere(n=56, radius=17)
    bbox = _full_bbox(lab.shape)
    one = sample_membrane(lab.__getitem__, 3, bbox, lab.shape, block=256)
    reads = []

    def reader(sl):
        reads.append(tuple(s.stop - s.start for s in sl))
        return lab[sl]

    many = sample_membrane(reader, 3, bbox, lab.shape, block=13)
    assert max(np.prod(r) for r in reads) <= (13 + 2 * 17) ** 3  # bounded by block + halo
    assert len(one) == len(many)
    a = _sorted(one.zyx, one.raw_normal, one.weight)
    b = _sorted(many.zyx, many.raw_normal, many.weight)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
    np.testing.assert_array_equal(one.coarse_mask, many.coarse_mask)


def test_bbox_restricts_region_and_other_labels_ignored():
    lab, c = _sphere(n=64, radius=12)
    lab = lab.copy()
    lab[:, :, 56:] = 9  # another membrane: must not attract points of label 3
    nz = np.nonzero(lab == 3)
    bbox = [int(f(a)) + d for a in nz for f, d in ((np.min, 0), (np.max, 1))]
    reads = []

    def reader(sl):
        reads.append(sl)
        return lab[sl]

    sp = sample_membrane(reader, 3, bbox, lab.shape)
    r = np.linalg.norm(sp.zyx - c, axis=1)
    assert np.all(r < 16)
    for sl in reads:  # never beyond bbox + band margin
        for s, lo, hi in zip(sl, bbox[0::2], bbox[1::2], strict=True):
            assert s.start >= lo - 16 and s.stop <= hi + 16


def test_spacing_thins_points():
    lab, _ = _sphere()
    bb = _full_bbox(lab.shape)
    dense = sample_membrane(lab.__getitem__, 3, bb, lab.shape, spacing=1.0)
    sparse = sample_membrane(lab.__getitem__, 3, bb, lab.shape, spacing=3.0)
    assert len(sparse) < 0.3 * len(dense)
    cells = np.floor(sparse.zyx / 3.0).astype(int)
    # at most one point per cell and face (two faces of a 4-voxel membrane never share a cell)
    _, counts = np.unique(cells, axis=0, return_counts=True)
    assert counts.max() <= 2


def test_thin_membrane_gets_both_faces():
    lab = np.zeros((24, 24, 24), np.int32)
    lab[12] = 1  # one-voxel sheet: every boundary voxel faces both sides
    sp = sample_membrane(lab.__getitem__, 1, [12, 13, 0, 24, 0, 24], lab.shape, band_width=6)
    up = sp.raw_normal[:, 0] > 0.99
    down = sp.raw_normal[:, 0] < -0.99
    assert up.sum() > 50 and down.sum() > 50 and (up | down).all()


def test_empty_and_blocks():
    lab = np.zeros((10, 10, 10), np.int32)
    sp = sample_membrane(lab.__getitem__, 1, [0, 10, 0, 10, 0, 10], lab.shape)
    assert len(sp) == 0 and sp.zyx.shape == (0, 3)
    blocks = list(block_slices((0, 0, 0), (10, 5, 3), 4))
    assert len(blocks) == 3 * 2 * 1
    covered = np.zeros((10, 5, 3), int)
    for b in blocks:
        covered[b] += 1
    assert np.all(covered == 1)
    with pytest.raises(ValueError):
        sample_membrane(lab.__getitem__, 1, [0, 10, 0, 10, 0, 10], lab.shape, spacing=0)
