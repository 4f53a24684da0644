"""copick projects made here (config JSON, static and overlay roots, OME-Zarr tomograms and
segmentations, picks JSON): picks round trip (same points and orientations), a campaign
manifest from the project that converts, predictions written back as copick picks.

With ``MEMBRAIN_COPICK_PYTHON`` set to an interpreter that has the real copick (it pins
zarr < 3, so it lives in its own environment), the project and the picks written here are also
read with copick itself."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from membrain_dist import axes, omezarr, pipeline, store
from membrain_dist.cli import main
from membrain_dist.convert import ConvertConfig, convert_tomogram
from membrain_dist.copick_project import (
    CopickProject,
    PickSet,
    export_predictions,
    read_picks,
    read_project,
    write_picks,
)
from membrain_dist.errors import InputError
from membrain_dist.manifest import read_manifest
from membrain_dist.star import particles_frame, particles_matrices, particles_zyx, write_particles

VS = 10.0
SHAPE = (24, 40, 36)
XYZ_A = np.array([[50.0, 120.0, 130.0], [200.0, 310.0, 125.0], [301.5, 80.0, 140.0]])
MATS = Rotation.random(3, random_state=11).as_matrix()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("copick")
    static, overlay = d / "static", d / "overlay"
    config = d / "config.json"
    config.write_text(json.dumps({
        "name": "test", "description": "made in the test", "version": "0.5.0",
        "config_type": "filesystem",
        "pickable_objects": [
            {"name": "psii", "is_particle": True, "label": 1, "color": [0, 255, 0, 255],
             "radius": 60.0},
            {"name": "membrane", "is_particle": False, "label": 2,
             "color": [200, 200, 200, 255]}],
        "overlay_root": f"local://{overlay}", "static_root": f"local://{static}",
        "overlay_fs_args": {"auto_mkdir": True}, "static_fs_args": {"auto_mkdir": True}}))
    rng = np.random.default_rng(1)
    for run in ("TS_1", "TS_2"):
        base = static / "ExperimentRuns" / run
        (base / f"VoxelSpacing{VS:.3f}").mkdir(parents=True)
        tomo = rng.normal(0, 1, SHAPE).astype(np.float32)
        seg = np.zeros(SHAPE, np.int8)
        seg[11:14] = 1
        tomo[11:14] -= 1.0
        omezarr.write_image(base / f"VoxelSpacing{VS:.3f}" / "wbp.zarr", tomo, VS, n_levels=2,
                            chunks=16)
        (base / "Segmentations").mkdir()
        omezarr.write_image(base / "Segmentations" / f"{VS:.3f}_curator_0_membrane.zarr", seg,
                            VS, chunks=16)
    # the curator's picks of TS_1 live in the static root
    as_static = CopickProject(config=config, overlay=static, static=None, objects=("psii",))
    write_picks(as_static, PickSet("psii", "curator", "1", "TS_1", XYZ_A, MATS,
                                   np.array([1.0, 0.5, 0.25]), VS))
    return {"dir": d, "config": config, "static": static, "overlay": overlay}


def test_picks_round_trip_same_points_and_orientations(project, tmp_path):
    proj = read_project(project["config"])
    assert proj.overlay == project["overlay"] and proj.static == project["static"]
    assert proj.runs() == ["TS_1", "TS_2"] and proj.objects == ("psii", "membrane")
    path = write_picks(proj, PickSet("psii", "membrain", "7", "TS_2", XYZ_A, MATS,
                                     np.array([3.0, 2.0, 1.0]), VS))
    assert path == project["overlay"] / "ExperimentRuns/TS_2/Picks/membrain_7_psii.json"
    raw = json.loads(path.read_text())  # the documented layout, read without our reader
    assert (raw["pickable_object_name"], raw["user_id"], raw["session_id"], raw["run_name"],
            raw["unit"]) == ("psii", "membrain", "7", "TS_2", "angstrom")
    p0 = raw["points"][0]
    assert p0["location"] == {"x": 50.0, "y": 120.0, "z": 130.0}
    t = np.array(p0["transformation_"])
    assert t.shape == (4, 4) and list(t[3]) == [0, 0, 0, 1]
    np.testing.assert_allclose(t[:3, :3], MATS[0], atol=1e-12)
    back = read_picks(path)
    np.testing.assert_allclose(back.xyz_A, XYZ_A)
    np.testing.assert_allclose(back.matrices, MATS, atol=1e-12)
    np.testing.assert_allclose(back.scores, [3.0, 2.0, 1.0])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**raw, "unit": "nanometer"}))
    with pytest.raises(InputError, match="nanometer"):
        read_picks(bad)


def test_manifest_from_the_project_trains_on_its_picks(project, tmp_path):
    out = tmp_path / "m.csv"
    rc = main(["copick-manifest", "--config", str(project["config"]), "--out", str(out),
               "--voxel-spacing", str(VS), "--tomo-type", "wbp", "--segmentation", "membrane",
               "--picks", "psii", "--user", "curator"])
    assert rc == 0
    rows = {e.name: e for e in read_manifest(out)}
    assert (rows["TS_1"].split, rows["TS_2"].split) == ("train", "test")
    assert rows["TS_2"].particles is None
    e = rows["TS_1"]
    assert e.tomogram == project["static"] / "ExperimentRuns/TS_1/VoxelSpacing10.000/wbp.zarr"
    df = pipeline.annotated_particles(e, SHAPE, VS)
    np.testing.assert_allclose(particles_zyx(df), XYZ_A[:, ::-1] / VS, atol=1e-5)
    np.testing.assert_allclose(axes.matrix_zyx_to_xyz(particles_matrices(df)), MATS, atol=1e-5)
    meta = convert_tomogram(e, tmp_path / "s.zarr", ConvertConfig(chunk=16, min_membrane_voxels=10))
    assert meta.shape_zyx == SHAPE and meta.voxel_size_A == VS and len(meta.membranes) == 1
    np.testing.assert_array_equal(
        store.tomogram_array(tmp_path / "s.zarr", "TS_1")[...],
        omezarr.read_slab(omezarr.read_info(e.tomogram), 0, SHAPE[0]))
    # an unknown segmentation name is an error naming the config
    with pytest.raises(InputError, match="no segmentation 'vesicles'"):
        from membrain_dist.copick_project import build_manifest

        build_manifest(project["config"], tmp_path / "x.csv", VS, "wbp", "vesicles")


def test_predictions_written_back_as_copick_picks(project, tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    zyx = XYZ_A[:, ::-1] / VS
    df = particles_frame("TS_2", zyx, axes.matrix_xyz_to_zyx(MATS), SHAPE, VS,
                         extra={"mbScore": np.array([1.5, 2.5, 3.5]),
                                "rlnMicrographPixelSize": np.full(3, VS)})
    write_particles(pred / "TS_2.star", df)
    rc = main(["copick-export", "--config", str(project["config"]), "--pred", str(pred),
               "--object", "psii", "--user", "membrain", "--session", "0"])
    assert rc == 0
    back = read_picks(project["overlay"] / "ExperimentRuns/TS_2/Picks/membrain_0_psii.json")
    np.testing.assert_allclose(back.xyz_A, XYZ_A, atol=1e-4)
    np.testing.assert_allclose(back.matrices, MATS, atol=1e-5)
    np.testing.assert_allclose(back.scores, [1.5, 2.5, 3.5])
    assert back.trust_orientation


def test_picks_of_named_classes_go_to_the_object_of_each_class(project, tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    df = particles_frame("TS_1", XYZ_A[:, ::-1] / VS, axes.matrix_xyz_to_zyx(MATS), SHAPE, VS,
                         extra={"mbScore": np.array([1.5, 2.5, 3.5]),
                                "rlnMicrographPixelSize": np.full(3, VS),
                                "rlnClassNumber": np.array([1, 2, 1]),
                                "mbClassName": np.array(["psii", "membrane", "psii"], object)})
    write_particles(pred / "TS_1.star", df)
    paths = export_predictions(project["config"], pred, user_id="tool", session_id="3")
    assert sorted(p.name for p in paths) == ["tool_3_membrane.json", "tool_3_psii.json"]
    picks = project["overlay"] / "ExperimentRuns/TS_1/Picks"
    psii, membrane = read_picks(picks / "tool_3_psii.json"), read_picks(picks / "tool_3_membrane.json")
    np.testing.assert_allclose(psii.xyz_A, XYZ_A[[0, 2]], atol=1e-4)
    np.testing.assert_allclose(psii.scores, [1.5, 3.5])
    np.testing.assert_allclose(membrane.xyz_A, XYZ_A[[1]], atol=1e-4)
    np.testing.assert_allclose(membrane.matrices, MATS[[1]], atol=1e-5)
    # two classes under one --object would mix them: refused, naming the STAR
    with pytest.raises(InputError, match=r"TS_1.star.*2 classes \(psii, membrane\)"):
        export_predictions(project["config"], pred, "psii", "tool", "4")
    # one class may be renamed; a class the project does not know is refused
    write_particles(pred / "TS_1.star", df[df["mbClassName"] == "psii"])
    (path,) = export_predictions(project["config"], pred, "membrane", "tool", "5")
    assert read_picks(path).object_name == "membrane" and len(read_picks(path).xyz_A) == 2
    df["mbClassName"] = np.array(["psii", "b6f", "psii"], object)
    write_particles(pred / "TS_1.star", df)
    with pytest.raises(InputError, match="class 'b6f' is no pickable object"):
        export_predictions(project["config"], pred, user_id="tool", session_id="6")
    # single-class picks need the object named
    write_particles(pred / "TS_1.star", df.drop(columns=["mbClassName", "rlnClassNumber"]))
    with pytest.raises(InputError, match="no mbClassName column"):
        export_predictions(project["config"], pred, user_id="tool", session_id="7")


@pytest.mark.skipif(not os.environ.get("MEMBRAIN_COPICK_PYTHON"),
                    reason="MEMBRAIN_COPICK_PYTHON (a Python with copick) not set")
def test_real_copick_reads_the_project_and_our_picks(project):
    write_picks(read_project(project["config"]),
                PickSet("psii", "membrain", "9", "TS_1", XYZ_A, MATS, np.ones(3), VS))
    script = textwrap.dedent(f"""
        import json, numpy as np, copick
        root = copick.from_file({str(project["config"])!r})
        run = root.get_run("TS_1")
        picks = run.get_picks(object_name="psii", user_id="membrain", session_id="9")
        assert len(picks) == 1, picks
        pts, tr = picks[0].numpy()
        tomo = run.get_voxel_spacing({VS}).get_tomogram("wbp")
        import zarr
        arr = zarr.open(tomo.zarr(), "r")["0"]
        seg = run.get_segmentations(name="membrane")
        # and copick writes picks for us to read back
        mine = run.new_picks(object_name="psii", session_id="5", user_id="copick")
        t = np.tile(np.eye(4), (len(pts), 1, 1))
        t[:, :3, :3] = np.array(tr)[:, :3, :3].transpose(0, 2, 1)
        mine.from_numpy(np.asarray(pts)[::-1].copy(), t[::-1].copy())
        mine.store()
        print(json.dumps({{"points": pts.tolist(), "transforms": tr.tolist(),
                           "shape": list(arr.shape), "segs": len(seg),
                           "runs": sorted(r.name for r in root.runs)}}))
        """)
    res = subprocess.run([os.environ["MEMBRAIN_COPICK_PYTHON"], "-c", script],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["runs"] == ["TS_1", "TS_2"] and got["shape"] == list(SHAPE) and got["segs"] == 1
    np.testing.assert_allclose(got["points"], XYZ_A)
    np.testing.assert_allclose(np.array(got["transforms"])[:, :3, :3], MATS, atol=1e-12)
    back = read_picks(project["overlay"] / "ExperimentRuns/TS_1/Picks/copick_5_psii.json")
    np.testing.assert_allclose(back.xyz_A, XYZ_A[::-1])
    np.testing.assert_allclose(back.matrices, MATS[::-1].transpose(0, 2, 1), atol=1e-12)
