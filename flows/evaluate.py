"""Evaluate flow: precision, recall, F1 and in-plane angle error of a prediction."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger

from membrain_dist.evaluation import evaluate_campaign, format_table


@flow(name="membrain-evaluate")
def evaluate_predictions(pred: str, gt: str, radius: float = 4.5, symmetry: int = 1,
                         json_out: str | None = None) -> dict:
    """Score ``pred`` (folder of STAR or one STAR) against ``gt``; table artifact + JSON."""
    from prefect.artifacts import create_table_artifact

    per_tomo, overall = evaluate_campaign(pred, gt, radius, symmetry)
    get_run_logger().info("\n%s", format_table(per_tomo, overall))
    records = json.loads(per_tomo.to_json(orient="records"))
    create_table_artifact(key="evaluation", table=records + [{"tomogram": "ALL", **overall}],
                          description=f"hit radius {radius} voxels, symmetry C{symmetry}")
    result = {"overall": overall, "per_tomogram": records, "radius": radius,
              "symmetry": symmetry}
    if json_out:
        path = Path(json_out)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(path)
    return result
