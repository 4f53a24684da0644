"""Particle STAR files (RELION conventions) read and written with ``starfile``.

Coordinates in files are voxels of the tomogram (``rlnCoordinateX`` = MRC column index);
inside the code a point is ``(z, y, x)``. Angles are RELION ZYZ Euler angles in degrees.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from . import axes
from .errors import InputError

__all__ = [
    "REQUIRED_COLUMNS",
    "ANGLE_COLUMNS",
    "CENTERED_COLUMNS",
    "read_particles",
    "particles_zyx",
    "particles_matrices",
    "particles_frame",
    "write_particles",
]

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("rlnTomoName", "rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ")
ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
CENTERED_COLUMNS = (
    "rlnCenteredCoordinateXAngst",
    "rlnCenteredCoordinateYAngst",
    "rlnCenteredCoordinateZAngst",
)


def read_particles(path: str | os.PathLike, tomo_name: str | None = None) -> pd.DataFrame:
    """Read the particle table of a STAR file.

    A file may hold one data block or several (e.g. RELION's ``optics`` + ``particles``):
    the block named ``particles`` is used if present, else the first loop block holding
    all :data:`REQUIRED_COLUMNS`.

    Parameters
    ----------
    path
        STAR file.
    tomo_name
        Keep only rows whose ``rlnTomoName`` equals this (compared as strings).

    Returns
    -------
    pd.DataFrame
        One row per particle; ``rlnTomoName`` as str; index reset.

    Raises
    ------
    InputError
        Unreadable file, no table, or required columns missing (named in the message).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "STAR file not found")
    try:
        blocks = starfile.read(p, always_dict=True, parse_as_string=["rlnTomoName"])
    except Exception as exc:  # starfile raises various types for malformed files
        raise InputError(p, f"unreadable STAR file ({exc})") from exc
    tables = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    if not tables:
        raise InputError(p, "no particle table (loop_ data block) found")
    candidates = ([tables["particles"]] if "particles" in tables else []) + [
        t for k, t in tables.items() if k != "particles"
    ]
    df = next((t for t in candidates if all(c in t.columns for c in REQUIRED_COLUMNS)), None)
    if df is None:
        best = candidates[0]
        missing = [c for c in REQUIRED_COLUMNS if c not in best.columns]
        raise InputError(p, f"missing required column(s) {', '.join(missing)}")
    df = df.copy()
    df["rlnTomoName"] = df["rlnTomoName"].astype(str)
    for c in REQUIRED_COLUMNS[1:]:
        try:
            df[c] = pd.to_numeric(df[c])
        except (ValueError, TypeError) as exc:
            raise InputError(p, f"column {c} is not numeric ({exc})") from exc
    if tomo_name is not None:
        df = df[df["rlnTomoName"] == str(tomo_name)]
    return df.reset_index(drop=True)


def particles_zyx(df: pd.DataFrame) -> np.ndarray:
    """``(N, 3)`` float32 particle positions (z, y, x) in voxels."""
    cols = ["rlnCoordinateZ", "rlnCoordinateY", "rlnCoordinateX"]
    return df[cols].to_numpy(dtype=np.float32).reshape(-1, 3)


def particles_matrices(df: pd.DataFrame) -> np.ndarray | None:
    """``(N, 3, 3)`` float32 in-code orientations (columns u, v, n in zyx) from the angles.

    ``None`` when the table has no tilt/psi columns; a missing ``rlnAngleRot`` reads as 0.
    """
    if "rlnAngleTilt" not in df.columns or "rlnAnglePsi" not in df.columns:
        return None
    rot = df["rlnAngleRot"] if "rlnAngleRot" in df.columns else pd.Series(0.0, index=df.index)
    ang = np.stack([rot.to_numpy(np.float64), df["rlnAngleTilt"].to_numpy(np.float64),
                    df["rlnAnglePsi"].to_numpy(np.float64)], axis=-1).reshape(-1, 3)
    return axes.matrix_xyz_to_zyx(axes.euler_to_matrix(ang))


def particles_frame(
    tomo_name: str,
    zyx: np.ndarray,
    matrices_zyx: np.ndarray | None,
    shape_zyx: tuple[int, int, int],
    voxel_size_A: float,
    extra: Mapping[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Build an output particle table.

    Parameters
    ----------
    tomo_name
        ``rlnTomoName`` of every row.
    zyx
        ``(N, 3)`` positions (z, y, x) in voxels.
    matrices_zyx
        ``(N, 3, 3)`` in-code orientations (columns u, v, n in zyx) or ``None``; with
        ``None`` all three angles are written as 0 (callers with membrane normals should
        build matrices from them and say so in ``mbOrientationFrom``, CONVENTIONS.md).
    shape_zyx, voxel_size_A
        Tomogram shape (voxels) and voxel size (Å) for the RELION 5 centred-Å columns.
    extra
        More columns, names prefixed ``mb`` (or ``rln``), each of length N.

    Returns
    -------
    pd.DataFrame
        Columns ``rlnTomoName, rlnCoordinateX/Y/Z, rlnAngleRot/Tilt/Psi,
        rlnCenteredCoordinateX/Y/ZAngst`` then the extra columns.
    """
    pts = np.asarray(zyx, dtype=np.float64).reshape(-1, 3)
    n = len(pts)
    xyz = axes.zyx_to_xyz(pts)
    if matrices_zyx is None:
        ang = np.zeros((n, 3), dtype=np.float64)
    else:
        m = np.asarray(matrices_zyx).reshape(-1, 3, 3)
        if len(m) != n:
            raise ValueError(f"{len(m)} matrices for {n} particles")
        ang = axes.matrix_to_euler(axes.matrix_zyx_to_xyz(m)).astype(np.float64)
    cen = axes.centered_angstrom(xyz, shape_zyx, voxel_size_A)
    cols: dict[str, object] = {"rlnTomoName": [str(tomo_name)] * n}
    for i, c in enumerate(("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ")):
        cols[c] = xyz[:, i]
    for i, c in enumerate(ANGLE_COLUMNS):
        cols[c] = ang[:, i]
    for i, c in enumerate(CENTERED_COLUMNS):
        cols[c] = cen[:, i]
    for k, v in (extra or {}).items():
        if not (k.startswith("mb") or k.startswith("rln")):
            raise ValueError(f"extra column {k!r} must start with 'mb' (or be a RELION label)")
        if k in cols:
            raise ValueError(f"extra column {k!r} clashes with a standard column")
        arr = np.asarray(v)
        if arr.shape[:1] != (n,):
            raise ValueError(f"extra column {k!r} has {arr.shape[:1]} rows, expected {n}")
        cols[k] = arr
    return pd.DataFrame(cols)


def write_particles(path: str | os.PathLike, df: pd.DataFrame) -> None:
    """Write ``df`` as one data block ``particles``, atomically (temporary file + rename)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex}")
    try:
        starfile.write({"particles": df}, tmp, float_format="%.6f")
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
