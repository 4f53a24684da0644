"""Particle STAR input in the field's forms: voxels, RELION 5 centred Å, picks at another pixel
size (data_optics, the manifest's particles_angpix, a tomograms.star). Every form of the same
particles must give the same training set (labels, cubes, centres) on a real store."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import starfile

from membrain_dist import pipeline, preflight
from membrain_dist.config import PipelineConfig
from membrain_dist.errors import InputError
from membrain_dist.manifest import read_manifest, write_manifest
from membrain_dist.mrc import write_volume
from membrain_dist.star import (
    CENTERED_COLUMNS,
    particles_frame,
    particles_zyx,
    read_particles,
    to_tomogram_voxels,
)

SHAPE = (40, 64, 64)  # z, y, x
VS = 13.6  # Å per voxel of the (bin-4) tomogram
BIN = 4
# particles just above the sheet (z 18..21), zyx voxels of the tomogram
CENTRES = np.array([[23.0, 12.0, 10.0], [23.5, 30.0, 20.0], [22.0, 50.0, 44.0],
                    [24.0, 20.0, 52.0], [23.0, 44.0, 30.0]], dtype=np.float32)


def _optics(px_tilt: float) -> pd.DataFrame:
    return pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["g1", "g2"],
                         "rlnTomoTiltSeriesPixelSize": [px_tilt, px_tilt],
                         "rlnImagePixelSize": [VS, VS]})


@pytest.fixture(scope="module")
def sheet(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("star_input")
    rng = np.random.default_rng(3)
    tomo = rng.normal(0, 1, SHAPE).astype(np.float32)
    seg = np.zeros(SHAPE, np.int8)
    seg[18:22] = 1
    tomo[18:22] -= 1.5
    write_volume(d / "t.mrc", tomo, VS)
    write_volume(d / "t_seg.mrc", seg, VS)
    voxel = particles_frame("t", CENTRES, None, SHAPE, VS)
    files = {}
    # voxels of the tomogram, no pixel size anywhere (CONVENTIONS.md)
    files["voxel"] = d / "voxel.star"
    starfile.write({"particles": voxel.drop(columns=list(CENTERED_COLUMNS))}, files["voxel"])
    # RELION 5: centred Å only, optics with the tilt series' pixel size
    cen = voxel.drop(columns=["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"])
    cen["rlnOpticsGroup"] = [1, 2, 1, 2, 1]
    files["centred"] = d / "relion5.star"
    starfile.write({"optics": _optics(VS / BIN), "particles": cen}, files["centred"])
    # unbinned picks (RELION 4: tilt-series pixels) with their pixel size in data_optics
    unb = voxel.drop(columns=list(CENTERED_COLUMNS))
    for c in ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"):
        unb[c] = unb[c] * BIN
    unb["rlnOpticsGroup"] = [2, 1, 1, 2, 2]
    files["unbinned_optics"] = d / "unbinned_optics.star"
    starfile.write({"optics": _optics(VS / BIN), "particles": unb}, files["unbinned_optics"])
    # the same picks with no pixel size in the file (it comes from the manifest)
    files["unbinned_bare"] = d / "unbinned_bare.star"
    starfile.write({"particles": unb.drop(columns=["rlnOpticsGroup"])}, files["unbinned_bare"])
    starfile.write({"global": pd.DataFrame({
        "rlnTomoName": ["other", "t"], "rlnTomoTiltSeriesPixelSize": [1.0, VS / BIN],
        "rlnTomoTomogramBinning": [BIN, BIN], "rlnTomoSizeX": [256, 256],
        "rlnTomoSizeY": [256, 256], "rlnTomoSizeZ": [160, 160]})}, d / "tomograms.star")
    rows = {
        "voxel": ("voxel.star", ""),
        "centred": ("relion5.star", ""),
        "unbinned_optics": ("unbinned_optics.star", ""),
        "unbinned_angpix": ("unbinned_bare.star", repr(VS / BIN)),
        "unbinned_tomograms_star": ("unbinned_bare.star", "tomograms.star"),
        "unbinned_unknown": ("unbinned_bare.star", ""),
    }
    entries = {}
    for key, (star_name, angpix) in rows.items():
        m = d / f"{key}.csv"
        m.write_text("name,tomogram,segmentation,particles,voxel_size_A,split,particles_angpix\n"
                     f"t,t.mrc,t_seg.mrc,{star_name},,train,{angpix}\n")
        entries[key] = read_manifest(m)[0]
    cfg = PipelineConfig()
    root = d / "c.zarr"
    pipeline.prepare_sequential([entries["voxel"]], root, cfg)
    return {"dir": d, "root": root, "entries": entries, "cfg": cfg}


def test_manifest_reads_particles_angpix_as_number_or_tomograms_star(sheet):
    e = sheet["entries"]
    assert e["voxel"].particles_angpix is None
    assert e["unbinned_angpix"].particles_angpix == pytest.approx(VS / BIN)
    assert e["unbinned_tomograms_star"].particles_angpix == pytest.approx(VS / BIN)
    # written back and read again
    path = sheet["dir"] / "written.csv"
    write_manifest([e["unbinned_angpix"], replace(e["voxel"], name="u")], path)
    back = read_manifest(path)
    assert [b.particles_angpix for b in back] == [pytest.approx(VS / BIN), None]


@pytest.mark.parametrize("key", ["voxel", "centred", "unbinned_optics", "unbinned_angpix",
                                 "unbinned_tomograms_star"])
def test_every_form_lands_on_the_same_voxels(sheet, key):
    df = pipeline.annotated_particles(sheet["entries"][key], SHAPE, VS)
    np.testing.assert_allclose(particles_zyx(df), CENTRES, atol=1e-4)


def test_every_form_gives_the_same_training_set(sheet):
    cfg = sheet["cfg"].labels
    ref = pipeline.training_set(sheet["root"], [sheet["entries"]["voxel"]], cfg)
    near = ref.labels < cfg.max_distance
    assert 50 < near.sum() < len(ref) // 2  # the particles label some points, not all
    for key in ("centred", "unbinned_optics", "unbinned_angpix", "unbinned_tomograms_star"):
        ts = pipeline.training_set(sheet["root"], [sheet["entries"][key]], cfg)
        np.testing.assert_allclose(ts.labels, ref.labels, atol=1e-4, err_msg=key)
        np.testing.assert_array_equal(ts.cubes, ref.cubes)
        np.testing.assert_allclose(ts.truth_zyx, ref.truth_zyx, atol=1e-4, err_msg=key)
        np.testing.assert_array_equal(ts.truth_row, ref.truth_row)


def test_picks_of_unknown_pixel_size_are_refused_before_any_work(sheet):
    e = sheet["entries"]["unbinned_unknown"]
    with pytest.raises(InputError, match="pixel size is unknown") as ei:
        preflight.check_particle_tables([e], training=True)
    assert ei.value.path == str(e.particles)
    assert "particles_angpix" in str(ei.value)
    preflight.check_particle_tables([sheet["entries"]["unbinned_optics"]], training=True)


def test_a_wrong_particles_angpix_moves_the_picks(sheet):
    """The manifest's value wins over the file's optics (and so can be seen to act)."""
    e = replace(sheet["entries"]["unbinned_optics"], particles_angpix=VS / 2)
    df = pipeline.annotated_particles(e, SHAPE, VS, strict=False)
    np.testing.assert_allclose(particles_zyx(df), CENTRES * 2, atol=1e-4)


def test_origin_shifts_are_applied_and_optics_need_a_group(tmp_path):
    parts = pd.DataFrame({"rlnTomoName": ["t", "t"],
                          "rlnCenteredCoordinateXAngst": [0.0, 10.0],
                          "rlnCenteredCoordinateYAngst": [0.0, 0.0],
                          "rlnCenteredCoordinateZAngst": [0.0, -5.0],
                          "rlnOriginXAngst": [5.0, 0.0], "rlnOriginYAngst": [0.0, 0.0],
                          "rlnOriginZAngst": [0.0, 5.0]})
    p = tmp_path / "r5.star"
    starfile.write({"particles": parts}, p)
    df = to_tomogram_voxels(read_particles(p), p, (10, 20, 30), 5.0)
    # position = centred - origin, then / 5 Å + N / 2 (x: 30 -> 15, z: 10 -> 5)
    np.testing.assert_allclose(particles_zyx(df), [[5.0, 10.0, 14.0], [3.0, 10.0, 17.0]])
    vox = pd.DataFrame({"rlnTomoName": ["t"], "rlnCoordinateX": [40.0], "rlnCoordinateY": [8.0],
                        "rlnCoordinateZ": [4.0], "rlnOriginXAngst": [10.0],
                        "rlnOriginYAngst": [0.0], "rlnOriginZAngst": [-5.0],
                        "rlnMicrographPixelSize": [2.5]})
    df = to_tomogram_voxels(vox, p, (10, 20, 30), 5.0)
    # (40 - 10 / 2.5, 8, 4 + 5 / 2.5) pixels of 2.5 Å -> halved
    np.testing.assert_allclose(particles_zyx(df), [[3.0, 4.0, 18.0]])
    q = tmp_path / "two_groups.star"
    starfile.write({"optics": _optics(1.0), "particles": parts}, q)
    with pytest.raises(InputError, match="rlnOpticsGroup"):
        read_particles(q)


def test_centred_angstrom_wins_over_disagreeing_voxels_with_a_warning(tmp_path, caplog):
    df = particles_frame("t", np.array([[2.0, 3.0, 4.0]]), None, (10, 20, 30), 5.0)
    df["rlnCoordinateX"] = 400.0  # e.g. unbinned voxels with no pixel size in the file
    with caplog.at_level("WARNING"):
        out = to_tomogram_voxels(df, tmp_path / "x.star", (10, 20, 30), 5.0)
    np.testing.assert_allclose(particles_zyx(out), [[2.0, 3.0, 4.0]])
    assert any("disagree with the centred" in r.getMessage() for r in caplog.records)
