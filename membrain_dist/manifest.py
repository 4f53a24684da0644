"""Campaign manifest CSV: one row per tomogram.

Columns ``name,tomogram,segmentation,particles,voxel_size_A,split`` plus optional ``sides``,
``polarity`` and ``particles_angpix`` columns; paths may be relative to the manifest's folder.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

__all__ = ["TomogramEntry", "REQUIRED_COLUMNS", "SPLITS", "read_manifest", "write_manifest"]

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("name", "tomogram", "segmentation", "particles", "voxel_size_A", "split")
SPLITS = ("train", "val", "test")
_SIDE_WORDS = ("both", "inside", "outside")


@dataclass(frozen=True)
class TomogramEntry:
    """One manifest row, paths resolved (absolute).

    Attributes
    ----------
    name
        Tomogram name (``rlnTomoName``; store group name).
    tomogram, segmentation
        MRC files or OME-Zarr images (NGFF 0.4 / 0.5 folders; the level of ``voxel_size_A``
        is read, the first level without it).
    particles
        STAR file of ground-truth picks, ``None`` for tomograms to predict.
    voxel_size_A
        Voxel size in Å overriding the MRC header, ``None`` to use the header.
    split
        ``"train"``, ``"val"`` or ``"test"``.
    sides
        ``"both"``, ``"inside"``, ``"outside"`` or the path of a per-membrane side CSV.
    polarity
        Membrane contrast forced by the manifest: ``-1`` dark (raw cryo-ET), ``+1`` bright;
        ``None`` (empty or ``auto``): decided from the data, one sign per campaign.
    particles_angpix
        Pixel size (Å) of the ``particles`` STAR's ``rlnCoordinateX/Y/Z`` when it differs from
        the tomogram's voxel size (unbinned picks for a binned tomogram); ``None``: the
        STAR's own pixel size (``data_optics``), else voxels of the tomogram. The manifest
        column holds a number or a RELION ``tomograms.star`` (its
        ``rlnTomoTiltSeriesPixelSize`` for this row's name).
    """

    name: str
    tomogram: Path
    segmentation: Path
    particles: Path | None
    voxel_size_A: float | None
    split: str
    sides: str = "both"
    polarity: int | None = None
    particles_angpix: float | None = None


_POLARITY_WORDS = {"": None, "auto": None, "dark": -1, "bright": 1, "-1": -1, "1": 1, "+1": 1}


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def read_manifest(path: str | os.PathLike) -> list[TomogramEntry]:
    """Read and validate a manifest.

    Raises
    ------
    InputError
        Naming the manifest (and the row / tomogram name) for: a missing column, an empty
        name, a duplicate name, a missing file, a bad split, or a voxel size that is not a
        positive number.
    """
    mpath = Path(path)
    if mpath.is_dir():
        raise InputError(mpath, "is a folder, not a manifest CSV file")
    if not mpath.is_file():
        raise InputError(mpath, "manifest not found")
    if mpath.stat().st_size == 0:
        raise InputError(mpath, f"manifest is empty (0 bytes); expected a CSV header "
                                f"{','.join(REQUIRED_COLUMNS)} and one row per tomogram")
    base = mpath.resolve().parent
    try:
        with open(mpath, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(mpath, f"unreadable manifest ({exc})") from exc
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        read = ",".join(header) if header else "no header line"
        hint = ""
        if len(header) == 1:
            sep = next((c for c in (";", "\t", "|") if c in header[0]), None)
            if sep is not None:
                hint = f" (the file looks {sep!r}-separated: a manifest is comma-separated)"
        raise InputError(mpath, f"missing column(s) {', '.join(missing)}; expected "
                                f"{','.join(REQUIRED_COLUMNS)}; read header {read[:200]!r}"
                                f"{hint}")
    if not rows:
        raise InputError(mpath, "manifest has no rows")
    entries: list[TomogramEntry] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(rows, start=2):  # line 1 is the header
        if None in raw:  # csv.DictReader keeps the fields beyond the header under None
            extra = raw[None]
            raise InputError(mpath, f"line {i}: {len(header) + len(extra)} fields, the header "
                                    f"has {len(header)} (extra: {extra!r}); quote a value "
                                    "that holds a comma")
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        name = row["name"]
        where = f"line {i} ({name})" if name else f"line {i}"
        if not name:
            raise InputError(mpath, f"{where}: empty name")
        if name == "OME":
            raise InputError(mpath, f"{where}: the name 'OME' is reserved (the store's index "
                                    "of tomograms)")
        if "/" in name or "\\" in name or name.startswith(".") or ".tmp-" in name:
            raise InputError(mpath, f"{where}: name {name!r} may not contain '/', '\\' or "
                                    "'.tmp-' nor start with '.' (it names a store group)")
        if name in seen:
            raise InputError(mpath, f"{where}: duplicate name {name!r} "
                                    f"(first on line {seen[name]})")
        seen[name] = i
        files: dict[str, Path | None] = {}
        for col in ("tomogram", "segmentation", "particles"):
            val = row[col]
            if not val:
                if col == "particles":
                    files[col] = None
                    continue
                raise InputError(mpath, f"{where}: empty {col} path")
            p = _resolve(base, val)
            if col != "particles" and p.is_dir():
                from .omezarr import is_ome_zarr

                if not is_ome_zarr(p):
                    raise InputError(mpath, f"{where}: {col} {p} is a folder but not an "
                                            "OME-Zarr image (no zarr.json / .zattrs)")
            elif not p.is_file():
                raise InputError(mpath, f"{where}: {col} file not found: {p}")
            files[col] = p
        vs_txt = row["voxel_size_A"]
        voxel: float | None = None
        if vs_txt:
            try:
                voxel = float(vs_txt)
            except ValueError:
                raise InputError(
                    mpath, f"{where}: voxel_size_A {vs_txt!r} is not a number") from None
            if not math.isfinite(voxel) or voxel <= 0:
                raise InputError(mpath, f"{where}: voxel_size_A must be > 0 Å, got {vs_txt}")
        split = row["split"].lower() or "test"
        if split not in SPLITS:
            raise InputError(mpath, f"{where}: split {row['split']!r} is not one of {SPLITS}")
        sides = row.get("sides", "") or "both"
        if sides not in _SIDE_WORDS:
            sp = _resolve(base, sides)
            if not sp.is_file():
                raise InputError(mpath, f"{where}: sides is neither {'/'.join(_SIDE_WORDS)} "
                                        f"nor an existing file: {sp}")
            sides = str(sp)
        pol_txt = (row.get("polarity", "") or "").lower()
        if pol_txt not in _POLARITY_WORDS:
            raise InputError(mpath, f"{where}: polarity {row['polarity']!r} is not dark, bright "
                                    "or auto (the membranes' contrast)")
        angpix = _particles_angpix(mpath, base, where, name, row.get("particles_angpix", ""))
        entries.append(TomogramEntry(
            name=name, tomogram=files["tomogram"], segmentation=files["segmentation"],  # type: ignore[arg-type]
            particles=files["particles"], voxel_size_A=voxel, split=split, sides=sides,
            polarity=_POLARITY_WORDS[pol_txt], particles_angpix=angpix))
    log.info("%s: %d tomograms", mpath, len(entries))
    return entries


def _particles_angpix(mpath: Path, base: Path, where: str, name: str,
                      text: str | None) -> float | None:
    """The ``particles_angpix`` cell: empty, a pixel size (Å) or a RELION tomograms.star."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        path = _resolve(base, text)
        if not path.is_file():
            raise InputError(mpath, f"{where}: particles_angpix {text!r} is neither a pixel "
                                    f"size (Å) nor an existing tomograms.star: {path}") from None
        from .star import tomograms_pixel_size

        return tomograms_pixel_size(path, name)
    if not math.isfinite(value) or value <= 0:
        raise InputError(mpath, f"{where}: particles_angpix must be > 0 Å, got {text}")
    return value


def _rel(p: Path | str | None, base: Path) -> str:
    if p is None:
        return ""
    q = Path(p).resolve()
    try:
        return q.relative_to(base).as_posix()
    except ValueError:
        return str(q)


def write_manifest(entries: Sequence[TomogramEntry], path: str | os.PathLike) -> None:
    """Write a manifest atomically; paths inside the manifest's folder are written relative.

    The ``sides`` (``polarity``, ``particles_angpix``) column is written only when some entry
    differs from ``"both"`` (``auto``, ``None``).
    """
    mpath = Path(path)
    base = mpath.resolve().parent
    with_sides = any(e.sides != "both" for e in entries)
    with_polarity = any(e.polarity is not None for e in entries)
    with_angpix = any(e.particles_angpix is not None for e in entries)
    cols = (list(REQUIRED_COLUMNS) + (["sides"] if with_sides else [])
            + (["polarity"] if with_polarity else [])
            + (["particles_angpix"] if with_angpix else []))
    tmp = mpath.with_name(f".{mpath.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for e in entries:
                row = [e.name, _rel(e.tomogram, base), _rel(e.segmentation, base),
                       _rel(e.particles, base),
                       "" if e.voxel_size_A is None else repr(float(e.voxel_size_A)), e.split]
                if with_sides:
                    row.append(e.sides if e.sides in _SIDE_WORDS else _rel(e.sides, base))
                if with_polarity:
                    row.append({None: "auto", -1: "dark", 1: "bright"}[e.polarity])
                if with_angpix:
                    row.append("" if e.particles_angpix is None else repr(float(e.particles_angpix)))
                w.writerow(row)
        os.replace(tmp, mpath)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
