"""Stage 2: rotation-normalised, intensity-normalised cubes around sampled points.

For each point ``p`` with unit normal ``n`` a frame ``R = [u, v, n]`` (columns, zyx) is built;
cube voxel ``[k, j, i]`` (cube axes z, y, x) samples the tomogram at
``p + (k - c) n + (j - c) v + (i - c) u`` with ``c = (s - 1) / 2``, so the membrane normal maps
to the cube's +z axis and the membrane lies in the cube's x-y plane. ``u`` is fixed by a
helper axis (tomogram x, or y when n is near x): the in-plane angle is arbitrary but
deterministic; training augments rotations about z. ``R`` is a proper rotation in XYZ
(``axes.matrix_zyx_to_xyz(R)`` has determinant +1), so cubes are never mirror images.

A batch of points is interpolated on a float32 block read from the tomogram covering the batch
(points are block-sorted, so the block is compact): trilinear (order 1, default) by
``_trilinear_cubes``, eight float32 corner gathers per sample over small sub-batches that stay in
cache (~3x faster than ``map_coordinates``, equal to it up to float32 round-off); orders 0 and
3 by one ``scipy.ndimage.map_coordinates`` call. Intensities are normalised per tomogram:
``clip(polarity (x - center) / scale, ±3)`` (v1 clipped z-scores at ±3; we keep the ±3 range
instead of rescaling to [0, 1]).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "Intensity",
    "batch_blocks",
    "rotation_frames",
    "cube_offsets",
    "normalise_intensity",
    "extract_batches",
    "extract_cubes",
]

log = logging.getLogger(__name__)

ReadVolume = Callable[[tuple[slice, slice, slice]], np.ndarray]


@dataclass(frozen=True)
class Intensity:
    """Per-tomogram intensity normalisation ``clip(polarity (x - center) / scale, ±clip)``,
    then an optional Gaussian low-pass of ``lowpass`` voxels (sigma; 0 = none).

    The low-pass raises the signal-to-noise ratio of raw (not denoised) tomograms before the
    cubes are cut: at bin 4 a protein's features span several voxels while the noise is
    nearly white, so a sigma of one voxel keeps the particle and removes most of the noise
    that a 12^3 cube's tiny CNN would otherwise have to learn to ignore from few examples.
    Clipping comes first, so a gold bead is not smeared into its neighbourhood."""

    center: float = 0.0
    scale: float = 1.0
    polarity: float = 1.0
    clip: float = 3.0
    lowpass: float = 0.0

    @classmethod
    def from_attrs(cls, attrs: dict, clip: float = 3.0, lowpass: float = 0.0) -> Intensity:
        """From the store's ``intensity`` attrs (``center``, ``scale``, ``polarity``)."""
        return cls(float(attrs["center"]), float(attrs["scale"]), float(attrs["polarity"]), clip,
                   lowpass)


#: Gaussian kernels are cut at this many sigmas (scipy's ``truncate``)
LOWPASS_TRUNCATE = 3.0


def lowpass_radius(sigma: float) -> int:
    """Support radius (voxels) of the low-pass kernel of ``sigma`` (0 when off)."""
    return int(LOWPASS_TRUNCATE * sigma + 0.5) if sigma > 0 else 0


def normalise_intensity(block: np.ndarray, intensity: Intensity) -> np.ndarray:
    """Return the normalised (and low-passed) float32 copy of ``block`` (any 3D shape).

    The low-pass treats the block's faces with ``mode="nearest"``: a caller keeps
    ``lowpass_radius`` voxels of margin around what it samples (``extract_batches`` does)."""
    out = np.asarray(block, np.float32) - np.float32(intensity.center)
    out *= np.float32(intensity.polarity / intensity.scale)
    np.clip(out, -intensity.clip, intensity.clip, out=out)
    if intensity.lowpass > 0:
        out = ndimage.gaussian_filter(out, intensity.lowpass, mode="nearest",
                                      truncate=LOWPASS_TRUNCATE, output=np.float32)
    return out


def rotation_frames(normals: np.ndarray) -> np.ndarray:
    """Frames ``(N, 3, 3)`` float32 whose columns are u, v, n (each zyx).

    ``u`` is the helper axis (tomogram x; y when ``|n_x| > 0.9``) made orthogonal to n;
    ``v = cross_zyx(u, n)`` which in XYZ is ``n x u``, so (u, v, n) is right-handed in XYZ.
    """
    n = np.asarray(normals, np.float32)
    n = n / np.linalg.norm(n, axis=1, keepdims=True)
    helper = np.zeros_like(n)
    near_x = np.abs(n[:, 2]) > 0.9
    helper[~near_x, 2] = 1.0
    helper[near_x, 1] = 1.0
    u = helper - np.einsum("ij,ij->i", helper, n)[:, None] * n
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = np.cross(u, n)
    return np.stack([u, v, n], axis=2).astype(np.float32)


def cube_offsets(size: int) -> np.ndarray:
    """Voxel offsets ``np.arange(size) - (size - 1) / 2`` (float32), per cube axis."""
    return np.arange(size, dtype=np.float32) - np.float32((size - 1) / 2)


def _sample_coords(points: np.ndarray, frames: np.ndarray, size: int) -> np.ndarray:
    """``(3, B, s, s, s)`` float32 zyx sample positions of the cubes of a batch."""
    o = cube_offsets(size)
    u, v, n = frames[:, :, 0], frames[:, :, 1], frames[:, :, 2]
    b = points.shape[0]
    coords = np.empty((3, b, size, size, size), np.float32)
    for a in range(3):
        coords[a] = (
            points[:, a, None, None, None]
            + n[:, a, None, None, None] * o[None, :, None, None]
            + v[:, a, None, None, None] * o[None, None, :, None]
            + u[:, a, None, None, None] * o[None, None, None, :]
        )
    return coords


def _half_diagonal(size: int) -> int:
    """Farthest a sample of a ``size`` cube lies from its centre along any axis (voxels,
    rounded up): half the cube's diagonal."""
    return int(math.ceil(math.sqrt(3) * (size - 1) / 2))


def _index_dtype(n_voxels: int) -> type:
    """Integer type of flat indices into a block of ``n_voxels``: int32 (faster) while it fits."""
    return np.int32 if n_voxels < 2**31 else np.int64


# points per sub-batch of _trilinear_cubes: ~15 work arrays of chunk x s^3 float32 stay in cache
_TRILINEAR_CHUNK = 48


def _trilinear_cubes(block: np.ndarray, points: np.ndarray, frames: np.ndarray, size: int,
                     chunk: int = _TRILINEAR_CHUNK) -> np.ndarray:
    """Cubes ``(B, s, s, s)`` float32 by trilinear interpolation of ``block`` (float32, zyx).

    ``points`` are in block voxel coordinates. Equals ``map_coordinates(block, coords, order=1,
    mode="nearest")`` of ``_sample_coords`` up to float32 round-off, and does not depend on
    where the block starts: each point is split into its integer voxel and its fraction
    (exact in float32) and only the fraction is added to the cube's offsets, so a cube cut
    from any block that holds it is the same to the bit (stored or cut in memory, in any
    batch: scores in bfloat16 then agree too). Samples beyond the block take its edge value:
    the block is edge-padded by one voxel on each side and corner indices are clamped into
    the padding, where both corners of an axis are equal and the interpolation is exact.
    Everything stays float32 / int32 (int64 indices for blocks beyond 2^31 voxels) and is
    processed ``chunk`` points at a time in preallocated buffers.
    """
    d, h, w = block.shape
    padded = np.pad(np.asarray(block, np.float32), 1, mode="edge")
    hp, wp = h + 2, w + 2
    flat = padded.ravel()
    sy, sz = wp, hp * wp
    # contiguous views shifted by each corner's flat offset: take(view, idx) = flat[idx + off]
    corners = [flat[off:] for off in (0, 1, sy, sy + 1, sz, sz + 1, sz + sy, sz + sy + 1)]
    itype = _index_dtype(padded.size)
    top = (d, h, w)  # largest padded index of a lower corner: the last voxel's padding
    o = cube_offsets(size)
    n = points.shape[0]
    out = np.empty((n, size, size, size), np.float32)
    shp = (min(chunk, n), size, size, size)
    frac = [np.empty(shp, np.float32) for _ in range(3)]
    fl = np.empty(shp, np.float32)
    ind = [np.empty(shp, itype) for _ in range(3)]
    g = [np.empty(shp, np.float32) for _ in range(8)]
    pts = np.asarray(points, np.float32)
    whole = np.floor(pts)
    part = pts - whole  # exact: the fraction of a float32 is a float32
    # padded index of each point's voxel, clamped so that far-off points stay in the index type
    base = np.clip(whole, -2 * size - 1, np.float32(max(top)) + 2 * size).astype(itype) + 1
    frm = np.asarray(frames, np.float32)
    reach = _half_diagonal(size) + 1  # of a cube's interpolation corners, voxels
    for a0 in range(0, n, chunk):
        fp, ip, r = part[a0 : a0 + chunk], base[a0 : a0 + chunk], frm[a0 : a0 + chunk]
        b = fp.shape[0]
        for a in range(3):
            c, f, i = frac[a][:b], fl[:b], ind[a][:b]
            # (b, s, s) plane term frac(p) + k n + j v, then + i u along the last axis
            plane = (fp[:, a, None, None] + r[:, a, 2, None, None] * o[None, :, None]
                     + r[:, a, 1, None, None] * o[None, None, :])
            np.add(plane[..., None], (r[:, a, 0, None] * o[None, :])[:, None, None, :], out=c)
            np.floor(c, out=f)
            c -= f
            np.copyto(i, f, casting="unsafe")
            i += ip[:, a, None, None, None]
            if ip[:, a].min() < reach or ip[:, a].max() > top[a] - reach:  # near the block's faces
                np.clip(i, 0, top[a], out=i)
        idx = ind[0][:b]
        idx *= hp
        idx += ind[1][:b]
        idx *= wp
        idx += ind[2][:b]
        gb = [x[:b] for x in g]
        for view, x in zip(corners, gb, strict=True):
            np.take(view, idx, out=x)
        fz, fy, fx = (x[:b] for x in frac)
        for lo, hi in ((0, 1), (2, 3), (4, 5), (6, 7)):  # along x
            gb[hi] -= gb[lo]
            gb[hi] *= fx
            gb[lo] += gb[hi]
        for lo, hi in ((0, 2), (4, 6)):  # along y
            gb[hi] -= gb[lo]
            gb[hi] *= fy
            gb[lo] += gb[hi]
        gb[4] -= gb[0]  # along z
        gb[4] *= fz
        np.add(gb[0], gb[4], out=out[a0 : a0 + b])
    return out


def _margin(size: int, order: int, lowpass: float = 0.0) -> int:
    # half cube diagonal + interpolation support (+ spline prefilter decay for order > 1)
    # + the low-pass kernel's radius
    return (_half_diagonal(size) + 2 + (6 if order > 1 else 0) + lowpass_radius(lowpass))


#: largest block (voxels) one batch reads by default: 16 Mi float32 voxels = 64 MiB
BLOCK_MAX_VOXELS = 16 * 1024**2


def _read_box(p: np.ndarray, shape: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 ``(lo, hi)`` corners of the block that points ``p`` (B, 3) need (clipped)."""
    lo = np.clip(np.floor(p.min(0)).astype(np.int64) - margin, 0, shape - 1)
    hi = np.clip(np.ceil(p.max(0)).astype(np.int64) + margin + 1, lo + 1, shape)
    return lo, hi


def bounded_batches(points: np.ndarray, shape_zyx: np.ndarray | tuple[int, int, int],
                    margin: int, batch_size: int, max_block_voxels: int | None = None
                    ) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """Row ranges ``(start, stop, lo, hi)`` covering all ``points`` (N, 3) in order: at most
    ``batch_size`` rows each, each read box ``[lo, hi)`` (int64 zyx, ``margin`` voxels around
    its points, clipped to the volume) under ``max_block_voxels`` unless it is one point."""
    limit = BLOCK_MAX_VOXELS if max_block_voxels is None else int(max_block_voxels)
    shape = np.asarray(shape_zyx, np.int64)
    out = []
    for first in range(0, points.shape[0], batch_size):
        stack = [(first, min(first + batch_size, points.shape[0]))]
        while stack:
            a, b = stack.pop()
            lo, hi = _read_box(points[a:b], shape, margin)
            if b - a == 1 or int(np.prod(hi - lo, dtype=np.int64)) <= limit:
                out.append((a, b, lo, hi))
            else:  # halves, first half popped first: rows stay in order
                m = (a + b) // 2
                stack += [(m, b), (a, m)]
    return out


def batch_blocks(
    read_volume: ReadVolume,
    shape_zyx: tuple[int, int, int],
    points: np.ndarray,
    normals: np.ndarray,
    *,
    size: int = 12,
    order: int = 1,
    batch_size: int = 2048,
    intensity: Intensity | None = None,
    frames: np.ndarray | None = None,
    max_block_voxels: int | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(start, block, local, frames)`` per batch of :func:`extract_batches`: the
    normalised float32 block the batch's cubes are cut from, the batch's points in block
    coordinates and its cube frames (B, 3, 3). What an interpolator needs, on any device."""
    pts = np.asarray(points, np.float32)
    nrm = np.asarray(normals, np.float32)
    shape = np.asarray(shape_zyx, np.int64)
    margin = _margin(size, order, intensity.lowpass if intensity is not None else 0.0)
    for start, stop, lo, hi in bounded_batches(pts, shape, margin, batch_size,
                                               max_block_voxels):
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        block = np.asarray(read_volume(sl), np.float32)
        if intensity is not None:
            block = normalise_intensity(block, intensity)
        if frames is None:
            fr = rotation_frames(nrm[start:stop])
        else:
            fr = np.asarray(frames[start:stop], np.float32)
        yield start, block, pts[start:stop] - lo.astype(np.float32), fr


def extract_batches(
    read_volume: ReadVolume,
    shape_zyx: tuple[int, int, int],
    points: np.ndarray,
    normals: np.ndarray,
    *,
    size: int = 12,
    order: int = 1,
    batch_size: int = 2048,
    intensity: Intensity | None = None,
    frames: np.ndarray | None = None,
    max_block_voxels: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, cubes)`` per batch: cubes ``(B, s, s, s)`` float32 for points[start:].

    Parameters
    ----------
    read_volume
        ``read_volume((sz, sy, sx)) -> ndarray``: a block of the tomogram (z, y, x).
    shape_zyx
        Shape of the tomogram (voxels).
    points, normals
        ``(N, 3)`` zyx voxel positions and unit normals (dz, dy, dx); ideally block-sorted.
    size
        Cube edge (voxels; paper: 12).
    order
        Interpolation order: 1 trilinear (default, fast), 3 cubic spline (v1).
    batch_size
        Points per block read; memory ~ the block plus (order 1) ~1 MB of work buffers, or
        (orders 0, 3: one ``map_coordinates`` call per batch) batch x s^3 x 16 B.
    intensity
        Normalisation (and low-pass) applied to each block before interpolation; None keeps
        raw values.
    frames
        ``(N, 3, 3)`` cube frames (columns u, v, n, zyx) instead of those built from the
        normals (:func:`rotation_frames`): cubes in a given in-plane orientation (particle
        frames, in-plane angle searches).
    max_block_voxels
        Largest tomogram block read for one batch (default :data:`BLOCK_MAX_VOXELS`).

    Notes
    -----
    Samples outside the tomogram take the nearest edge value (``mode="nearest"``). A batch
    whose points' read box would exceed ``max_block_voxels`` is cut into contiguous halves
    until each part's box fits (or the part is one point), so reads stay bounded on unbinned
    tomograms whatever the points' order; batches then start at any row, not only at
    multiples of ``batch_size``. Box corners are int64 (index spaces beyond 2^31 voxels).
    """
    for start, block, local, fr in batch_blocks(
            read_volume, shape_zyx, points, normals, size=size, order=order,
            batch_size=batch_size, intensity=intensity, frames=frames,
            max_block_voxels=max_block_voxels):
        if order == 1:
            yield start, _trilinear_cubes(block, local, fr, size)
            continue
        coords = _sample_coords(local, fr, size)
        if order > 1:
            block = ndimage.spline_filter(block, order=order, output=np.float32, mode="nearest")
        cubes = ndimage.map_coordinates(
            block, coords.reshape(3, -1), order=order, mode="nearest", prefilter=False,
            output=np.float32,
        )
        yield start, cubes.reshape(local.shape[0], size, size, size)


def extract_cubes(
    volume: np.ndarray,
    points: np.ndarray,
    normals: np.ndarray,
    *,
    size: int = 12,
    order: int = 1,
    batch_size: int = 2048,
    intensity: Intensity | None = None,
    frames: np.ndarray | None = None,
) -> np.ndarray:
    """All cubes ``(N, s, s, s)`` float32 from an in-memory (or zarr) volume (extract_batches)."""
    out = np.empty((np.asarray(points).shape[0], size, size, size), np.float32)
    for start, cubes in extract_batches(
        volume.__getitem__, tuple(volume.shape), points, normals, size=size, order=order,
        batch_size=batch_size, intensity=intensity, frames=frames,
    ):
        out[start : start + cubes.shape[0]] = cubes
    return out


def _reference_extract_loop(
    volume: np.ndarray,
    points: np.ndarray,
    normals: np.ndarray,
    size: int = 12,
    *,
    crop: int = 25,
) -> np.ndarray:
    """Naive v1-style reference (benchmarks and tests only): one Python iteration per point.

    As MemBrain v1: crop a ``crop^3`` subvolume around the rounded point, rotate the whole crop
    with a cubic-spline ``map_coordinates`` call so the normal maps to +z, centre-crop to
    ``size^3``. Same frame convention as ``extract_cubes`` (results agree up to interpolation).
    """
    pts = np.asarray(points, np.float32)
    frames = rotation_frames(normals)
    half = crop // 2
    c0 = (crop - size) // 2
    # offsets chosen so the centre crop samples exactly extract_cubes' positions
    o = np.arange(crop, dtype=np.float64) - c0 - (size - 1) / 2
    kk, jj, ii = np.meshgrid(o, o, o, indexing="ij")
    out = np.empty((pts.shape[0], size, size, size), np.float32)
    padded = np.pad(np.asarray(volume, np.float32), half + 1, mode="edge")
    for t in range(pts.shape[0]):
        p = pts[t].astype(np.float64)
        ctr = np.rint(p).astype(np.int64)
        sub = padded[tuple(slice(c + 1, c + 1 + crop) for c in ctr)]  # centre at ctr
        r = frames[t].astype(np.float64)
        local = (p - ctr + half)[:, None, None, None]
        coords = (local + r[:, 2, None, None, None] * kk + r[:, 1, None, None, None] * jj
                  + r[:, 0, None, None, None] * ii)
        rot = ndimage.map_coordinates(sub, coords, order=3, mode="nearest")
        out[t] = rot[c0 : c0 + size, c0 : c0 + size, c0 : c0 + size]
    return out
