"""OME-Zarr images (NGFF 0.4 on Zarr v2 as the cryoET data portal and copick write them, NGFF
0.5 on Zarr v3) as manifest tomograms and segmentations: the same store as from the MRC, a
level chosen by voxel size, level paths from the metadata, clear errors."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

from membrain_dist import omezarr, pipeline, store
from membrain_dist.convert import ConvertConfig, convert_tomogram
from membrain_dist.errors import InputError
from membrain_dist.manifest import read_manifest, write_manifest
from membrain_dist.mrc import write_volume
from membrain_dist.star import particles_zyx, read_particles

SHAPE = (32, 48, 40)
VS = 10.0


def write_ngff(path: Path, data: np.ndarray, vs: float, version: str = "0.4",
               paths: tuple[str, ...] = ("0", "1"), chunks: int = 16) -> None:
    """An OME-Zarr image: level i is ``data`` strided by 2**i on z, y and x, scale in Å."""
    fmt = 2 if version == "0.4" else 3
    g = zarr.open_group(LocalStore(path), mode="w", zarr_format=fmt)
    datasets = []
    for i, key in enumerate(paths):
        f = 2 ** i
        level = np.ascontiguousarray(data[::f, ::f, ::f])
        kw = ({"chunk_key_encoding": {"name": "v2", "separator": "/"}} if fmt == 2
              else {"dimension_names": ("z", "y", "x")})
        g.create_array(key, data=level, chunks=(chunks,) * 3, **kw)
        datasets.append({"path": key, "coordinateTransformations": [
            {"type": "scale", "scale": [vs * f] * 3}]})
    ms = {"axes": [{"name": a, "type": "space", "unit": "angstrom"} for a in "zyx"],
          "datasets": datasets, "name": path.stem}
    if fmt == 2:
        g.attrs["multiscales"] = [{"version": "0.4", **ms}]
    else:
        g.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("omezarr")
    rng = np.random.default_rng(0)
    tomo = rng.normal(0, 1, SHAPE).astype(np.float32)
    seg = np.zeros(SHAPE, np.int8)
    seg[10:14] = 1
    seg[20:24, 5:40, 4:36] = 1
    write_volume(d / "t.mrc", tomo, VS)
    write_volume(d / "s.mrc", seg, VS)
    write_ngff(d / "t.zarr", tomo, VS, "0.4", paths=("0", "1"))
    write_ngff(d / "s.zarr", seg, VS, "0.5", paths=("s0", "s1"))  # ome-zarr-py's level names
    return {"dir": d, "tomo": tomo, "seg": seg}


def _entry(d: Path, name: str, tomo: str, seg: str, vs: str = ""):
    m = d / f"{name}.csv"
    m.write_text(f"name,tomogram,segmentation,particles,voxel_size_A,split\n"
                 f"{name},{tomo},{seg},,{vs},test\n")
    return read_manifest(m)[0]


def test_ngff_tomogram_and_segmentation_give_the_mrc_store(volumes, tmp_path):
    d = volumes["dir"]
    cfg = ConvertConfig(chunk=16, min_membrane_voxels=10)
    ref = convert_tomogram(_entry(d, "a", "t.mrc", "s.mrc"), tmp_path / "mrc.zarr", cfg)
    got = convert_tomogram(_entry(d, "a", "t.zarr", "s.zarr"), tmp_path / "ngff.zarr", cfg)
    assert (got.shape_zyx, got.voxel_size_A, got.membranes) == (
        ref.shape_zyx, ref.voxel_size_A, ref.membranes)
    assert got.intensity == ref.intensity
    assert len(got.membranes) == 2
    for get in (store.tomogram_array, store.labels_array):
        np.testing.assert_array_equal(get(tmp_path / "ngff.zarr", "a")[...],
                                      get(tmp_path / "mrc.zarr", "a")[...])
    assert got.source["tomogram"]["level"] == "0" and got.source["segmentation"]["level"] == "s0"
    # a rerun finds the same fingerprints: skipped, nothing rewritten
    mtime = (tmp_path / "ngff.zarr" / "a" / "zarr.json").stat().st_mtime_ns
    convert_tomogram(_entry(d, "a", "t.zarr", "s.zarr"), tmp_path / "ngff.zarr", cfg)
    assert (tmp_path / "ngff.zarr" / "a" / "zarr.json").stat().st_mtime_ns == mtime


def test_level_is_chosen_by_the_manifest_voxel_size(volumes, tmp_path):
    d = volumes["dir"]
    e = _entry(d, "b", "t.zarr", "s.zarr", vs=str(2 * VS))
    meta = convert_tomogram(e, tmp_path / "c.zarr", ConvertConfig(chunk=16,
                                                                  min_membrane_voxels=10))
    assert meta.shape_zyx == (16, 24, 20) and meta.voxel_size_A == 2 * VS
    np.testing.assert_array_equal(store.tomogram_array(tmp_path / "c.zarr", "b")[...],
                                  volumes["tomo"][::2, ::2, ::2])
    assert meta.source["tomogram"]["level"] == "1" and meta.source["segmentation"]["level"] == "s1"
    with pytest.raises(InputError, match=r"no level of voxel size 15 Å; levels: '0' \(10 Å\), "
                                         r"'1' \(20 Å\)") as ei:
        omezarr.read_info(d / "t.zarr", 15.0)
    assert ei.value.path == str(d / "t.zarr")


def test_folders_that_are_not_ome_zarr_images_are_refused(volumes, tmp_path):
    plain = tmp_path / "plain.zarr"
    zarr.open_group(LocalStore(plain), mode="w").create_array("0", shape=(4, 4, 4), dtype="f4")
    with pytest.raises(InputError, match="without OME-NGFF multiscales"):
        omezarr.read_info(plain)
    (tmp_path / "empty").mkdir()
    m = tmp_path / "m.csv"
    m.write_text(f"name,tomogram,segmentation,particles,voxel_size_A,split\n"
                 f"x,empty,{volumes['dir'] / 's.mrc'},,,test\n")
    with pytest.raises(InputError, match="folder but not an OME-Zarr image"):
        read_manifest(m)


def test_ngff_tomogram_gives_the_picks_of_its_mrc(test_manifest: Path, trained_model: Path,
                                                  sequential_prediction: Path, tmp_path):
    """The trained model picks the same particles on a tomogram given as NGFF 0.4 (levels at
    1x and 2x, chunks 32^3) as on its MRC."""
    entry = read_manifest(test_manifest)[0]
    with mrcfile.open(entry.tomogram, permissive=True) as f:
        data, vs = np.asarray(f.data, np.float32), float(f.voxel_size.x)
    write_ngff(tmp_path / "tomo.zarr", data, vs, "0.4", chunks=32)
    row = tmp_path / "row.csv"
    from dataclasses import replace

    write_manifest([replace(entry, tomogram=tmp_path / "tomo.zarr")], row)
    cfg = pipeline.model_pipeline_config(trained_model)
    pipeline.predict_sequential(read_manifest(row), tmp_path / "s.zarr", trained_model,
                                tmp_path / "pred", cfg)
    got = read_particles(tmp_path / "pred" / f"{entry.name}.star")
    ref = read_particles(sequential_prediction / f"{entry.name}.star")
    assert len(ref) > 0 and len(got) == len(ref)
    np.testing.assert_allclose(particles_zyx(got), particles_zyx(ref), atol=1e-4)
    np.testing.assert_allclose(got["mbScore"], ref["mbScore"], atol=1e-5)
