"""Stage 5b: the particle's average in its membrane frame, and in-plane angles from it.

PCA of a cluster's points (stage 5) gives an in-plane axis only as well as the score field's
shape around a centre shows it; at raw-data SNR that is 25-30 degrees off. When the training
annotations carry orientations, ``train`` also averages the annotated particles' density in
their own frames (:func:`accumulate_average`: columns ``u`` = the annotated long axis
projected into the membrane plane, ``v``, ``n`` = the membrane normal at the particle's foot,
pointing to its side) and stores it with the model (``average.mrc``). At prediction each pick's
in-plane angle is the one whose rotated cube correlates best with that average
(:func:`search_in_plane`): a 2D template search about the pick's membrane normal, in
``angle_step`` steps over the full turn (the average carries the particle's own symmetry) and
over whole-voxel in-plane offsets of the pick, refined by a parabola through the best step and
its neighbours. The average is turned, not the tomogram: one cube is cut per pick.

Cubes are cut by :func:`membrain_dist.extraction.extract_batches` from the normalised (and
low-passed) tomogram with explicit frames. All positions are voxels ``(z, y, x)``; frames and
matrices have columns ``u, v, n`` in zyx (:func:`membrain_dist.orientation.frame_from_axes`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .extraction import Intensity, ReadVolume, _margin, cube_offsets, extract_batches
from .orientation import frame_from_axes, reference_axis

__all__ = ["AverageSum", "accumulate_average", "in_plane_frames", "search_in_plane",
           "turned_references", "write_average", "read_average", "AVERAGE_FILE", "AVERAGE_GLOB",
           "average_file", "model_averages"]

log = logging.getLogger(__name__)

#: the average's file in a model directory
AVERAGE_FILE = "average.mrc"
#: every average file of a model directory (one model's, or one per class)
AVERAGE_GLOB = "average*.mrc"


def average_file(klass: int | None = None) -> str:
    """File name of a model's average: ``average.mrc``, or ``average_class<k>.mrc`` for class
    ``klass`` (0-based; the file is numbered 1-based, as ``rlnClassNumber``) of a model with
    named classes."""
    return AVERAGE_FILE if klass is None else f"average_class{klass + 1}.mrc"


def model_averages(n_classes: int) -> list[tuple[int | None, str]]:
    """``(class, file name)`` of each average a model of ``n_classes`` outputs has: one
    ``(None, average.mrc)``, or one per class of a model with several."""
    if n_classes <= 1:
        return [(None, AVERAGE_FILE)]
    return [(k, average_file(k)) for k in range(n_classes)]


@dataclass
class AverageSum:
    """Running sum of particle cubes in their frames (``count`` cubes of edge ``size``)."""

    total: np.ndarray  # (s, s, s) float64
    count: int = 0

    @classmethod
    def empty(cls, size: int) -> AverageSum:
        return cls(np.zeros((size, size, size), np.float64), 0)

    def __iadd__(self, other: AverageSum) -> AverageSum:
        self.total += other.total
        self.count += other.count
        return self

    def mean(self) -> np.ndarray | None:
        """The average (float32), or None when no particle contributed."""
        return (self.total / self.count).astype(np.float32) if self.count else None


#: largest tomogram region (voxels) read for one group of centres
REGION_VOXELS = 4 * 1024**2


def _compact_groups(centres: np.ndarray, margin: int, max_voxels: int) -> list[np.ndarray]:
    """Indices of ``centres`` in groups whose bounding box (plus ``margin``) stays under
    ``max_voxels``: picks spread over a tomogram are read region by region, never the whole
    tomogram at once (a group holds at least one centre)."""
    if centres.shape[0] == 0:
        return []
    coarse = np.floor(centres / 32).astype(np.int64)
    order = np.lexsort((coarse[:, 2], coarse[:, 1], coarse[:, 0]))
    groups, cur = [], []
    lo = hi = None
    for i in order:
        p = centres[i]
        nlo = p - margin if lo is None else np.minimum(lo, p - margin)
        nhi = p + margin if hi is None else np.maximum(hi, p + margin)
        if cur and float(np.prod(nhi - nlo + 1)) > max_voxels:
            groups.append(np.array(cur))
            cur, nlo, nhi = [], p - margin, p + margin
        cur.append(i)
        lo, hi = nlo, nhi
    groups.append(np.array(cur))
    return groups


def _cubes(read_volume: ReadVolume, shape: tuple[int, int, int], centres: np.ndarray,
           frames: np.ndarray, size: int, intensity: Intensity | None) -> np.ndarray:
    """Cubes ``(K, J, s, s, s)`` around ``centres`` (K, 3) in ``frames`` (K, J, 3, 3)."""
    k, j = frames.shape[:2]
    out = np.empty((k, j, size, size, size), np.float32)
    margin = _margin(size, 1, intensity.lowpass if intensity is not None else 0.0)
    for g in _compact_groups(np.asarray(centres, np.float64), margin, REGION_VOXELS):
        fr = frames[g].reshape(-1, 3, 3)
        pts = np.repeat(np.asarray(centres, np.float32)[g], j, axis=0)
        flat = np.empty((pts.shape[0], size, size, size), np.float32)
        for start, cb in extract_batches(read_volume, shape, pts, fr[:, :, 2], size=size,
                                         intensity=intensity, frames=fr,
                                         batch_size=pts.shape[0]):
            flat[start : start + cb.shape[0]] = cb
        out[g] = flat.reshape(g.size, j, size, size, size)
    return out


def accumulate_average(
    read_volume: ReadVolume, shape: tuple[int, int, int], centres: np.ndarray,
    axes: np.ndarray, normals: np.ndarray, size: int, intensity: Intensity | None,
) -> AverageSum:
    """Sum of the cubes of edge ``size`` around ``centres`` (K, 3) in the particles' frames.

    ``axes`` (K, 3) are the annotated long in-plane axes, ``normals`` (K, 3) the membrane
    normals at the particles (unit, pointing to the particle's side); the axis is projected
    into the membrane plane. Particles whose axis is (nearly) parallel to the normal, or not
    finite, are left out."""
    c = np.asarray(centres, np.float64).reshape(-1, 3)
    n = np.asarray(normals, np.float64).reshape(-1, 3)
    a = np.asarray(axes, np.float64).reshape(-1, 3)
    u = a - np.einsum("ki,ki->k", a, n)[:, None] * n
    norm = np.linalg.norm(u, axis=1)
    ok = np.isfinite(norm) & (norm > 0.3) & np.isfinite(c).all(1)
    acc = AverageSum.empty(size)
    if not ok.any():
        return acc
    frames = frame_from_axes(u[ok] / norm[ok, None], n[ok])[:, None]
    cubes = _cubes(read_volume, shape, c[ok], frames, size, intensity)
    acc.total += cubes[:, 0].sum(0, dtype=np.float64)
    acc.count += int(ok.sum())
    return acc


def in_plane_frames(normals: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Frames (K, J, 3, 3) about each unit normal (K, 3) at in-plane ``angles`` (J,) radians,
    measured from the rot = 0 reference axis (:func:`membrain_dist.orientation.reference_axis`)
    towards ``v0 = u0 x n`` (zyx components)."""
    n = np.asarray(normals, np.float64).reshape(-1, 3)
    u0 = reference_axis(n)
    v0 = np.cross(u0, n)
    cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
    u = cos * u0[:, None, :] + sin * v0[:, None, :]
    k, j = u.shape[:2]
    frames = frame_from_axes(u.reshape(-1, 3), np.repeat(n, j, axis=0))
    return frames.reshape(k, j, 3, 3)


def _mask(size: int) -> np.ndarray:
    """Spherical mask of the cube (radius size / 2): corners rotate out of view."""
    o = np.arange(size) - (size - 1) / 2
    r = np.sqrt(o[:, None, None] ** 2 + o[None, :, None] ** 2 + o[None, None, :] ** 2)
    return r <= size / 2


def _refine_peak(ncc: np.ndarray, i: np.ndarray) -> np.ndarray:
    """Sub-step offset (-0.5..0.5) of each row's peak ``i`` from a parabola through it and its
    circular neighbours."""
    j = ncc.shape[1]
    rows = np.arange(ncc.shape[0])
    y0, y1, y2 = ncc[rows, (i - 1) % j], ncc[rows, i], ncc[rows, (i + 1) % j]
    denom = y0 - 2 * y1 + y2
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(denom < 0, 0.5 * (y0 - y2) / denom, 0.0)
    return np.clip(shift, -0.5, 0.5)


def turned_references(average: np.ndarray, angles: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The average turned about its normal (the cube's z axis) by each of ``angles`` (J,)
    radians, sampled at the ``mask`` voxels (s^3 bool, rotation invariant about z), each
    zero-mean with unit norm: (J, M) float32.

    Row ``j`` is the average as a cube cut at angle 0 sees a particle whose ``u`` lies at
    ``angles[j]`` (:func:`in_plane_frames`): the cube cut at angle ``t`` equals the angle-0 cube
    at local ``(x cos t - y sin t, x sin t + y cos t)``, so correlating the angle-0 cube with
    the average at the inverse turn gives the correlation at ``t`` (cubic spline,
    edge-clamped)."""
    from scipy import ndimage

    size = int(average.shape[0])
    o = cube_offsets(size).astype(np.float64)
    z, y, x = (g[mask] for g in np.meshgrid(o, o, o, indexing="ij"))
    centre = (size - 1) / 2
    refs = np.empty((len(angles), z.size), np.float32)
    coeffs = ndimage.spline_filter(np.asarray(average, np.float64), order=3, mode="nearest")
    for j, t in enumerate(np.asarray(angles, np.float64)):
        c, s = np.cos(t), np.sin(t)
        coords = np.stack([z, y * c - x * s, x * c + y * s]) + centre
        r = ndimage.map_coordinates(coeffs, coords, order=3, mode="nearest",
                                    prefilter=False)
        r -= r.mean()
        refs[j] = r / max(float(np.linalg.norm(r)), 1e-12)
    return refs


def search_in_plane(
    read_volume: ReadVolume, shape: tuple[int, int, int], centres: np.ndarray,
    normals: np.ndarray, average: np.ndarray, intensity: Intensity | None,
    angle_step: float = 5.0, shift: int = 0, chunk: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """In-plane angle of each centre by correlation with ``average`` (its frame's cube).

    Cubes are cut at the reference in-plane angle 0 and correlated with the average turned to
    every step (:func:`turned_references`): the correlations of cutting a cube per step, up to
    interpolation, at one cut per position. With ``shift`` the cut centre also moves over the
    whole-voxel offsets ``-shift..shift`` along both in-plane axes (a pick is a few voxels off
    the particle's centre; off-centre the correlation is blurred), and each angle keeps its
    best correlation over the offsets. The offsets' cubes are windows of one cube of edge
    ``s + 2 shift`` per centre (the same samples as cutting each: one cut per centre).

    Parameters
    ----------
    centres, normals
        (K, 3) voxels zyx and unit membrane normals (to the particle's side).
    average
        (s, s, s) cube in the particle frame (:func:`accumulate_average`).
    angle_step
        Search step (degrees) over the full turn; the peak is refined by a parabola.
    shift
        In-plane offsets searched (voxels, each way; 0: at the centre only).
    chunk
        Centres cut per pass, in spatial order (memory ~ ``chunk x (2 shift + 1)^2 x s^3 x 4``
        bytes for the offsets' windows).

    Returns
    -------
    matrices : (K, 3, 3) float32
        Columns u, v, n (zyx) with u at the best angle.
    correlation : (K,) float32
        Normalised cross-correlation at the best step and offset (in the cube's inscribed
        sphere).

    Notes
    -----
    Measured on the hard phantom's tuning campaign (seed 101, four one-membrane models, the
    picks of ``predict`` on its two test tomograms, 48-61 matched each): mean in-plane error
    (C2) 20.9 / 14.2 / 17.7 / 23.4° at the picks, 13.8 / 11.2 / 14.6 / 19.6° with offsets up to
    1 voxel, **12.9 / 10.1 / 11.6 / 16.6°** up to 2 (the default), 11.9 / 10.2 / 14.2 / 19.3°
    up to 3; half-voxel offsets up to 2 (81 cuts) 11.5 / 10.5 / 10.6 / 18.4°; offsets along the
    normal too did not help.
    """
    c = np.asarray(centres, np.float64).reshape(-1, 3)
    n = np.asarray(normals, np.float64).reshape(-1, 3)
    size = int(average.shape[0])
    j = max(int(round(360.0 / angle_step)), 4)
    step = 2 * np.pi / j
    mask = _mask(size)
    refs = turned_references(average, np.arange(j) * step, mask)  # (J, M)
    frames0 = in_plane_frames(n, np.zeros(1))  # (K, 1, 3, 3)
    # one cube of edge size + 2 shift per centre: the cube at in-plane offset (a, b) voxels
    # along (u, v) is its window starting at (shift, shift + b, shift + a) (the same samples)
    big = size + 2 * shift
    windows = [(slice(shift, shift + size), slice(shift + b, shift + b + size),
                slice(shift + a, shift + a + size))
               for a in range(-shift, shift + 1) for b in range(-shift, shift + 1)]
    margin = _margin(big, 1, intensity.lowpass if intensity is not None else 0.0)
    order = (np.concatenate(_compact_groups(c, margin, REGION_VOXELS)) if c.shape[0]
             else np.zeros(0, np.int64))
    best = np.zeros(c.shape[0])
    peak = np.zeros(c.shape[0], np.float32)
    for k0 in range(0, c.shape[0], chunk):
        idx = order[k0:k0 + chunk]
        cubes = _cubes(read_volume, shape, c[idx], frames0[idx], big, intensity)[:, 0]
        v = np.stack([cubes[(slice(None), *w)][:, mask] for w in windows], axis=1)  # (k, S, M)
        v -= v.mean(axis=2, keepdims=True)
        ncc = (v @ refs.T) / np.maximum(np.linalg.norm(v, axis=2, keepdims=True), 1e-12)
        ncc = ncc.max(axis=1)  # (k, J): the best offset at each angle
        i = np.argmax(ncc, axis=1)
        best[idx] = (i + _refine_peak(ncc, i)) * step
        peak[idx] = ncc[np.arange(idx.size), i]
    mats = np.zeros((0, 3, 3))
    if c.shape[0]:
        f0 = frames0[:, 0]
        u = np.cos(best)[:, None] * f0[:, :, 0] + np.sin(best)[:, None] * f0[:, :, 1]
        mats = frame_from_axes(u, n)
    return mats.astype(np.float32), peak


def write_average(path: str | os.PathLike, average: np.ndarray, voxel_size_A: float) -> None:
    """Write the average as an MRC (its frame: x = u, the long in-plane axis; z = the
    membrane normal; open it in a viewer to see what the model's picks are aligned to)."""
    from . import mrc

    mrc.write_volume(path, np.asarray(average, np.float32), voxel_size_A)


def read_average(path: str | os.PathLike) -> np.ndarray | None:
    """The average (s, s, s) float32 in ``path`` (a model's ``average.mrc``), or None when
    there is none."""
    from . import mrc

    if not Path(path).is_file():
        return None
    return np.asarray(mrc.open_volume(mrc.read_info(path).path), np.float32)
