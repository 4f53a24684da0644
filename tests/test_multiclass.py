"""Several particle classes (issue 18): per-class labels on an analytic sheet, per-class
clustering of overlapping clusters, the multi-output network and its model directory, STAR
output with the class, per-class evaluation, and a tiny two-class train + predict on a real
store. Single-class behaviour is checked to be what it was."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from membrain_dist import pipeline
from membrain_dist.clustering import ClusterConfig
from membrain_dist.config import LabelConfig, PipelineConfig
from membrain_dist.errors import InputError
from membrain_dist.evaluation import evaluate_campaign
from membrain_dist.manifest import read_manifest
from membrain_dist.model import MemBrainCNN, ModelMeta, load_model, save_model
from membrain_dist.mrc import write_volume
from membrain_dist.orientation import OrientationConfig
from membrain_dist.picks import (
    PickConfig,
    cluster_classes,
    cluster_points,
    reduce_picks,
    suppress_duplicates,
)
from membrain_dist.star import (
    particles_frame,
    particles_matrices,
    read_particles,
    write_particles,
)

SHAPE = (40, 64, 64)  # z, y, x
VS = 13.6
# class 1 ("A") and class 2 ("B") centres just above the sheet (z 18..21), zyx voxels
CENTRES = np.array([[23.0, 14.0, 14.0], [23.0, 40.0, 46.0],  # A
                    [23.0, 16.0, 44.0], [23.0, 46.0, 18.0],  # B
                    [23.0, 30.0, 30.0]], dtype=np.float32)  # class 3: not a named class
CLASS_NUMBER = np.array([1, 1, 2, 2, 3])
RADII = {"A": (3.0, 3.0, 3.0), "B": (2.0, 2.0, 6.0)}  # normal, v, u semi-axes (voxels)


@pytest.fixture(scope="module")
def sheet(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A flat membrane (normal along z) with annotations of two classes (and a third)."""
    d = tmp_path_factory.mktemp("multiclass")
    rng = np.random.default_rng(5)
    tomo = rng.normal(0, 1, SHAPE).astype(np.float32)
    seg = np.zeros(SHAPE, np.int8)
    seg[18:22] = 1
    tomo[18:22] -= 1.5
    for c, k in zip(CENTRES, CLASS_NUMBER, strict=True):  # a class-specific blob above
        z, y, x = np.round(c).astype(int)
        tomo[z - 1:z + 2, y - 2:y + 3, x - 2:x + 3] -= 2.0 if k == 1 else 1.0
    write_volume(d / "t.mrc", tomo, VS)
    write_volume(d / "t_seg.mrc", seg, VS)
    df = particles_frame("t", CENTRES, None, SHAPE, VS)
    df["rlnClassNumber"] = CLASS_NUMBER
    write_particles(d / "numbers.star", df)
    named = df.drop(columns=["rlnClassNumber"])
    named["mbClassName"] = np.array([{1: "A", 2: "B", 3: "C"}[k] for k in CLASS_NUMBER],
                                    dtype=object)
    write_particles(d / "names.star", named)
    entries = {}
    for key in ("numbers", "names"):
        m = d / f"{key}.csv"
        m.write_text("name,tomogram,segmentation,particles,voxel_size_A,split\n"
                     f"t,t.mrc,t_seg.mrc,{key}.star,,train\n")
        entries[key] = read_manifest(m)[0]
    root = d / "c.zarr"
    pipeline.prepare_sequential([entries["numbers"]], root, PipelineConfig())
    return {"dir": d, "root": root, "entries": entries}


def _expected(points: np.ndarray, centres: np.ndarray, radii: tuple, cap: float) -> np.ndarray:
    """Hand-made labels of the upper-face points: the STAR's zero angles put the particle's
    normal on z, its v on y and its long axis u on x; the solid ellipsoid's variances r^2 / 5,
    inverted and normalised to unit determinant, measured from the centres' feet."""
    var = np.asarray(radii, np.float64) ** 2 / 5
    m = np.prod(var) ** (1 / 3) / var  # diagonal metric, zyx
    foot = centres.astype(np.float64).copy()
    foot[:, 0] = points[:, 0].mean()  # the (flat) upper face
    d = points[:, None, :] - foot[None]
    return np.minimum(np.sqrt(np.einsum("pki,i->pk", d**2, m)).min(axis=1), cap)


@pytest.mark.parametrize("key", ["numbers", "names"])
def test_per_class_labels_follow_each_class_shape_and_centres(sheet, key):
    cfg = LabelConfig(classes=("A", "B"), class_radii_zyx=(RADII["A"], RADII["B"]))
    ts = pipeline.training_set(sheet["root"], [sheet["entries"][key]], cfg)
    assert ts.labels.shape == (len(ts), 2)
    upper = ts.zyx[:, 0] > 20
    assert upper.sum() > 500 and (~upper).sum() > 500
    for c, name in enumerate(("A", "B")):
        want = _expected(ts.zyx[upper], CENTRES[CLASS_NUMBER == c + 1], RADII[name], 7.0)
        got = ts.labels[upper, c]
        near = want < 6.5
        assert near.sum() > 40
        np.testing.assert_allclose(got[near], want[near], atol=0.35, err_msg=name)
        assert np.all(got[want >= 7.0] > 6.6)
        # the lower face sees no particle of either class
        assert np.all(ts.labels[~upper, c] == 7.0)
    assert ts.truth_class.tolist() == [0, 0, 1, 1]  # the class-3 annotation labels nothing
    assert ts.height_class.tolist() == [0, 0, 1, 1]
    # one class named: a single-output set of that class's annotations only (by name; a
    # class number is 1-based into the named list, so number 1 is then that class)
    c, name = (1, "B") if key == "names" else (0, "A")
    one = pipeline.training_set(sheet["root"], [sheet["entries"][key]],
                                LabelConfig(classes=(name,), ellipsoid_radii_zyx=RADII[name]))
    assert one.labels.ndim == 1
    np.testing.assert_allclose(one.labels, ts.labels[:, c], atol=1e-6)


def test_unnamed_classes_use_every_annotation_as_before(sheet):
    ts = pipeline.training_set(sheet["root"], [sheet["entries"]["numbers"]], LabelConfig())
    assert ts.labels.ndim == 1 and len(ts.truth_row) == 5
    assert ts.truth_class.tolist() == [0] * 5


def test_named_classes_need_a_class_column(sheet, tmp_path):
    df = read_particles(sheet["dir"] / "numbers.star").drop(columns=["rlnClassNumber"])
    write_particles(tmp_path / "bare.star", df)
    (tmp_path / "m.csv").write_text("name,tomogram,segmentation,particles,voxel_size_A,split\n"
                                    f"t,{sheet['dir'] / 't.mrc'},{sheet['dir'] / 't_seg.mrc'},"
                                    "bare.star,,train\n")
    with pytest.raises(InputError, match="rlnClassNumber"):
        pipeline.training_set(sheet["root"], read_manifest(tmp_path / "m.csv"),
                              LabelConfig(classes=("A", "B")))
    with pytest.raises(ValueError, match="one entry per class"):
        LabelConfig(classes=("A", "B"), class_radii_zyx=((1.0, 1.0, 1.0),))


# --------------------------------------------------------------------------- clustering
def _plane(n: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    yy, xx = np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32),
                         indexing="ij")
    zyx = np.stack([np.full(n * n, 10.0, np.float32), yy.ravel(), xx.ravel()], axis=1)
    normal = np.tile(np.array([[1.0, 0.0, 0.0]], np.float32), (n * n, 1))
    return zyx, normal, np.ones(n * n, np.int8)


def _bumps(zyx: np.ndarray, centres: list[tuple[float, float]], floor: float = 0.0
           ) -> np.ndarray:
    d = np.min([np.hypot(zyx[:, 1] - y, zyx[:, 2] - x) for y, x in centres], axis=0)
    return (np.minimum(d, 7.0) + floor).astype(np.float32)


def test_per_class_clustering_recovers_overlapping_clusters_with_their_class():
    zyx, normal, side = _plane()
    a = [(12.0, 12.0), (34.0, 34.0)]
    b = [(15.0, 14.0), (12.0, 36.0)]  # the first 3.6 voxels from an A: overlapping in space
    # class B's network output runs 3.5 voxels higher: its own threshold finds it
    scores = np.stack([_bumps(zyx, a), _bumps(zyx, b, floor=3.5)], axis=1)
    ccfg = ClusterConfig(score_threshold=4.0, class_score_thresholds=(4.0, 7.0))
    ocfg = OrientationConfig()
    picks = cluster_classes(zyx, normal, side, scores, ccfg, ocfg)
    for k, want in ((0, a), (1, b)):
        got = picks.zyx[picks.klass == k][:, 1:]
        assert len(got) == len(want), (k, got)
        for y, x in want:
            assert np.min(np.hypot(got[:, 0] - y, got[:, 1] - x)) < 1.0
    # one threshold for both (the class fields unset): class B's clusters are lost
    plain = cluster_classes(zyx, normal, side, scores, ClusterConfig(score_threshold=4.0), ocfg)
    assert (plain.klass == 1).sum() < len(b)
    # the tomogram reduction keeps an A and a B closer than nms_distance, each lifted by
    # its own height
    kept, keep = reduce_picks(picks, PickConfig(nms_distance=8.0, class_heights=(1.0, 3.0)))
    assert keep.all() and len(kept.zyx) == 4
    np.testing.assert_allclose(kept.zyx[:, 0], np.where(kept.klass == 0, 11.0, 13.0))


def test_single_class_clustering_and_reduction_are_unchanged():
    zyx, normal, side = _plane()
    scores = _bumps(zyx, [(12.0, 12.0), (16.0, 14.0), (34.0, 34.0)])
    ccfg, ocfg = ClusterConfig(score_threshold=4.0), OrientationConfig()
    one = cluster_classes(zyx, normal, side, scores, ccfg, ocfg)
    ref = cluster_points(zyx, normal, side, scores, ccfg, ocfg)
    for f in ("zyx", "matrices", "score", "n_points", "side", "from_pca", "klass"):
        np.testing.assert_array_equal(getattr(one, f), getattr(ref, f))
    assert (one.klass == 0).all()
    pcfg = PickConfig(nms_distance=8.0, height=2.0)
    kept, keep = reduce_picks(one, pcfg)
    np.testing.assert_array_equal(keep, suppress_duplicates(one.zyx, one.score, 8.0))
    np.testing.assert_allclose(kept.zyx, one.zyx[keep] + 2.0 * one.matrices[keep][:, :, 2],
                               atol=1e-5)
    # a single-class ClusterConfig's provenance is what it was before the class fields
    assert "class_score_thresholds" not in ccfg.to_dict()
    assert ccfg.for_class(0) == ccfg


# --------------------------------------------------------------------------- model
def test_multi_output_network_and_model_directory(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(5, 12, 12, 12)
    two = MemBrainCNN(12, 4, n_classes=2).eval()
    assert tuple(two(x).shape) == (5, 2)
    one = MemBrainCNN(12, 4).eval()
    assert tuple(one(x).shape) == (5,)
    save_model(two, tmp_path / "two", ModelMeta(classes=["PSII", "b6f"]))
    back, meta = load_model(tmp_path / "two")
    assert meta.n_classes == 2 and meta.classes == ["PSII", "b6f"]
    torch.testing.assert_close(back(x), two(x))
    save_model(one, tmp_path / "one", ModelMeta())
    raw = json.loads((tmp_path / "one" / "model.json").read_text())
    assert "n_classes" not in raw and "classes" not in raw  # as before classes existed
    assert load_model(tmp_path / "one")[1].n_classes == 1
    with pytest.raises(ValueError, match="class names"):
        save_model(two, tmp_path / "bad", ModelMeta(classes=["PSII"]))


# --------------------------------------------------------------------------- end to end
def test_two_class_train_predict_writes_classes_and_evaluates_per_class(sheet, tmp_path):
    cfg = PipelineConfig()
    cfg = replace(
        cfg, train=replace(cfg.train, max_epochs=2, patience=2, num_threads=2, channels=4),
        labels=replace(cfg.labels, classes=("A", "B"),
                       class_radii_zyx=(RADII["A"], RADII["B"])),
        inference=replace(cfg.inference, rotations=1),
        picks=replace(cfg.picks, min_calibration_particles=1),
        orientation=replace(cfg.orientation, min_average_particles=2))
    entry = sheet["entries"]["names"]
    model = tmp_path / "model"
    model.mkdir()  # averages of an earlier model trained into this folder go
    for stale in ("average.mrc", "average_class3.mrc"):
        (model / stale).write_bytes(b"stale")
    metrics = pipeline.fit_model(sheet["root"], [entry], [], cfg, model)
    assert set(metrics["classes"]) == {"A", "B"}
    meta = json.loads((model / "model.json").read_text())
    assert meta["classes"] == ["A", "B"] and meta["n_classes"] == 2
    # one average per class, of that class's annotations (two each; class C's one is no class)
    assert meta["metrics"]["average_particles"] == {"A": 2, "B": 2}
    assert (model / "average_class1.mrc").is_file() and (model / "average_class2.mrc").is_file()
    assert not (model / "average.mrc").exists() and not (model / "average_class3.mrc").exists()
    pcfg = pipeline.model_pipeline_config(model)
    assert len(pcfg.cluster.class_score_thresholds) == 2
    assert len(pcfg.picks.class_heights) == 2 and pcfg.labels.classes == ("A", "B")
    # a generous threshold: the 2-epoch network is not calibrated, the plumbing is tested
    pcfg = replace(pcfg, cluster=replace(pcfg.cluster, class_score_thresholds=(6.5, 6.5)))
    out = tmp_path / "pred"
    pipeline.predict_sequential([entry], tmp_path / "s.zarr", model, out, pcfg)
    scores, names = pipeline.read_class_scores(tmp_path / "s.zarr", "t", 1)
    assert scores.shape[1] == 2 and names == ["A", "B"]
    df = read_particles(out / "t.star")
    assert {"rlnClassNumber", "mbClassName"} <= set(df.columns)
    assert len(df) > 0
    assert set(df["rlnClassNumber"].astype(int)) <= {1, 2}
    assert all(n == ("A", "B")[k - 1] for n, k in zip(df["mbClassName"].astype(str),
                                                       df["rlnClassNumber"].astype(int),
                                                       strict=True))
    # each class's picks turned by its own average; a class without one keeps PCA's angles
    assert set(df["mbOrientationFrom"]) == {"average"}
    (model / "average_class2.mrc").unlink()
    search = pipeline.in_plane_search(model, pcfg)
    assert search.average_paths == (str(model / "average_class1.mrc"), None)
    again = pipeline.tomogram_particles(tmp_path / "s.zarr", "t", pcfg.picks, search)
    number = again["rlnClassNumber"].astype(int).to_numpy()
    assert set(number) == {1, 2}
    assert (again["mbOrientationFrom"][number == 1] == "average").all()
    assert (again["mbOrientationFrom"][number == 2] != "average").all()
    np.testing.assert_allclose(particles_matrices(again)[number == 1],
                               particles_matrices(df)[number == 1], atol=1e-6)
    # the napari points carry each pick's class number
    from membrain_dist.napari_points import read_points_csv

    _, props = read_points_csv(out / "napari" / "t.csv")
    np.testing.assert_array_equal(props["class"], df["rlnClassNumber"].astype(float))
    _, overall = evaluate_campaign(out, sheet["dir"] / "names.star")
    assert set(overall["classes"]) >= {"A", "B"}
    assert overall["classes"]["A"]["n_gt"] == 2 and overall["classes"]["B"]["n_gt"] == 2
    # a streaming run's paths give the same (N, C) scores: parts cut on one worker, scored on
    # another and joined; cubes cut on the inference device (grid_sample)
    import shutil

    from membrain_dist.geometry import membrane_cubes

    root, inf = tmp_path / "s.zarr", pcfg.inference
    scores_dir = root / "t" / "geometry" / "m1" / "scores"
    parts = pipeline.point_parts(pipeline.n_points(root, "t", 1), 500)
    assert len(parts) > 1
    for a, b in parts:
        cubes = membrane_cubes(root, "t", 1, pcfg.geometry, a, b)
        pipeline.score_part(cubes, root, "t", 1, model, inf, a, b)
    shutil.rmtree(scores_dir)
    pipeline.assemble_scores(root, "t", 1, model, inf, 500)
    joined, names = pipeline.read_class_scores(root, "t", 1)
    assert names == ["A", "B"]
    np.testing.assert_allclose(joined, scores, atol=1e-5)
    # the device cutter (grid_sample) agrees with the host's to float32 round-off, which
    # bfloat16 (the default where native) rounds into steps of 1/32 voxel: both in float32
    f32 = []
    for cutter in ("host", "device"):
        shutil.rmtree(scores_dir)
        pipeline.score_membrane(root, "t", 1, model, replace(inf, cutter=cutter, precision="float32"),
                                pcfg.geometry)
        f32.append(pipeline.read_class_scores(root, "t", 1)[0])
    np.testing.assert_allclose(f32[1], f32[0], atol=1e-3)


def test_classes_from_a_toml_config_and_v1_names(tmp_path):
    from membrain_dist.v1 import v1_class_names

    path = tmp_path / "p.toml"
    path.write_text('[labels]\nclasses = ["PSII", "b6f"]\n'
                    'class_radii_zyx = [[3, 6, 9], [3, 4, 6]]\n'
                    '[cluster]\nclass_score_thresholds = [3.5, 4.5]\n')
    cfg = PipelineConfig.from_toml(path)
    assert cfg.labels.classes == ("PSII", "b6f") and cfg.labels.n_classes == 2
    assert cfg.labels.class_radii_zyx == ((3.0, 6.0, 9.0), (3.0, 4.0, 6.0))
    assert cfg.cluster.for_class(1).score_threshold == 4.5
    assert len(pipeline.class_covariances(cfg.labels)) == 2
    path.write_text('[labels]\nclasses = ["PSII", "PSII"]\n')
    with pytest.raises(InputError, match="differ"):
        PipelineConfig.from_toml(path)
    assert v1_class_names({"part_dists": [["PSII", "UK"]]}, 1) == []
    assert v1_class_names({"part_dists": [["PSII", "UK"], ["b6f"]]}, 2) == ["PSII+UK", "b6f"]


def test_class_epochs_give_a_rare_class_its_share():
    from membrain_dist.training import draw_class_epoch, draw_epoch

    y = torch.full((10000, 2), 7.0)
    y[:2000, 0] = 1.0  # a frequent class
    y[2000:2100, 1] = 1.0  # a rare one: 100 near rows
    gen = torch.Generator().manual_seed(0)
    rows = draw_class_epoch(y, 0.5, 4096, gen, 12288)
    share = (y[rows] < 7.0).float().mean(0)
    assert set(range(2000, 2100)) <= set(rows.tolist()) and len(rows) <= 12288
    # each class's draw is balanced on its own: the rare class's 100 rows are repeated to a
    # sixth of the epoch, where one draw over "near any class" gives them a few percent
    assert float(share[1]) > 0.15 and float(share[0]) > 0.25
    plain = draw_epoch((y < 7.0).any(1), 0.5, 4096, gen, 12288)
    assert float((y[plain, 1] < 7.0).float().mean()) < 0.05
