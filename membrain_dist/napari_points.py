"""Picks as a napari points layer: the CSV napari's built-in reader opens.

napari (``napari_builtins.io``) reads a CSV whose header holds ``axis-0``, ``axis-1``, ...
columns as a points layer; an ``index`` first column is skipped and every other column becomes
a (float) property. Coordinates are written in Å, ``(z, y, x)`` = voxel index x voxel size,
the world coordinates napari gives the store's OME-Zarr tomogram (its level-0 scale), so the
points lie on the image.
"""

from __future__ import annotations

import csv
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["write_points_csv", "read_points_csv"]


def write_points_csv(path: str | os.PathLike, zyx_vox: np.ndarray, voxel_size_A: float,
                     properties: Mapping[str, np.ndarray]) -> Path:
    """Write ``(N, 3)`` voxel positions (z, y, x) as napari points in Å with numeric
    ``properties`` (e.g. ``score``, ``membrane``), atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    zyx = np.asarray(zyx_vox, dtype=np.float64).reshape(-1, 3) * float(voxel_size_A)
    names = list(properties)
    cols = [np.asarray(properties[k], dtype=np.float64).reshape(-1) for k in names]
    for k, c in zip(names, cols, strict=True):
        if c.shape[0] != zyx.shape[0]:
            raise ValueError(f"property {k!r} has {c.shape[0]} values for {zyx.shape[0]} points")
    tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["index", "axis-0", "axis-1", "axis-2", *names])
            for i in range(zyx.shape[0]):
                w.writerow([i, *(repr(float(v)) for v in zyx[i]),
                            *(repr(float(c[i])) for c in cols)])
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def read_points_csv(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Read such a CSV the way napari's reader does: ``axis-*`` columns -> ``(N, D)`` data,
    the others (but a first ``index``) -> float properties."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    head, table = rows[0], np.array(rows[1:], dtype=object).reshape(-1, len(rows[0]))
    axes_ = [i for i, c in enumerate(head) if c.startswith("axis-")]
    props = {head[i]: table[:, i].astype(float) for i in range(len(head))
             if i not in axes_ and not (i == 0 and head[i] == "index")}
    return table[:, axes_].astype(float), props
