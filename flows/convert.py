"""Convert flow: a manifest's MRC tomograms and segmentations into the campaign Zarr store."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from membrain_dist.config import PipelineConfig
from membrain_dist.manifest import read_manifest

from .logs import forward_library_logs
from .runtime import ClusterSpec, manifest_run_name, open_clusters, task_runner
from .stages import Failures, convert_flow


@flow(name="membrain-convert", flow_run_name=manifest_run_name)
def convert_campaign(manifest: str, store: str, cfg: PipelineConfig = PipelineConfig(),
                     cluster: ClusterSpec = ClusterSpec()) -> tuple[dict[str, list[int]], Failures]:
    """Convert every manifest row (skipping rows already converted unchanged)."""
    forward_library_logs()
    entries = read_manifest(manifest)
    Path(store).parent.mkdir(parents=True, exist_ok=True)
    with open_clusters(cluster) as cl:
        return convert_flow.with_options(task_runner=task_runner(cl.cpu_address))(
            entries, store, cfg)
