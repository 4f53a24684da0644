"""Spatial screen: score a coarse subset of a membrane's points first, then only the points
near a low one.

Only points predicted closer than the clustering threshold are clustered, and on real-SNR
data a few percent are. The predicted distance varies smoothly along the membrane (it is a
distance to the nearest centre), so the points of one ``cell``-voxel cube of space and one
side tell much the same. The screen scores one point per cell and side (the first in row
order), then every point within ``cell`` voxels of a screened point of its side whose
prediction lies below the cutoff (the clustering threshold plus ``refine_margin``); every other
point is left unscored (NaN: never clustered, since clustering keeps finite scores below
the threshold). On the hard phantom's held-out campaigns (seeds 102 / 103) a 3-voxel screen
scored 43-47 % of the points with held-out F1 within 0.007 of scoring every point (README).

Pure functions; the scoring itself is a callable, so the same screen serves cubes cut on the
host, cut on the device, read from the store or handed over in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["screen_rows", "near_rows", "screened_scores"]


def screen_rows(zyx: np.ndarray, side: np.ndarray, cell: float) -> np.ndarray:
    """Sorted row indices of one point per ``cell``-voxel cube of space (aligned to the
    origin) and side: the first such point in row order.

    ``zyx`` (N, 3) voxels, ``side`` (N,) integer side labels.
    """
    if not cell > 0:
        raise ValueError(f"screen cell must be > 0 voxels, got {cell}")
    zyx = np.asarray(zyx, np.float64).reshape(-1, 3)
    if zyx.shape[0] == 0:
        return np.zeros(0, np.int64)
    key = np.concatenate([np.floor(zyx / cell).astype(np.int64),
                          np.asarray(side, np.int64).reshape(-1, 1)], axis=1)
    _, first = np.unique(key, axis=0, return_index=True)
    return np.sort(first)


def near_rows(zyx: np.ndarray, side: np.ndarray, seeds: np.ndarray, radius: float) -> np.ndarray:
    """Mask (N,): points within ``radius`` voxels of a seed row (indices into ``zyx``) on
    the same side (a seed itself included)."""
    zyx = np.asarray(zyx, np.float64).reshape(-1, 3)
    side = np.asarray(side).reshape(-1)
    seeds = np.asarray(seeds, np.int64).reshape(-1)
    near = np.zeros(zyx.shape[0], bool)
    for s in np.unique(side[seeds]):
        rows = np.flatnonzero(side == s)
        tree = cKDTree(zyx[seeds[side[seeds] == s]])
        # the bound is exclusive: the next float up keeps points at exactly ``radius``
        d, _ = tree.query(zyx[rows], k=1, distance_upper_bound=np.nextafter(radius, np.inf))
        near[rows[np.isfinite(d)]] = True
    return near


def screened_scores(
    score: Callable[[np.ndarray], np.ndarray],
    zyx: np.ndarray,
    side: np.ndarray,
    cutoffs: Sequence[float],
    cell: float,
) -> np.ndarray:
    """Scores (N,) or (N, C) of points ``zyx`` (N, 3, voxels) with the screen; NaN where a
    point was not scored.

    ``score(rows)`` returns the predictions of the given rows ((n,) or (n, C), voxels).
    ``cutoffs``: one distance for every class or one per class; a screened point is low when
    it lies below the cutoff of some class. Its neighbours within ``cell`` voxels (same
    side) are scored next.
    """
    n = int(np.asarray(zyx).reshape(-1, 3).shape[0])
    if not len(cutoffs):
        raise ValueError("the screen needs the clustering cutoffs (pipeline.with_refinement)")
    first = screen_rows(zyx, side, cell)
    s_first = np.asarray(score(first), np.float32)
    out = np.full((n, *s_first.shape[1:]), np.nan, np.float32)
    out[first] = s_first
    if first.size == 0:
        return out
    cut = np.asarray(cutoffs, np.float32)
    if s_first.ndim > 1 and cut.size not in (1, s_first.shape[1]):
        raise ValueError(f"{cut.size} screen cutoffs for {s_first.shape[1]} classes")
    low = s_first < cut
    low = low.any(axis=1) if low.ndim > 1 else low
    if not low.any():
        return out
    todo = near_rows(zyx, side, first[low], cell)
    todo[first] = False
    rows = np.flatnonzero(todo)
    if rows.size:
        out[rows] = np.asarray(score(rows), np.float32)
    return out
