"""What predict writes for RELION 5 and Warp: the coordinates' pixel size, Warp's micrograph
name, a tomograms.star whose sizes and pixel sizes turn the centred Å back into the voxels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import starfile

from membrain_dist.manifest import read_manifest
from membrain_dist.mrc import read_info
from membrain_dist.star import particles_zyx, read_particles

#: the columns predict wrote before this change, kept as they were
OLD_COLUMNS = ["rlnTomoName", "rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ",
               "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnCenteredCoordinateXAngst",
               "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst", "mbScore",
               "mbPoints", "mbMembrane", "mbSide", "mbOrientationFrom"]


def test_outputs_carry_pixel_size_micrograph_name_and_a_tomograms_star(
        sequential_prediction: Path, test_manifest: Path):
    entries = read_manifest(test_manifest)
    merged = starfile.read(sequential_prediction / "particles.star")  # one block, as before
    assert list(merged.columns[:len(OLD_COLUMNS)]) == OLD_COLUMNS
    tomos = starfile.read(sequential_prediction / "tomograms.star", always_dict=True)["global"]
    assert list(tomos["rlnTomoName"].astype(str)) == [e.name for e in entries]
    assert len(merged) > 0
    for e in entries:
        info = read_info(e.tomogram)
        nz, ny, nx = info.shape_zyx
        row = tomos[tomos["rlnTomoName"].astype(str) == e.name].iloc[0]
        assert (row["rlnTomoSizeX"], row["rlnTomoSizeY"], row["rlnTomoSizeZ"]) == (nx, ny, nz)
        vs = e.voxel_size_A or info.voxel_size_A
        assert row["rlnTomoTiltSeriesPixelSize"] == vs and row["rlnTomoTomogramBinning"] == 1
        assert row["rlnMicrographName"] == f"{e.name}.tomostar"
        one = read_particles(sequential_prediction / f"{e.name}.star")
        mine = merged[merged["rlnTomoName"].astype(str) == e.name]
        assert len(mine) == len(one)
        assert set(mine["rlnMicrographName"]) <= {f"{e.name}.tomostar"}
        np.testing.assert_allclose(mine["rlnMicrographPixelSize"], vs)
        # RELION 5's decentring with the tomograms.star: pixel = centred / px + size / 2
        size = np.array([row["rlnTomoSizeX"], row["rlnTomoSizeY"], row["rlnTomoSizeZ"]], float)
        cen = mine[[f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]].to_numpy()
        vox = mine[[f"rlnCoordinate{a}" for a in "XYZ"]].to_numpy()
        np.testing.assert_allclose(cen / row["rlnTomoTiltSeriesPixelSize"] + size / 2, vox,
                                   atol=1e-4)


def test_picks_as_napari_points_in_angstrom_with_score_and_membrane(
        sequential_prediction: Path, test_manifest: Path):
    import csv

    for e in read_manifest(test_manifest):
        star = read_particles(sequential_prediction / f"{e.name}.star")
        path = sequential_prediction / "napari" / f"{e.name}.csv"
        with open(path, newline="") as fh:  # napari_builtins' rules: axis-* data, the rest
            rows = list(csv.reader(fh))     # (but a leading index) float properties
        head = rows[0]
        assert head[:4] == ["index", "axis-0", "axis-1", "axis-2"]
        table = np.array(rows[1:], dtype=float).reshape(-1, len(head))
        vs = float(star["rlnMicrographPixelSize"].iloc[0]) if len(star) else 1.0
        np.testing.assert_allclose(table[:, 1:4], particles_zyx(star) * vs, atol=1e-3)
        props = dict(zip(head[4:], table[:, 4:].T, strict=True))
        assert set(props) == {"score", "membrane", "side"}
        np.testing.assert_allclose(props["score"], star["mbScore"], atol=1e-5)
        np.testing.assert_array_equal(props["membrane"], star["mbMembrane"])
        np.testing.assert_array_equal(props["side"], star["mbSide"])


def test_relion5_ground_truth_scores_like_the_voxel_one(
        sequential_prediction: Path, test_manifest: Path, tmp_path: Path):
    """evaluate --gt MANIFEST with RELION 5 STARs (centred Å only, data_optics at the unbinned
    pixel size) gives the figures of the voxel ground truth."""
    from dataclasses import replace

    import pandas as pd

    from membrain_dist.evaluation import evaluate_campaign
    from membrain_dist.manifest import write_manifest
    from membrain_dist.star import CENTERED_COLUMNS

    entries = read_manifest(test_manifest)
    relion = []
    for e in entries:
        df = read_particles(e.particles)
        df = df.drop(columns=["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"])
        assert set(CENTERED_COLUMNS) <= set(df.columns) and len(df)
        df["rlnOpticsGroup"] = 1
        optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["o1"],
                               "rlnTomoTiltSeriesPixelSize": [e.voxel_size_A / 4]})
        path = tmp_path / f"{e.name}_relion5.star"
        starfile.write({"optics": optics, "particles": df}, path)
        relion.append(replace(e, particles=path))
    gt5 = tmp_path / "gt5.csv"
    write_manifest(relion, gt5)
    ref_rows, ref = evaluate_campaign(sequential_prediction, test_manifest, symmetry=2)
    got_rows, got = evaluate_campaign(sequential_prediction, gt5, symmetry=2)
    assert ref["n_gt"] > 0 and ref["n_matched"] > 0
    for k in ("n_gt", "n_pred", "n_matched", "f1", "precision", "recall", "angle_mean"):
        assert got[k] == pytest.approx(ref[k], nan_ok=True), k
    pd.testing.assert_frame_equal(got_rows, ref_rows)
