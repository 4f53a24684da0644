"""copick projects on a local filesystem, read and written without the copick package.

copick 1.x pins ``zarr < 3``, so it cannot be a dependency; this module reads and writes its
documented layout (``copick.impl.filesystem``) itself::

    config.json                       {"pickable_objects": [...], "overlay_root": "local:///...",
                                       "static_root": "local:///...", "config_type": ...}
    <root>/ExperimentRuns/<run>/
      VoxelSpacing<vs:.3f>/<tomo_type>.zarr            OME-Zarr tomogram (NGFF 0.4, levels 0, 1, 2)
      Segmentations/<vs:.3f>_<user>_<session>_<name>.zarr    OME-Zarr segmentation
      Picks/<user>_<session>_<object>.json             points

A picks file holds ``pickable_object_name``, ``user_id``, ``session_id``, ``run_name``,
``voxel_spacing``, ``unit`` ("angstrom"), ``trust_orientation`` and ``points``: each
``{"location": {"x", "y", "z"} (Å), "transformation_": 4x4, "instance_id", "score"}``. The
4x4's rotation block takes particle (object) coordinates to tomogram XYZ: it is CONVENTIONS.md's
``M`` (``transformation_[i][j] = M[i, j]``); its translation column holds shifts (0 here: the
location is the centre). A location in Å is ``voxel index x voxel spacing``: the voxel centre
of index k lies at ``k * vs`` (the data portal's point annotations are voxel indices; copick
multiplies them by the spacing), the convention of this package's store coordinates too.
Reads look in the overlay root first, then the static root; writes go to the overlay root.
Only local roots (a path or ``local://``) are supported.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import axes
from .errors import InputError

__all__ = ["CopickProject", "PickSet", "read_project", "read_picks", "find_picks", "write_picks",
           "tomogram_path", "segmentation_path", "build_manifest", "export_predictions"]

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CopickProject:
    """A copick project: its config file, roots (overlay first) and pickable objects."""

    config: Path
    overlay: Path
    static: Path | None
    objects: tuple[str, ...]

    @property
    def roots(self) -> list[Path]:
        return [self.overlay] + ([self.static] if self.static and self.static != self.overlay
                                 else [])

    def runs(self) -> list[str]:
        """Run names found under either root (sorted)."""
        names: set[str] = set()
        for r in self.roots:
            d = r / "ExperimentRuns"
            if d.is_dir():
                names |= {p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")}
        return sorted(names)


@dataclass
class PickSet:
    """Points of one picks file: ``xyz_A`` (N, 3) Å, ``matrices`` (N, 3, 3) ``M`` in XYZ,
    ``scores`` (N,), and the file's identity."""

    object_name: str
    user_id: str
    session_id: str
    run: str
    xyz_A: np.ndarray
    matrices: np.ndarray
    scores: np.ndarray
    voxel_spacing: float | None = None
    trust_orientation: bool = True
    path: Path | None = None


def _root(config: Path, value: object, key: str) -> Path | None:
    if value in (None, ""):
        return None
    text = str(value)
    if "://" in text:
        proto, _, rest = text.partition("://")
        if proto not in ("local", "file"):
            raise InputError(config, f"{key} {text!r}: only local copick roots are supported "
                                     "(a path or local://...)")
        text = rest
    p = Path(text).expanduser()
    return p if p.is_absolute() else (config.parent / p).resolve()


def read_project(config: str | os.PathLike) -> CopickProject:
    """Read a copick config JSON (filesystem type).

    Raises
    ------
    InputError
        Missing or unreadable file, no ``overlay_root``, a non-local root.
    """
    c = Path(config)
    if not c.is_file():
        raise InputError(c, "copick config not found")
    try:
        data = json.loads(c.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(c, f"unreadable copick config ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(c, "a copick config is a JSON object")
    overlay = _root(c, data.get("overlay_root"), "overlay_root")
    static = _root(c, data.get("static_root"), "static_root")
    if overlay is None:
        if static is None:
            raise InputError(c, "no overlay_root (nor static_root): not a filesystem copick config")
        overlay = static
    objects = tuple(str(o.get("name")) for o in data.get("pickable_objects") or []
                    if isinstance(o, dict) and o.get("name"))
    return CopickProject(config=c, overlay=overlay, static=static, objects=objects)


def _run_dirs(project: CopickProject, run: str) -> list[Path]:
    return [r / "ExperimentRuns" / run for r in project.roots]


def tomogram_path(project: CopickProject, run: str, voxel_spacing: float, tomo_type: str) -> Path:
    """``VoxelSpacing<vs:.3f>/<tomo_type>.zarr`` of a run (overlay, then static root)."""
    for d in _run_dirs(project, run):
        p = d / f"VoxelSpacing{voxel_spacing:.3f}" / f"{tomo_type}.zarr"
        if p.is_dir():
            return p
    have = sorted({q.relative_to(d).as_posix() for d in _run_dirs(project, run)
                   for q in d.glob("VoxelSpacing*/*.zarr")})
    raise InputError(project.config, f"run {run!r}: no tomogram VoxelSpacing{voxel_spacing:.3f}/"
                                     f"{tomo_type}.zarr (found {have[:6]})")


def segmentation_path(project: CopickProject, run: str, voxel_spacing: float, name: str,
                      user_id: str | None = None, session_id: str | None = None) -> Path:
    """``Segmentations/<vs:.3f>_<user>_<session>_<name>.zarr`` of a run; user and session
    narrow the choice; several left is an error naming them."""
    found: list[Path] = []
    for d in _run_dirs(project, run):
        seg = d / "Segmentations"
        if not seg.is_dir():
            continue
        prefix = f"{voxel_spacing:.3f}_"
        for p in sorted(seg.glob(f"{prefix}*_{name}.zarr")):
            middle = p.name[len(prefix):-len(f"_{name}.zarr")]
            user, _, session = middle.rpartition("_")
            if (user_id is None or user == user_id) and (session_id is None or session == session_id):
                found.append(p)
        if found:
            break
    if not found:
        raise InputError(project.config, f"run {run!r}: no segmentation {name!r} at voxel "
                                         f"spacing {voxel_spacing:.3f}"
                                         + (f" by {user_id}/{session_id}" if user_id or session_id
                                            else ""))
    if len(found) > 1:
        raise InputError(project.config, f"run {run!r}: {len(found)} segmentations {name!r} "
                                         f"({[p.name for p in found]}): give the user and session")
    return found[0]


def read_picks(path: str | os.PathLike) -> PickSet:
    """Read one copick picks JSON.

    Raises
    ------
    InputError
        Unreadable file, a unit other than Å, a point without location, a transformation that
        is not 4x4 with last row (0, 0, 0, 1) and a rotation block.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(p, f"unreadable copick picks file ({exc})") from exc
    unit = str(data.get("unit", "angstrom")).lower()
    if unit != "angstrom":
        raise InputError(p, f"unit {unit!r}: only angstrom picks are read")
    pts = data.get("points") or []
    xyz = np.zeros((len(pts), 3))
    mats = np.tile(np.eye(3), (len(pts), 1, 1))
    scores = np.ones(len(pts))
    for i, pt in enumerate(pts):
        try:
            loc = pt["location"]
            xyz[i] = (float(loc["x"]), float(loc["y"]), float(loc["z"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(p, f"point {i}: no location x, y, z ({exc})") from exc
        t = pt.get("transformation_")
        if t is not None:
            a = np.asarray(t, dtype=np.float64)
            if a.shape != (4, 4) or not np.allclose(a[3], [0, 0, 0, 1]):
                raise InputError(p, f"point {i}: transformation_ is not a 4x4 with last row "
                                    "(0, 0, 0, 1)")
            r = a[:3, :3]
            if not np.allclose(r @ r.T, np.eye(3), atol=1e-4) or np.linalg.det(r) < 0:
                raise InputError(p, f"point {i}: transformation_ holds no rotation")
            mats[i] = r
            xyz[i] += a[:3, 3]  # a shift in the translation column moves the point
        if pt.get("score") is not None:
            scores[i] = float(pt["score"])
    vs = data.get("voxel_spacing")
    return PickSet(object_name=str(data.get("pickable_object_name", "")),
                   user_id=str(data.get("user_id", "")), session_id=str(data.get("session_id", "")),
                   run=str(data.get("run_name") or p.parent.parent.name), xyz_A=xyz, matrices=mats,
                   scores=scores, voxel_spacing=None if vs is None else float(vs),
                   trust_orientation=bool(data.get("trust_orientation", True)), path=p)


def find_picks(project: CopickProject, run: str, object_name: str, user_id: str | None = None,
               session_id: str | None = None) -> list[PickSet]:
    """The picks files of an object in a run (both roots), by their JSON contents."""
    out = []
    for d in _run_dirs(project, run):
        for f in sorted((d / "Picks").glob("*.json")) if (d / "Picks").is_dir() else []:
            ps = read_picks(f)
            if ps.object_name != object_name:
                continue
            if (user_id is None or ps.user_id == user_id) and (
                    session_id is None or ps.session_id == session_id):
                out.append(ps)
    return out


def write_picks(project: CopickProject, picks: PickSet) -> Path:
    """Write ``picks`` to the overlay root as ``Picks/<user>_<session>_<object>.json``
    (atomically: temporary file + rename)."""
    for field_name in ("user_id", "session_id", "object_name", "run"):
        v = getattr(picks, field_name)
        if not v or "/" in v or v.startswith("."):
            raise InputError(project.config, f"copick {field_name} {v!r} is empty or not a "
                                             "plain name")
    d = project.overlay / "ExperimentRuns" / picks.run / "Picks"
    d.mkdir(parents=True, exist_ok=True)
    points = []
    for xyz, m, s in zip(np.asarray(picks.xyz_A, np.float64), np.asarray(picks.matrices, np.float64),
                         np.asarray(picks.scores, np.float64), strict=True):
        t = np.eye(4)
        t[:3, :3] = m
        points.append({"location": {"x": float(xyz[0]), "y": float(xyz[1]), "z": float(xyz[2])},
                       "transformation_": t.tolist(), "instance_id": 0, "score": float(s)})
    data = {"pickable_object_name": picks.object_name, "user_id": picks.user_id,
            "session_id": picks.session_id, "run_name": picks.run,
            "voxel_spacing": None if picks.voxel_spacing is None else float(picks.voxel_spacing),
            "unit": "angstrom", "points": points, "trust_orientation": picks.trust_orientation}
    path = d / f"{picks.user_id}_{picks.session_id}_{picks.object_name}.json"
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def build_manifest(config: str | os.PathLike, out: str | os.PathLike, voxel_spacing: float,
                   tomo_type: str, segmentation: str, seg_user: str | None = None,
                   seg_session: str | None = None, picks_object: str | None = None,
                   picks_user: str | None = None, picks_session: str | None = None,
                   val_runs: Sequence[str] = (), runs: Sequence[str] | None = None) -> Path:
    """A campaign manifest from a copick project: one row per run with the tomogram
    ``<tomo_type>`` at ``voxel_spacing`` (OME-Zarr, read in place), the segmentation
    ``segmentation`` and, where the run has picks of ``picks_object``, a particles STAR
    written beside the manifest (``copick_particles/<run>.star``, voxels of the tomogram,
    RELION angles from the 4x4s unless ``trust_orientation`` is false or every 4x4 is the
    identity, copick's default). Runs with picks are
    ``train`` rows (``val`` when listed in ``val_runs``), the others ``test`` rows."""
    from .manifest import TomogramEntry, write_manifest
    from .omezarr import read_info
    from .star import ANGLE_COLUMNS, particles_frame, write_particles

    project = read_project(config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list(runs) if runs is not None else project.runs()
    if not names:
        raise InputError(project.config, "no runs under ExperimentRuns in either root")
    entries = []
    for run in names:
        tomo = tomogram_path(project, run, voxel_spacing, tomo_type)
        seg = segmentation_path(project, run, voxel_spacing, segmentation, seg_user, seg_session)
        star = None
        sets = find_picks(project, run, picks_object, picks_user, picks_session) if picks_object else []
        if len(sets) > 1:
            raise InputError(project.config, f"run {run!r}: {len(sets)} picks files of "
                                             f"{picks_object!r} ({[s.path.name for s in sets]}): "
                                             "give the user and session")
        if sets:
            ps = sets[0]
            info = read_info(tomo, voxel_spacing)
            zyx = axes.xyz_to_zyx(ps.xyz_A / voxel_spacing)
            df = particles_frame(run, zyx, axes.matrix_xyz_to_zyx(ps.matrices), info.shape_zyx,
                                 voxel_spacing, extra={"mbScore": ps.scores})
            if not ps.trust_orientation or np.allclose(ps.matrices, np.eye(3)):
                # copick's default transformation is the identity: no orientation was given
                df = df.drop(columns=list(ANGLE_COLUMNS))
            star = out.parent / "copick_particles" / f"{run}.star"
            star.parent.mkdir(exist_ok=True)
            write_particles(star, df)
        split = "test" if star is None else ("val" if run in val_runs else "train")
        entries.append(TomogramEntry(name=run, tomogram=tomo, segmentation=seg, particles=star,
                                     voxel_size_A=float(voxel_spacing), split=split))
    write_manifest(entries, out)
    log.info("%s: %d runs (%d annotated)", out, len(entries),
             sum(e.particles is not None for e in entries))
    return out


def export_predictions(config: str | os.PathLike, pred_dir: str | os.PathLike,
                       object_name: str | None = None, user_id: str = "membrain",
                       session_id: str = "0",
                       names: Sequence[str] | None = None) -> list[Path]:
    """Write predict's ``<pred>/<name>.star`` files into a copick project as picks under
    ``user_id`` / ``session_id`` (run = tomogram name): locations in Å (voxels x the STAR's
    ``rlnMicrographPixelSize``), orientations as 4x4s, score = ``mbScore`` (the predicted
    distance in voxels: lower is surer).

    Picks of a model with named classes (an ``mbClassName`` column) go to the pickable object
    of each class's name, one picks file per class; ``object_name`` names the object of
    single-class picks (and may rename a STAR's one class). A run without picks gets an empty
    picks file of ``object_name`` when it is given, else none."""
    from .star import particles_matrices, particles_zyx, read_particles

    project = read_project(config)
    pred = Path(pred_dir)
    stars = ([pred / f"{n}.star" for n in names] if names is not None
             else sorted(p for p in pred.glob("*.star")
                         if p.name not in ("particles.star", "tomograms.star")))
    known = set(project.runs())
    written = []
    for f in stars:
        df = read_particles(f)
        run = f.stem
        if run not in known:
            raise InputError(f, f"no copick run {run!r} in {project.config}")
        if len(df) and "rlnMicrographPixelSize" not in df.columns:
            raise InputError(f, "no rlnMicrographPixelSize column: the coordinates' pixel size "
                                "is unknown")
        for obj, rows in _picks_by_object(f, df, object_name, project):
            vs = float(rows["rlnMicrographPixelSize"].iloc[0]) if len(rows) else None
            m = particles_matrices(rows)
            mats = (axes.matrix_zyx_to_xyz(m) if m is not None
                    else np.tile(np.eye(3), (len(rows), 1, 1)))
            xyz_A = axes.zyx_to_xyz(particles_zyx(rows).astype(np.float64)) * (vs or 1.0)
            scores = (rows["mbScore"].to_numpy(np.float64) if "mbScore" in rows.columns
                      else np.ones(len(rows)))
            written.append(write_picks(project, PickSet(
                object_name=obj, user_id=user_id, session_id=session_id, run=run,
                xyz_A=xyz_A, matrices=mats, scores=scores, voxel_spacing=vs,
                trust_orientation=m is not None)))
    return written


def _picks_by_object(star: Path, df: pd.DataFrame, object_name: str | None,
                     project: CopickProject) -> list[tuple[str, pd.DataFrame]]:
    """``(pickable object, rows)`` pairs of one prediction STAR (see
    :func:`export_predictions`)."""
    from .star import CLASS_NAME_COLUMN as class_column

    if class_column not in df.columns or not len(df):
        if object_name is None:
            if not len(df):
                return []
            raise InputError(star, f"no {class_column} column: name the pickable object "
                                   "(copick-export --object)")
        return [(object_name, df)]
    classes = list(dict.fromkeys(str(c) for c in df[class_column]))
    if object_name is not None:
        if len(classes) > 1:
            raise InputError(star, f"picks of {len(classes)} classes ({', '.join(classes)}): "
                                   "leave --object out to write each class as the pickable "
                                   "object of its name")
        return [(object_name, df)]
    unknown = [c for c in classes if c not in project.objects]
    if unknown:
        raise InputError(star, f"class {unknown[0]!r} is no pickable object of "
                               f"{project.config} (objects: {', '.join(project.objects)}); "
                               "name one with --object")
    return [(c, df[df[class_column].astype(str) == c]) for c in classes]
