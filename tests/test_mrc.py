import mrcfile
import numpy as np
import pytest

from membrain_dist.errors import InputError
from membrain_dist.mrc import open_volume, read_info, read_slab, write_volume


def test_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)
    p = tmp_path / "v.mrc"
    write_volume(p, data, 13.5)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["v.mrc"]  # no temp file left
    info = read_info(p)
    assert info.shape_zyx == (5, 6, 7)
    assert info.voxel_size_A == pytest.approx(13.5)
    assert info.dtype == np.float32
    vol = open_volume(p)
    np.testing.assert_array_equal(vol, data)
    assert not vol.flags.writeable
    np.testing.assert_array_equal(read_slab(info, 1, 4, 2, 5), data[1:4, 2:5, :])


def test_axis_order_matches_mrc_columns_rows_sections(tmp_path):
    data = np.zeros((4, 5, 6), dtype=np.float32)
    z, y, x = 1, 3, 4
    data[z, y, x] = 9.0
    p = tmp_path / "ax.mrc"
    with mrcfile.new(p) as mrc:
        mrc.set_data(data)
    with mrcfile.open(p, header_only=True) as mrc:
        assert (int(mrc.header.nx), int(mrc.header.ny), int(mrc.header.nz)) == (6, 5, 4)
    vol = open_volume(p)
    assert np.unravel_index(np.argmax(vol), vol.shape) == (z, y, x)


def test_zero_voxel_size_is_none(tmp_path):
    p = tmp_path / "z.mrc"
    with mrcfile.new(p) as mrc:
        mrc.set_data(np.zeros((3, 3, 3), np.float32))
        mrc.voxel_size = 0.0
    assert read_info(p).voxel_size_A is None


def test_truncated_file(tmp_path):
    p = tmp_path / "t.mrc"
    write_volume(p, np.ones((4, 4, 4), np.float32), 1.0)
    raw = p.read_bytes()
    p.write_bytes(raw[:-10])
    with pytest.raises(InputError, match="truncated") as ei:
        read_info(p)
    assert ei.value.path == str(p)


def test_unreadable_and_missing(tmp_path):
    p = tmp_path / "junk.mrc"
    p.write_bytes(b"not an mrc file")
    with pytest.raises(InputError, match="junk.mrc"):
        read_info(p)
    with pytest.raises(InputError, match="not found"):
        read_info(tmp_path / "absent.mrc")


def test_not_3d(tmp_path):
    p = tmp_path / "img.mrc"
    with mrcfile.new(p) as mrc:
        mrc.set_data(np.zeros((8, 9), np.float32))
    with pytest.raises(InputError, match="not a 3D"):
        read_info(p)


def test_mode0_unsigned_bytes_in_old_files(tmp_path):
    p = tmp_path / "old.mrc"
    with mrcfile.new(p) as mrc:
        mrc.set_data(np.array([[[-56, 5], [0, -1]]] * 2, dtype=np.int8))  # bytes 200, 5, 0, 255
        mrc.header.nversion = 0  # pre-MRC2014, no IMOD signed flag
    vol = open_volume(p)
    assert vol.dtype == np.uint8
    np.testing.assert_array_equal(vol[0], [[200, 5], [0, 255]])
    # an MRC2014 file keeps signed bytes
    q = tmp_path / "new.mrc"
    with mrcfile.new(q) as mrc:
        mrc.set_data(np.array([[[-56, 5], [0, -1]]] * 2, dtype=np.int8))
    assert open_volume(q).dtype == np.int8


def test_write_casts_labels_and_bool(tmp_path):
    labels = np.zeros((3, 4, 5), dtype=np.int64)
    labels[1, 2, 3] = 300
    write_volume(tmp_path / "l.mrc", labels, 2.0)
    np.testing.assert_array_equal(open_volume(tmp_path / "l.mrc"), labels)
    write_volume(tmp_path / "b.mrc", labels > 0, 2.0)
    np.testing.assert_array_equal(open_volume(tmp_path / "b.mrc"), labels > 0)


def test_mode0_imod_signed_flag_keeps_int8(tmp_path):
    p = tmp_path / "imod.mrc"
    with mrcfile.new(p) as mrc:
        mrc.set_data(np.full((2, 2, 2), -3, dtype=np.int8))
        mrc.header.nversion = 0
        extra = bytearray(mrc.header.extra2.tobytes())
        extra[40:48] = np.array([1146047817, 1], dtype="<i4").tobytes()
        mrc.header.extra2 = bytes(extra)
    vol = open_volume(p)
    assert vol.dtype == np.int8 and int(vol[0, 0, 0]) == -3


def test_big_endian_file(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    p = tmp_path / "be.mrc"
    with mrcfile.new(p) as mrc:
        mrc.set_data(data.astype(">f4"))
    info = read_info(p)
    assert info.dtype.byteorder == ">"
    np.testing.assert_array_equal(open_volume(p), data)
    slab = read_slab(info, 1, 2, 1, 3)
    assert slab.dtype.isnative
    np.testing.assert_array_equal(slab, data[1:2, 1:3])
