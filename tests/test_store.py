import numpy as np
import pytest
import zarr

from membrain_dist import store


def _names(root):
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_atomic_group_exception_leaves_nothing(tmp_path):
    root = tmp_path / "c.zarr"
    with pytest.raises(RuntimeError):
        with store.atomic_group(root, "t1") as g:
            g.create_array("x", shape=(4,), dtype="float32")[:] = 1
            raise RuntimeError("boom")
    assert _names(root) == []
    assert store.read_meta(root, "t1") is None


def test_existing_group_survives_failed_rewrite(tmp_path):
    root = tmp_path / "c.zarr"
    with store.atomic_group(root, "t1") as g:
        g.attrs["v"] = 1
    with pytest.raises(ValueError):
        with store.atomic_group(root, "t1") as g:
            g.attrs["v"] = 2
            raise ValueError("fail")
    assert _names(root) == ["t1"]
    assert zarr.open_group(root / "t1", mode="r").attrs["v"] == 1
    with store.atomic_group(root, "t1") as g:
        g.attrs["v"] = 3
    assert _names(root) == ["t1"]
    assert zarr.open_group(root / "t1", mode="r").attrs["v"] == 3


def test_nested_atomic_group_and_array(tmp_path):
    root = tmp_path / "c.zarr"
    with store.atomic_group(root, "t1/geometry/m1") as g:
        g.create_array("zyx", shape=(2, 3), dtype="float32")[:] = 5
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    store.write_array_atomic(root, "t1/geometry/m1/scores", data, (1, 3, 4), attrs={"k": 1})
    store.write_array_atomic(root, "t1/geometry/m1/scores", data * 2, (1, 3, 4))
    a = zarr.open_array(root / "t1/geometry/m1/scores", mode="r")
    np.testing.assert_array_equal(a[:], data * 2)
    assert "k" not in a.attrs  # replaced as a whole
    assert sorted(p.name for p in (root / "t1/geometry/m1").iterdir()) == [
        "scores", "zarr.json", "zyx"]
    with pytest.raises(ValueError):  # object dtype cannot be stored: nothing left behind
        store.write_array_atomic(root, "t1/bad", np.array([object()]), None)
    assert not any(".tmp-" in p.name for p in (root / "t1").iterdir())


def test_meta_round_trip_and_listing(tmp_path):
    root = tmp_path / "c.zarr"
    meta = store.TomogramMeta("tomoA", 10.0, (4, 5, 6), (4, 5, 6), source={"a": 1},
                              intensity={"center": 0.0, "scale": 1.0, "polarity": -1},
                              membranes=[{"id": 1, "voxels": 3, "bbox": [0, 1, 0, 1, 0, 3]}])
    with store.atomic_group(root, "tomoA") as g:
        g.create_array(store.TOMOGRAM_KEY, shape=(4, 5, 6), dtype="float32", chunks=(2, 5, 6))[
            :] = np.arange(120, dtype=np.float32).reshape(4, 5, 6)
        g.attrs.update(meta.to_attrs())
    with store.atomic_group(root, "incomplete") as g:
        g.attrs["voxel_size_A"] = 1.0
    assert store.read_meta(root, "tomoA") == meta
    assert store.read_meta(root, "incomplete") is None
    assert store.read_meta(root, "absent") is None
    assert store.list_tomograms(root) == ["tomoA"]
    da = store.tomogram_dataarray(root, "tomoA")
    assert da.dims == ("z", "y", "x")
    np.testing.assert_allclose(da.coords["x"], np.arange(6) * 10.0)
    np.testing.assert_allclose(da.coords["z"], [0, 10, 20, 30])
    assert da.attrs["voxel_size_A"] == 10.0
    assert float(da.sel(z=20.0, y=10.0, x=50.0)) == 2 * 30 + 1 * 6 + 5


def test_provenance_is_current():
    prov = store.provenance("convert", {"chunk": (8, 8, 8)}, {"path": "a"})
    assert prov["stage"] == "convert" and "code_version" in prov
    attrs = {"provenance": {"stage": "convert", "params": {"chunk": [8, 8, 8]},
                            "inputs": {"path": "a"}, "code_version": prov["code_version"]}}
    assert store.is_current(attrs, prov)
    assert not store.is_current(attrs, store.provenance("convert", {"chunk": 16}, {"path": "a"}))
    assert not store.is_current({}, prov)


_KILLED_WRITER = """
import os, signal, sys
import numpy as np
from membrain_dist import store
with store.atomic_group(sys.argv[1], "t1/geometry/m2") as g:
    g.create_array("zyx", data=np.ones((5, 3), np.float32))
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sweep_removes_what_a_killed_writer_left(tmp_path):
    """A SIGKILLed writer leaves its temporary group; the sweep removes it, nothing else."""
    import subprocess
    import sys

    root = tmp_path / "s.zarr"
    with store.atomic_group(root, "t1/geometry/m1") as g:
        g.create_array("zyx", data=np.zeros((4, 3), np.float32))
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(root)], capture_output=True)
    assert proc.returncode == -9, proc.stderr
    geometry = root / "t1" / "geometry"
    left = [p.name for p in geometry.iterdir() if store.TMP_MARKER in p.name]
    assert len(left) == 1 and left[0].startswith(".m2.tmp-")  # outside the name space
    assert not (geometry / "m2").exists()  # never taken for a finished group

    assert store.sweep_orphans(root, ["other"]) == []  # other tomograms are not touched
    removed = store.sweep_orphans(root, ["t1"])
    assert removed == [f"t1/geometry/{left[0]}"]
    assert sorted(p.name for p in geometry.iterdir()) == ["m1", "zarr.json"]
    np.testing.assert_array_equal(zarr.open_group(str(root), path="t1/geometry/m1", mode="r")["zyx"][...],
                                  np.zeros((4, 3), np.float32))


def _write_sibling(args: tuple[str, int]) -> int:
    root, i = args
    store.write_array_atomic(root, f"t{i // 8}/picks/m{i}", np.full(3, i, np.float32), None)
    return i


def test_concurrent_writers_create_shared_parents(tmp_path):
    """Worker processes writing sibling arrays race to create the root and parent groups."""
    from concurrent.futures import ProcessPoolExecutor

    root = str(tmp_path / "s.zarr")
    with ProcessPoolExecutor(4) as pool:
        done = list(pool.map(_write_sibling, [(root, i) for i in range(64)]))
    assert done == list(range(64))
    for i in range(64):
        a = zarr.open_array(root, path=f"t{i // 8}/picks/m{i}", mode="r")
        np.testing.assert_array_equal(a[...], np.full(3, i, np.float32))


@pytest.mark.parametrize("start, n", [(0, 8), (8, 16), (3, 9), (13, 2), (0, 30)])
def test_write_rows_chunk_by_chunk(tmp_path, start: int, n: int):
    """write_rows equals one slice assignment, aligned to the chunks or not, and leaves the
    rows around it untouched."""
    rng = np.random.default_rng(start + n)
    a = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=(30, 2, 3), chunks=(8, 2, 3),
                          dtype=np.float32, fill_value=-1.0)
    rows = rng.normal(size=(n, 2, 3)).astype(np.float32)
    store.write_rows(a, start, rows)
    expected = np.full((30, 2, 3), -1.0, np.float32)
    expected[start : start + n] = rows
    np.testing.assert_array_equal(a[...], expected)
