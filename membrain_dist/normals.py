"""Stage 1b: normal voting over a KD-tree, and consistent orientation of a normal field.

Voting (after Page et al. 2002 / v1): each point's normal is re-estimated from its
neighbours' raw normals. A neighbour's normal ``n_j`` is reflected about the chord
``c = (p_i - p_j) / |p_i - p_j|``: ``n' = n_j - 2 (n_j . c) c``, which maps the normal of a
circle (sphere) through ``p_j`` and ``p_i`` at ``p_j`` exactly onto its normal at ``p_i``, so
curvature does not bias the vote. Votes are summed as weighted outer products; the new normal
is the top eigenvector, signed to agree with the raw (outward) normal.

Neighbours come from ``scipy.spatial.cKDTree.query(k, distance_upper_bound)`` in batches:
memory is ``O(batch x k)``, never ``N x N`` (v1 built a dense distance matrix).

Coordinates are ``(z, y, x)`` voxels; normals ``(dz, dy, dx)`` unit float32.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph
from scipy.spatial import cKDTree

__all__ = ["vote_normals", "orient_consistently"]

log = logging.getLogger(__name__)

_CACHE_ENTRIES = 1 << 24


def _neighbours(
    tree: cKDTree, pts: np.ndarray, k: int, radius: float, batch: int,
    ids: np.ndarray | None = None,
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(start, stop, d, idx, valid)``: the k voters nearest to each point of ``pts``
    within ``radius``, batch by batch. ``tree`` holds the voters; ``ids`` maps its entries to
    indices into ``pts`` (None: the tree holds ``pts`` itself)."""
    n, m = pts.shape[0], tree.n
    k = min(k, m)
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        d, idx = tree.query(pts[start:stop], k=k, distance_upper_bound=radius)
        d = d.reshape(stop - start, k)
        idx = idx.reshape(stop - start, k)
        valid = idx < m
        d = np.where(valid, d, 0.0).astype(np.float32)
        idx = np.where(valid, idx, 0)
        yield start, stop, d, (idx if ids is None else ids[idx]), valid


def _voters(tree: cKDTree, pts: np.ndarray, k: int, radius: float) -> np.ndarray | None:
    """Indices of a random voter subset with about ``k`` voters within ``radius`` of a point.

    The median neighbour count within ``radius`` is measured on up to 512 probe points; when
    it exceeds ``k`` a fixed-seed random ``k / count`` share of the points votes, so the vote
    covers the whole radius at the cost of ``k`` neighbours. None: every point votes.
    """
    n = pts.shape[0]
    if n <= k:
        return None
    rng = np.random.default_rng(0)
    probe = rng.choice(n, size=min(n, 512), replace=False)
    count = float(np.median(tree.query_ball_point(pts[probe], radius, return_length=True)))
    if count <= k:
        return None
    return np.flatnonzero(rng.random(n) < k / count)


def vote_normals(
    points: np.ndarray,
    raw_normals: np.ndarray,
    weights: np.ndarray,
    *,
    vote_radius: float = 10.0,
    vote_sigma: float = 5.0,
    vote_neighbours: int = 96,
    min_vote_weight: float = 3.0,
    batch: int = 4096,
    subsample: bool = True,
) -> np.ndarray:
    """Curvature-aware normal voting.

    Parameters
    ----------
    points
        ``(N, 3)`` float32 zyx voxel coordinates.
    raw_normals
        ``(N, 3)`` float32 unit raw normals (dz, dy, dx), each pointing to its point's face.
    weights
        ``(N,)`` reliability of each raw normal (voxels; mean band distance).
    vote_radius
        Neighbours farther than this do not vote (voxels).
    vote_sigma
        Gaussian distance decay of a vote, ``exp(-d^2 / 2 sigma^2)`` (voxels).
    vote_neighbours
        About this many neighbours vote. Where more points lie within ``vote_radius`` (dense
        sampling), a random subset of the points votes (``subsample``), so the votes cover the
        whole radius: 96 nearest points of a membrane sampled every 1.5 voxels on both faces
        reach only ~6 voxels, which leaves errors correlated over a few voxels (staircase
        segmentation edges) in the vote.
    min_vote_weight
        Neighbours with a weight below this (estimates made only by voxels next to the
        membrane, whose directions are quantised to the grid) get vote weight 0.
    batch
        Points per KD-tree query batch (memory ~ batch x vote_neighbours x 100 B).
    subsample
        False: the ``vote_neighbours`` nearest points vote (before 2026-12), which narrows
        the neighbourhood where the sampling is dense.

    Returns
    -------
    ndarray
        ``(N, 3)`` float32 unit voted normals, signed to agree with ``raw_normals``.

    Notes
    -----
    Only neighbours whose raw normal agrees in sign with the point's (``n_i . n_j > 0``) vote,
    so the opposite face of a thick membrane, a few voxels away, does not tilt the vote.
    Sampled points sit on the voxel lattice (+-0.5 voxel off the true surface); the reflection
    would read that jitter as curvature (a tilt of ``2 dh / L`` for a chord of length L), so
    chords are taken between *smoothed* positions: each point is first moved along a plain
    (unreflected) tensor-vote normal onto the Gaussian-weighted mean of its same-face
    neighbours. On a sphere this shifts all points of a face by the same small amount, which
    keeps the reflection exact. A point without reliable neighbours keeps its raw normal (its
    own vote carries weight 1e-6).
    """
    pts = np.asarray(points, np.float32)
    raw = np.asarray(raw_normals, np.float32)
    w_all = np.asarray(weights, np.float32)
    n = pts.shape[0]
    out = np.empty((n, 3), np.float32)
    if n == 0:
        return out
    k = int(min(vote_neighbours, n))
    tree = cKDTree(pts)
    w_rel = np.where(w_all >= min_vote_weight, w_all, 0.0).astype(np.float32)
    inv2s2 = np.float32(0.5 / vote_sigma**2)

    # positions are smoothed over the nearest points (the same shift for every point of a
    # sphere's face keeps the reflection exact); the votes come from the voter subset
    ids = _voters(tree, pts, k, vote_radius) if subsample else None
    smooth = np.empty_like(pts)
    # the second pass reuses the neighbour lists when they fit in ~128 MB (8 B per entry)
    cache: list | None = [] if ids is None and n * k <= _CACHE_ENTRIES else None
    for start, stop, d, idx, valid in _neighbours(tree, pts, k, vote_radius, batch):
        if cache is not None:
            cache.append((start, stop, d, idx.astype(np.int32), valid))
        ni = raw[start:stop]
        nj = raw[idx]
        g = np.exp(-d * d * inv2s2) * (valid & (np.einsum("bc,bkc->bk", ni, nj) > 0))
        e = _top_eigenvector(_tensor(g * w_rel[idx], nj), ni)
        mean = np.matmul(g[:, None, :], pts[idx])[:, 0] / g.sum(1, keepdims=True)
        shift = np.einsum("bc,bc->b", pts[start:stop] - mean, e)
        smooth[start:stop] = pts[start:stop] - shift[:, None] * e

    if ids is not None:
        second = _neighbours(cKDTree(pts[ids]), pts, k, vote_radius, batch, ids)
    else:
        second = cache if cache is not None else _neighbours(tree, pts, k, vote_radius, batch)
    for start, stop, d, idx, valid in second:
        ni = raw[start:stop]
        nj = raw[idx]
        chord = smooth[start:stop, None, :] - smooth[idx]
        clen = np.linalg.norm(chord, axis=2, keepdims=True)
        c = np.divide(chord, clen, out=np.zeros_like(chord), where=clen > 1e-3)
        nr = nj - 2.0 * np.einsum("bkc,bkc->bk", nj, c)[..., None] * c
        agree = np.einsum("bc,bkc->bk", ni, nj) > 0
        w = w_rel[idx] * np.exp(-d * d * inv2s2) * (valid & agree)
        out[start:stop] = _top_eigenvector(_tensor(w, nr), ni)
    return out


def _tensor(w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``sum_k w[b, k] v[b, k] v[b, k]^T`` as ``(B, 3, 3)`` (batched matmul)."""
    return np.matmul(np.swapaxes(v * w[..., None], 1, 2), v)


def _top_eigenvector(t: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Top eigenvectors of ``(B, 3, 3)`` tensors, signed to agree with ``ref`` (B, 3)."""
    t = t + 1e-6 * ref[:, :, None] * ref[:, None, :]
    _, vecs = np.linalg.eigh(t)
    e = vecs[:, :, 2]
    sgn = np.where(np.einsum("bc,bc->b", e, ref) < 0, -1.0, 1.0).astype(np.float32)
    return (e * sgn[:, None]).astype(np.float32)


def orient_consistently(
    points: np.ndarray, normals: np.ndarray, *, neighbours: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Orient an unsigned normal field consistently over a point cloud (Hoppe et al. 1992).

    A k-nearest-neighbour graph weighted by ``1 - |n_i . n_j|`` is reduced to its minimum
    spanning forest; signs are propagated from one root per connected component along the
    forest (breadth-first predecessors, resolved by vectorised pointer jumping).

    Parameters
    ----------
    points
        ``(N, 3)`` zyx voxel coordinates.
    normals
        ``(N, 3)`` unit normals (dz, dy, dx); their signs are ignored.
    neighbours
        k of the k-nearest-neighbour graph.

    Returns
    -------
    field
        ``(N, 3)`` float32 consistently oriented normals. Each component's overall sign is
        fixed deterministically: its mean field has a positive largest-magnitude component.
    component
        ``(N,)`` int64 connected-component label of each point in the graph.
    """
    pts = np.asarray(points, np.float32)
    nrm = np.asarray(normals, np.float32)
    n = pts.shape[0]
    if n == 0:
        return nrm.copy(), np.zeros(0, np.int64)
    k = int(min(neighbours + 1, n))
    if k > 1:
        _, idx = cKDTree(pts).query(pts, k=k)
        rows = np.repeat(np.arange(n), k - 1)
        cols = idx[:, 1:].ravel()
        ok = cols < n
        rows, cols = rows[ok], cols[ok]
        wt = 1.0 - np.abs(np.einsum("ij,ij->i", nrm[rows], nrm[cols])) + 1e-6
        g = sparse.csr_matrix((wt, (rows, cols)), shape=(n, n))
        g = g.maximum(g.T)
        forest = csgraph.minimum_spanning_tree(g)
        forest = forest.maximum(forest.T).tocsr()
    else:
        forest = sparse.csr_matrix((n, n))
    ncomp, comp = csgraph.connected_components(forest, directed=False)
    _, roots = np.unique(comp, return_index=True)
    # a virtual node n links one root per component, so one BFS covers the whole forest
    coo = forest.tocoo()
    vr = np.full(roots.size, n)
    g2 = sparse.csr_matrix(
        (
            np.concatenate([coo.data, np.ones(2 * roots.size)]),
            (np.concatenate([coo.row, vr, roots]), np.concatenate([coo.col, roots, vr])),
        ),
        shape=(n + 1, n + 1),
    )
    _, pred = csgraph.breadth_first_order(g2, n, directed=False, return_predecessors=True)
    ptr = pred[:n].astype(np.int64)
    ptr[roots] = roots
    rel = np.where(np.einsum("ij,ij->i", nrm, nrm[ptr]) < 0, -1, 1).astype(np.int8)
    while True:  # pointer jumping: O(log depth) vectorised passes
        nxt = ptr[ptr]
        if np.array_equal(nxt, ptr):
            break
        rel = rel * rel[ptr]
        ptr = nxt
    field = nrm * rel[:, None].astype(np.float32)
    mean = np.stack([np.bincount(comp, weights=field[:, a], minlength=ncomp) for a in range(3)], 1)
    big = mean[np.arange(ncomp), np.argmax(np.abs(mean), axis=1)]
    flip = np.where(big < 0, -1.0, 1.0).astype(np.float32)
    field *= flip[comp][:, None]
    log.debug("oriented %d normals in %d components", n, ncomp)
    return field.astype(np.float32), comp.astype(np.int64)
