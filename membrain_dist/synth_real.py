"""A phantom built on a real annotated thylakoid membrane (MemBrain v1's ``T1S1M1``).

MemBrain v1 ships one expert-annotated membrane of a spinach thylakoid tomogram (EMD-10780,
bin 4, 13.68 Å): its segmentation (cropped), the Membranorama surface mesh and the annotated
positions and in-plane orientations of 48 PSII dimers, 32 b6f dimers and 25 unknown densities
(``shared/data/membrain-v1``). The tomogram itself is not included, so this module images the
real geometry as the hard preset images its synthetic membranes (:func:`synth.hard_config`):

- **membrane**: two leaflets at ``cfg.leaflet_offset`` on each side of the mask's mid-surface
  (from the mask's signed distance, so the real segmentation's thickness and defects stay);
- **proteins**: the real PSII map at every PSII annotation, the real b6f map at every b6f
  annotation, small densities at the unknown ones; each in its annotated frame (long axis
  ``cos(a) m1 - sin(a) m2`` of the annotation's mesh triangle, normal to the protein's side),
  its transmembrane centre on the mask's mid-surface under the annotated point;
- **imaging**: CTF, envelope, missing wedge and coloured noise at ``cfg.snr``, as the preset.

The segmentation is the real mask, holes and staircase included; the ground truth is the
annotated PSII points themselves (on the mesh, ~2 voxels above the mask's mid-plane).
Coordinates follow the data README: voxel (x, y, z) in the crop =
``(Position_Å - mrc_origin_Å) / voxel_size - crop_start_xyz``.
"""

from __future__ import annotations

import json
import logging
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
from scipy import ndimage

from . import synth_imaging as imaging
from .orientation import frame_from_axes
from .synth import (
    SynthConfig,
    SynthTomogram,
    _render,
    _small_prims,
    imaging_filter,
    signal_variance,
)
from .synth_maps import MEMBRAIN_V1_DATA, protein_map, render_map

__all__ = ["RealAnnotations", "read_annotations", "real_membrane_tomogram", "REAL_NAME"]

log = logging.getLogger(__name__)

#: tomogram name of the real membrane in campaigns
REAL_NAME = "T1S1M1"
GROUPS = {"psii": "M2_PSII_dimer", "b6f": "M2_b6f_dimer", "unknown": "M2_UKdensity"}


@dataclass(frozen=True)
class RealAnnotations:
    """One group's annotations in crop voxels: centres (K, 3) zyx on the mesh, unit mesh
    normals (K, 3) zyx (sign as the triangle's winding) and long axes (K, 3) zyx."""

    centres: np.ndarray
    normals: np.ndarray
    axes: np.ndarray


def _crop_info(data: Path) -> dict:
    return json.loads((data / f"{REAL_NAME}_crop.json").read_text())


def read_mask(data: Path = MEMBRAIN_V1_DATA) -> np.ndarray:
    """The real segmentation crop, uint8 (z, y, x) 0/1 (mrcfile reads the gzip itself)."""
    with mrcfile.open(data / f"{REAL_NAME}_mask_crop.mrc.gz", permissive=True) as m:
        return (np.asarray(m.data) > 0).astype(np.uint8)


def _read_mesh(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) xyz Å and triangles (F, 3) 0-based of an OBJ file."""
    verts, faces = [], []
    for line in path.read_text().splitlines():
        if line.startswith("v "):
            verts.append([float(t) for t in line.split()[1:4]])
        elif line.startswith("f "):
            faces.append([int(t.split("/")[0]) - 1 for t in line.split()[1:4]])
    return np.asarray(verts), np.asarray(faces, np.int64)


def read_annotations(data: Path = MEMBRAIN_V1_DATA) -> dict[str, RealAnnotations]:
    """The annotated groups (``psii``, ``b6f``, ``unknown``) in crop voxels (module docstring)."""
    info = _crop_info(data)
    vs = float(info["voxel_size_A"])
    origin = np.asarray(info["full_mrc_origin_xyz_A"], np.float64)
    start_xyz = np.asarray(info["crop_start_zyx"], np.float64)[::-1]
    verts, faces = _read_mesh(data / f"{REAL_NAME}_mesh.obj")
    root = ET.fromstring((data / f"{REAL_NAME}_positions.xml").read_bytes().decode("utf-16"))
    out = {}
    for key, group in GROUPS.items():
        pos, ids, ang = [], [], []
        for g in root.iter("Group"):
            if g.get("Name") != group:
                continue
            for p in g.iter("Point"):
                pos.append([float(t) for t in p.get("Position").split(",")])
                ids.append(int(p.get("ID")))
                ang.append(float(p.get("Orientation").split(",")[0]))
        pos_a, ids_a, ang_a = np.asarray(pos).reshape(-1, 3), np.asarray(ids, int), np.asarray(ang)
        tri = verts[faces[ids_a]]  # (K, 3 vertices, xyz)
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        n /= np.linalg.norm(n, axis=1, keepdims=True)
        m1 = tri[:, 1] - tri[:, 0]
        m1 /= np.linalg.norm(m1, axis=1, keepdims=True)
        m2 = np.cross(n, m1)
        u = np.cos(ang_a)[:, None] * m1 - np.sin(ang_a)[:, None] * m2
        xyz = (pos_a - origin) / vs - start_xyz
        out[key] = RealAnnotations(xyz[:, ::-1].copy(), n[:, ::-1].copy(), u[:, ::-1].copy())
    return out


def _along(field: np.ndarray, p: np.ndarray, d: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """``field`` (trilinear) at ``p + t d`` for each point (K, 3) and each t: (K, T)."""
    pts = p[:, None, :] + ts[None, :, None] * d[:, None, :]
    v = ndimage.map_coordinates(field, pts.reshape(-1, 3).T, order=1, mode="constant")
    return v.reshape(p.shape[0], ts.size)


def protein_frames(mask: np.ndarray, ann: RealAnnotations) -> tuple[np.ndarray, np.ndarray]:
    """Frames (K, 3, 3) (columns u, v, n; n to the protein's side) and the transmembrane
    origins (K, 3): the mask's mid-plane under each annotated point along n.

    The side is where the mask is not: of the two directions along the mesh normal, the one
    with less mask within 6 voxels. The origin is the mean depth of the mask's voxels along
    the line below the point (the point itself when the line meets no mask)."""
    m = ndimage.gaussian_filter(mask.astype(np.float32), 0.5)
    ts = np.arange(0.25, 6.01, 0.25)
    plus = _along(m, ann.centres, ann.normals, ts).sum(1)
    minus = _along(m, ann.centres, -ann.normals, ts).sum(1)
    n = np.where((plus > minus)[:, None], -ann.normals, ann.normals)
    depth_t = np.arange(0.0, 10.01, 0.25)
    inside = _along(mask.astype(np.float32), ann.centres, -n, depth_t) > 0.5
    cnt = inside.sum(1)
    depth = np.where(cnt > 0, (inside * depth_t).sum(1) / np.maximum(cnt, 1), 0.0)
    u = ann.axes - np.einsum("ki,ki->k", ann.axes, n)[:, None] * n
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return frame_from_axes(u, n), ann.centres - depth[:, None] * n


def membrane_density(mask: np.ndarray, cfg: SynthConfig) -> np.ndarray:
    """Two Gaussian leaflets (fwhm ``cfg.leaflet_fwhm``) ``cfg.leaflet_offset`` voxels on
    each side of the mask's mid-surface (the ridge of its inner distance)."""
    inner = ndimage.distance_transform_edt(mask).astype(np.float32)
    outer, idx = ndimage.distance_transform_edt(1 - mask, return_indices=True)
    # local half thickness at each mask voxel, carried outwards from the nearest mask voxel
    half = ndimage.maximum_filter(inner, size=7)[tuple(idx)]
    # distance from the mid-surface: EDTs count to voxel centres, so a mask voxel next to
    # the background has inner 1 and a background voxel next to the mask outer 1
    d_mid = np.where(mask > 0, half - inner, half - 1 + outer.astype(np.float32))
    del idx
    sigma = cfg.leaflet_fwhm / (2 * math.sqrt(2 * math.log(2)))
    dens = np.exp(-0.5 * ((d_mid - cfg.leaflet_offset) / sigma) ** 2)
    dens[outer > cfg.leaflet_offset + 4 * cfg.leaflet_fwhm] = 0
    return (cfg.membrane_amplitude * dens).astype(np.float32)


def real_membrane_tomogram(rng: np.random.Generator, cfg: SynthConfig,
                           data: Path = MEMBRAIN_V1_DATA) -> SynthTomogram:
    """The real membrane imaged with ``cfg`` (the hard preset's imaging; its shape is the
    crop's): a :class:`SynthTomogram` whose targets are the annotated PSII dimers."""
    mask = read_mask(data)
    shape = mask.shape
    vs = float(_crop_info(data)["voxel_size_A"])
    if abs(vs - cfg.voxel_size_A) > 0.01 * vs:
        raise ValueError(f"the real membrane is at {vs:.2f} Å/voxel, cfg at {cfg.voxel_size_A}")
    ann = read_annotations(data)
    density = membrane_density(mask, cfg)
    pm_t = protein_map(cfg.target_map, cfg.voxel_size_A, cfg.hydrophobic_A)
    pm_l = protein_map(cfg.distractor_map, cfg.voxel_size_A, cfg.hydrophobic_A)
    t_mats, t_org = protein_frames(mask, ann["psii"])
    b_mats, b_org = protein_frames(mask, ann["b6f"])
    s_mats, s_org = protein_frames(mask, ann["unknown"])
    render_map(density, t_org, t_mats, pm_t, cfg.protein_amplitude)
    render_map(density, b_org, b_mats, pm_l, cfg.large_amplitude)
    # unknown densities: small blobs standing on the face above the mid-surface
    _render(density, s_org + 3.0 * s_mats[:, :, 2], s_mats, _small_prims(), cfg.small_amplitude)
    noise_std = math.sqrt(signal_variance(cfg) / cfg.snr) if cfg.snr else 0.0
    tomo = imaging_filter(density, cfg)
    if not cfg.invert:
        np.negative(tomo, out=tomo)
    if noise_std > 0:
        wedge = cfg.tilt_max_deg if cfg.noise_wedge else None
        tomo += imaging.coloured_noise(rng, shape, noise_std, cfg.noise_corner, cfg.noise_slope,
                                       wedge)
    k = len(t_org)
    log.info("%s: %d PSII, %d b6f, %d unknown densities on the real membrane", REAL_NAME, k,
             len(b_org), len(s_org))
    return SynthTomogram(
        tomogram=tomo, segmentation=mask, labels=mask,
        density=density if cfg.keep_density else None,
        centres_zyx=ann["psii"].centres.astype(np.float32),
        matrices_zyx=t_mats.astype(np.float32),
        membrane_of_particle=np.ones(k, np.int32), membrane_kind=("thylakoid",),
        membrane_side=np.zeros(1, np.int8), small_zyx=s_org.astype(np.float32),
        large_zyx=b_org.astype(np.float32), large_matrices_zyx=b_mats.astype(np.float32),
        ribosome_zyx=np.zeros((0, 3), np.float32), gold_zyx=np.zeros((0, 3), np.float32),
        noise_std=float(noise_std), scenario=("real",), protein_zyx=t_org.astype(np.float32),
    )


def write_real_membrane(out_dir: Path, seed: int, cfg: SynthConfig, split: str = "train",
                        angles: bool = True, data: Path = MEMBRAIN_V1_DATA):
    """Image the real membrane (noise seeded by ``seed``) into ``out_dir`` as one campaign
    row named :data:`REAL_NAME` (:func:`synth.write_synth_tomogram`); returns its manifest
    entry and ground-truth table. A row already written is reused."""
    from .manifest import TomogramEntry
    from .star import read_particles
    from .synth import tomogram_rng, write_synth_tomogram

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    star = out / f"{REAL_NAME}_particles.star"
    if star.is_file() and (out / f"{REAL_NAME}.mrc").is_file():
        entry = TomogramEntry(name=REAL_NAME, tomogram=out / f"{REAL_NAME}.mrc",
                              segmentation=out / f"{REAL_NAME}_seg.mrc", particles=star,
                              voxel_size_A=cfg.voxel_size_A, split=split)
        return entry, read_particles(star)
    st = real_membrane_tomogram(tomogram_rng(seed, 10_000), cfg, data)
    return write_synth_tomogram(out, REAL_NAME, st, cfg.voxel_size_A, split, angles)
