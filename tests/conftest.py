"""Shared fixtures: one small synthetic campaign and one briefly trained model per session.

Everything is real: MRC files on disk, a Zarr store, torch training (few epochs: the tests
check plumbing and equivalences here; pick quality is measured by the demo and benchmarks).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifest of 3 synthetic tomograms: 1 train, 2 test (with ground truth)."""
    from membrain_dist.synth import generate_campaign

    out = tmp_path_factory.mktemp("campaign")
    return generate_campaign(out, n_tomos=3, seed=11, n_train=1, n_val=0)


@pytest.fixture(scope="session")
def trained_model(campaign: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained sequentially for a few epochs on the campaign's train row."""
    from membrain_dist import pipeline
    from membrain_dist.config import PipelineConfig
    from membrain_dist.manifest import read_manifest

    work = tmp_path_factory.mktemp("model")
    cfg = PipelineConfig()
    cfg = replace(cfg, train=replace(cfg.train, max_epochs=3, patience=3, num_threads=2),
                  labels=replace(cfg.labels, template=str(campaign.parent / "template.mrc")),
                  inference=replace(cfg.inference, rotations=1))  # plumbing: one pass
    train = [e for e in read_manifest(campaign) if e.split == "train"]
    root = work / "train.zarr"
    pipeline.prepare_sequential(train, root, cfg)
    model_dir = work / "model"
    pipeline.fit_model(root, train, [], cfg, model_dir)
    return model_dir


@pytest.fixture(scope="session")
def test_manifest(campaign: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The campaign's test rows as their own manifest."""
    from membrain_dist.manifest import read_manifest, write_manifest

    path = campaign.parent / "test_rows.csv"
    write_manifest([e for e in read_manifest(campaign) if e.split == "test"], path)
    return path


@pytest.fixture(scope="session")
def sequential_prediction(test_manifest: Path, trained_model: Path,
                          tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Reference: the whole predict chain in-process, no dask, no Prefect."""
    from membrain_dist import pipeline
    from membrain_dist.manifest import read_manifest

    work = tmp_path_factory.mktemp("sequential")
    cfg = pipeline.model_pipeline_config(trained_model)
    pipeline.predict_sequential(read_manifest(test_manifest), work / "store.zarr",
                                trained_model, work / "pred", cfg)
    return work / "pred"


@pytest.fixture(scope="session")
def flow_prediction(test_manifest: Path, trained_model: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    """The predict flow (Prefect, shared temporary API) on a 2-worker LocalCluster:
    ``(prediction folder, store, PredictResult)`` (tests/test_flows.py, test_stream.py)."""
    from flows.predict import predict_campaign
    from flows.runtime import ClusterSpec, prefect_api

    work = tmp_path_factory.mktemp("flow")
    with prefect_api():
        result = predict_campaign(str(test_manifest), str(trained_model), str(work / "pred"),
                                  str(work / "store.zarr"),
                                  cluster=ClusterSpec(n_workers=2, memory_limit="4GiB"))
    return work / "pred", work / "store.zarr", result
