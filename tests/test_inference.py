"""Batched inference: zarr == numpy, batch size irrelevant, one model load per process."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from membrain_dist.inference import (
    configure_threads,
    get_model,
    predict_distances,
    resolve_device,
)
from membrain_dist.manifest import read_manifest
from membrain_dist.model import MemBrainCNN, ModelMeta, save_model


@pytest.fixture(scope="module")
def model() -> MemBrainCNN:
    torch.manual_seed(0)
    m = MemBrainCNN(12, 8)
    with torch.no_grad():  # give BatchNorm non-default running statistics
        m.train()(torch.randn(32, 12, 12, 12))
    return m.eval()


@pytest.fixture(scope="module")
def cubes() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(157, 12, 12, 12)).astype(np.float32)


def test_zarr_equals_numpy_and_batch_size_is_irrelevant(model, cubes, tmp_path: Path):
    ref = predict_distances(model, cubes, batch_size=4096)
    assert ref.shape == (157,) and ref.dtype == np.float32
    with torch.inference_mode():  # one plain forward pass over everything
        direct = model(torch.from_numpy(cubes)).numpy()
    np.testing.assert_allclose(ref, direct, atol=1e-5, rtol=0)
    z = zarr.create_array(
        store=str(tmp_path / "c.zarr"), shape=cubes.shape, chunks=(64, 12, 12, 12), dtype="float32"
    )
    z[...] = cubes
    np.testing.assert_allclose(predict_distances(model, z, batch_size=100), ref, atol=1e-5, rtol=0)
    for bs in (3, 64, 156):
        np.testing.assert_allclose(
            predict_distances(model, cubes, batch_size=bs), ref, atol=1e-5, rtol=0
        )
    assert predict_distances(model, cubes[:0]).shape == (0,)
    # predictions depend on the cube: the comparison above is not vacuous
    assert ref.std() > 1e-3


def test_get_model_loads_once_and_reloads_when_rewritten(model, tmp_path: Path):
    save_model(model, tmp_path, ModelMeta())
    a, meta = get_model(tmp_path, "cpu")
    b, _ = get_model(str(tmp_path) + "/", "cpu")
    assert a is b and meta.channels == 8
    st = (tmp_path / "model.json").stat()
    save_model(model, tmp_path, ModelMeta(voxel_size_A=10.0))
    os.utime(tmp_path / "model.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    c, meta_c = get_model(tmp_path, "cpu")
    assert c is not a and meta_c.voxel_size_A == 10.0


def test_resolve_device_and_threads():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")
    with pytest.raises(RuntimeError):
        resolve_device("gpu0")
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1
        assert configure_threads(None) == 1  # outside dask: left alone
    finally:
        torch.set_num_threads(before)


def test_threads_follow_the_dask_worker():
    from distributed import Client, LocalCluster

    before = torch.get_num_threads()
    try:
        with (
            LocalCluster(
                n_workers=1, threads_per_worker=3, processes=False, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            assert client.submit(configure_threads, None, pure=False).result() == 3
            assert client.submit(configure_threads, 1, pure=False).result() == 1
    finally:
        torch.set_num_threads(before)


def test_rotations_average_quarter_turns_about_the_normal(model, cubes):
    x = torch.from_numpy(cubes)
    with torch.inference_mode():  # the mean over explicit turns in the (y, x) plane of a cube
        turns = [model(torch.rot90(x, k, dims=(2, 3)).contiguous()).numpy() for k in range(4)]
    np.testing.assert_allclose(predict_distances(model, cubes, rotations=4), np.mean(turns, 0),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(predict_distances(model, cubes, rotations=2),
                               np.mean(turns[:2], 0), atol=1e-5, rtol=0)
    # the averaged score no longer depends on the arbitrary in-plane angle of the cube ...
    turned = np.ascontiguousarray(np.rot90(cubes, 1, axes=(2, 3)))  # (N, z, y, x)
    np.testing.assert_allclose(predict_distances(model, turned, rotations=4),
                               predict_distances(model, cubes, rotations=4), atol=1e-5, rtol=0)
    # ... which a single pass does (so the check above is not vacuous)
    assert np.abs(predict_distances(model, turned) - predict_distances(model, cubes)).max() > 1e-3
    # 8: the four turns of the cube and of its mirror image (x reversed); the score is then
    # the same for a mirrored cube
    mirror = np.ascontiguousarray(cubes[:, :, :, ::-1])
    with torch.inference_mode():
        turns_m = [model(torch.rot90(torch.from_numpy(mirror), k, dims=(2, 3)).contiguous())
                   .numpy() for k in range(4)]
    np.testing.assert_allclose(predict_distances(model, cubes, rotations=8),
                               np.mean(turns + turns_m, 0), atol=1e-5, rtol=0)
    np.testing.assert_allclose(predict_distances(model, mirror, rotations=8),
                               predict_distances(model, cubes, rotations=8), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rotations"):
        predict_distances(model, cubes, rotations=3)


def test_ensemble_of_four_at_one_turn_is_invariant_like_one_network_at_four(model, cubes):
    from membrain_dist.model import MemBrainEnsemble

    ens = MemBrainEnsemble([model] * 4).eval()  # four copies: the mean over the four turns
    np.testing.assert_allclose(predict_distances(ens, cubes, rotations=1),
                               predict_distances(model, cubes, rotations=4), atol=1e-5, rtol=0)
    turned = np.ascontiguousarray(np.rot90(cubes, 1, axes=(2, 3)))
    np.testing.assert_allclose(predict_distances(ens, turned), predict_distances(ens, cubes),
                               atol=1e-5, rtol=0)


def test_inference_model_folds_batchnorm_and_leaves_the_model_alone(model, cubes):
    from torch import nn

    from membrain_dist.inference import inference_model

    folded = inference_model(model, "cpu")
    assert not any(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm3d) for m in model.modules()) == 4  # untouched
    x = torch.from_numpy(cubes[:16]).unsqueeze(1)
    with torch.inference_mode():
        np.testing.assert_allclose(
            folded(x.contiguous(memory_format=torch.channels_last_3d)).numpy(),
            model(x).numpy(), atol=1e-5, rtol=0)


def test_cubes_cut_on_the_device_equal_the_host_cubes():
    """grid_sample cutting (what a CUDA worker does; run on the CPU here) gives the host's
    trilinear cubes, points near and beyond the faces included (edge values repeated)."""
    from membrain_dist.extraction import extract_cubes, rotation_frames
    from membrain_dist.inference import cut_cubes_torch

    rng = np.random.default_rng(3)
    vol = rng.normal(size=(40, 50, 60)).astype(np.float32)
    pts = np.concatenate([rng.uniform(0, 1, (300, 3)) * [40, 50, 60],
                          np.float32([[0, 0, 0], [39, 49, 59], [-2, 25, 61]])]).astype(np.float32)
    nrm = rng.normal(size=(pts.shape[0], 3)).astype(np.float32)
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    host = extract_cubes(vol, pts, nrm, batch_size=10_000)  # one block: the whole volume
    dev = cut_cubes_torch(torch.from_numpy(vol), torch.from_numpy(pts),
                          torch.from_numpy(rotation_frames(nrm)), 12).numpy()
    assert dev.shape == host.shape
    np.testing.assert_allclose(dev, host, atol=1e-4)


def test_scores_from_device_cutting_equal_host_cutting(model):
    """predict_points (blocks to the device, cubes cut and scored there) == cutting on the
    host and predict_distances, with an intensity normalisation and several blocks."""
    from membrain_dist.extraction import Intensity, extract_cubes
    from membrain_dist.inference import predict_points

    rng = np.random.default_rng(4)
    vol = (rng.normal(size=(48, 64, 64)) * 3 + 10).astype(np.float32)
    pts = (rng.uniform(0, 1, (700, 3)) * [47, 63, 63]).astype(np.float32)
    nrm = rng.normal(size=(700, 3)).astype(np.float32)
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    inten = Intensity(10.0, 3.0, -1.0)
    host = predict_distances(model, extract_cubes(vol, pts, nrm, intensity=inten), 64, "cpu",
                             rotations=4)
    dev = predict_points(model, vol.__getitem__, vol.shape, pts, nrm, intensity=inten,
                         batch_size=64, device="cpu", rotations=4, read_points=200)
    np.testing.assert_allclose(dev, host, atol=1e-4)


def _split_cutoff(values: np.ndarray) -> float:
    """A cutoff in the widest gap of the middle half of ``values``: no value sits on it, so
    round-off between calls cannot move a cube across it."""
    v = np.sort(values)
    lo, hi = len(v) // 4, 3 * len(v) // 4
    k = lo + int(np.argmax(np.diff(v[lo:hi])))
    return float(v[k] + v[k + 1]) / 2


def test_turn_cascade_refines_exactly_the_cubes_below_the_cutoff(model, cubes, tmp_path: Path):
    """refine_below: cubes whose first pass lies below the cutoff get the mean of all turns
    (as without the cascade), the others keep the first pass; the same from a zarr array
    and from cubes cut on the device."""
    full = predict_distances(model, cubes, 64, rotations=4)
    first = predict_distances(model, cubes, 64, rotations=1)
    cut = _split_cutoff(first)
    low = first < cut
    assert 20 < low.sum() < len(low) - 20
    casc = predict_distances(model, cubes, 64, rotations=4, refine_below=[cut])
    np.testing.assert_allclose(casc[low], full[low], atol=1e-5, rtol=0)
    np.testing.assert_allclose(casc[~low], first[~low], atol=1e-5, rtol=0)
    # the turns change the kept cubes' scores, so the comparison above tells them apart
    assert np.abs(full[~low] - first[~low]).max() > 1e-3
    z = zarr.create_array(store=str(tmp_path / "c.zarr"), shape=cubes.shape,
                          chunks=(50, 12, 12, 12), dtype="float32")
    z[...] = cubes
    np.testing.assert_allclose(predict_distances(model, z, 16, rotations=4, refine_below=[cut]),
                               casc, atol=1e-5, rtol=0)
    # no cutoff, or one pass: no cascade
    np.testing.assert_allclose(predict_distances(model, cubes, 64, rotations=4,
                                                 refine_below=()), full, atol=1e-6, rtol=0)
    np.testing.assert_allclose(predict_distances(model, cubes, 64, rotations=1,
                                                 refine_below=[cut]), first, atol=1e-6, rtol=0)


def test_turn_cascade_per_class_refines_a_cube_below_any_class_cutoff(cubes):
    torch.manual_seed(3)
    m = MemBrainCNN(12, 8, n_classes=2).eval()
    full = predict_distances(m, cubes, 64, rotations=2)
    first = predict_distances(m, cubes, 64, rotations=1)
    cuts = [_split_cutoff(first[:, 0]), _split_cutoff(first[:, 1])]
    low = (first[:, 0] < cuts[0]) | (first[:, 1] < cuts[1])
    assert 0 < (~low).sum() and (first[:, 0] < cuts[0]).sum() < low.sum()
    casc = predict_distances(m, cubes, 64, rotations=2, refine_below=cuts)
    np.testing.assert_allclose(casc[low], full[low], atol=1e-5, rtol=0)
    np.testing.assert_allclose(casc[~low], first[~low], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="3 refinement cutoffs for 2 classes"):
        predict_distances(m, cubes, 64, rotations=2, refine_below=[1.0, 2.0, 3.0])


def test_turn_cascade_with_cubes_cut_on_the_device(model):
    from membrain_dist.extraction import extract_cubes
    from membrain_dist.inference import predict_points

    rng = np.random.default_rng(5)
    vol = rng.normal(size=(40, 48, 48)).astype(np.float32)
    pts = (rng.uniform(0.2, 0.8, (300, 3)) * [39, 47, 47]).astype(np.float32)
    nrm = rng.normal(size=(300, 3)).astype(np.float32)
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    host_cubes = extract_cubes(vol, pts, nrm)
    cut = _split_cutoff(predict_distances(model, host_cubes, 64, rotations=1))
    host = predict_distances(model, host_cubes, 64, rotations=4, refine_below=[cut])
    dev = predict_points(model, vol.__getitem__, vol.shape, pts, nrm, batch_size=64,
                         device="cpu", rotations=4, read_points=128, refine_below=[cut])
    np.testing.assert_allclose(dev, host, atol=1e-4)


def test_with_refinement_takes_the_cutoffs_from_the_clustering_thresholds():
    from dataclasses import replace

    from membrain_dist.config import PipelineConfig
    from membrain_dist.pipeline import with_refinement

    cfg = PipelineConfig().with_overrides("cluster", score_threshold=4.5)
    assert with_refinement(cfg).inference.refine_below == (5.5,)
    per_class = cfg.with_overrides("cluster", class_score_thresholds=(3.0, 4.0))
    assert with_refinement(per_class).inference.refine_below == (4.0, 5.0)
    assert with_refinement(cfg.with_overrides("inference", refine_margin=0.25)
                           ).inference.refine_below == (4.75,)
    # a later threshold moves the cutoff with it; none at one pass or without a margin
    again = with_refinement(with_refinement(cfg).with_overrides("cluster", score_threshold=3.0))
    assert again.inference.refine_below == (4.0,)
    one = cfg.with_overrides("inference", rotations=1)  # one pass: cutoffs for the screen only
    assert with_refinement(one).inference.refine_below == (5.5,)
    unscreened = replace(one, inference=replace(one.inference, screen=None))
    assert with_refinement(unscreened).inference.refine_below == ()
    off = replace(cfg, inference=replace(cfg.inference, refine_margin=None))
    assert with_refinement(off).inference.refine_below == ()


def test_prediction_with_the_turn_cascade(trained_model: Path, test_manifest: Path,
                                          tmp_path: Path):
    """predict_sequential at 4 turns with the cascade: every point of a membrane keeps
    either the full mean of its turns or a first pass at or above the cutoff; the cutoff is
    in the scores' provenance, and clustering refuses a threshold above it."""
    from dataclasses import replace

    from membrain_dist import pipeline
    from membrain_dist.geometry import membrane_cubes
    from membrain_dist.model import load_model

    entry = read_manifest(test_manifest)[0]
    root, name = tmp_path / "store.zarr", entry.name
    cfg = pipeline.model_pipeline_config(trained_model).with_overrides("inference", rotations=4)
    cfg = replace(cfg, inference=replace(cfg.inference, screen=None))  # every point scored
    pipeline.predict_sequential([entry], root, trained_model, tmp_path / "pred", cfg)
    cut = cfg.cluster.score_threshold + cfg.inference.refine_margin
    mids = pipeline.membrane_ids(root, name)
    mid = min(mids, key=lambda m: pipeline.n_points(root, name, m))
    got = pipeline.read_scores(root, name, mid)
    full = predict_distances(load_model(trained_model, "cpu")[0],
                             membrane_cubes(root, name, mid, cfg.geometry), rotations=4,
                             precision=cfg.inference.precision)
    same = np.isclose(got, full, atol=1e-5, rtol=0)
    assert np.all(same | (got >= cut - 1e-6))
    assert same.sum() > 0 and (~same).sum() > 0  # some points refined, some kept
    attrs = pipeline.store.node_attrs(root, pipeline.scores_key(name, mid))
    assert attrs["provenance"]["params"]["refine_below"] == [cut]
    # the precision asked for is in the provenance (none for float32, as before the option)
    asked = attrs["provenance"]["params"].get("precision", "float32")
    assert asked == cfg.inference.precision
    scored = pipeline.with_refinement(cfg).inference  # the cutoffs the prediction used
    assert pipeline.scores_current(root, name, mid, trained_model, scored)
    for other in {"float32", "bfloat16", "auto"} - {asked}:  # other scores: not current
        assert not pipeline.scores_current(root, name, mid, trained_model,
                                           replace(scored, precision=other))
    with pytest.raises(ValueError, match="refined only below"):
        pipeline.cluster_membrane(root, name, mid, replace(cfg.cluster, score_threshold=cut + 0.5),
                                  cfg.orientation)


def test_scripted_features_give_the_eager_outputs(model, cubes):
    """The TorchScript feature stack (CPU default) runs compiled, for any batch size and for
    turned (non-contiguous) cubes, with the eager folded stack's outputs."""
    from membrain_dist.inference import inference_model

    scripted = inference_model(model, "cpu")
    eager = inference_model(model, "cpu", script=False)
    assert isinstance(scripted.features, torch.jit.ScriptModule)  # no silent fallback
    assert not isinstance(eager.features, torch.jit.ScriptModule)
    x = torch.from_numpy(cubes).unsqueeze(1)
    with torch.inference_mode():
        for batch in (x[:1], x[:7], x, torch.rot90(x, 1, (3, 4))):
            b = batch.contiguous(memory_format=torch.channels_last_3d)
            np.testing.assert_allclose(scripted(b).numpy(), eager(b).numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(scripted(b).numpy(), model(batch).numpy(), atol=1e-5,
                                       rtol=0)


def test_prepared_model_is_kept_until_the_weights_change(cubes):
    from membrain_dist.inference import prepared_model

    torch.manual_seed(1)
    net = MemBrainCNN(12, 8).eval()
    first = prepared_model(net, "cpu")
    assert prepared_model(net, "cpu") is first
    before = predict_distances(net, cubes[:20])
    with torch.no_grad():
        net.head.bias.add_(1.0)  # in place: the same object, other weights
    second = prepared_model(net, "cpu")
    assert second is not first
    np.testing.assert_allclose(predict_distances(net, cubes[:20]), before + 1.0, atol=1e-5)


def test_bfloat16_scores_are_float32_scores_up_to_its_rounding(model, cubes):
    """``precision="bfloat16"``: the prepared network really computes in bfloat16 (weights,
    scripted features), the outputs come back as float32 and differ from the float32 ones
    by bfloat16 round-off only (8 bits of mantissa: ~0.4 % of the scale), at every turn."""
    from membrain_dist.inference import model_dtype, prepared_model

    bf = prepared_model(model, "cpu", torch.bfloat16)
    assert model_dtype(bf) == torch.bfloat16 and model_dtype(model) == torch.float32
    assert isinstance(bf.features, torch.jit.ScriptModule)
    assert prepared_model(model, "cpu") is not bf  # kept per dtype
    for rotations in (1, 4):
        ref = predict_distances(model, cubes, rotations=rotations)
        got = predict_distances(model, cubes, rotations=rotations, precision="bfloat16")
        assert got.dtype == np.float32 and got.shape == ref.shape
        scale = float(np.abs(ref).max())
        assert np.abs(got - ref).max() <= 0.02 * scale
        assert np.abs(got - ref).max() > 0  # not float32 under another name


def test_resolve_precision():
    from membrain_dist.config import InferenceConfig
    from membrain_dist.inference import native_bfloat16, resolve_precision

    assert resolve_precision("float32", "cpu") == torch.float32
    assert resolve_precision("bfloat16", "cpu") == torch.bfloat16
    native = native_bfloat16("cpu")
    assert resolve_precision("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("half", "cpu")
    with pytest.raises(ValueError, match="precision"):
        InferenceConfig(precision="float16")
