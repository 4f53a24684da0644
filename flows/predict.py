"""Predict flow: from MRC to particles STAR for every manifest row, on dask workers."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from membrain_dist import pipeline
from membrain_dist.config import PipelineConfig
from membrain_dist.errors import InputError
from membrain_dist.manifest import TomogramEntry, read_manifest
from membrain_dist.store import sweep_orphans, write_index

from . import progress
from .logs import forward_library_logs
from .runtime import ClusterSpec, manifest_run_name, open_clusters, task_runner
from .stages import Failures, convert_flow, geometry_flow, inference_flow, particles_flow
from .stream import Schedule, stream_entries


@dataclass
class PredictResult:
    summaries: dict[str, dict] = field(default_factory=dict)
    failures: Failures = field(default_factory=dict)
    campaign_star: str | None = None


def _validate(entries: list[TomogramEntry]) -> Failures:
    """Header checks of all rows before any work: bad rows are reported, not fatal."""
    bad: Failures = {}
    for e in entries:
        try:
            pipeline.validate_entries([e])
        except InputError as exc:
            bad[e.name] = str(exc)
    return bad


#: QC thumbnails in the qc-figures artifact: width in pixels, bytes per thumbnail and in all
#: (the figures themselves stay files: whole images in the database made a 1.2 MB artifact
#: for 3 tomograms, and Prefect refused its 1.8 MB event)
THUMB_WIDTH = 240
THUMB_MAX_BYTES = 40_000
THUMBS_MAX_BYTES = 400_000


def qc_thumbnail(png: Path, width: int = THUMB_WIDTH) -> bytes | None:
    """A small PNG of a QC figure, or None when it cannot be read or is still too large."""
    import io

    from PIL import Image

    try:
        with Image.open(png) as im:
            im = im.convert("RGB")
            im.thumbnail((width, width * 4))
            buf = io.BytesIO()
            im.quantize(colors=64).save(buf, format="PNG", optimize=True)
    except OSError:
        return None
    data = buf.getvalue()
    return data if len(data) <= THUMB_MAX_BYTES else None


def qc_markdown(names: list[str], out_dir: str) -> str:
    """One row per tomogram: the QC figure's path (a file:// link) and a small thumbnail
    while the thumbnails stay under :data:`THUMBS_MAX_BYTES` in all."""
    qc = Path(out_dir).resolve() / "qc"
    lines = [f"QC figures: `{qc}`", "", "| tomogram | figure | thumbnail |", "| --- | --- | --- |"]
    budget = THUMBS_MAX_BYTES
    for n in names:
        png = qc / f"{n}.png"
        if not png.is_file():
            continue
        thumb = qc_thumbnail(png) if budget > 0 else None
        cell = ""
        if thumb is not None and len(thumb) <= budget:
            budget -= len(thumb)
            cell = f"![{n}](data:image/png;base64,{base64.b64encode(thumb).decode()})"
        lines.append(f"| {n} | [{png.name}]({png.as_uri()}) | {cell} |")
    return "\n".join(lines) + "\n"


def _artifacts(summaries: dict[str, dict], failures: Failures, out_dir: str) -> None:
    """Table of picks per tomogram and the QC figures (paths and thumbnails), for the UI."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    rows = [{"tomogram": n, "particles": s["particles"], "points": s["points"]}
            for n, s in summaries.items()]
    rows += [{"tomogram": n, "particles": None, "points": None, "error": m}
             for n, m in failures.items()]
    create_table_artifact(key="picks-per-tomogram", table=rows,
                          description="Particles found per tomogram")
    qc = Path(out_dir).resolve() / "qc"
    if any((qc / f"{n}.png").is_file() for n in summaries):
        create_markdown_artifact(key="qc-figures", markdown=qc_markdown(list(summaries), out_dir),
                                 description="QC: picks on the membranes (figures are files)")
        create_link_artifact(key="qc-folder", link=qc.as_uri(), link_text=str(qc),
                             description="Folder of the QC figures (PNG)")


def predict_entries(entries: list[TomogramEntry], model_dir: str, out_dir: str, store: str,
                    cfg: PipelineConfig, cpu_address: str, gpu_address: str,
                    gpu_resource: bool, schedule: Schedule = Schedule()) -> PredictResult:
    """The stages of a prediction on already running clusters, streamed per tomogram
    (:mod:`flows.stream`) or stage by stage (``schedule.mode``); scoring in a turn cascade
    about the clustering thresholds (:func:`~membrain_dist.pipeline.with_refinement`)."""
    cfg = pipeline.with_refinement(cfg)
    with progress.tracking(progress.RunProgress([e.name for e in entries])) as run:
        logger = get_run_logger()
        failures = _validate(entries)
        for n, m in failures.items():
            logger.error("skipping %s: %s", n, m)
        run.tomograms_failed(failures)
        good = [e for e in entries if e.name not in failures]
        if schedule.mode == "stream":
            summaries, bad = stream_entries(good, model_dir, out_dir, store, cfg, cpu_address,
                                            gpu_address, gpu_resource, schedule)
            write_index(store)  # the root lists every converted tomogram (NGFF collection)
        else:
            summaries, bad = _stage_by_stage(good, model_dir, out_dir, store, cfg, cpu_address,
                                             gpu_address, gpu_resource, schedule, run)
        failures.update(bad)
        return _finish(entries, good, summaries, failures, out_dir, store)


def _stage_by_stage(good, model_dir, out_dir, store, cfg, cpu_address, gpu_address,
                    gpu_resource, schedule: Schedule, run: progress.RunProgress
                    ) -> tuple[dict[str, dict], Failures]:
    """Each stage for every tomogram before the next stage starts (stage subflows)."""
    failures: Failures = {}
    cpu = task_runner(cpu_address)
    membranes, bad = convert_flow.with_options(task_runner=cpu)(good, store, cfg)
    failures.update(bad)
    run.tomograms_failed(failures)
    geo, bad = geometry_flow.with_options(task_runner=cpu)(good, membranes, store, cfg,
                                                           schedule.keep_cubes,
                                                           schedule.group_voxels)
    failures.update(bad)
    run.tomograms_failed(failures)
    keys = [k for k in geo if k[0] not in failures]
    scored, bad = inference_flow.with_options(task_runner=task_runner(gpu_address))(
        keys, store, model_dir, cfg, gpu_resource)
    failures.update(bad)
    run.tomograms_failed(failures)
    keys = [k for k in scored if k[0] not in failures]
    summaries, bad = particles_flow.with_options(task_runner=cpu)(
        keys, good, store, out_dir, cfg, pipeline.in_plane_search(model_dir, cfg))
    failures.update(bad)
    run.tomograms_failed(failures)
    return summaries, failures


def _finish(entries: list[TomogramEntry], good: list[TomogramEntry], summaries: dict[str, dict],
            failures: Failures, out_dir: str, store: str) -> PredictResult:
    """Sweep, drop the outputs of failed tomograms, gather the campaign STAR, report."""
    logger = get_run_logger()
    sweep_orphans(store, [e.name for e in good])  # left by workers lost mid-write
    for n in failures:  # no output of an earlier run that particles.star would not match
        for path in pipeline.remove_tomogram_outputs(out_dir, n):
            logger.warning("%s failed: removed %s", n, path)
    done = [e.name for e in entries if e.name in summaries]
    result = PredictResult(summaries, failures)
    if done:
        result.campaign_star = str(pipeline.write_campaign_star(out_dir, done, store))
    else:  # nothing of this run to gather: no particles.star of an earlier one either
        (Path(out_dir) / pipeline.CAMPAIGN_STAR).unlink(missing_ok=True)
        (Path(out_dir) / pipeline.TOMOGRAMS_STAR).unlink(missing_ok=True)
    _artifacts(summaries, failures, out_dir)
    logger.info("%d/%d tomograms done, %d particles; failed: %s", len(done), len(entries),
                sum(s["particles"] for s in summaries.values()), sorted(failures) or "none")
    return result


@flow(name="membrain-predict", flow_run_name=manifest_run_name)
def predict_campaign(manifest: str, model_dir: str, out_dir: str, store: str,
                     cfg: PipelineConfig | None = None,
                     cluster: ClusterSpec = ClusterSpec(),
                     schedule: Schedule = Schedule(),
                     settings: dict[str, dict[str, Any]] | None = None) -> PredictResult:
    """Every manifest row (all splits) -> ``out_dir/<name>.star`` + QC + campaign STAR.

    ``cfg``: the whole configuration (default: the model's own, :func:`~membrain_dist.pipeline.
    model_pipeline_config`). ``settings``: ``{stage: {field: value}}`` on top of it, exactly
    the fields given, as ``predict --config`` (what a deployment sets: a partial ``cfg`` would
    take the defaults, not the model's calibrated threshold, for every field it leaves out)."""
    forward_library_logs()
    cfg = pipeline.predict_config(model_dir, cfg, settings)
    pipeline.model_fingerprint(model_dir)  # a missing/broken model fails before any work
    entries = read_manifest(manifest)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open_clusters(cluster) as cl:
        return predict_entries(entries, model_dir, out_dir, store, cfg, cl.cpu_address,
                               cl.gpu_address, cl.gpu_resource, schedule)
