"""Real protein densities (EM maps) for the synthetic "hard" preset.

A map is read once per process (:func:`read_map`, cached), resampled to the tomogram voxel
size with ``scipy.ndimage.zoom`` and given a **membrane frame** (:func:`protein_map`, cached
per voxel size):

- ``n`` (membrane normal): the principal axis of the thresholded density (inertia tensor)
  about which a 180° rotation maps the map best onto itself, i.e. the C2 axis of a dimeric
  membrane complex (PSII, b6f) -- for PSII it is also the axis of least extent;
- the **transmembrane slab**: the slab of thickness ``hydrophobic_A`` (default 40 Å)
  perpendicular to ``n`` with the largest summed cross-section; the frame origin is its
  centre on the C2 axis (the point that sits on the membrane mid-surface);
- the sign of ``n``: towards the side where more density lies beyond the slab (PSII: the
  lumenal extrinsic domain), so ``n`` points from the membrane to the protruding domain;
- ``u``: the remaining principal axis of largest extent (the long in-plane axis; its sign is
  immaterial for C2), ``v = n x u`` in the right-handed XYZ frame (``np.cross(u, n)`` on zyx
  vectors), as in :mod:`membrain_dist.synth`.

All arrays are ``(z, y, x)``; vectors are zyx; lengths in voxels of the tomogram unless noted.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
from scipy import ndimage

__all__ = [
    "MEMBRAIN_V1_DATA",
    "PSII_MAP",
    "B6F_MAP",
    "ProteinMap",
    "read_map",
    "map_frame",
    "protein_map",
    "render_map",
]

#: Folder of the MemBrain v1 files (``../shared/data/membrain-v1`` next to the checkout;
#: ``MEMBRAIN_V1_DATA`` overrides it).
MEMBRAIN_V1_DATA = Path(
    os.environ.get(
        "MEMBRAIN_V1_DATA",
        str(Path(__file__).resolve().parents[2] / "shared" / "data" / "membrain-v1"),
    )
)
PSII_MAP = str(MEMBRAIN_V1_DATA / "PSII_Chlamy_C2_14A.mrc")
B6F_MAP = str(MEMBRAIN_V1_DATA / "b6f_14A_center.mrc")


@dataclass(frozen=True)
class ProteinMap:
    """A protein density at tomogram voxel size with its membrane frame.

    Attributes
    ----------
    density
        float32 (z, y, x), peak 1, resampled to ``voxel_size_A``.
    origin
        (3,) zyx voxel position (in ``density``) of the frame origin: the transmembrane
        slab's centre on the C2 axis.
    axes
        (3, 3) float64, columns u, v, n (unit, zyx, in ``density``'s index space).
    voxel_size_A
        Voxel size of ``density``.
    radius
        Largest distance (voxels) from ``origin`` of a voxel above 10 % of the peak.
    top, bottom
        Largest / smallest n-coordinate (voxels from the origin) of such voxels.
    com_n
        n-coordinate of the centre of mass (thresholded at 10 %).
    """

    density: np.ndarray
    origin: np.ndarray
    axes: np.ndarray
    voxel_size_A: float
    radius: float
    top: float
    bottom: float
    com_n: float


@functools.lru_cache(maxsize=8)
def read_map(path: str) -> tuple[np.ndarray, float]:
    """Read an MRC map once per process: float32 (z, y, x) (read-only) and its voxel size (Å)."""
    with mrcfile.open(path, permissive=True) as m:
        data = np.asarray(m.data, dtype=np.float32).copy()
        vs = float(m.voxel_size.x)
    if data.ndim != 3 or vs <= 0:
        raise ValueError(f"{path}: need a 3D map with a voxel size, got {data.shape}, {vs}")
    data.setflags(write=False)
    return data, vs


def _c2_score(d: np.ndarray, centre: np.ndarray, axis: np.ndarray) -> float:
    """Correlation of ``d`` with itself rotated 180° about ``axis`` through ``centre``."""
    r = 2.0 * np.outer(axis, axis) - np.eye(3)
    rot = ndimage.affine_transform(d, r, offset=centre - r @ centre, order=1)
    return float(np.corrcoef(rot.ravel(), d.ravel())[0, 1])


def map_frame(
    density: np.ndarray, voxel_size_A: float, hydrophobic_A: float = 40.0, threshold: float = 0.15
) -> tuple[np.ndarray, np.ndarray]:
    """Membrane frame of a map (module docstring): origin (3,) and axes (3, 3) columns u, v, n.

    Parameters
    ----------
    density
        (z, y, x) map, protein positive.
    voxel_size_A
        Its voxel size (sets the slab thickness in voxels).
    hydrophobic_A
        Transmembrane slab thickness, Å.
    threshold
        Fraction of the peak below which density is ignored.
    """
    d = np.asarray(density, np.float64)
    w = np.where(d > threshold * d.max(), d, 0.0)
    g = np.indices(d.shape).reshape(3, -1).astype(np.float64)
    wt = w.reshape(-1) / w.sum()
    com = (g * wt).sum(1)
    gc = g - com[:, None]
    cov = (gc * wt) @ gc.T
    _, vec = np.linalg.eigh(cov)  # ascending variance
    scores = [_c2_score(d, com, vec[:, i]) for i in range(3)]
    i_n = int(np.argmax(scores))
    n = vec[:, i_n]
    u = vec[:, max(i for i in range(3) if i != i_n)]
    s = n @ gc
    mask = w.reshape(-1) > 0
    lo, hi = math.floor(s[mask].min()), math.ceil(s[mask].max())
    area, edges = np.histogram(s[mask], bins=np.arange(lo, hi + 2))
    width = max(1, int(round(hydrophobic_A / voxel_size_A)))
    run = np.convolve(area, np.ones(width), mode="valid")
    j = int(np.argmax(run))
    s0 = 0.5 * (edges[j] + edges[j + width])
    above = float(w.reshape(-1)[s > s0 + 0.5 * width].sum())
    below = float(w.reshape(-1)[s < s0 - 0.5 * width].sum())
    origin = com + s0 * n
    if below > above:
        n = -n
    v = np.cross(u, n)
    return origin, np.stack([u, v, n], axis=1)


@functools.lru_cache(maxsize=16)
def protein_map(path: str, voxel_size_A: float, hydrophobic_A: float = 40.0) -> ProteinMap:
    """The map at ``path`` resampled to ``voxel_size_A`` with its frame (cached per arguments).

    The frame is found on the original map (finer), then carried to the resampled grid
    (``grid_mode`` zoom: output index ``j`` is input position ``(j + 0.5) / f - 0.5``). Before
    zooming, a Gaussian of sigma ``0.4`` output voxels damps what the coarser grid would alias.
    """
    raw, vs = read_map(path)
    origin0, axes = map_frame(raw, vs, hydrophobic_A)
    f = vs / float(voxel_size_A)
    src = ndimage.gaussian_filter(raw, 0.4 / f) if f < 1 else raw
    dens = ndimage.zoom(src, f, order=3, grid_mode=True, mode="grid-constant")
    dens = np.maximum(dens, 0.0).astype(np.float32)
    dens /= dens.max()
    dens.setflags(write=False)
    origin = (origin0 + 0.5) * f - 0.5
    pts = np.argwhere(dens > 0.1).astype(np.float64) - origin
    local = pts @ axes
    wts = dens[dens > 0.1].astype(np.float64)
    return ProteinMap(
        density=dens,
        origin=origin,
        axes=axes,
        voxel_size_A=float(voxel_size_A),
        radius=float(np.linalg.norm(pts, axis=1).max()),
        top=float(local[:, 2].max()),
        bottom=float(local[:, 2].min()),
        com_n=float((local[:, 2] * wts).sum() / wts.sum()),
    )


def render_map(
    vol: np.ndarray,
    centres: np.ndarray,
    mats: np.ndarray,
    pmap: ProteinMap,
    amp: float = 1.0,
    batch: int = 16,
) -> None:
    """Add copies of a protein map into ``vol`` in place.

    Particle ``k`` has its frame origin at ``centres[k]`` (zyx voxels) and orientation
    ``mats[k]`` (columns u, v, n in tomogram zyx): voxel ``p`` takes the map value at
    ``origin + A (M^T (p - c))`` with ``A = pmap.axes`` (trilinear), so the map's own u, v, n
    land on the particle's (a proper rotation: no mirror).
    """
    k = len(centres)
    if k == 0:
        return
    rad = int(math.ceil(pmap.radius + 1.5))
    g = np.arange(-rad, rad + 1, dtype=np.float32)
    grid = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    w = 2 * rad + 1
    shape = np.array(vol.shape)
    a_t = pmap.axes.T.astype(np.float32)
    org = pmap.origin.astype(np.float32)
    for b0 in range(0, k, batch):
        c = np.asarray(centres[b0 : b0 + batch], np.float64)
        m = np.asarray(mats[b0 : b0 + batch], np.float32)
        ci = np.rint(c).astype(np.int64)
        frac = (ci - c).astype(np.float32)
        local = np.einsum("bpj,bjk->bpk", grid[None] + frac[:, None, :], m)
        coords = local @ a_t + org
        vals = ndimage.map_coordinates(
            pmap.density, coords.reshape(-1, 3).T, order=1, mode="constant", cval=0.0
        )
        vals = (vals.astype(np.float32) * np.float32(amp)).reshape(-1, w, w, w)
        for i in range(len(c)):
            lo = ci[i] - rad
            a = np.maximum(lo, 0)
            e = np.minimum(lo + w, shape)
            if np.any(e <= a):
                continue
            vol[a[0] : e[0], a[1] : e[1], a[2] : e[2]] += vals[
                i,
                a[0] - lo[0] : e[0] - lo[0],
                a[1] - lo[1] : e[1] - lo[1],
                a[2] - lo[2] : e[2] - lo[2],
            ]
