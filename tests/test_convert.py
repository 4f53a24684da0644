import logging
import os

import mrcfile
import numpy as np
import pytest
import zarr
from scipy import ndimage

from membrain_dist import store
from membrain_dist.convert import ConvertConfig, convert_tomogram, validate_entry
from membrain_dist.errors import InputError
from membrain_dist.manifest import TomogramEntry
from membrain_dist.mrc import write_volume

CFG = ConvertConfig(chunk=8, min_membrane_voxels=1)


def _entry(tmp_path, tomo, seg, vs_t=10.0, vs_s=10.0, manifest_vs=None, name="tomo1"):
    """A manifest row of two MRCs. A constant ``tomo`` (a placeholder where only the
    segmentation matters) gets faint noise: a blank tomogram is refused at conversion."""
    if np.isfinite(tomo).all() and np.ptp(tomo) == 0:
        tomo = tomo + np.random.default_rng(0).normal(0, 0.1, tomo.shape).astype(tomo.dtype)
    t, s = tmp_path / f"{name}_t.mrc", tmp_path / f"{name}_s.mrc"
    write_volume(t, tomo, vs_t)
    write_volume(s, seg, vs_s)
    return TomogramEntry(name, t, s, None, manifest_vs, "test")


def _spanning_segmentation(shape=(20, 19, 11)):
    """Components crossing z-slab and y-strip boundaries of 8-voxel blocks."""
    seg = np.zeros(shape, dtype=np.int8)
    for k in range(5, 11):  # diagonal line: 26-connected only, crosses z=8 and y=8 together
        seg[k, k, 2] = 1
    seg[2:18, 3, 5] = 1  # long rod along z through two slab faces
    # a U: two arms in separate blocks joined only at the bottom (transitive merge)
    seg[1:17, 12, 8] = 1
    seg[1:17, 17, 8] = 1
    seg[16, 12:18, 8] = 1
    seg[9, 9, 9] = 1  # isolated voxel
    seg[0:3, 0:2, 0:2] = 1  # small block in a corner
    return seg


def _same_partition(a, b):
    """True when label images a and b are equal up to a permutation of non-zero labels."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]], axis=1), axis=0)
    return len(pairs) == len(np.unique(a[a > 0])) == len(np.unique(b[b > 0]))


@pytest.mark.parametrize("connectivity", [26, 6])
def test_conversion_matches_source_and_scipy_label(tmp_path, connectivity):
    rng = np.random.default_rng(0)
    tomo = rng.normal(size=(20, 19, 11)).astype(np.float32)
    seg = _spanning_segmentation()
    e = _entry(tmp_path, tomo, seg)
    cfg = ConvertConfig(chunk=8, min_membrane_voxels=1, connectivity=connectivity)
    meta = convert_tomogram(e, tmp_path / "c.zarr", cfg)
    root = tmp_path / "c.zarr"
    np.testing.assert_array_equal(store.tomogram_array(root, "tomo1")[:], tomo)
    labels = store.labels_array(root, "tomo1")[:]
    assert labels.dtype == np.int32
    structure = ndimage.generate_binary_structure(3, 3 if connectivity == 26 else 1)
    ref, n = ndimage.label(seg, structure=structure)
    assert _same_partition(labels, ref)
    assert len(meta.membranes) == n == labels.max()
    for m in meta.membranes:
        sl = ndimage.find_objects((labels == m["id"]).astype(int))[0]
        assert m["bbox"] == [sl[0].start, sl[0].stop, sl[1].start, sl[1].stop, sl[2].start,
                             sl[2].stop]
        assert m["voxels"] == int((labels == m["id"]).sum())
    assert meta.chunks == (8, 8, 8) and meta.shape_zyx == (20, 19, 11)
    assert store.tomogram_array(root, "tomo1").chunks == (8, 8, 8)


def test_diagonal_line_is_one_component_with_26_connectivity(tmp_path):
    seg = np.zeros((16, 16, 4), dtype=np.int8)
    for k in range(4, 12):
        seg[k, k, 1] = 1  # crosses the z=8 and y=8 block faces at the same voxel corner
    e = _entry(tmp_path, np.zeros(seg.shape, np.float32), seg)
    meta = convert_tomogram(e, tmp_path / "c.zarr", CFG)
    assert [m["voxels"] for m in meta.membranes] == [8]


def test_small_components_dropped_and_logged(tmp_path, caplog):
    seg = np.zeros((12, 12, 12), dtype=np.int8)
    seg[2:10, 2:10, 3] = 1  # 64 voxels
    seg[10, 10, 10] = 1  # 1 voxel
    e = _entry(tmp_path, np.zeros(seg.shape, np.float32), seg)
    with caplog.at_level(logging.INFO, logger="membrain_dist.convert"):
        meta = convert_tomogram(e, tmp_path / "c.zarr", ConvertConfig(chunk=8,
                                                                       min_membrane_voxels=10))
    assert [m["voxels"] for m in meta.membranes] == [64]
    labels = store.labels_array(tmp_path / "c.zarr", "tomo1")[:]
    assert labels[10, 10, 10] == 0 and labels.max() == 1
    assert "dropped 1 of 2" in caplog.text


def test_multilabel_segmentation_keeps_values(tmp_path):
    seg = np.zeros((10, 10, 10), dtype=np.int16)
    seg[1:4, 1:4, 1:4] = 3
    seg[4:7, 1:4, 1:4] = 7  # touching label 3: must stay separate
    e = _entry(tmp_path, np.zeros(seg.shape, np.float32), seg)
    meta = convert_tomogram(e, tmp_path / "c.zarr", CFG)
    np.testing.assert_array_equal(store.labels_array(tmp_path / "c.zarr", "tomo1")[:], seg)
    assert [(m["id"], m["voxels"], m["bbox"]) for m in meta.membranes] == [
        (3, 27, [1, 4, 1, 4, 1, 4]), (7, 27, [4, 7, 1, 4, 1, 4])]


def test_multilabel_statistics_across_blocks(tmp_path):
    """Labels spanning 8-voxel blocks, blocks holding one label or several: each label's voxel
    count and bbox are those of the whole volume; the labels are stored as they are."""
    seg = np.zeros((20, 19, 11), dtype=np.int16)
    seg[2:18, 3, 5] = 5  # through three z slabs, alone in most blocks
    seg[10, 6, 1:3] = 5  # a second piece of 5 in a block of 5 alone
    seg[1:17, 12:18, 8] = 9  # through z slabs and row bands
    seg[9:12, 9:11, 1:4] = 2  # beside 9 in the middle blocks
    seg[0, 0, 0:3] = 4  # too small: dropped (min_membrane_voxels 4)
    e = _entry(tmp_path, np.zeros(seg.shape, np.float32), seg)
    meta = convert_tomogram(e, tmp_path / "c.zarr", ConvertConfig(chunk=8, min_membrane_voxels=4))
    expect = []
    for v in (2, 5, 9):
        idx = np.argwhere(seg == v)
        lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
        expect.append((v, len(idx), [int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]),
                                     int(lo[2]), int(hi[2])]))
    assert [(m["id"], m["voxels"], m["bbox"]) for m in meta.membranes] == expect
    np.testing.assert_array_equal(store.labels_array(tmp_path / "c.zarr", "tomo1")[:],
                                  np.where(seg == 4, 0, seg))


def test_axis_convention_bright_voxel(tmp_path):
    z, y, x = 3, 5, 9
    tomo = np.zeros((6, 7, 12), dtype=np.float32)
    tomo[z, y, x] = 100.0
    seg = np.zeros_like(tomo, dtype=np.int8)
    seg[z, y, x] = 1
    t, s = tmp_path / "t.mrc", tmp_path / "s.mrc"
    for path, data in ((t, tomo), (s, seg)):
        with mrcfile.new(path) as mrc:  # written with mrcfile directly, data[z, y, x]
            mrc.set_data(data)
            mrc.voxel_size = 4.0
    meta = convert_tomogram(TomogramEntry("ax", t, s, None, None, "test"), tmp_path / "c.zarr",
                            CFG)
    arr = store.tomogram_array(tmp_path / "c.zarr", "ax")[:]
    assert np.unravel_index(np.argmax(arr), arr.shape) == (z, y, x)
    assert meta.membranes[0]["bbox"] == [z, z + 1, y, y + 1, x, x + 1]
    da = store.tomogram_dataarray(tmp_path / "c.zarr", "ax")
    assert da.dims == ("z", "y", "x")
    assert float(da.sel(z=z * 4.0, y=y * 4.0, x=x * 4.0)) == 100.0
    np.testing.assert_allclose(da.coords["x"], np.arange(12) * 4.0)


@pytest.mark.parametrize("sign,polarity", [(1.0, 1), (-1.0, -1)])
def test_intensity_statistics_and_polarity(tmp_path, sign, polarity):
    rng = np.random.default_rng(2)
    tomo = rng.normal(3.0, 2.0, size=(16, 16, 16)).astype(np.float32)
    seg = np.zeros(tomo.shape, dtype=np.int8)
    seg[:, 7:9, :] = 1
    tomo[seg > 0] += sign * 10.0
    e = _entry(tmp_path, tomo, seg)
    meta = convert_tomogram(e, tmp_path / "c.zarr", CFG)
    med = np.median(tomo)
    assert meta.intensity["center"] == pytest.approx(med, rel=1e-6)
    assert meta.intensity["scale"] == pytest.approx(np.median(np.abs(tomo - med)) * 1.4826,
                                                    rel=1e-5)
    assert meta.intensity["polarity"] == polarity


def test_ome_metadata_and_attrs(tmp_path):
    seg = np.zeros((8, 8, 8), np.int8)
    seg[2:5, 2:5, 2:5] = 1
    e = _entry(tmp_path, np.ones(seg.shape, np.float32), seg, vs_t=7.0, vs_s=7.0)
    convert_tomogram(e, tmp_path / "c.zarr", CFG)
    g = zarr.open_group(tmp_path / "c.zarr" / "tomo1", mode="r")
    ms = g.attrs["ome"]["multiscales"][0]
    assert g.attrs["ome"]["version"] == "0.5"
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in ms["axes"]} == {"angstrom"}
    assert ms["datasets"] == [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [7.0, 7.0, 7.0]}]}]
    assert g["labels"].attrs["ome"]["labels"] == ["membranes"]
    assert "image-label" in g["labels/membranes"].attrs["ome"]
    assert g.attrs["complete"] is True and g.attrs["voxel_size_A"] == 7.0
    assert g.attrs["source"]["tomogram"]["size"] == os.path.getsize(e.tomogram)
    assert g.attrs["provenance"]["stage"] == "convert"
    assert store.list_tomograms(tmp_path / "c.zarr") == ["tomo1"]


def _chunk_mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_rerun_skips_and_source_change_reconverts(tmp_path, caplog):
    rng = np.random.default_rng(1)
    tomo = rng.normal(size=(10, 10, 10)).astype(np.float32)
    seg = np.zeros(tomo.shape, np.int8)
    seg[3:6, 3:6, 3:6] = 1
    e = _entry(tmp_path, tomo, seg)
    root = tmp_path / "c.zarr"
    convert_tomogram(e, root, CFG)
    before = _chunk_mtimes(root)
    with caplog.at_level(logging.INFO, logger="membrain_dist.convert"):
        convert_tomogram(e, root, CFG)
    assert "skipped" in caplog.text
    assert _chunk_mtimes(root) == before
    write_volume(e.tomogram, tomo + 1.0, 10.0)  # source changed
    convert_tomogram(e, root, CFG)
    np.testing.assert_array_equal(store.tomogram_array(root, "tomo1")[:], tomo + 1.0)
    convert_tomogram(e, root, ConvertConfig(chunk=4, min_membrane_voxels=1))  # config changed
    assert store.tomogram_array(root, "tomo1").chunks == (4, 4, 4)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["tomo1"]


def _no_group_left(root):
    return not root.exists() or not any(p.is_dir() for p in root.iterdir())


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_in_tomogram(tmp_path):
    tomo = np.zeros((12, 10, 10), np.float32)
    tomo[10, 2, 3] = np.nan  # in the second slab
    seg = np.ones(tomo.shape, np.int8)
    e = _entry(tmp_path, tomo, seg)
    with pytest.raises(InputError, match="NaN") as ei:
        convert_tomogram(e, tmp_path / "c.zarr", CFG)
    assert ei.value.path == str(e.tomogram)
    assert "(10, 2, 3)" in str(ei.value)
    assert _no_group_left(tmp_path / "c.zarr")


def test_empty_segmentation(tmp_path):
    e = _entry(tmp_path, np.zeros((6, 6, 6), np.float32), np.zeros((6, 6, 6), np.int8))
    with pytest.raises(InputError, match="empty segmentation") as ei:
        convert_tomogram(e, tmp_path / "c.zarr", CFG)
    assert ei.value.path == str(e.segmentation)
    assert _no_group_left(tmp_path / "c.zarr")


def test_shape_mismatch(tmp_path):
    e = _entry(tmp_path, np.zeros((6, 6, 6), np.float32), np.ones((6, 6, 5), np.int8))
    with pytest.raises(InputError, match="differs from the tomogram") as ei:
        validate_entry(e)
    assert ei.value.path == str(e.segmentation)


def test_voxel_size_rules(tmp_path):
    tomo, seg = np.zeros((6, 6, 6), np.float32), np.ones((6, 6, 6), np.int8)
    e = _entry(tmp_path, tomo, seg, vs_t=0.0, vs_s=0.0, name="zero")
    with pytest.raises(InputError, match="voxel size missing") as ei:
        validate_entry(e)
    assert ei.value.path == str(e.tomogram)
    e = _entry(tmp_path, tomo, seg, vs_t=10.0, vs_s=12.0, name="disagree")
    with pytest.raises(InputError, match="disagrees"):
        validate_entry(e)
    # the manifest overrides the headers
    e = _entry(tmp_path, tomo, seg, vs_t=0.0, vs_s=12.0, manifest_vs=8.0, name="override")
    meta = convert_tomogram(e, tmp_path / "c.zarr", CFG)
    assert meta.voxel_size_A == 8.0


def test_truncated_tomogram(tmp_path):
    e = _entry(tmp_path, np.zeros((6, 6, 6), np.float32), np.ones((6, 6, 6), np.int8))
    raw = e.tomogram.read_bytes()
    e.tomogram.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(InputError, match="truncated") as ei:
        convert_tomogram(e, tmp_path / "c.zarr", CFG)
    assert ei.value.path == str(e.tomogram)


def test_slab_larger_than_chunk(tmp_path):
    rng = np.random.default_rng(3)
    seg = (rng.random((24, 17, 9)) > 0.75).astype(np.int8)
    tomo = rng.normal(size=seg.shape).astype(np.float32)
    e = _entry(tmp_path, tomo, seg)
    convert_tomogram(e, tmp_path / "c.zarr", ConvertConfig(chunk=4, slab=10,
                                                           min_membrane_voxels=1))
    labels = store.labels_array(tmp_path / "c.zarr", "tomo1")[:]
    ref, _ = ndimage.label(seg, structure=np.ones((3, 3, 3)))
    assert _same_partition(labels, ref)
    np.testing.assert_array_equal(store.tomogram_array(tmp_path / "c.zarr", "tomo1")[:], tomo)
