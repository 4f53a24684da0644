"""MRC (or OME-Zarr) -> Zarr ingest with bounded memory.

The tomogram and segmentation are streamed block by block (``slab`` sections in z,
``chunk`` rows in y, all columns in x; blocks align with the Zarr chunks), so a volume
larger than memory converts. Each block is read with :func:`membrain_dist.mrc.read_slab`
(positioned reads into a fresh array: no file pages stay mapped, which would count toward
the resident set) or, for an OME-Zarr image (cryoET data portal, copick), with
:func:`membrain_dist.omezarr.read_slab` from the level of the manifest's voxel size; peak
memory is a few blocks plus Zarr's encode buffers.

Membrane labels: a binary segmentation is split into 26-connected components (default;
``ConvertConfig.connectivity=6`` for face connectivity). Each block is labelled with
``scipy.ndimage.label``; labels touching across block faces are merged with a union-find
(``scipy.sparse.csgraph.connected_components`` on the pairs found on the two-voxel-thick
faces, read back from the provisional label array) and a second streaming pass writes the
final labels ``1..K`` (ordered by first appearance in z, y, x raster order of blocks).
A segmentation holding several non-zero values keeps them as labels. Components (or
labels) with fewer than ``min_membrane_voxels`` voxels are dropped (logged).

The per-block passes (copy + provisional labels, final labels, each pyramid level) are pure
functions of their block, mapped by a :data:`BlockMap`: ``serial_map`` here, or a dask map
over a cluster's CPU workers (``flows.fanout``) for a tomogram of at least
``fan_out_min_voxels``, so one large tomogram converts on many workers. Blocks write whole
Zarr chunks only (blocks align with chunks), so they never race; the results (block
statistics, label counts) come back small and in block order, and the stored arrays are the
same whichever map ran them. Provisional labels are block-local in the store (``1..n`` per
block); a block's offset (the labels of the blocks before it, in raster order) makes them
campaign-unique where the faces are merged and in the final pass.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from . import mrc, omezarr, store
from .errors import InputError
from .manifest import TomogramEntry
from .mrc import MrcInfo
from .omezarr import ZarrInfo
from .store import TomogramMeta

#: what a tomogram or segmentation header says (an MRC file or one level of an OME-Zarr image)
VolumeInfo = MrcInfo | ZarrInfo

__all__ = [
    "BlockMap",
    "serial_map",
    "FAN_OUT_MIN_VOXELS",
    "ConvertConfig",
    "validate_entry",
    "resolve_voxel_size",
    "source_fingerprint",
    "convert_tomogram",
]

log = logging.getLogger(__name__)

_FINGERPRINT_BYTES = 1024 + 1024 * 1024  # header + first MiB
_MAX_LABEL_VALUES = 65536

_T = TypeVar("_T")
#: ``map(fn, items) -> [fn(item) for item in items]``, in order; ``fn`` and the items pickle
BlockMap = Callable[[Callable[[Any], _T], Sequence[Any]], list[_T]]


def serial_map(fn: Callable[[Any], _T], items: Sequence[Any]) -> list[_T]:
    """The :data:`BlockMap` of one process: each block in turn."""
    return [fn(item) for item in items]


#: a tomogram of at least this many voxels (256 MiB of float32) is converted by the given
#: ``fan_out`` map; a smaller one in its own task (campaigns convert tomograms side by side)
FAN_OUT_MIN_VOXELS = 2**26


@dataclass(frozen=True)
class ConvertConfig:
    """Ingest settings.

    Attributes
    ----------
    chunk
        Zarr chunk edge (voxels), chunks are ``chunk**3``.
    compression_level
        Blosc level (:func:`membrain_dist.store.default_compressor`: lz4, bit shuffle).
    slab
        z-slab thickness for streaming (sections); ``None`` = ``chunk``; rounded up to a
        multiple of ``chunk``.
    min_membrane_voxels
        Components (labels) with fewer voxels are dropped.
    pyramid_min
        Viewing pyramid: levels ``1``, ``2``, ... each binned 2x on z, y and x (mean for the
        tomogram, every second voxel for the labels) are added while the last level's largest
        axis exceeds this many voxels (0: no pyramid).
    connectivity
        26 (faces, edges and corners) or 6 (faces) for connected components.
    intensity_samples
        Approximate number of voxels in the strided subsample used for the intensity
        statistics.
    """

    chunk: int = 128
    compression_level: int = 3
    slab: int | None = None
    min_membrane_voxels: int = 100
    connectivity: int = 26
    intensity_samples: int = 1_000_000
    pyramid_min: int = 64

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")
        if self.connectivity not in (6, 26):
            raise ValueError(f"connectivity must be 6 or 26, got {self.connectivity}")
        if self.slab is not None and self.slab < 1:
            raise ValueError(f"slab must be >= 1, got {self.slab}")

    @property
    def slab_z(self) -> int:
        """Effective z-slab thickness: a multiple of ``chunk``."""
        s = self.chunk if self.slab is None else self.slab
        return max(1, math.ceil(s / self.chunk)) * self.chunk


def read_info(path: str | os.PathLike, voxel_size_A: float | None = None) -> VolumeInfo:
    """Header of an MRC file, or of the level of an OME-Zarr image whose voxel size is
    ``voxel_size_A`` (Å; ``None``: its first level)."""
    if omezarr.is_ome_zarr(path):
        return omezarr.read_info(path, voxel_size_A)
    return mrc.read_info(path)


def read_slab(info: VolumeInfo, z0: int, z1: int, y0: int = 0, y1: int | None = None) -> np.ndarray:
    """Sections ``z0:z1``, rows ``y0:y1``, all columns (see the format's ``read_slab``)."""
    if isinstance(info, ZarrInfo):
        return omezarr.read_slab(info, z0, z1, y0, y1)
    return mrc.read_slab(info, z0, z1, y0, y1)


def resolve_voxel_size(entry: TomogramEntry, tinfo: VolumeInfo, sinfo: VolumeInfo) -> float:
    """Voxel size (Å): the manifest's if given, else the tomogram header's.

    Raises
    ------
    InputError
        No manifest value and the tomogram header says 0; or, with no manifest value,
        tomogram and segmentation headers disagree (both non-zero, > 0.1 % apart). With a
        manifest value a header disagreement is only logged (the manifest overrides).
    """
    t, s = tinfo.voxel_size_A, sinfo.voxel_size_A
    disagree = t is not None and s is not None and not math.isclose(t, s, rel_tol=1e-3)
    if entry.voxel_size_A is not None:
        if disagree:
            log.warning("%s: header voxel sizes differ (tomogram %g Å, segmentation %g Å); "
                        "using the manifest's %g Å", entry.name, t, s, entry.voxel_size_A)
        return float(entry.voxel_size_A)
    if t is None:
        raise InputError(tinfo.path, "voxel size missing: header says 0 and the manifest "
                                     "gives no voxel_size_A")
    if disagree:
        raise InputError(sinfo.path, f"voxel size {s:g} Å disagrees with the tomogram's "
                                     f"{t:g} Å ({tinfo.path}); fix the header or set "
                                     "voxel_size_A in the manifest")
    return float(t)


def is_blank(lo: float, hi: float) -> bool:
    """A tomogram whose values span ``[lo, hi]`` carries no contrast: constant, or varying
    only in the last digits float32 holds (a blank volume rescaled or resampled)."""
    return not hi - lo > 1e-5 * max(abs(lo), abs(hi), 1e-30)


def validate_entry(entry: TomogramEntry) -> tuple[VolumeInfo, VolumeInfo]:
    """Header-only checks of a manifest row.

    Both files readable, 3D, not truncated, of the same shape; a usable voxel size
    (see :func:`resolve_voxel_size`). An OME-Zarr tomogram is read at the level of the
    manifest's voxel size (its first level without one); an OME-Zarr segmentation at the
    level of the tomogram's voxel size.

    Returns
    -------
    tuple[VolumeInfo, VolumeInfo]
        Tomogram and segmentation header info (header voxel sizes, not overridden).
    """
    tinfo = read_info(entry.tomogram, entry.voxel_size_A)
    sinfo = read_info(entry.segmentation, entry.voxel_size_A or tinfo.voxel_size_A)
    if tinfo.shape_zyx != sinfo.shape_zyx:
        raise InputError(sinfo.path, f"shape (z, y, x) {sinfo.shape_zyx} differs from the "
                                     f"tomogram's {tinfo.shape_zyx} ({tinfo.path})")
    resolve_voxel_size(entry, tinfo, sinfo)
    return tinfo, sinfo


def _fingerprint(info: VolumeInfo) -> dict[str, Any]:
    if isinstance(info, ZarrInfo):
        return omezarr.fingerprint(info)
    return source_fingerprint(info.path)


def source_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Cheap identity of an input file: path, size, mtime (ns), sha256 of header + first MiB."""
    p = Path(path).resolve()
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        h.update(fh.read(_FINGERPRINT_BYTES))
    return {"path": str(p), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns),
            "sha256": h.hexdigest()}


def _blocks(shape: tuple[int, int, int], slab: int, rows: int):
    nz, ny, _ = shape
    for z0 in range(0, nz, slab):
        for y0 in range(0, ny, rows):
            yield z0, min(z0 + slab, nz), y0, min(y0 + rows, ny)


def _shift_slices(length: int, d: int) -> tuple[slice, slice]:
    """Index windows pairing ``a[i]`` with ``b[i + d]``."""
    return slice(max(0, -d), length - max(0, d)), slice(max(0, d), length - max(0, -d))


def _face_pairs(a: np.ndarray, b: np.ndarray, full: bool) -> np.ndarray:
    """Label pairs ``(la, lb)`` of voxels adjacent across a face.

    ``a`` and ``b`` are the 2D label planes on either side; with ``full`` (26-connectivity)
    in-plane offsets -1..1 are included, else only the facing voxel (6-connectivity).
    """
    offs = [(du, dv) for du in (-1, 0, 1) for dv in (-1, 0, 1)] if full else [(0, 0)]
    out = []
    for du, dv in offs:
        ua, ub = _shift_slices(a.shape[0], du)
        va, vb = _shift_slices(a.shape[1], dv)
        pa, pb = a[ua, va], b[ub, vb]
        m = (pa > 0) & (pb > 0)
        if m.any():
            out.append(np.unique(np.stack([pa[m], pb[m]], axis=1), axis=0))
    if not out:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(out), axis=0).astype(np.int64)


def _ome_multiscales(name: str, vs: float, n_levels: int = 1, mean: bool = True) -> list[dict]:
    """NGFF multiscales of levels ``0..n_levels-1`` binned 2**k on z, y, x. A mean-binned
    voxel i of level k covers level-0 voxels ``2**k i .. 2**k (i + 1) - 1``: its centre lies
    ``(2**k - 1) / 2`` level-0 voxels further (the translation); a strided (label) level
    keeps voxel ``2**k i`` and needs none."""
    datasets = []
    for k in range(n_levels):
        f = 2 ** k
        ct: list[dict] = [{"type": "scale", "scale": [vs * f] * 3}]
        if mean and k:
            ct.append({"type": "translation", "translation": [vs * (f - 1) / 2] * 3})
        datasets.append({"path": str(k), "coordinateTransformations": ct})
    return [{
        "name": name,
        "axes": [{"name": a, "type": "space", "unit": "angstrom"} for a in "zyx"],
        "datasets": datasets,
    }]


def pyramid_shapes(shape: tuple[int, int, int], min_size: int) -> list[tuple[int, int, int]]:
    """Shapes of the levels below level 0: each the previous one halved (floor) on z, y and
    x, while the previous level's largest axis exceeds ``min_size`` and every axis keeps at
    least one voxel."""
    out: list[tuple[int, int, int]] = []
    cur = tuple(int(s) for s in shape)
    while min_size > 0 and max(cur) > min_size and min(cur) >= 2:
        cur = tuple(s // 2 for s in cur)
        out.append(cur)  # type: ignore[arg-type]
    return out  # type: ignore[return-value]


def bin2_mean(block: np.ndarray) -> np.ndarray:
    """float32 mean of each 2x2x2 voxel block of ``block`` (even shape), summed in float64
    axis by axis (contiguous slices: ~3x faster than a mean over a 6-D reshape)."""
    s = block[0::2].astype(np.float64)
    s += block[1::2]
    s = s[:, 0::2] + s[:, 1::2]
    s = s[:, :, 0::2] + s[:, :, 1::2]
    s *= 0.125
    return s.astype(np.float32)


@dataclass(frozen=True)
class _LevelJob:
    """One z x y block (all x) of pyramid level ``k`` from level ``k - 1`` (keys of the group
    at ``root``): ``step`` output voxels per axis, whole chunks of the level."""

    root: str
    src_t: str
    dst_t: str
    src_l: str
    dst_l: str
    z0: int
    y0: int
    step: int


def _level_block(job: _LevelJob) -> None:
    """Write one block of a pyramid level: the mean of each 2x2x2 tomogram block, the first
    voxel of each 2x2x2 label block."""
    src_t, dst_t, src_l, dst_l = (store.writable_array(job.root, k)
                                  for k in (job.src_t, job.dst_t, job.src_l, job.dst_l))
    nz, ny, nx = dst_t.shape
    z0, y0, step = job.z0, job.y0, job.step
    z1, y1 = min(z0 + step, nz), min(y0 + step, ny)
    for x0 in range(0, nx, step):
        x1 = min(x0 + step, nx)
        dst_t[z0:z1, y0:y1, x0:x1] = bin2_mean(
            np.asarray(src_t[2 * z0:2 * z1, 2 * y0:2 * y1, 2 * x0:2 * x1]))
        dst_l[z0:z1, y0:y1, x0:x1] = src_l[2 * z0:2 * z1:2, 2 * y0:2 * y1:2, 2 * x0:2 * x1:2]


def _omero(name: str, center: float, scale: float, lo: float, hi: float, nz: int) -> dict:
    """OMERO rendering settings: the contrast window ``center -+ 3 robust std`` (within the
    data range), greyscale, the middle section."""
    start, end = max(lo, center - 3 * scale), min(hi, center + 3 * scale)
    return {"channels": [{"label": name, "color": "FFFFFF", "active": True, "coefficient": 1.0,
                          "family": "linear", "inverted": False,
                          "window": {"start": start, "end": end, "min": lo, "max": hi}}],
            "rdefs": {"model": "greyscale", "defaultZ": int(nz // 2)}}


def _check_segmentation_block(sinfo: VolumeInfo, blk: np.ndarray, z0: int) -> None:
    if np.issubdtype(blk.dtype, np.floating):
        if not np.isfinite(blk).all():
            raise InputError(sinfo.path, f"NaN or infinite values in the segmentation "
                                         f"(sections from z={z0})")
        if not np.array_equal(blk, np.round(blk)):
            raise InputError(sinfo.path, "segmentation holds non-integer values: expected a "
                                         "binary mask or integer labels (threshold it first)")


#: |membrane mean - median| / MAD below this: the membranes' contrast sign is a guess
POLARITY_MARGIN = 0.1


def decide_polarity(membrane_mean: float, center: float, scale: float, forced: int | None,
                    name: str) -> dict:
    """The sign that makes membranes bright (``polarity``), how sure it is, and whence.

    ``polarity_margin`` = (membrane mean - tomogram median) / robust std, signed: about -0.3 to
    -1 for raw cryo-ET (dense matter dark); near 0 the contrast is ambiguous (a segmentation
    off the membranes, a denoised and re-normalised volume, a tiny membrane) and a warning says
    so. ``forced`` (the manifest's ``polarity`` column: +1 bright, -1 dark membranes) wins."""
    margin = (membrane_mean - center) / scale
    measured = 1 if margin >= 0 else -1
    if forced is None and abs(margin) < POLARITY_MARGIN:
        log.warning("%s: membrane contrast is ambiguous (membrane mean %.3f robust std from the "
                    "median): polarity %+d is a guess; set the manifest's polarity column "
                    "(dark or bright membranes)", name, margin, measured)
    elif forced is not None and forced != measured and abs(margin) >= POLARITY_MARGIN:
        log.warning("%s: the manifest says %s membranes, the data look %s (margin %.2f)", name,
                    "bright" if forced > 0 else "dark", "bright" if measured > 0 else "dark",
                    margin)
    return {"polarity": int(forced if forced is not None else measured),
            "polarity_margin": round(float(margin), 4),
            "polarity_from": "manifest" if forced is not None else "data"}


@dataclass(frozen=True)
class _Pass1Job:
    """One block of pass 1: sections ``z0:z1``, rows ``y0:y1``, all columns."""

    root: str
    tomo_key: str
    labels_key: str
    tinfo: VolumeInfo
    sinfo: VolumeInfo
    z0: int
    z1: int
    y0: int
    y1: int
    stride: int
    full: bool


@dataclass(frozen=True)
class _Pass1:
    """What pass 1 learnt of a block (small): data range, the strided intensity sample,
    the segmentation's non-zero values (sorted; at most ``_MAX_LABEL_VALUES + 1``) with their
    voxel counts and bboxes, membrane intensity sum and count, and per block-local label its
    voxel count and bbox. Bboxes are ``(z0, z1, y0, y1, x0, x1)``, tomogram voxels."""

    lo: float
    hi: float
    sample: np.ndarray
    values: np.ndarray
    value_counts: np.ndarray
    value_bboxes: np.ndarray
    mem_sum: float
    mem_n: int
    counts: np.ndarray
    bboxes: np.ndarray


def _pass1_block(job: _Pass1Job) -> _Pass1:
    """Copy a tomogram block to the store (NaN check, range, intensity sample) and write its
    segmentation's connected components as block-local labels ``1..n``."""
    z0, z1, y0, y1 = job.z0, job.z1, job.y0, job.y1
    t = read_slab(job.tinfo, z0, z1, y0, y1).astype(np.float32, copy=False)
    finite = np.isfinite(t)
    if not finite.all():
        bad = np.argwhere(~finite)[0] + (z0, y0, 0)
        kind = "NaN" if np.isnan(t).any() else "infinite"
        raise InputError(job.tinfo.path, f"{kind} values in the tomogram (first at "
                                         f"z, y, x = {tuple(int(v) for v in bad)})")
    del finite
    lo, hi = (float(t.min()), float(t.max())) if t.size else (math.inf, -math.inf)
    store.writable_array(job.root, job.tomo_key)[z0:z1, y0:y1, :] = t
    st = job.stride
    sample = t[(-z0) % st::st, (-y0) % st::st, ::st].ravel()

    s = read_slab(job.sinfo, z0, z1, y0, y1)
    _check_segmentation_block(job.sinfo, s, z0)
    mask = s != 0
    values, value_counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
    mem_sum, mem_n = 0.0, 0
    if mask.any():
        values, value_counts = np.unique(s[mask].astype(np.int64), return_counts=True)
        mem_sum, mem_n = float(t[mask].sum(dtype=np.float64)), int(mask.sum())
    del t
    structure = ndimage.generate_binary_structure(3, 3 if job.full else 1)
    lab, n = ndimage.label(mask, structure=structure, output=np.int32)
    counts, bboxes = np.zeros(0, np.int64), np.zeros((0, 6), np.int64)
    if n:
        # bincount casts to intp: count the membrane voxels only, not the block
        counts = np.bincount(lab[mask], minlength=n + 1)[1:].astype(np.int64)
        bboxes = _bboxes(ndimage.find_objects(lab), z0, y0)
    if len(values) > _MAX_LABEL_VALUES:  # refused by the caller: no statistics needed
        value_bboxes = np.zeros((0, 6), np.int64)
        values, value_counts = values[:_MAX_LABEL_VALUES + 1], value_counts[:0]
    elif len(values) > 1:
        value_bboxes = _bboxes(ndimage.find_objects(_value_index(s, values)), z0, y0)
    else:  # one value (or none): the union of its components' boxes
        value_bboxes = np.zeros((len(values), 6), np.int64)
        if len(values):
            value_bboxes[0, 0::2] = bboxes[:, 0::2].min(axis=0)
            value_bboxes[0, 1::2] = bboxes[:, 1::2].max(axis=0)
    del s
    store.writable_array(job.root, job.labels_key)[z0:z1, y0:y1, :] = lab
    return _Pass1(lo, hi, sample, values, value_counts, value_bboxes, mem_sum, mem_n, counts,
                  bboxes)


def _bboxes(objects: list, z0: int, y0: int) -> np.ndarray:
    """``(n, 6)`` int64 tomogram bboxes ``(z0, z1, y0, y1, x0, x1)`` of ``find_objects``' slices
    in a block that starts at section ``z0``, row ``y0`` (every object present)."""
    return np.array([[o[0].start + z0, o[0].stop + z0, o[1].start + y0, o[1].stop + y0,
                      o[2].start, o[2].stop] for o in objects], dtype=np.int64).reshape(-1, 6)


@dataclass(frozen=True)
class _Pass2Job:
    """One block of pass 2: its final labels, ``lut[block-local label]``, or (an already
    labelled segmentation) ``lut[index of the segmentation's value in values]``."""

    root: str
    labels_key: str
    z0: int
    z1: int
    y0: int
    y1: int
    lut: np.ndarray
    sinfo: VolumeInfo | None = None
    values: np.ndarray | None = None


def _pass2_block(job: _Pass2Job) -> None:
    larr = store.writable_array(job.root, job.labels_key)
    box = (slice(job.z0, job.z1), slice(job.y0, job.y1), slice(None))
    if job.sinfo is not None:
        idx = _value_index(read_slab(job.sinfo, job.z0, job.z1, job.y0, job.y1), job.values)
    else:
        idx = larr[box]
    larr[box] = job.lut[idx]


def convert_tomogram(
    entry: TomogramEntry, root: str | os.PathLike, cfg: ConvertConfig = ConvertConfig(),
    fan_out: BlockMap | None = None, fan_out_min_voxels: int = FAN_OUT_MIN_VOXELS,
) -> TomogramMeta:
    """Convert one manifest row into the store group ``<root>/<entry.name>``.

    Writes the float32 tomogram at ``<name>/0`` and int32 labels at
    ``<name>/labels/membranes/0`` (chunks ``cfg.chunk**3``, Blosc/lz4), with
    :class:`~membrain_dist.store.TomogramMeta`, provenance and OME-NGFF 0.5 attributes.
    Skips (returns the stored meta) when a complete group with the same source fingerprint
    and config exists. Everything is built in a temporary group renamed into place at the
    end, so a failure leaves nothing behind (and an older finished group intact).
    A tomogram of at least ``fan_out_min_voxels`` voxels maps its blocks with ``fan_out``
    (e.g. over a dask cluster's workers) when given; the arrays written are the same.

    Raises
    ------
    InputError
        Bad headers or shapes, missing voxel size, NaNs in the tomogram, empty segmentation.
    """
    tinfo, sinfo = validate_entry(entry)
    vs = resolve_voxel_size(entry, tinfo, sinfo)
    source = {"tomogram": _fingerprint(tinfo), "segmentation": _fingerprint(sinfo)}
    forced = {"polarity": entry.polarity} if entry.polarity is not None else {}
    prov = store.provenance("convert", asdict(cfg), {**source, "voxel_size_A": vs, **forced})
    existing = store._group(root, entry.name)
    if existing is not None:
        attrs = dict(existing.attrs)
        if attrs.get("complete") and store.is_current(attrs, prov):
            log.info("%s: skipped (converted, sources and config unchanged)", entry.name)
            return TomogramMeta.from_attrs(entry.name, attrs)
        log.info("%s: sources or config changed, reconverting", entry.name)

    shape = tinfo.shape_zyx
    nz, ny, nx = shape
    c = cfg.chunk
    chunks = (min(c, nz), min(c, ny), min(c, nx))
    slab, rows = cfg.slab_z, c
    comp = store.default_compressor(cfg.compression_level)
    full = cfg.connectivity == 26
    stride = max(1, math.ceil((nz * ny * nx / max(cfg.intensity_samples, 1)) ** (1 / 3)))
    block_map: BlockMap = (fan_out if fan_out is not None and nz * ny * nx >= fan_out_min_voxels
                           else serial_map)
    blocks = list(_blocks(shape, slab, rows))

    with store.atomic_group(root, entry.name) as g:
        tarr = g.create_array(store.TOMOGRAM_KEY, shape=shape, dtype="float32", chunks=chunks,
                              compressors=comp, fill_value=0.0, dimension_names=("z", "y", "x"))
        labels_grp = g.create_group("labels")
        mem_grp = labels_grp.create_group("membranes")
        larr = mem_grp.create_array("0", shape=shape, dtype="int32", chunks=chunks,
                                    compressors=comp, fill_value=0,
                                    dimension_names=("z", "y", "x"))
        sroot, tkey, lkey = str(root), tarr.path, larr.path

        # pass 1: tomogram copy + NaN check + intensity sample; block-local labels
        res = block_map(_pass1_block, [_Pass1Job(sroot, tkey, lkey, tinfo, sinfo, *b, stride,
                                                 full) for b in blocks])
        n_local = np.array([len(r.counts) for r in res], np.int64)
        offsets = np.concatenate([[0], np.cumsum(n_local)[:-1]]).astype(np.int64)
        n_prov = int(n_local.sum())
        lo = min((r.lo for r in res), default=math.inf)
        hi = max((r.hi for r in res), default=-math.inf)
        values = np.unique(np.concatenate([r.values for r in res]))  # non-zero, sorted
        mem_sum = sum(r.mem_sum for r in res)  # in block order, as one process would
        mem_n = sum(r.mem_n for r in res)

        if n_prov == 0:
            raise InputError(sinfo.path, "empty segmentation: no membrane voxel (all values 0)")
        if is_blank(lo, hi):
            raise InputError(tinfo.path, f"blank tomogram: every voxel is {lo:.6g}"
                             + ("" if hi == lo else f" to {hi:.6g}")
                             + " (no contrast); nothing can be picked in it")

        # intensity statistics
        sample = np.concatenate([r.sample for r in res])
        center = float(np.median(sample))
        scale = float(np.median(np.abs(sample - center)) * 1.4826)
        if not scale > 0:
            scale = float(sample.std()) or 1.0
            log.warning("%s: MAD of the tomogram is 0; using scale %g", entry.name, scale)
        del sample
        mem_mean = mem_sum / max(mem_n, 1)
        intensity = {"center": center, "scale": scale, "membrane_mean": mem_mean,
                     "sample_stride": stride,
                     **decide_polarity(mem_mean, center, scale, entry.polarity, entry.name)}
        polarity = intensity["polarity"]

        # pass 2: final labels
        if len(values) > 1:
            lut, membranes = _multilabel_tables(sinfo, values, res, cfg, entry.name)
            jobs = [_Pass2Job(sroot, lkey, *b, lut, sinfo, values) for b in blocks]
        else:
            counts = np.concatenate([r.counts for r in res])
            bboxes = np.concatenate([r.bboxes for r in res])
            lut, membranes = _component_tables(
                larr, shape, slab, rows, offsets.reshape(-1, math.ceil(ny / rows)), n_prov,
                counts, bboxes, full, cfg, entry.name, sinfo.path)
            jobs = []
            for b, off, n in zip(blocks, offsets, n_local, strict=True):
                if n:  # a block without membrane keeps its zeros
                    lut_b = lut[off:off + n + 1].copy()
                    lut_b[0] = 0
                    jobs.append(_Pass2Job(sroot, lkey, *b, lut_b))
        del res
        block_map(_pass2_block, jobs)

        meta = TomogramMeta(name=entry.name, voxel_size_A=vs, shape_zyx=shape,
                                  chunks=chunks, source=source, intensity=intensity,
                                  membranes=membranes)
        levels = pyramid_shapes(shape, cfg.pyramid_min)
        src_t, src_l = tarr.path, larr.path
        for k, lshape in enumerate(levels, start=1):
            lchunks = tuple(min(c, s) for s in lshape)
            dst_t = g.create_array(str(k), shape=lshape, dtype="float32", chunks=lchunks,
                                   compressors=comp, fill_value=0.0,
                                   dimension_names=("z", "y", "x"))
            dst_l = mem_grp.create_array(str(k), shape=lshape, dtype="int32", chunks=lchunks,
                                         compressors=comp, fill_value=0,
                                         dimension_names=("z", "y", "x"))
            block_map(_level_block, [
                _LevelJob(sroot, src_t, dst_t.path, src_l, dst_l.path, z0, y0, c)
                for z0 in range(0, lshape[0], c) for y0 in range(0, lshape[1], c)])
            src_t, src_l = dst_t.path, dst_l.path
        n_levels = 1 + len(levels)
        ms = _ome_multiscales(entry.name, vs, n_levels)
        labels_grp.attrs.update({"ome": {"version": "0.5", "labels": ["membranes"]}})
        mem_grp.attrs.update({"ome": {"version": "0.5",
                                      "multiscales": _ome_multiscales("membranes", vs, n_levels,
                                                                      mean=False),
                                      "image-label": {"source": {"image": "../../"}}}})
        g.attrs.update({**meta.to_attrs(), "provenance": prov,
                        "ome": {"version": "0.5", "multiscales": ms,
                                "omero": _omero(entry.name, center, scale, lo, hi, nz)}})
    log.info("%s: converted %s voxels at %g Å, %d membranes, intensity centre %.4g scale "
             "%.4g polarity %+d", entry.name, shape, vs, len(membranes), center, scale, polarity)
    return meta


def _global_labels(plane: np.ndarray, offsets: np.ndarray, step: int) -> np.ndarray:
    """A 2D plane of block-local labels made unique: segment ``j`` of ``step`` rows (axis 0)
    belongs to the block whose label offset is ``offsets[j]``."""
    out = plane.astype(np.int64)
    for j, off in enumerate(offsets):
        seg = out[j * step:(j + 1) * step]
        seg[seg > 0] += off
    return out


def _component_tables(larr, shape, slab, rows, offsets, n_prov, counts, bboxes, full, cfg,
                      name, seg_path) -> tuple[np.ndarray, list[dict]]:
    """Merge provisional labels across block faces; lookup table + membrane records.
    ``offsets[i, j]``: the label offset of the block of z slab ``i`` and row band ``j``."""
    nz, ny, _ = shape
    pairs = []
    for zb in range(slab, nz, slab):
        f = np.asarray(larr[zb - 1:zb + 1, :, :])
        i = zb // slab
        pairs.append(_face_pairs(_global_labels(f[0], offsets[i - 1], rows),
                                 _global_labels(f[1], offsets[i], rows), full))
    for yb in range(rows, ny, rows):
        f = np.asarray(larr[:, yb - 1:yb + 1, :])
        j = yb // rows
        pairs.append(_face_pairs(_global_labels(f[:, 0, :], offsets[:, j - 1], slab),
                                 _global_labels(f[:, 1, :], offsets[:, j], slab), full))
    pairs_arr = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    n = n_prov + 1
    graph = coo_matrix((np.ones(len(pairs_arr), dtype=np.int8),
                        (pairs_arr[:, 0], pairs_arr[:, 1])), shape=(n, n))
    ncomp, comp = connected_components(graph, directed=False)
    comp_p = comp[1:]
    size = np.bincount(comp_p, weights=counts, minlength=ncomp).astype(np.int64)
    lo = np.full((ncomp, 3), np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full((ncomp, 3), -1, dtype=np.int64)
    for k in range(3):
        np.minimum.at(lo[:, k], comp_p, bboxes[:, 2 * k])
        np.maximum.at(hi[:, k], comp_p, bboxes[:, 2 * k + 1])
    first = np.full(ncomp, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, comp_p, np.arange(1, n, dtype=np.int64))
    present = first < np.iinfo(np.int64).max
    keep = present & (size >= cfg.min_membrane_voxels)
    n_all, n_keep = int(present.sum()), int(keep.sum())
    if n_all > n_keep:
        log.info("%s: dropped %d of %d connected components smaller than %d voxels "
                 "(%d voxels)", name, n_all - n_keep, n_all, cfg.min_membrane_voxels,
                 int(size[present & ~keep].sum()))
    if n_keep == 0:
        raise InputError(seg_path, f"no membrane of at least {cfg.min_membrane_voxels} voxels "
                                   f"({n_all} components, largest {int(size.max())} voxels)")
    kept = np.flatnonzero(keep)
    kept = kept[np.argsort(first[kept])]
    lut_comp = np.zeros(ncomp, dtype=np.int32)
    lut_comp[kept] = np.arange(1, n_keep + 1, dtype=np.int32)
    lut = lut_comp[comp]
    lut[0] = 0
    membranes = [{"id": i + 1, "voxels": int(size[c]),
                  "bbox": [int(lo[c, 0]), int(hi[c, 0]), int(lo[c, 1]), int(hi[c, 1]),
                           int(lo[c, 2]), int(hi[c, 2])]} for i, c in enumerate(kept)]
    return lut, membranes


def _value_index(seg: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """int32 image: 0 where ``seg == 0``, else 1 + the index of the value in sorted ``vals``."""
    out = np.zeros(seg.shape, dtype=np.int32)
    nz = seg != 0
    out[nz] = np.searchsorted(vals, seg[nz].astype(np.int64)) + 1
    return out


def _multilabel_tables(sinfo, vals: np.ndarray, blocks: Sequence[_Pass1], cfg, name):
    """Statistics of an already-labelled segmentation (its sorted non-zero values ``vals``),
    from each block's value statistics; lookup table (value index -> label) and records."""
    if len(vals) > _MAX_LABEL_VALUES:
        raise InputError(sinfo.path, f"segmentation holds more than {_MAX_LABEL_VALUES} "
                                     "distinct values: expected a mask or membrane labels")
    nv = len(vals)
    size = np.zeros(nv + 1, dtype=np.int64)
    lo = np.full((nv + 1, 3), np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full((nv + 1, 3), -1, dtype=np.int64)
    for b in blocks:
        i = np.searchsorted(vals, b.values) + 1
        size[i] += b.value_counts
        lo[i] = np.minimum(lo[i], b.value_bboxes[:, 0::2])
        hi[i] = np.maximum(hi[i], b.value_bboxes[:, 1::2])
    keep = size >= cfg.min_membrane_voxels
    keep[0] = False
    if (~keep[1:]).any():
        log.info("%s: dropped %d of %d labels smaller than %d voxels", name,
                 int((~keep[1:]).sum()), nv, cfg.min_membrane_voxels)
    if not keep.any():
        raise InputError(sinfo.path, f"no membrane label with at least "
                                     f"{cfg.min_membrane_voxels} voxels")
    if vals.min() >= 1 and vals.max() <= np.iinfo(np.int32).max:
        ids = vals.astype(np.int32)
    else:
        log.info("%s: label values outside 1..2^31-1, renumbering 1..%d", name, nv)
        ids = np.arange(1, nv + 1, dtype=np.int32)
    lut = np.zeros(nv + 1, dtype=np.int32)
    lut[1:][keep[1:]] = ids[keep[1:]]
    membranes = [{"id": int(ids[i - 1]), "voxels": int(size[i]),
                  "bbox": [int(lo[i, 0]), int(hi[i, 0]), int(lo[i, 1]), int(hi[i, 1]),
                           int(lo[i, 2]), int(hi[i, 2])]}
                 for i in range(1, nv + 1) if keep[i]]
    log.info("%s: segmentation already labelled (%d values): labels kept", name, nv)
    return lut, membranes

