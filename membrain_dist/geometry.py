"""Stages 1 + 2 on the campaign store: one membrane in, points / normals / sides / cubes out.

``process_membrane`` reads the membrane's bounding-box blocks from the label array, samples
points and raw normals (``sampling``), votes normals (``normals``), assigns and selects sides
(``sides``) and writes ``<name>/geometry/m<id>`` atomically::

    zyx     float32 (N, 3)        full-tomogram voxel coordinates (z, y, x)
    normal  float32 (N, 3)        voted normal pointing to the point's side (dz, dy, dx)
    side    int8    (N,)          +1 / -1 (closed membranes: +1 outside, -1 inside)
    cubes   float32 (N, s, s, s)  only with ``keep_cubes``: cube axes (z, y, x), z along the normal

The rotation-normalised cubes (``extraction``) are cut batch by batch where they are used
(:func:`membrane_cubes`: scoring, training sets), reading only the tomogram region the batch
needs; a campaign's store then holds points, not ~7 kB of cubes per point.

Tasks get the store path, tomogram name and membrane id only (cheap to ship to dask workers).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from membrain_dist import store
from membrain_dist.extraction import (
    Intensity,
    _margin,
    _read_box,
    extract_batches,
    normalise_intensity,
)
from membrain_dist.normals import vote_normals
from membrain_dist.sampling import sample_membrane
from membrain_dist.sides import SideSpec, assign_sides, enclosed_volume, select_sides

__all__ = ["GeometryConfig", "process_membrane", "read_geometry", "geometry_key", "membrane_cubes",
           "source_cubes"]

log = logging.getLogger(__name__)

STAGE = "geometry"


@dataclass(frozen=True)
class GeometryConfig:
    """Parameters of stages 1 and 2 (all lengths in voxels of the stored tomogram).

    Attributes
    ----------
    band_width
        Band radius around the membrane (paper: 15; v1 used 8 at bin 4).
    min_band_distance
        Band voxels must lie farther than this (0.5 = every non-membrane voxel, v1's 0.5 < d).
    spacing
        Thinning grid edge: at most one point per cell and face (v1: points >= 1.5 apart).
    min_coherence
        Drop points whose band vectors disagree (rims of open sheets; v1 trimmed edges).
    edge_trim
        Drop points this close to the tomogram faces (0 = keep).
    vote_radius, vote_sigma, vote_neighbours, vote_subsample
        Normal voting neighbourhood: radius 10, Gaussian decay sigma 5, about 96 voters
        drawn over the whole radius (a random subset of the points where more lie within it;
        the 96 nearest points of both faces reach only ~6 voxels at spacing 1.5). Hard
        phantom, tuning seed 101, normal at the point nearest each annotated particle (100):
        median 1.65 / mean 3.63 / p90 5.75 deg, against 1.66 / 3.80 / 6.06 with the 96
        nearest and 1.68 / 3.47 / 6.41 with the 400 nearest (4x the cost).
        ``vote_subsample = false`` gives the nearest points' vote of before; the field is part
        of the geometry's provenance, so a store made before it is redone on the next run.
        v1 used a 40-voxel radius with ``exp(-d/100)`` (nearly flat); the chord reflection
        makes votes exact on spheres, so a tighter, decaying kernel only trades noise for
        fidelity on irregular membranes. Measured: radius-20 sphere median 1.0 deg / p95 2.1 deg;
        tilted planes median <= 0.9 / p95 <= 2.0 (tests/test_normals.py).
    min_vote_weight
        Raw normals with mean band distance below this do not vote (v1: zero weight for
        short, unreliable vectors: lattice-quantised directions of recessed boundary voxels).
        Capped at ``band_width / 3`` so narrow bands still vote.
    orient_neighbours
        k of the k-NN graph that orients the normal field consistently (sides).
    cube_size
        Cube edge (paper: 12). 16 (more context around a large complex) did not help on the
        hard phantom: one annotated membrane, tuning seed 101, training seeds 0 / 1, held-out
        F1 0.570 / 0.480 against 0.511 / 0.588, at ~3x the CNN's cost per cube.
    order
        Interpolation order: 1 trilinear (default; ~4x faster), 3 cubic spline as v1.
    batch_size
        Points per extraction batch (one ``map_coordinates`` call each).
    block
        EDT block edge; memory per block ~ 30 B x (block + 2 band_width + 4)^3.
    chunk_points
        Cubes per zarr chunk of the ``cubes`` array.
    intensity_clip
        Normalised intensities are clipped to +-this (v1: 3).
    lowpass_sigma
        Gaussian low-pass (voxels, sigma) of the normalised tomogram before the cubes are cut
        (``extraction.Intensity``); 0 = none, as v1 (which expected denoised tomograms).
    """

    band_width: float = 15.0
    min_band_distance: float = 0.5
    spacing: float = 1.5
    min_coherence: float = 0.5
    edge_trim: float = 0.0
    vote_radius: float = 10.0
    vote_sigma: float = 5.0
    vote_neighbours: int = 96
    vote_subsample: bool = True
    min_vote_weight: float = 3.0
    orient_neighbours: int = 10
    cube_size: int = 12
    order: int = 1
    batch_size: int = 2048
    block: int = 128
    chunk_points: int = 1024
    intensity_clip: float = 3.0
    lowpass_sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.band_width <= self.min_band_distance or self.spacing <= 0:
            raise ValueError("need band_width > min_band_distance and spacing > 0")
        if self.order not in (0, 1, 3) or self.cube_size < 1 or self.batch_size < 1:
            raise ValueError("order must be 0, 1 or 3; cube_size and batch_size positive")
        if not self.lowpass_sigma >= 0:
            raise ValueError(f"lowpass_sigma must be >= 0, got {self.lowpass_sigma}")
        if self.block < 1 or self.chunk_points < 1:
            raise ValueError("block and chunk_points must be positive")


def cube_intensity(attrs: dict | None, cfg: GeometryConfig) -> Intensity | None:
    """The normalisation (and low-pass) cubes are cut with, from a tomogram's ``intensity``
    attrs (None: raw values)."""
    if not attrs:
        return None
    return Intensity.from_attrs(attrs, clip=cfg.intensity_clip, lowpass=cfg.lowpass_sigma)


def geometry_key(name: str, membrane_id: int) -> str:
    """Store key of one membrane's geometry group."""
    return f"{name}/{store.GEOMETRY_KEY}/m{int(membrane_id)}"


# Largest tomogram region (voxels, float32: 4 B each) read at once for a membrane's extraction
REGION_MAX_VOXELS = 32 * 1024**2


def _region_reader(tomo, shape: tuple[int, int, int], zyx: np.ndarray, size: int, order: int,
                   intensity: Intensity | None):
    """``(read_volume, intensity)`` for ``extract_batches``.

    When the points' bounding box plus the extraction margin fits ``REGION_MAX_VOXELS``, the
    region is read and normalised once (batches overlap the same zarr chunks, which would
    otherwise be decoded again for every batch) and batches slice it; ``intensity`` is then
    None (already applied; normalisation is voxel-wise, so the cubes are identical). Otherwise
    every batch reads its own block from the store.
    """
    if zyx.shape[0] == 0:
        return tomo.__getitem__, intensity
    margin = _margin(size, order, intensity.lowpass if intensity is not None else 0.0)
    lo, hi = _read_box(zyx, np.asarray(shape, np.int64), margin)
    if int(np.prod(hi - lo, dtype=np.int64)) > REGION_MAX_VOXELS:
        return tomo.__getitem__, intensity
    region = np.asarray(tomo[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))],
                        np.float32)
    if intensity is not None:
        region = normalise_intensity(region, intensity)

    def read_volume(sl: tuple[slice, slice, slice]) -> np.ndarray:
        # extract_batches' blocks lie inside the region (same margin, same clipping)
        return region[tuple(slice(q.start - int(a), q.stop - int(a)) for q, a in
                            zip(sl, lo, strict=True))]

    return read_volume, None


@dataclass(frozen=True)
class CubeSource:
    """What cutting the cubes of some points needs: a block reader of the tomogram, its shape
    (z, y, x), the points (N, 3) and normals (N, 3), and the normalisation to apply to read
    blocks (None when ``read_volume`` returns normalised values already)."""

    read_volume: Callable[[tuple[slice, slice, slice]], np.ndarray]
    shape_zyx: tuple[int, int, int]
    zyx: np.ndarray
    normal: np.ndarray
    intensity: Intensity | None

    def rows(self, rows: np.ndarray | None) -> CubeSource:
        """The same source for the points ``rows`` (indices; None: all of them)."""
        if rows is None:
            return self
        return replace(self, zyx=self.zyx[rows], normal=self.normal[rows])


def cube_source(root: Path, name: str, meta: store.TomogramMeta, zyx: np.ndarray,
                normal: np.ndarray, cfg: GeometryConfig) -> CubeSource:
    """The stored tomogram as a :class:`CubeSource` of ``zyx``/``normal`` (normalised as
    ``meta.intensity`` says; one region read when it is small enough)."""
    shape = tuple(int(s) for s in meta.shape_zyx)
    intensity = cube_intensity(meta.intensity, cfg)
    if intensity is None:
        log.warning("%s: no intensity attrs, cubes keep raw intensities", name)
    tomo = store.tomogram_array(root, name)
    read_volume, intensity = _region_reader(tomo, shape, zyx, cfg.cube_size, cfg.order, intensity)
    return CubeSource(read_volume, shape, zyx, normal, intensity)


def _cube_batches(src: CubeSource, cfg: GeometryConfig):
    return extract_batches(src.read_volume, src.shape_zyx, src.zyx, src.normal,
                           size=cfg.cube_size, order=cfg.order, batch_size=cfg.batch_size,
                           intensity=src.intensity)


def stored_cubes(root: str | os.PathLike, name: str, membrane_id: int) -> bool:
    """Whether the membrane's geometry group kept its cubes (``keep_cubes``)."""
    path = Path(root).joinpath(*geometry_key(name, membrane_id).split("/"))
    return (path / "cubes" / "zarr.json").is_file()


def _rows_of(arr, start: int, stop: int | None, rows: np.ndarray | None) -> np.ndarray:
    """``arr[start:stop]`` of a ``zarr.Array``, or with ``rows`` (indices, any order) those
    rows in that order."""
    if rows is None:
        return np.asarray(arr[start:stop])
    rows = np.asarray(rows, np.int64)
    uniq, inverse = np.unique(rows, return_inverse=True)  # zarr reads sorted selections
    return np.asarray(arr.oindex[uniq])[inverse]


def membrane_source(root: str | os.PathLike, name: str, membrane_id: int,
                    cfg: GeometryConfig | None = None, start: int = 0,
                    stop: int | None = None, rows: np.ndarray | None = None) -> CubeSource:
    """:class:`CubeSource` of the points ``start:stop`` (or of the points ``rows``, indices in
    that order) of one membrane's stored geometry."""
    import zarr

    cfg = cfg or GeometryConfig()
    root = Path(root)
    key = geometry_key(name, membrane_id)
    if store.node_attrs(root, key) is None:
        raise KeyError(f"{root}: no geometry group {key}")
    g = zarr.open_group(store=str(root), path=key, mode="r")
    zyx = _rows_of(g["zyx"], start, stop, rows).astype(np.float32, copy=False)
    normal = _rows_of(g["normal"], start, stop, rows).astype(np.float32, copy=False)
    meta = store.read_meta(root, name)
    if meta is None:
        raise KeyError(f"{root}: no complete tomogram group {name!r}")
    return cube_source(root, name, meta, zyx, normal, cfg)


def membrane_cubes(root: str | os.PathLike, name: str, membrane_id: int,
                   cfg: GeometryConfig | None = None, start: int = 0,
                   stop: int | None = None, rows: np.ndarray | None = None) -> np.ndarray:
    """Cubes ``(n, s, s, s)`` float32 of the points ``start:stop`` (or ``rows``, indices in
    that order) of one membrane.

    Read from the geometry group when it kept them (``keep_cubes``), otherwise cut now from
    the tomogram (the same cubes: extraction is deterministic). Only the region the points
    need is read. ``cfg`` must be the configuration the geometry was made with."""
    import zarr

    cfg = cfg or GeometryConfig()
    if stored_cubes(root, name, membrane_id):
        g = zarr.open_group(store=str(root), path=geometry_key(name, membrane_id), mode="r")
        return _rows_of(g["cubes"], start, stop, rows).astype(np.float32, copy=False)
    return source_cubes(membrane_source(root, name, membrane_id, cfg, start, stop, rows), cfg)


def source_cubes(src: CubeSource, cfg: GeometryConfig) -> np.ndarray:
    """Cubes ``(n, s, s, s)`` float32 of the points of ``src``, cut now."""
    s = cfg.cube_size
    out = np.empty((src.zyx.shape[0], s, s, s), np.float32)
    if src.zyx.shape[0] == 0:
        return out
    for first, batch in _cube_batches(src, cfg):
        out[first : first + batch.shape[0]] = batch
    return out


def process_membrane(
    root: str | os.PathLike,
    name: str,
    membrane_id: int,
    cfg: GeometryConfig | None = None,
    side_spec: SideSpec | None = None,
    keep_cubes: bool = False,
) -> int:
    """Run stages 1 + 2 for one membrane and write ``<name>/geometry/m<id>``.

    Parameters
    ----------
    root
        Campaign store directory.
    name
        Tomogram group name.
    membrane_id
        Label of the membrane (an ``id`` of the tomogram's ``membranes`` attrs).
    cfg
        Stage parameters (default ``GeometryConfig()``).
    side_spec
        Which side(s) to keep (default both).
    keep_cubes
        Also write the cubes (``cubes``, N x s^3 float32: ~7 kB per point at s = 12, several
        times the tomogram's size): for debugging, training sets or a stage-by-stage run.
        Without them, scoring cuts the cubes itself (:func:`membrane_cubes`).

    Returns
    -------
    int
        Number of points written (or already stored when the provenance is current).
    """
    cfg = cfg or GeometryConfig()
    side_spec = side_spec or SideSpec()
    root = Path(root)
    meta = store.read_meta(root, name)
    if meta is None:
        raise KeyError(f"{root}: no complete tomogram group {name!r}")
    records = [m for m in meta.membranes if int(m["id"]) == int(membrane_id)]
    if not records:
        raise KeyError(f"{root}/{name}: no membrane {membrane_id}")
    record = records[0]
    key = geometry_key(name, membrane_id)
    prov = store.provenance(
        STAGE,
        {**asdict(cfg), "side_spec": side_spec.as_attrs()},
        {"source": meta.source, "intensity": meta.intensity, "membrane": record,
         "shape_zyx": list(meta.shape_zyx)},
    )
    attrs = store.node_attrs(root, key)
    # stored cubes or not, the points are the same; a run that wants cubes redoes a group
    # made without them
    if (attrs is not None and store.is_current(attrs, prov)
            and (attrs.get("cubes", True) or not keep_cubes)):
        log.info("%s: current, skipped", key)
        return int(attrs["n_points"])

    labels = store.labels_array(root, name)
    shape = tuple(int(s) for s in meta.shape_zyx)
    sp = sample_membrane(
        labels.__getitem__, int(membrane_id), record["bbox"], shape,
        band_width=cfg.band_width, min_band_distance=cfg.min_band_distance,
        spacing=cfg.spacing, block=cfg.block, min_coherence=cfg.min_coherence,
        edge_trim=cfg.edge_trim,
    )
    normal = vote_normals(
        sp.zyx, sp.raw_normal, sp.weight, vote_radius=cfg.vote_radius,
        vote_sigma=cfg.vote_sigma, vote_neighbours=cfg.vote_neighbours,
        min_vote_weight=min(cfg.min_vote_weight, cfg.band_width / 3),
        subsample=cfg.vote_subsample,
    )
    cavity = enclosed_volume(sp.coarse_mask)
    side = assign_sides(
        sp.zyx, normal, cavity=cavity, cavity_origin=sp.coarse_origin,
        cavity_factor=sp.coarse_factor, neighbours=cfg.orient_neighbours,
    )
    keep = select_sides(side_spec, sp.zyx, normal, side, closed=cavity is not None)
    zyx, normal, side = sp.zyx[keep], normal[keep], side[keep]
    n = int(zyx.shape[0])
    s = cfg.cube_size
    comp = store.default_compressor()
    with store.atomic_group(root, key) as g:
        for arr_name, data in (("zyx", zyx), ("normal", normal), ("side", side)):
            a = g.create_array(arr_name, shape=data.shape, dtype=data.dtype,
                               chunks=tuple(max(1, c) for c in data.shape), compressors=comp)
            if n:
                a[...] = data
        if keep_cubes:
            # cubes are noisy float32: blosc-lz4 saved ~5% of the bytes at 1/4 of the write
            # speed (benchmarks/geometry.py), so they are stored uncompressed; no chunk of cubes
            # is all zeros, so zarr's check for empty chunks (a second pass over every byte)
            # is skipped: half the write time
            cubes = g.create_array(
                "cubes", shape=(n, s, s, s), dtype=np.float32,
                chunks=(max(1, min(cfg.chunk_points, n)), s, s, s), compressors=None,
                config={"write_empty_chunks": True},
            )
            if n:
                src = cube_source(root, name, meta, zyx, normal, cfg)
                for start, batch in _cube_batches(src, cfg):
                    store.write_rows(cubes, start, batch)
        g.attrs.update({
            "provenance": prov,
            "n_points": n,
            "cubes": bool(keep_cubes),
            "closed": cavity is not None,
            "n_sampled": len(sp),
        })
    log.info("%s: %d points (%d sampled, closed=%s)", key, n, len(sp), cavity is not None)
    return n


def read_geometry(root: str | os.PathLike, name: str, membrane_id: int) -> dict[str, np.ndarray]:
    """Points of one membrane: ``{"zyx", "normal", "side"}`` arrays (cubes not loaded).

    Raises KeyError when the group is missing.
    """
    import zarr

    key = geometry_key(name, membrane_id)
    if store.node_attrs(root, key) is None:
        raise KeyError(f"{root}: no geometry group {key}")
    g = zarr.open_group(store=str(root), path=key, mode="r")
    return {k: np.asarray(g[k][...]) for k in ("zyx", "normal", "side")}
