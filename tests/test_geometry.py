"""Tests of stages 1 + 2 on a small campaign store."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from membrain_dist import store
from membrain_dist.geometry import GeometryConfig, geometry_key, process_membrane, read_geometry
from membrain_dist.normals import vote_normals
from membrain_dist.sampling import sample_membrane
from membrain_dist.sides import SideSpec


def _make_store(root: Path, name: str = "t0") -> tuple[np.ndarray, np.ndarray]:
    n = 64
    g = np.indices((n, n, n), dtype=np.float32)
    c = np.float32([32, 31, 30])
    r = np.sqrt(((g - c[:, None, None, None]) ** 2).sum(0))
    labels = np.zeros((n, n, n), np.int32)
    labels[(r >= 12) & (r < 16)] = 2  # vesicle
    labels[52:55, :, :] = 5  # flat sheet
    tomo = (10 + 2 * (labels > 0) + 0.01 * g[2]).astype(np.float32)
    grp = store.open_store(root).require_group(name)
    store.write_array_atomic(root, f"{name}/{store.TOMOGRAM_KEY}", tomo, (32, 32, 32))
    store.write_array_atomic(root, f"{name}/{store.LABELS_KEY}", labels, (32, 32, 32))
    membranes = []
    for mid in (2, 5):
        nz = np.nonzero(labels == mid)
        bbox = [int(f(a)) + d for a in nz for f, d in ((np.min, 0), (np.max, 1))]
        membranes.append({"id": mid, "voxels": int(nz[0].size), "bbox": bbox})
    meta = store.TomogramMeta(name, 10.0, (n, n, n), (32, 32, 32),
                              source={"tomogram": {"sha256": "x"}},
                              intensity={"center": 10.0, "scale": 1.0, "polarity": 1.0},
                              membranes=membranes)
    grp.attrs.update(meta.to_attrs())
    return tomo, labels


def test_process_membrane_writes_and_skips(tmp_path: Path, caplog):
    root = tmp_path / "c.zarr"
    _, labels = _make_store(root)
    cfg = GeometryConfig(batch_size=300, chunk_points=256, block=24)
    n = process_membrane(root, "t0", 2, cfg, keep_cubes=True)
    assert n > 500
    geo = read_geometry(root, "t0", 2)
    assert geo["zyx"].shape == (n, 3) and geo["zyx"].dtype == np.float32
    assert geo["normal"].dtype == np.float32 and geo["side"].dtype == np.int8
    import zarr

    grp = zarr.open_group(store=str(root), path=geometry_key("t0", 2), mode="r")
    cubes = grp["cubes"]
    assert cubes.shape == (n, 12, 12, 12) and cubes.dtype == np.float32
    assert cubes.chunks[0] == 256
    assert grp.attrs["closed"] is True and grp.attrs["n_points"] == n
    r = np.linalg.norm(geo["zyx"] - np.float32([32, 31, 30]), axis=1)
    np.testing.assert_array_equal(geo["side"], np.where(r < 14, -1, 1))
    c = np.asarray(cubes[...])
    # intensity normalised (membrane 12 -> 2 + x gradient <= 0.64, background 0 + gradient):
    # the membrane lies below the cube centre (-z, points sit on its boundary), not above
    below, above = c[:, 2:5, 4:8, 4:8].mean(), c[:, 8:, 4:8, 4:8].mean()
    assert below > 1.8 and above < 0.8 and np.abs(c).max() <= 3
    # the same points as the pure functions give
    bbox = grp.attrs["provenance"]["inputs"]["membrane"]["bbox"]
    sp = sample_membrane(labels.__getitem__, 2, bbox, labels.shape, block=64)
    assert len(sp) == n

    # rerun: skipped (the group is not rewritten), with or without asking for cubes
    mtime = (root / "t0" / "geometry" / "m2" / "zarr.json").stat().st_mtime_ns
    assert process_membrane(root, "t0", 2, cfg) == n
    assert process_membrane(root, "t0", 2, cfg, keep_cubes=True) == n
    assert (root / "t0" / "geometry" / "m2" / "zarr.json").stat().st_mtime_ns == mtime
    # changed parameters: recomputed, only the outside kept
    n_out = process_membrane(root, "t0", 2, cfg, SideSpec("outside"))
    assert 0 < n_out < n
    assert np.all(read_geometry(root, "t0", 2)["side"] == 1)
    assert not any(".tmp-" in p.name for p in (root / "t0" / "geometry").iterdir())


def test_sheet_and_errors(tmp_path: Path):
    root = tmp_path / "c.zarr"
    _make_store(root)
    cfg = GeometryConfig(batch_size=1000)
    n = process_membrane(root, "t0", 5, cfg)
    geo = read_geometry(root, "t0", 5)
    assert len(geo["zyx"]) == n > 1000
    faces = np.sign(geo["normal"][:, 0])
    np.testing.assert_array_equal(geo["side"], np.where(faces == faces[0], geo["side"][0],
                                                        -geo["side"][0]))
    with pytest.raises(KeyError):
        process_membrane(root, "t0", 99, cfg)
    with pytest.raises(KeyError):
        read_geometry(root, "t0", 99)


def test_config_defaults_match_pure_functions():
    cfg = GeometryConfig()
    names = {f.name for f in fields(cfg)}
    for fn in (sample_membrane, vote_normals):
        for p in inspect.signature(fn).parameters.values():
            if p.kind is p.KEYWORD_ONLY and p.name in names:
                assert getattr(cfg, p.name) == p.default, p.name
    with pytest.raises(ValueError):
        GeometryConfig(order=2)


@pytest.mark.parametrize("lowpass", [0.0, 1.0])
def test_region_read_equals_per_batch_reads(tmp_path: Path, monkeypatch, lowpass: float):
    """Reading the membrane's region once gives the cubes that per-batch store reads give
    (with and without the low-pass, whose kernel needs its own margin)."""
    import zarr

    from membrain_dist import geometry
    from membrain_dist.extraction import Intensity, extract_cubes

    root = tmp_path / "c.zarr"
    tomo, _ = _make_store(root)
    cfg = GeometryConfig(batch_size=300, chunk_points=256, block=24, lowpass_sigma=lowpass)

    def cubes() -> np.ndarray:
        process_membrane(root, "t0", 2, cfg, keep_cubes=True)
        grp = zarr.open_group(store=str(root), path=geometry_key("t0", 2), mode="r")
        return np.asarray(grp["cubes"][...])

    once = cubes()
    monkeypatch.setattr(geometry, "REGION_MAX_VOXELS", 0)
    import shutil

    shutil.rmtree(root / "t0" / "geometry")
    if lowpass:  # separable filter passes over other block extents: float32 round-off
        np.testing.assert_allclose(cubes(), once, atol=2e-5)
    else:
        np.testing.assert_array_equal(cubes(), once)
    geo = read_geometry(root, "t0", 2)
    want = extract_cubes(tomo, geo["zyx"], geo["normal"],
                         intensity=Intensity(10.0, 1.0, 1.0, lowpass=lowpass))
    np.testing.assert_allclose(once, want, atol=1e-4)  # other block origin: float32 round-off


def test_cubes_cut_on_demand_equal_the_stored_cubes(tmp_path: Path):
    """Without keep_cubes the group holds points only; membrane_cubes cuts the same cubes the
    store would have held (any row range); a run that wants cubes then recomputes the group."""
    import zarr

    from membrain_dist.geometry import membrane_cubes

    root = tmp_path / "c.zarr"
    _make_store(root)
    cfg = GeometryConfig(batch_size=300, chunk_points=256, block=24)
    n = process_membrane(root, "t0", 2, cfg)
    key = geometry_key("t0", 2)
    grp = zarr.open_group(store=str(root), path=key, mode="r")
    assert "cubes" not in grp and grp.attrs["cubes"] is False
    cut = membrane_cubes(root, "t0", 2, cfg)
    part = membrane_cubes(root, "t0", 2, cfg, 100, 357)
    assert cut.shape == (n, 12, 12, 12) and cut.dtype == np.float32
    # another block origin: float32 round-off of the sample positions only
    np.testing.assert_allclose(part, cut[100:357], atol=1e-4)
    mtime = (root / "t0" / "geometry" / "m2" / "zarr.json").stat().st_mtime_ns
    assert process_membrane(root, "t0", 2, cfg, keep_cubes=True) == n
    assert (root / "t0" / "geometry" / "m2" / "zarr.json").stat().st_mtime_ns != mtime
    stored = np.asarray(zarr.open_group(store=str(root), path=key, mode="r")["cubes"][...])
    np.testing.assert_array_equal(stored, cut)  # same batches, same region: bit for bit
    np.testing.assert_array_equal(membrane_cubes(root, "t0", 2, cfg, 5, 9), stored[5:9])
