"""Particle STAR files (RELION conventions) read and written with ``starfile``.

Coordinates in files are voxels (``rlnCoordinateX`` = MRC column index) or RELION 5 centred Å
(``rlnCenteredCoordinateX/Y/ZAngst``); inside the code a point is ``(z, y, x)`` in voxels of
the tomogram it lies in. :func:`to_tomogram_voxels` is the one place where a table read from a
file is brought into a tomogram's voxels (centred Å, or voxels at another pixel size scaled
by the pixel-size ratio). Angles are RELION ZYZ Euler angles in degrees.
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
    "PIXEL_SIZE_LABELS",
    "CLASS_NAME_COLUMN",
    "CLASS_NUMBER_COLUMN",
    "read_particles",
    "coordinate_pixel_size",
    "to_tomogram_voxels",
    "tomograms_pixel_size",
    "particles_zyx",
    "particles_matrices",
    "particles_frame",
    "write_particles",
    "write_star_blocks",
    "tomostar_name",
]

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("rlnTomoName", "rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ")
VOXEL_COLUMNS = REQUIRED_COLUMNS[1:]
ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
CENTERED_COLUMNS = (
    "rlnCenteredCoordinateXAngst",
    "rlnCenteredCoordinateYAngst",
    "rlnCenteredCoordinateZAngst",
)
ORIGIN_COLUMNS = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")
#: Labels (a particle column, or a ``data_optics`` column joined through ``rlnOpticsGroup``)
#: that give the pixel size (Å) of ``rlnCoordinateX/Y/Z``, the first present wins: RELION 4/5
#: tomography (coordinates in tilt-series pixels), RELION 3.1+ (micrograph pixels; what this
#: package writes, the "micrograph" being the tomogram), then the image pixel size.
PIXEL_SIZE_LABELS = ("rlnTomoTiltSeriesPixelSize", "rlnMicrographPixelSize", "rlnImagePixelSize")
#: columns naming a particle's class: a name of ``LabelConfig.classes``, or its 1-based number
CLASS_NAME_COLUMN, CLASS_NUMBER_COLUMN = "mbClassName", "rlnClassNumber"
#: more than this share of the particles outside the tomogram: not voxels of it
_OUTSIDE_SHARE = 0.5


def read_particles(path: str | os.PathLike, tomo_name: str | None = None) -> pd.DataFrame:
    """Read the particle table of a STAR file.

    A file may hold one data block or several (e.g. RELION's ``optics`` + ``particles``):
    the block named ``particles`` is used if present, else the first loop block holding
    ``rlnTomoName`` and a full coordinate set: voxels (``rlnCoordinateX/Y/Z``) or RELION 5
    centred Å (``rlnCenteredCoordinateX/Y/ZAngst``). Pixel-size labels of a ``data_optics``
    block (:data:`PIXEL_SIZE_LABELS`) are joined onto the rows (through ``rlnOpticsGroup``,
    or to every row when the block has one group).

    Parameters
    ----------
    path
        STAR file.
    tomo_name
        Keep only rows whose ``rlnTomoName`` equals this (compared as strings).

    Returns
    -------
    pd.DataFrame
        One row per particle; ``rlnTomoName`` as str; index reset. Coordinates as in the
        file (see :func:`to_tomogram_voxels`).

    Raises
    ------
    InputError
        Unreadable file, no table, required columns missing (named in the message), or
        optics groups that cannot be matched to the particles.
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
        t for k, t in tables.items() if k not in ("particles", "optics")
    ]
    if not candidates:
        candidates = list(tables.values())

    def usable(t: pd.DataFrame) -> bool:
        return "rlnTomoName" in t.columns and (all(c in t.columns for c in VOXEL_COLUMNS)
                                               or all(c in t.columns for c in CENTERED_COLUMNS))

    df = next((t for t in candidates if usable(t)), None)
    if df is None:
        best = candidates[0]
        missing = [c for c in REQUIRED_COLUMNS if c not in best.columns]
        if "rlnTomoName" in best.columns:
            missing += [f"(or the RELION 5 centred columns {', '.join(CENTERED_COLUMNS)})"]
        raise InputError(p, f"missing required column(s) {', '.join(missing)}")
    df = df.copy()
    df["rlnTomoName"] = df["rlnTomoName"].astype(str)
    for c in (*VOXEL_COLUMNS, *CENTERED_COLUMNS, *ORIGIN_COLUMNS, *PIXEL_SIZE_LABELS):
        if c not in df.columns:
            continue
        try:
            df[c] = pd.to_numeric(df[c])
        except (ValueError, TypeError) as exc:
            raise InputError(p, f"column {c} is not numeric ({exc})") from exc
    if "optics" in tables:
        df = _join_optics(p, df, tables["optics"])
    if tomo_name is not None:
        df = df[df["rlnTomoName"] == str(tomo_name)]
    return df.reset_index(drop=True)


def _join_optics(path: Path, df: pd.DataFrame, optics: pd.DataFrame) -> pd.DataFrame:
    """Copy the pixel-size labels of a ``data_optics`` block onto the particle rows."""
    labels = [c for c in PIXEL_SIZE_LABELS if c in optics.columns and c not in df.columns]
    if not labels or not len(optics):
        return df
    if "rlnOpticsGroup" in df.columns and "rlnOpticsGroup" in optics.columns:
        table = optics.set_index(pd.to_numeric(optics["rlnOpticsGroup"]))
        groups = pd.to_numeric(df["rlnOpticsGroup"])
        unknown = sorted(set(groups) - set(table.index))
        if unknown:
            raise InputError(path, f"rlnOpticsGroup {unknown[:5]} of the particles is not in "
                                   "the data_optics block")
        for c in labels:
            df[c] = pd.to_numeric(table[c]).reindex(groups).to_numpy()
    elif len(optics) == 1:
        for c in labels:
            df[c] = float(pd.to_numeric(optics[c]).iloc[0])
    else:
        raise InputError(path, f"{len(optics)} optics groups but the particles have no "
                               "rlnOpticsGroup column: the coordinates' pixel size is ambiguous")
    return df


def coordinate_pixel_size(
    df: pd.DataFrame, path: str | os.PathLike, override: float | None = None
) -> tuple[np.ndarray | None, str]:
    """Pixel size (Å) of the ``rlnCoordinateX/Y/Z`` of each row, and where it came from.

    ``override`` (the manifest's ``particles_angpix``) wins over the file's labels
    (:data:`PIXEL_SIZE_LABELS`); a disagreement is logged. ``(None, "unknown")`` when neither
    says.

    Raises
    ------
    InputError
        A pixel-size label holds a value that is not a positive number.
    """
    found: tuple[np.ndarray, str] | None = None
    for label in PIXEL_SIZE_LABELS:
        if label in df.columns:
            v = df[label].to_numpy(np.float64)
            if not (np.isfinite(v) & (v > 0)).all():
                raise InputError(path, f"{label} must be a positive pixel size (Å), got "
                                       f"{sorted(set(v[~(np.isfinite(v) & (v > 0))]))[:3]}")
            found = (v, label)
            break
    if override is not None:
        if found is not None and not np.allclose(found[0], override, rtol=1e-3):
            log.warning("%s: the manifest's particles_angpix %g Å overrides the file's %s %s",
                        path, override, found[1], sorted(set(found[0].tolist()))[:3])
        return np.full(len(df), float(override)), "the manifest's particles_angpix"
    if found is None:
        return None, "unknown"
    return found[0], found[1]


def to_tomogram_voxels(
    df: pd.DataFrame,
    path: str | os.PathLike,
    shape_zyx: tuple[int, int, int],
    voxel_size_A: float,
    coords_angpix: float | None = None,
    strict: bool = True,
) -> pd.DataFrame:
    """The table with ``rlnCoordinateX/Y/Z`` in voxels of the tomogram ``shape_zyx`` at
    ``voxel_size_A``.

    - RELION 5 centred Å (``rlnCenteredCoordinateX/Y/ZAngst``), when present, win:
      ``x = centred / voxel_size_A + N / 2`` (:func:`axes.from_centered_angstrom`; RELION's
      centre, independent of binning).
    - Otherwise ``rlnCoordinateX/Y/Z`` at the pixel size of :func:`coordinate_pixel_size`
      (``coords_angpix``, the manifest's ``particles_angpix``, wins over the file) are
      scaled by ``pixel size / voxel_size_A``: unbinned picks (1.35 Å) for a bin-4 tomogram
      (5.4 Å) are divided by 4, RELION's and Warp's convention, which keeps the centred Å
      coordinates of a particle the same at every binning.
    - Without a pixel size they are taken as voxels of this tomogram (CONVENTIONS.md).

    ``rlnOriginX/Y/ZAngst`` shifts (refined particles) are applied (``position = coordinate
    - origin``) and set to 0. Angles and other columns are kept.

    Raises
    ------
    InputError
        (``strict``) Most particles land outside the tomogram while the coordinates' pixel
        size is unknown: they are not voxels of this tomogram and nothing says what they are.
        (Not ``strict``: a warning.)
    """
    out = df.copy()
    n = len(out)
    vs = float(voxel_size_A)
    has_cen = all(c in out.columns for c in CENTERED_COLUMNS)
    origin = (out[list(ORIGIN_COLUMNS)].to_numpy(np.float64)
              if all(c in out.columns for c in ORIGIN_COLUMNS) else np.zeros((n, 3)))
    px: np.ndarray | None = None
    if has_cen:
        cen = out[list(CENTERED_COLUMNS)].to_numpy(np.float64) - origin
        xyz = axes.from_centered_angstrom(cen, shape_zyx, vs)
        how = "RELION 5 centred Å"
        if n and all(c in out.columns for c in VOXEL_COLUMNS):
            vox, _ = _scaled_voxels(out, path, coords_angpix, origin, vs)
            off = np.abs(vox - xyz).max(axis=1)
            if (off > 1.0).any():
                log.warning("%s: rlnCoordinateX/Y/Z disagree with the centred Å coordinates by "
                            "up to %.1f voxels for %d of %d particles; using the centred Å "
                            "(binning-independent)", path, float(off.max()),
                            int((off > 1.0).sum()), n)
    else:
        xyz, (px, how) = _scaled_voxels(out, path, coords_angpix, origin, vs)
        how = (f"voxels at {sorted(set(np.round(px, 6).tolist()))[:3]} Å ({how})"
               if px is not None else "voxels of the tomogram (no pixel size given)")
    for i, c in enumerate(VOXEL_COLUMNS):
        out[c] = xyz[:, i]
    for c in ORIGIN_COLUMNS:
        if c in out.columns:
            out[c] = 0.0
    if n:
        hi = np.array(shape_zyx, dtype=np.float64)[::-1] - 0.5
        outside = ((xyz < -0.5) | (xyz > hi)).any(axis=1)
        k = int(outside.sum())
        if k > _OUTSIDE_SHARE * n:
            msg = (f"{k} of {n} particles lie outside the tomogram (z, y, x) "
                   f"{tuple(int(s) for s in shape_zyx)} at {vs:g} Å read as {how}")
            if strict and not has_cen and px is None:
                raise InputError(path, msg + ": the coordinates' pixel size is unknown; set "
                                       "particles_angpix in the manifest (Å, or a RELION "
                                       "tomograms.star), add a data_optics block with "
                                       "rlnTomoTiltSeriesPixelSize, or give RELION 5 "
                                       "rlnCenteredCoordinateX/Y/ZAngst")
            log.warning("%s: %s", path, msg)
    log.debug("%s: %d particles read as %s", path, n, how)
    return out


def _scaled_voxels(df: pd.DataFrame, path: str | os.PathLike, coords_angpix: float | None,
                   origin_A: np.ndarray, voxel_size_A: float
                   ) -> tuple[np.ndarray, tuple[np.ndarray | None, str]]:
    """``rlnCoordinateX/Y/Z`` less the origin shifts (Å), in voxels of ``voxel_size_A``
    (scaled by the coordinates' pixel size over it, when one is known), and that pixel size
    with its source (:func:`coordinate_pixel_size`)."""
    px, how = coordinate_pixel_size(df, path, coords_angpix)
    ratio = np.ones(len(df)) if px is None else px / voxel_size_A
    raw = df[list(VOXEL_COLUMNS)].to_numpy(np.float64)
    return (raw - origin_A / (voxel_size_A * ratio)[:, None]) * ratio[:, None], (px, how)


def tomograms_pixel_size(path: str | os.PathLike, name: str) -> float:
    """Pixel size (Å) of the particle coordinates of tomogram ``name`` from a RELION
    ``tomograms.star`` (``rlnTomoTiltSeriesPixelSize`` of its ``rlnTomoName`` row: RELION 4
    particle coordinates are tilt-series pixels). A file of one tomogram serves any name.

    Raises
    ------
    InputError
        Unreadable file, no such table or tomogram, or a pixel size that is not positive.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "tomograms STAR file not found")
    try:
        blocks = starfile.read(p, always_dict=True, parse_as_string=["rlnTomoName"])
    except Exception as exc:
        raise InputError(p, f"unreadable STAR file ({exc})") from exc
    table = next((t for t in blocks.values() if isinstance(t, pd.DataFrame)
                  and {"rlnTomoName", "rlnTomoTiltSeriesPixelSize"} <= set(t.columns)), None)
    if table is None:
        raise InputError(p, "no table with rlnTomoName and rlnTomoTiltSeriesPixelSize "
                            "(a RELION tomograms.star)")
    names = table["rlnTomoName"].astype(str)
    rows = table[names == str(name)]
    if not len(rows):
        if len(table) != 1:
            raise InputError(p, f"no tomogram {name!r} (rlnTomoName: "
                                f"{sorted(set(names))[:5]})")
        rows = table
    try:
        v = float(rows["rlnTomoTiltSeriesPixelSize"].iloc[0])
    except (TypeError, ValueError):
        v = float("nan")
    if not (np.isfinite(v) and v > 0):
        raise InputError(p, f"rlnTomoTiltSeriesPixelSize of {name!r} must be > 0 Å, got "
                            f"{rows['rlnTomoTiltSeriesPixelSize'].iloc[0]!r}")
    return v


def particles_zyx(df: pd.DataFrame) -> np.ndarray:
    """``(N, 3)`` float32 particle positions (z, y, x) in voxels (``rlnCoordinate``; a table
    with only centred Å goes through :func:`to_tomogram_voxels` first)."""
    if not all(c in df.columns for c in VOXEL_COLUMNS):
        raise ValueError("the table has no rlnCoordinateX/Y/Z (only RELION 5 centred Å): bring "
                         "it into a tomogram's voxels with star.to_tomogram_voxels")
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


def tomostar_name(tomo_name: str) -> str:
    """Warp's ``rlnMicrographName`` of a tomogram: ``<name>.tomostar``."""
    return f"{tomo_name}.tomostar"


def write_particles(path: str | os.PathLike, df: pd.DataFrame) -> None:
    """Write ``df`` as one data block ``particles``, atomically (temporary file + rename)."""
    write_star_blocks(path, {"particles": df})


def write_star_blocks(path: str | os.PathLike, blocks: Mapping[str, pd.DataFrame]) -> None:
    """Write named data blocks to one STAR file, atomically (temporary file + rename)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex}")
    try:
        starfile.write(dict(blocks), tmp, float_format="%.6f")
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
