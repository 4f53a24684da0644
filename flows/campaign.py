"""Campaign flow: a whole manifest end to end (train on its train rows, predict the rest)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from membrain_dist import pipeline
from membrain_dist.config import PipelineConfig
from membrain_dist.manifest import read_manifest, write_manifest

from .evaluate import evaluate_predictions
from .logs import forward_library_logs
from .predict import PredictResult, predict_entries
from .runtime import ClusterSpec, manifest_run_name, open_clusters
from .stream import Schedule
from .train import train_campaign


@flow(name="membrain-campaign", flow_run_name=manifest_run_name)
def run_campaign(manifest: str, out_dir: str, cfg: PipelineConfig = PipelineConfig(),
                 model_dir: str | None = None, cluster: ClusterSpec = ClusterSpec(),
                 symmetry: int = 1, schedule: Schedule = Schedule()) -> dict:
    """Train (unless ``model_dir`` holds a model), predict the test rows, evaluate them
    against their particles STAR when the manifest gives one. Layout of ``out_dir``:
    ``campaign.zarr``, ``model/``, ``predictions/`` (STAR, qc/), ``evaluation.json``."""
    forward_library_logs()
    logger = get_run_logger()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = str(out / "campaign.zarr")
    model = model_dir or str(out / "model")
    if model_dir is None:
        train_campaign(manifest, model, store, cfg, cluster)
    cfg = pipeline.over_model(cfg, model)  # the model's settings, the file's on top
    entries = [e for e in read_manifest(manifest) if e.split == "test"]
    pred_dir = str(out / "predictions")
    with open_clusters(cluster) as cl:
        result: PredictResult = predict_entries(entries, model, pred_dir, store, cfg,
                                                cl.cpu_address, cl.gpu_address,
                                                cl.gpu_resource, schedule)
    summary = {"predictions": pred_dir, "failures": result.failures,
               "particles": {n: s["particles"] for n, s in result.summaries.items()}}
    with_gt = [e for e in entries if e.particles is not None and e.name in result.summaries]
    if with_gt:
        gt = out / "evaluated_rows.csv"  # the test rows only: train rows have no predictions
        write_manifest(with_gt, gt)
        summary["evaluation"] = evaluate_predictions(pred_dir, str(gt), symmetry=symmetry,
                                                     json_out=str(out / "evaluation.json"))
    logger.info("campaign done: %s", {k: v for k, v in summary.items() if k != "evaluation"})
    return summary
