"""Membrane sides: which face each sampled point samples, and which faces to keep.

Both faces of a segmented membrane are sampled (their raw normals point away from the
membrane, in opposite directions). The voted normals are oriented consistently over the
membrane's point cloud (``normals.orient_consistently``); a point's side is
``sign(voted . field)``, so the two faces get ``+1`` and ``-1``. For a closed membrane (the
pooled mask encloses a volume, ``binary_fill_holes``) the field is turned to point away from
the enclosed volume, so ``+1`` = outside and ``-1`` = inside (normal pointing into the lumen).

Side selection per membrane (manifest ``sides`` column): ``both`` (default), ``inside``,
``outside``, or a CSV with ``membrane,side`` or ``membrane,x,y,z`` rows (a point on the wanted
side, voxels, X = column index). Coordinates are ``(z, y, x)`` voxels.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from membrain_dist.errors import InputError
from membrain_dist.normals import orient_consistently

__all__ = [
    "SideSpec",
    "parse_sides",
    "enclosed_volume",
    "assign_sides",
    "select_sides",
]

log = logging.getLogger(__name__)

SideKind = Literal["both", "inside", "outside", "point"]
_KINDS = ("both", "inside", "outside")


@dataclass(frozen=True)
class SideSpec:
    """Which side(s) of one membrane to keep.

    Attributes
    ----------
    kind
        ``both``, ``inside``, ``outside`` (closed membranes) or ``point``.
    point_zyx
        For ``point``: a voxel position ``(z, y, x)`` on the wanted side.
    """

    kind: SideKind = "both"
    point_zyx: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in (*_KINDS, "point"):
            raise ValueError(f"unknown side kind {self.kind!r}")
        if (self.kind == "point") != (self.point_zyx is not None):
            raise ValueError("point_zyx is required for, and only for, kind='point'")

    def as_attrs(self) -> dict:
        """JSON-serialisable form (for provenance)."""
        return {"kind": self.kind, "point_zyx": None if self.point_zyx is None
                else [float(v) for v in self.point_zyx]}


def parse_sides(value: str | None, base_dir: Path) -> Callable[[int], SideSpec]:
    """Parse a manifest ``sides`` value into a per-membrane lookup.

    Parameters
    ----------
    value
        ``""``/``None``/``both``, ``inside``, ``outside``, or a CSV path (relative to
        ``base_dir`` unless absolute) with header ``membrane,side`` or ``membrane,x,y,z``
        (x, y, z in voxels, X = column index). Membranes absent from the CSV keep both sides.
    base_dir
        Folder of the manifest.

    Returns
    -------
    callable
        ``membrane_id -> SideSpec``.

    Raises
    ------
    InputError
        Missing or malformed CSV (names the file and the problem).
    """
    text = (value or "").strip()
    if text.lower() in ("", *_KINDS):
        spec = SideSpec(text.lower() or "both")  # type: ignore[arg-type]
        return lambda _mid: spec
    path = Path(text)
    if not path.is_absolute():
        path = Path(base_dir) / path
    if not path.is_file():
        raise InputError(path, "sides file not found (expected both|inside|outside or a CSV)")
    table: dict[int, SideSpec] = {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "membrane" not in cols or not ({"side"} <= set(cols) or {"x", "y", "z"} <= set(cols)):
            raise InputError(path, f"needs columns membrane,side or membrane,x,y,z; got {cols}")
        for lineno, row in enumerate(reader, start=2):
            r = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
            try:
                mid = int(r["membrane"])
                if r.get("side"):
                    kind = r["side"].lower()
                    if kind not in _KINDS:
                        raise ValueError(f"side {kind!r} is not one of {_KINDS}")
                    spec = SideSpec(kind)  # type: ignore[arg-type]
                else:
                    x, y, z = (float(r[c]) for c in ("x", "y", "z"))
                    if not np.isfinite([x, y, z]).all():
                        raise ValueError("non-finite coordinate")
                    spec = SideSpec("point", (z, y, x))
            except (KeyError, ValueError) as exc:
                raise InputError(path, f"line {lineno}: {exc}") from exc
            if mid in table:
                raise InputError(path, f"line {lineno}: membrane {mid} listed twice")
            table[mid] = spec
    both = SideSpec("both")
    return lambda mid: table.get(int(mid), both)


def enclosed_volume(coarse_mask: np.ndarray, *, min_fraction: float = 0.05) -> np.ndarray | None:
    """Voxels enclosed by a (pooled) membrane mask, or None when it encloses nothing.

    ``binary_fill_holes(mask) & ~mask``; a cavity smaller than ``min_fraction`` of the mask's
    own volume (a bubble in a thick sheet's segmentation) does not make the membrane closed.
    """
    filled = ndimage.binary_fill_holes(coarse_mask)
    cavity = filled & ~coarse_mask
    n = int(cavity.sum())
    if n == 0 or n < min_fraction * int(coarse_mask.sum()):
        return None
    return cavity


def assign_sides(
    points: np.ndarray,
    normals: np.ndarray,
    *,
    cavity: np.ndarray | None = None,
    cavity_origin: tuple[int, int, int] = (0, 0, 0),
    cavity_factor: int = 1,
    probe: float = 3.0,
    neighbours: int = 10,
) -> np.ndarray:
    """Side ``+1`` / ``-1`` of every point.

    Parameters
    ----------
    points
        ``(N, 3)`` zyx voxels.
    normals
        ``(N, 3)`` unit normals, each pointing to its point's face (voted, raw-signed).
    cavity
        Enclosed volume of a closed membrane (``enclosed_volume``), pooled by ``cavity_factor``
        from full-tomogram voxel ``cavity_origin``; None for open membranes.
    probe
        Distance (voxels, times ``cavity_factor``) stepped along the normal to test whether a
        point faces the cavity.
    neighbours
        k of the orientation graph.

    Returns
    -------
    ndarray
        ``(N,)`` int8 sides. With a cavity, ``-1`` = inside (normal points into the cavity).
    """
    pts = np.asarray(points, np.float32)
    nrm = np.asarray(normals, np.float32)
    if pts.shape[0] == 0:
        return np.zeros(0, np.int8)
    field, comp = orient_consistently(pts, nrm, neighbours=neighbours)
    if cavity is not None:
        step = probe * cavity_factor
        origin = np.asarray(cavity_origin, np.float32)

        def inside(q: np.ndarray) -> np.ndarray:
            c = np.floor((q - origin) / cavity_factor).astype(np.int64)
            ok = np.all((c >= 0) & (c < np.asarray(cavity.shape)), axis=1)
            c = np.where(ok[:, None], c, 0)
            return ok & cavity[c[:, 0], c[:, 1], c[:, 2]]

        # +1 where stepping against the field enters the cavity: the field points outward
        vote = inside(pts - step * field).astype(np.int64) - inside(pts + step * field)
        score = np.bincount(comp, weights=vote, minlength=int(comp.max()) + 1)
        field = field * np.where(score < 0, -1.0, 1.0).astype(np.float32)[comp][:, None]
    dots = np.einsum("ij,ij->i", nrm, field)
    return np.where(dots < 0, -1, 1).astype(np.int8)


def select_sides(
    spec: SideSpec,
    points: np.ndarray,
    normals: np.ndarray,
    sides: np.ndarray,
    *,
    closed: bool,
    neighbours: int = 16,
) -> np.ndarray:
    """Boolean mask of the points to keep under ``spec``.

    ``inside`` / ``outside`` need a closed membrane: on an open one they keep both sides and
    log a warning (unattended campaigns should not stop on one odd membrane). ``point`` keeps
    the side the point lies on, decided by a vote of its ``neighbours`` nearest points: a
    point ``p`` with normal ``n`` votes for its own side when ``(q - p) . n > 0``.
    """
    n = points.shape[0]
    if spec.kind == "both" or n == 0:
        return np.ones(n, bool)
    if spec.kind in ("inside", "outside"):
        if not closed:
            log.warning("side %r asked for an open membrane: keeping both sides", spec.kind)
            return np.ones(n, bool)
        return sides == (-1 if spec.kind == "inside" else 1)
    q = np.asarray(spec.point_zyx, np.float32)
    k = int(min(neighbours, n))
    _, idx = cKDTree(points).query(q, k=k)
    idx = np.atleast_1d(idx)
    toward = np.einsum("ij,ij->i", q - points[idx], normals[idx]) > 0
    vote = int(np.sum(np.where(toward, sides[idx], -sides[idx])))
    wanted = 1 if vote >= 0 else -1
    return sides == wanted
