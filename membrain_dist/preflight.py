"""Checks of every input and output a command names, before any compute.

Each check raises :class:`~membrain_dist.errors.InputError` naming the file or folder at
fault (the CLI turns it into exit status 2). Cheap by design: headers, small JSON files, the
model's weights (a few MB, checked against their SHA-256) and the particle STARs; the volumes
themselves are read by the pipeline.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from .errors import InputError
from .manifest import TomogramEntry

__all__ = ["output_dir", "store_location", "check_model", "check_particle_tables",
           "check_template", "check_entries"]

log = logging.getLogger(__name__)


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def _check_creatable(path: Path, what: str) -> None:
    anc = _existing_ancestor(path)
    if anc == path:
        if not path.is_dir():
            raise InputError(path, f"{what} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(path, f"{what} is not writable")
        return
    if not anc.is_dir():
        raise InputError(path, f"{what} cannot be created: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise InputError(path, f"{what} cannot be created: {anc} is not writable")


def _probe(folder: Path, what: str) -> None:
    """Create and delete a file in ``folder`` (read-only mounts, root-squashed shares)."""
    probe = folder / f".membrain-dist-probe-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(folder, f"{what} is not writable ({exc.strerror or exc})") from None


def output_dir(path: str | os.PathLike, what: str = "output folder", create: bool = True
               ) -> Path:
    """A folder the command writes into: created (with parents) and probed for writing."""
    p = Path(path).expanduser().absolute()
    _check_creatable(p, what)
    if create:
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(p, f"{what} cannot be created ({exc.strerror or exc})") from None
        _probe(p, what)
    return p


def store_location(path: str | os.PathLike) -> Path:
    """A campaign Zarr store: a folder (existing or not) whose parent folder is writable."""
    p = Path(path).expanduser().absolute()
    _check_creatable(p, "store")
    if p.is_dir() and any(p.iterdir()) and not (p / "zarr.json").is_file():
        raise InputError(p, "store folder exists, is not empty and holds no zarr.json: "
                            "not a campaign store")
    parent = output_dir(p.parent, "store's parent folder")
    if p.is_dir():
        _probe(p, "store")
    return parent / p.name


def check_model(model_dir: str | os.PathLike, entries: Sequence[TomogramEntry] = ()):
    """The model loads (metadata, SHA-256 of the weights, tensor shapes) and was trained at
    the voxel size of every row (header or manifest, see ``convert.resolve_voxel_size``).
    Returns its :class:`~membrain_dist.model.ModelMeta`."""
    from .convert import resolve_voxel_size, validate_entry
    from .model import META_FILE, VOXEL_SIZE_RTOL, load_model

    _, meta = load_model(model_dir, "cpu")
    trained = meta.voxel_size_A
    for e in entries:
        tinfo, sinfo = validate_entry(e)
        vs = resolve_voxel_size(e, tinfo, sinfo)
        if trained and abs(vs - trained) > VOXEL_SIZE_RTOL * trained:
            raise InputError(Path(model_dir) / META_FILE,
                             f"model was trained at {trained:.4g} Å/voxel; tomogram {e.name} "
                             f"({e.tomogram}) is {vs:.4g} Å/voxel: predict with a model of "
                             "that voxel size (or fix voxel_size_A in the manifest)")
    return meta


def check_particle_tables(entries: Sequence[TomogramEntry], training: bool = False) -> None:
    """Every particles STAR of the rows reads and has the required columns; for training
    rows it also holds particles of that tomogram (``rlnTomoName``) whose coordinates land in
    the tomogram (their pixel size known: see ``star.to_tomogram_voxels``)."""
    from .convert import resolve_voxel_size, validate_entry
    from .pipeline import annotated_particles
    from .star import read_particles

    for e in entries:
        if e.particles is None:
            continue
        if training:
            tinfo, sinfo = validate_entry(e)
            annotated_particles(e, tinfo.shape_zyx, resolve_voxel_size(e, tinfo, sinfo))
        else:
            read_particles(e.particles)


def check_template(path: str | os.PathLike | None) -> None:
    """The particle template (labels) is a readable 3D MRC."""
    if not path:
        return
    from . import mrc

    mrc.read_info(path)


def check_entries(entries: Sequence[TomogramEntry]) -> None:
    """Header checks of every row (see ``convert.validate_entry``)."""
    from .pipeline import validate_entries

    validate_entries(entries)
