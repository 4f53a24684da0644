"""Spatial screen: score a coarse subset of a membrane's points first, then only the points
near a low one.

Only points predicted closer than the clustering threshold are clustered, and on real-SNR
data a few percent are. The predicted distance varies smoothly along the membrane (it is a
distance to the nearest centre), so the points of one ``cell``-voxel cube of space and one
side tell much the same. The screen scores one point per cell and side (the first in row
order), then every point within ``cell`` voxels of a screened point of its side whose
prediction lies below the cutoff (the clustering threshold plus ``refine_margin``); every other
point is left unscored (NaN: never clustered, since clustering keeps finite scores below
the threshold). On the hard phantom's held-out campaigns (seeds 102 / 103, four models, 1 and
4 turns) a 3-voxel screen scored 43-48 % of the points with the same held-out F1 (README).

A membrane is scored in parts (row ranges); a part also scores the screened points of
other parts within reach of its own (:func:`reach_rows`), so which points get scored does not
depend on how the membrane is split. Pure functions; the scoring itself is a callable, so the
same screen serves cubes cut on the host, cut on the device, read from the store or handed
over in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["screen_rows", "near_rows", "reach_rows", "screened_scores"]


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
    cells = np.floor(zyx / cell).astype(np.int64)
    cells -= cells.min(axis=0)
    _, sides = np.unique(np.asarray(side).reshape(-1), return_inverse=True)
    dims = (*(int(d) + 1 for d in cells.max(axis=0)), int(sides.max()) + 1)
    key = np.ravel_multi_index((*cells.T, sides.reshape(-1)), dims)  # one int64 per cell, side
    _, first = np.unique(key, return_index=True)
    return np.sort(first)


def near_rows(zyx: np.ndarray, side: np.ndarray, seeds: np.ndarray, radius: float) -> np.ndarray:
    """Mask (N,): points within ``radius`` voxels of a seed row (indices into ``zyx``) on
    the same side (a seed itself included)."""
    zyx = np.asarray(zyx, np.float64).reshape(-1, 3)
    side = np.asarray(side).reshape(-1)
    seeds = np.asarray(seeds, np.int64).reshape(-1)
    return _within(zyx, side, zyx[seeds], side[seeds], radius)


def _within(zyx: np.ndarray, side: np.ndarray, near_zyx: np.ndarray, near_side: np.ndarray,
            radius: float) -> np.ndarray:
    """Mask of ``zyx`` (N, 3): within ``radius`` of a point of ``near_zyx`` on the same side."""
    out = np.zeros(zyx.shape[0], bool)
    for s in np.unique(near_side):
        rows = np.flatnonzero(side == s)
        if not rows.size:
            continue
        tree = cKDTree(near_zyx[near_side == s])
        # the bound is exclusive: the next float up keeps points at exactly ``radius``
        d, _ = tree.query(zyx[rows], k=1, distance_upper_bound=np.nextafter(radius, np.inf))
        out[rows[np.isfinite(d)]] = True
    return out


def reach_rows(zyx: np.ndarray, side: np.ndarray, start: int, stop: int, cell: float,
               screen: np.ndarray | None = None) -> np.ndarray:
    """Screen rows of a membrane (:func:`screen_rows`, sorted) outside ``start:stop`` that lie
    within ``cell`` voxels of one of the points ``start:stop`` on its side: with the screen
    rows inside, every screened point whose score can decide a point of that part. Scoring
    them with the part makes the screen's outcome independent of how the membrane is split
    into parts. ``screen``: :func:`screen_rows` of the membrane when already known."""
    zyx = np.asarray(zyx, np.float64).reshape(-1, 3)
    side = np.asarray(side).reshape(-1)
    rows = screen_rows(zyx, side, cell) if screen is None else np.asarray(screen, np.int64)
    rows = rows[(rows < start) | (rows >= stop)]
    if not rows.size or stop <= start:
        return rows[:0]
    return rows[_within(zyx[rows], side[rows], zyx[start:stop], side[start:stop], cell)]


def screened_scores(
    score: Callable[[np.ndarray], np.ndarray],
    zyx: np.ndarray,
    side: np.ndarray,
    cutoffs: Sequence[float],
    cell: float,
    screen: np.ndarray | None = None,
    n: int | None = None,
) -> np.ndarray:
    """Scores (n,) or (n, C) of the first ``n`` points of ``zyx`` (N, 3, voxels) with the
    screen; NaN where a point was not scored.

    ``score(rows)`` returns the predictions of the given rows ((k,) or (k, C), voxels).
    ``cutoffs``: one distance for every class or one per class; a screened point is low when
    it lies below the cutoff of some class, and its neighbours within ``cell`` voxels (same
    side) are scored next. ``screen``: the screened rows (default :func:`screen_rows` of all
    points); ``n``: the points wanted (default all; the rows after them only take part in
    the screen, as :func:`reach_rows` gives them).
    """
    zyx = np.asarray(zyx, np.float64).reshape(-1, 3)
    side = np.asarray(side).reshape(-1)
    n = zyx.shape[0] if n is None else int(n)
    if not len(cutoffs):
        raise ValueError("the screen needs the clustering cutoffs (pipeline.with_refinement)")
    first = screen_rows(zyx, side, cell) if screen is None else np.asarray(screen, np.int64)
    s_first = np.asarray(score(first), np.float32)
    out = np.full((n, *s_first.shape[1:]), np.nan, np.float32)
    own = first < n
    out[first[own]] = s_first[own]
    if first.size == 0:
        return out
    cut = np.asarray(cutoffs, np.float32)
    if s_first.ndim > 1 and cut.size not in (1, s_first.shape[1]):
        raise ValueError(f"{cut.size} screen cutoffs for {s_first.shape[1]} classes")
    low = s_first < cut
    low = low.any(axis=1) if low.ndim > 1 else low
    if not low.any():
        return out
    todo = near_rows(zyx, side, first[low], cell)[:n]
    todo[first[own]] = False
    rows = np.flatnonzero(todo)
    if rows.size:
        out[rows] = np.asarray(score(rows), np.float32)
    return out
