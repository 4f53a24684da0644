"""OME-Zarr (OME-NGFF 0.4 on Zarr v2, 0.5 on Zarr v3) images as tomogram or segmentation input.

The cryoET data portal and copick store tomograms as multiscale OME-Zarr images (level paths
``"0"``, ``"1"``, ``"2"``; ome-zarr-py writes ``"s0"``, ...): level paths and voxel sizes are
always read from the ``multiscales`` metadata, never assumed. A level is read block by block
(:func:`read_slab`, the counterpart of :func:`membrain_dist.mrc.read_slab`), so a tomogram is
never converted to MRC nor held in memory whole. Arrays are indexed ``[z, y, x]`` (leading
axes, e.g. ``t`` and ``c``, must have length 1).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from .errors import InputError

__all__ = ["ZarrInfo", "is_ome_zarr", "read_info", "read_slab", "levels", "fingerprint",
           "write_image"]

log = logging.getLogger(__name__)

#: OME-NGFF space units -> Å
_UNIT_A = {"angstrom": 1.0, "nanometer": 10.0, "micrometer": 1e4, "picometer": 0.01}
_LEVEL_TOLERANCE = 0.01


@dataclass(frozen=True)
class ZarrInfo:
    """One level of an OME-Zarr image.

    Attributes
    ----------
    path
        The image group (folder).
    level
        Dataset path of the level read (from the metadata).
    shape_zyx
        Level shape (z, y, x), voxels.
    voxel_size_A
        Level voxel size (x scale) in Å.
    dtype
        Array dtype.
    lead
        Number of leading length-1 axes (``t``, ``c``) before z, y, x.
    version
        OME-NGFF version of the metadata (``"0.4"``, ``"0.5"``).
    """

    path: Path
    level: str
    shape_zyx: tuple[int, int, int]
    voxel_size_A: float | None
    dtype: np.dtype
    lead: int = 0
    version: str = ""


def is_ome_zarr(path: str | os.PathLike) -> bool:
    """A folder holding Zarr group metadata (``zarr.json`` or ``.zgroup`` / ``.zattrs``)."""
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in ("zarr.json", ".zgroup", ".zattrs"))


def _open_group(p: Path) -> zarr.Group:
    try:
        return zarr.open_group(LocalStore(p, read_only=True), mode="r")
    except Exception as exc:  # zarr raises several types for a folder that is no group
        raise InputError(p, f"not a readable Zarr group ({exc})") from exc


def _multiscale(p: Path, attrs: dict) -> tuple[dict, str]:
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else None
    ms = (ome or {}).get("multiscales") or attrs.get("multiscales")
    if not ms or not isinstance(ms, list):
        raise InputError(p, "a Zarr group without OME-NGFF multiscales metadata: expected an "
                            "OME-Zarr image (NGFF 0.4 or 0.5)")
    version = str((ome or {}).get("version") or ms[0].get("version") or "")
    return ms[0], version


def _scale(transforms: Any, n: int) -> np.ndarray:
    out = np.ones(n)
    for t in transforms or []:
        if isinstance(t, dict) and t.get("type") == "scale" and "scale" in t:
            out = out * np.asarray(t["scale"], dtype=np.float64)
    return out


def levels(path: str | os.PathLike) -> list[tuple[str, np.ndarray]]:
    """``(dataset path, (z, y, x) voxel size in Å)`` of every level, as the metadata lists
    them (finest first by convention).

    Raises
    ------
    InputError
        No multiscales metadata, axes that do not end in z, y, x, or an unknown unit.
    """
    p = Path(path)
    ms, _ = _multiscale(p, dict(_open_group(p).attrs))
    axes = ms.get("axes") or ["z", "y", "x"]
    names = [str(a["name"] if isinstance(a, dict) else a).lower() for a in axes]
    if names[-3:] != ["z", "y", "x"]:
        raise InputError(p, f"axes {names}: expected the last three to be z, y, x")
    units = [a.get("unit") if isinstance(a, dict) else None for a in axes][-3:]
    factor = []
    for u in units:
        if u is None:
            factor.append(1.0)
            continue
        if str(u).lower() not in _UNIT_A:
            raise InputError(p, f"axis unit {u!r} is not one of {sorted(_UNIT_A)}")
        factor.append(_UNIT_A[str(u).lower()])
    if any(u is None for u in units):
        log.warning("%s: spatial axes without a unit: their scale is read as Å", p)
    top = _scale(ms.get("coordinateTransformations"), len(names))
    out = []
    for d in ms.get("datasets") or []:
        s = _scale(d.get("coordinateTransformations"), len(names)) * top
        out.append((str(d["path"]), s[-3:] * np.asarray(factor)))
    if not out:
        raise InputError(p, "multiscales metadata lists no datasets")
    return out


def read_info(path: str | os.PathLike, voxel_size_A: float | None = None) -> ZarrInfo:
    """Open an OME-Zarr image and choose its level.

    Parameters
    ----------
    path
        The image group (the folder holding the ``multiscales`` metadata).
    voxel_size_A
        Choose the level of this voxel size (Å, 1 % tolerance); ``None``: the first level.

    Raises
    ------
    InputError
        Not an OME-Zarr image, no level of that voxel size (the levels are listed), a level
        array missing or not 3D after length-1 leading axes.
    """
    p = Path(path)
    if not is_ome_zarr(p):
        raise InputError(p, "not an OME-Zarr image folder (no zarr.json / .zattrs)")
    g = _open_group(p)
    _, version = _multiscale(p, dict(g.attrs))
    lv = levels(p)
    if voxel_size_A is None:
        level, scale = lv[0]
    else:
        match = [(k, s) for k, s in lv if abs(s[-1] - voxel_size_A) <= _LEVEL_TOLERANCE * voxel_size_A]
        if not match:
            listed = ", ".join(f"{k!r} ({s[-1]:g} Å)" for k, s in lv)
            raise InputError(p, f"no level of voxel size {voxel_size_A:g} Å; levels: {listed}")
        level, scale = match[0]
    try:
        arr = g[level]
    except KeyError:
        raise InputError(p, f"level {level!r} named in the multiscales metadata is missing") from None
    if not isinstance(arr, zarr.Array):
        raise InputError(p, f"level {level!r} is not an array")
    lead = arr.ndim - 3
    if lead < 0 or any(int(s) != 1 for s in arr.shape[:lead]):
        raise InputError(p, f"level {level!r} has shape {arr.shape}: expected (z, y, x) after "
                            "length-1 leading axes")
    vz, vy, vx = (float(v) for v in scale)
    voxel = vx if np.isfinite(vx) and vx > 0 else None
    if voxel is not None and not np.allclose([vy, vz], vx, rtol=1e-4):
        log.warning("%s: anisotropic voxel size (x, y, z) = (%g, %g, %g) Å; using x", p, vx, vy, vz)
    return ZarrInfo(path=p, level=level, shape_zyx=tuple(int(s) for s in arr.shape[lead:]),  # type: ignore[arg-type]
                    voxel_size_A=voxel, dtype=np.dtype(arr.dtype), lead=lead, version=version)


def read_slab(info: ZarrInfo, z0: int, z1: int, y0: int = 0, y1: int | None = None) -> np.ndarray:
    """Sections ``z0:z1``, rows ``y0:y1``, all columns of the chosen level, as a new array
    (only the chunks they touch are read and decompressed)."""
    _, ny, _ = info.shape_zyx
    y1 = ny if y1 is None else y1
    if not (0 <= z0 <= z1 <= info.shape_zyx[0] and 0 <= y0 <= y1 <= ny):
        raise IndexError(f"slab z {z0}:{z1}, y {y0}:{y1} outside shape {info.shape_zyx}")
    arr = zarr.open_array(LocalStore(info.path, read_only=True), path=info.level, mode="r")
    return np.asarray(arr[(0,) * info.lead + (slice(z0, z1), slice(y0, y1), slice(None))])


def fingerprint(info: ZarrInfo) -> dict[str, Any]:
    """Cheap identity of a level: path, level, total bytes and newest mtime of its files, and
    the sha256 of the image's and the level's metadata."""
    h = hashlib.sha256(info.level.encode())
    for meta in ("zarr.json", ".zattrs", ".zgroup"):
        f = info.path / meta
        if f.is_file():
            h.update(f.read_bytes())
    size, mtime = 0, 0
    level_dir = info.path.joinpath(*info.level.split("/"))
    for root, _, files in os.walk(level_dir):
        for name in files:
            st = os.stat(os.path.join(root, name))
            size += int(st.st_size)
            mtime = max(mtime, int(st.st_mtime_ns))
            if name in ("zarr.json", ".zarray", ".zattrs"):
                h.update(Path(root, name).read_bytes())
    return {"path": str(info.path.resolve()), "level": info.level, "size": size,
            "mtime_ns": mtime, "sha256": h.hexdigest()}


def write_image(path: str | os.PathLike, data: np.ndarray, voxel_size_A: float,
                n_levels: int = 1, version: str = "0.4", chunks: int = 64) -> Path:
    """Write an in-memory ``(z, y, x)`` volume as an OME-Zarr image, the way the cryoET data
    portal and copick do (NGFF 0.4 on Zarr v2 with ``/`` chunk keys, levels ``"0"``,
    ``"1"``, ... each binned 2x on z, y and x by striding; ``version="0.5"``: Zarr v3).
    For small volumes (tests, copick projects made here); not streamed."""
    p = Path(path)
    fmt = 2 if version == "0.4" else 3
    g = zarr.open_group(LocalStore(p), mode="w", zarr_format=fmt)
    datasets = []
    for i in range(n_levels):
        f = 2 ** i
        level = np.ascontiguousarray(np.asarray(data)[::f, ::f, ::f])
        kw: dict[str, Any] = ({"chunk_key_encoding": {"name": "v2", "separator": "/"}}
                              if fmt == 2 else {"dimension_names": ("z", "y", "x")})
        g.create_array(str(i), data=level, chunks=(min(chunks, max(level.shape)),) * 3, **kw)
        datasets.append({"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": [float(voxel_size_A) * f] * 3}]})
    ms = {"name": p.stem, "axes": [{"name": a, "type": "space", "unit": "angstrom"} for a in "zyx"],
          "datasets": datasets}
    if fmt == 2:
        g.attrs["multiscales"] = [{"version": "0.4", **ms}]
    else:
        g.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    return p
