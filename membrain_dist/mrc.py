"""MRC files: header validation, lazy (memory-mapped) reading, atomic writing.

Arrays are indexed ``[z, y, x]``: x is the MRC column (fastest) axis, z the section axis.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
from mrcfile.utils import data_dtype_from_header, data_shape_from_header

from .errors import InputError

__all__ = ["MrcInfo", "read_info", "open_volume", "read_slab", "write_volume"]

log = logging.getLogger(__name__)

_HEADER_BYTES = 1024
_IMOD_STAMP = 1146047817  # "IMOD"; imodFlags bit 0 set -> mode-0 bytes are signed


@dataclass(frozen=True)
class MrcInfo:
    """What the header of a 3D MRC file says.

    Attributes
    ----------
    path
        The file.
    shape_zyx
        Volume shape (z, y, x) in voxels.
    voxel_size_A
        Voxel size in Å from the header (x spacing), ``None`` when the header says 0.
    dtype
        dtype of :func:`open_volume`'s array (mode 0 without the signed flag: uint8).
    data_offset
        Byte offset of the data block (1024 + extended header).
    """

    path: Path
    shape_zyx: tuple[int, int, int]
    voxel_size_A: float | None
    dtype: np.dtype
    data_offset: int = _HEADER_BYTES


def _bytes_are_unsigned(header: np.recarray) -> bool:
    """Mode 0 stored as unsigned bytes (files older than MRC2014 without IMOD's signed flag)."""
    if int(header.mode) != 0:
        return False
    if int(header.nversion) >= 20140:
        return False  # MRC2014: mode 0 is signed int8
    # IMOD's imodStamp / imodFlags live at bytes 152 / 156, i.e. 40 / 44 into ``extra2``
    extra = bytes(np.asarray(header.extra2).tobytes())
    i4 = np.dtype(np.int32).newbyteorder(header.mode.dtype.byteorder)
    stamp, flags = np.frombuffer(extra[40:48], dtype=i4)
    return not (int(stamp) == _IMOD_STAMP and int(flags) & 1)


def read_info(path: str | os.PathLike) -> MrcInfo:
    """Read and validate an MRC header without reading the data.

    Raises
    ------
    InputError
        The file is missing or unreadable, not a 3D volume, or shorter than its header
        says (truncated).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "file not found")
    size = p.stat().st_size
    if size < _HEADER_BYTES:
        raise InputError(p, f"not an MRC file: {size} bytes, shorter than the 1024-byte header")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with mrcfile.open(p, mode="r", permissive=True, header_only=True) as mrc:
                header = mrc.header.copy()
                vs = mrc.voxel_size.copy()
        dtype = np.dtype(data_dtype_from_header(header))
        shape = tuple(int(s) for s in data_shape_from_header(header))
    except Exception as exc:  # mrcfile raises several types for garbage headers
        raise InputError(p, f"unreadable MRC header ({exc})") from exc
    for w in caught:
        log.warning("%s: %s", p, w.message)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(p, f"not a 3D volume: data shape {shape}")
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if min(nx, ny, nz) < 2:
        raise InputError(p, f"not a 3D volume: nx, ny, nz = {nx}, {ny}, {nz}")
    offset = _HEADER_BYTES + int(header.nsymbt)
    expected = offset + nx * ny * nz * dtype.itemsize
    if size < expected:
        raise InputError(
            p, f"truncated: {size} bytes on disk, header (shape z,y,x = {nz},{ny},{nx}, "
            f"{dtype}) needs {expected}"
        )
    if _bytes_are_unsigned(header):
        dtype = np.dtype(np.uint8)
    vx, vy, vzz = float(vs.x), float(vs.y), float(vs.z)
    if not np.isfinite(vx) or vx <= 0:
        voxel: float | None = None
    else:
        voxel = vx
        if not np.allclose([vy, vzz], vx, rtol=1e-4):
            log.warning("%s: anisotropic voxel size (x, y, z) = (%g, %g, %g) Å; using x",
                        p, vx, vy, vzz)
    return MrcInfo(path=p, shape_zyx=(nz, ny, nx), voxel_size_A=voxel, dtype=dtype,
                   data_offset=offset)


def open_volume(path: str | os.PathLike) -> np.ndarray:
    """Read-only memory map of the volume, indexed ``[z, y, x]``; nothing is loaded.

    Mode 0 (8-bit) files written before MRC2014 without IMOD's "signed bytes" flag hold
    unsigned bytes that mrcfile would read as signed int8; they are returned as uint8.
    The header is read permissively (old files lack the ``MAP`` stamp); see
    :func:`read_info` for the checks applied.
    """
    info = read_info(path)
    return np.memmap(info.path, dtype=info.dtype, mode="r", offset=info.data_offset,
                     shape=info.shape_zyx)


def read_slab(info: MrcInfo, z0: int, z1: int, y0: int = 0, y1: int | None = None) -> np.ndarray:
    """Read sections ``z0:z1``, rows ``y0:y1`` (all columns) into a new array.

    Each section's rows are one contiguous byte range, read with ``readinto`` straight into
    the output. Unlike slicing :func:`open_volume`'s memory map, this leaves no file pages
    mapped into the process (mapped pages, and the kernel's read-around, count toward its
    resident set), so streaming a larger-than-memory volume stays bounded.

    Returns
    -------
    np.ndarray
        ``(z1 - z0, y1 - y0, nx)`` in native byte order; dtype ``info.dtype`` (uint8 for
        old unsigned mode-0 files, see :func:`open_volume`).
    """
    _, ny, nx = info.shape_zyx
    y1 = ny if y1 is None else y1
    if not (0 <= z0 <= z1 <= info.shape_zyx[0] and 0 <= y0 <= y1 <= ny):
        raise IndexError(f"slab z {z0}:{z1}, y {y0}:{y1} outside shape {info.shape_zyx}")
    item = info.dtype.itemsize
    plane, row = ny * nx * item, nx * item
    out = np.empty((z1 - z0, y1 - y0, nx), dtype=info.dtype)
    with open(info.path, "rb", buffering=0) as fh:
        for k in range(z1 - z0):
            fh.seek(info.data_offset + (z0 + k) * plane + y0 * row)
            buf = memoryview(out[k]).cast("B")
            got = fh.readinto(buf)
            if got != len(buf):
                raise InputError(info.path, f"truncated: short read at section {z0 + k}")
    if not info.dtype.isnative:
        out = out.byteswap().view(info.dtype.newbyteorder("="))
    return out


def _storable(data: np.ndarray) -> np.ndarray:
    """Cast to a dtype mrcfile can write (int8/int16/uint16/float32/complex64...)."""
    a = np.asarray(data)
    if a.dtype == np.bool_:
        return a.astype(np.int8)
    if a.dtype in (np.int8, np.int16, np.uint16, np.uint8, np.float32, np.float16):
        return a
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if -(2**15) <= lo and hi < 2**15:
            return a.astype(np.int16)
        log.warning("integer data out of int16 range: writing float32")
    return a.astype(np.float32)


def write_volume(path: str | os.PathLike, data: np.ndarray, voxel_size_A: float) -> None:
    """Write a 3D ``(z, y, x)`` volume atomically (temporary file in the same folder,
    then ``os.replace``).

    bool is written as int8, wider integers as int16 when they fit (else float32),
    float64 as float32. ``voxel_size_A`` (Å) goes into the header.
    """
    p = Path(path)
    a = _storable(data)
    if a.ndim != 3:
        raise ValueError(f"write_volume expects a 3D (z, y, x) array, got shape {a.shape}")
    tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex}")
    try:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(a)
            mrc.voxel_size = float(voxel_size_A)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
