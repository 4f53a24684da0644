"""Synthetic cryo-ET campaign generator (ground truth for the demo and end-to-end tests).

A tomogram is built in four steps, all on ``(z, y, x)`` float32 arrays:

1. **Membranes** (rejection-sampled placements, each its own connected component):
   ellipsoidal vesicles, curved sheet patches (paraboloid / cylinder / saddle with a random
   normal direction and an elliptical rim) and stacked pairs of parallel sheets
   (thylakoid-like). Each membrane is an approximate signed distance field ``d`` to its
   mid-surface (first-order ``f / |grad f|``, exact for spheres, within a few percent for the
   mild curvatures used); the density is a bilayer profile of two Gaussian leaflets at
   ``d = +-leaflet_offset`` (FWHM ``leaflet_fwhm``), the segmentation is
   ``|d| <= seg_half_width``. A candidate membrane is rejected when any point of its
   mid-surface lies within ``2 * seg_half_width + membrane_gap + 1`` voxels of an accepted
   one, so segmentations of different membranes are at least ``membrane_gap`` voxels apart
   (partners of a stack: ``stack_spacing - 2 * seg_half_width``). Membranes stay
   ``border_margin`` voxels inside the volume.
2. **Proteins** (random sequential adsorption with per-object exclusion radii, so targets are
   ``>= target_spacing`` apart): the target is a PSII-like, C2-symmetric complex (two lobes
   along its long in-plane axis u, ~12 x 6 voxels, a transmembrane part in the bilayer and an
   extra-membrane domain protruding ~7 voxels on one side only). Each membrane gets one
   target side at random (stacks: the sides facing away from the partner). Distractors:
   small round membrane-attached proteins on both sides, large elongated single-lobe
   proteins without transmembrane part on the non-target side, free ribosome-like blobs and
   very dense gold beads. Every object is a union (max) of soft-edged ellipsoids.
3. **Imaging**: missing wedge (tilt range ``+-tilt_max_deg`` about y: Fourier coefficients
   whose direction in the x-z plane is within ``90 - tilt_max_deg`` degrees of the z axis
   are zeroed) and a Gaussian envelope (real-space sigma ``lowpass_sigma`` voxels, a
   CTF-envelope stand-in), applied in one real FFT of the whole volume in single precision
   (a (300, 1000, 1000) volume needs ~3.6 GB for volume + spectrum + result).
4. **Noise**: white Gaussian noise added after filtering, std = ``noise_ratio`` x the peak of
   the filtered target template (its amplitude after imaging), drawn slab by slab.

The tomogram is ``-filtered_density + noise`` (protein dark, raw cryo-ET), or
``+filtered_density + noise`` with ``invert=True``.

Particle centres (ground truth) lie on the membrane's outer surface on the protein's side,
``mid-surface + seg_half_width * n`` (the segmentation boundary). Orientations are in-code
matrices: columns u (long in-plane axis), v, n (normal towards the protein), each in zyx
order, with ``v = n x u`` in the right-handed XYZ frame (``np.cross(u_zyx, n_zyx)`` on zyx
arrays), so that ``axes.matrix_zyx_to_xyz`` gives a proper rotation.

**Hard preset** (:func:`hard_config`; the new :class:`SynthConfig` fields default to the
behaviour above, bit for bit): a radial CTF on the signal and coloured noise at a set SNR
(:mod:`membrain_dist.synth_imaging`, :func:`signal_variance`), damaged segmentations
(thickness 3-7 voxels, holes, caps lost to the missing wedge, staircase edges; ``labels``
is the damaged segmentation, ``labels_clean`` the undamaged bands), grana stacks of 3-5
sheets with 4-7 voxel gaps, face-on and edge-on sheets, targets on both faces and large
distractors on the same faces, the real PSII / b6f maps as target / distractor
(:mod:`membrain_dist.synth_maps`), their transmembrane slab on the mid-surface, and centres
clicked 1-4 voxels beyond the local segmentation face.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.fft
from scipy import ndimage
from scipy.spatial.transform import Rotation

from . import synth_imaging as imaging
from .synth_maps import B6F_MAP, PSII_MAP, protein_map, render_map

__all__ = [
    "SynthConfig",
    "SynthTomogram",
    "generate_tomogram",
    "generate_campaign",
    "render_template",
    "imaging_filter",
    "benchmark_config",
    "hard_config",
    "signal_variance",
    "tomogram_rng",
]

log = logging.getLogger(__name__)

_KINDS = ("vesicle", "sheet", "stack", "edge-on")
_ORIENTATIONS = ("random", "face-on", "edge-on")


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the synthetic tomograms. Lengths in voxels unless noted.

    Attributes
    ----------
    shape_zyx
        Tomogram shape (z, y, x). Default (80, 160, 160).
    voxel_size_A
        Voxel size in Å written to the MRC headers. Default 14.08 (typical bin 4).
    n_membranes
        Number of membranes (connected components) aimed for; a stack counts two. Fewer are
        placed when ``max_tries`` placements fail. Default 4.
    kind_weights
        Relative probabilities of vesicle, sheet, stack. Default (0.45, 0.3, 0.25).
    vesicle_radius
        Range of the mean vesicle radius (mid-surface). Default (20, 35).
    vesicle_aspect
        Largest ratio between ellipsoid semi-axes. Default 1.25.
    sheet_radius
        Range of the sheet patch's in-plane semi-axes (elliptical rim). Default (25, 45).
    sheet_min_curvature_radius
        Smallest radius of curvature of a sheet (principal curvatures are drawn in
        ``+-1/this``). Default 40.
    stack_spacing
        Range of the mid-surface distance of the two sheets of a stack. Default (10, 14).
    leaflet_offset, leaflet_fwhm
        Leaflet centres at ``+-leaflet_offset`` from the mid-surface, each ``leaflet_fwhm``
        thick: 1.75 and 1.5 give a ~5 voxel bilayer with a ~2 voxel gap.
    membrane_amplitude
        Peak density of a leaflet. Default 1.0.
    seg_half_width
        Segmentation = ``|d| <= seg_half_width``. Default 2.5.
    membrane_gap
        Smallest gap between segmentations of different membranes (not stack partners).
        Default 8 (room for proteins between them).
    border_margin
        Smallest gap between a segmentation and the volume border. Default 3.
    max_tries
        Membrane placement attempts per tomogram. Default 300.
    target_density
        Expected targets per 1000 voxel^2 of membrane mid-surface (Poisson). Default 2.0:
        densely packed like PSII in thylakoids, so one annotated tomogram holds dozens.
    target_spacing
        Smallest distance between target centres. Default 11.
    rim_margin
        Smallest distance of a membrane-attached protein from a sheet's rim. Default 6.
    small_per_target, large_per_target
        Expected number of small (both sides) / large (non-target side) distractors per
        target on the same membrane area. Defaults 1.0, 0.75.
    ribosomes_per_mvox, gold_per_mvox
        Free ribosome-like blobs / gold beads per 10^6 voxels. Defaults 3.0, 0.5.
    ribosome_radius, gold_radius
        Radius ranges. Defaults (6, 8), (2, 2.5).
    protein_amplitude, small_amplitude, large_amplitude, ribosome_amplitude, gold_amplitude
        Peak densities (membrane leaflet = 1). Defaults 1.0, 1.2, 1.2, 1.0, 6.0.
    tilt_max_deg
        Tilt range +- this about the y axis; the missing wedge is the rest. Default 60.
    lowpass_sigma
        Real-space sigma (voxels) of the Gaussian envelope. Default 0.8.
    noise_ratio
        Noise std / peak of the imaging-filtered target template. Default 0.8: a density
        threshold still scores F1 < 0.6 (membranes and distractors are as dense as targets),
        while a one-tomogram model reaches the paper's F1 (README, Figures).
    invert
        False: tomogram = -density (protein dark); True: protein bright. Default False.
    keep_density
        Keep the noiseless, unfiltered density in :class:`SynthTomogram` (memory). Default True.

    The fields below make the data harder (:func:`hard_config`); their defaults reproduce the
    original generator bit for bit.

    sheet_orientation, stack_orientation
        "random" (default), "face-on" (normal within ``orientation_jitter_deg`` of z) or
        "edge-on" (normal within ``orientation_jitter_deg`` of the x-y plane) for the kinds
        "sheet" and "stack". A fourth ``kind_weights`` entry adds the kind "edge-on" (an
        edge-on sheet). The membrane kind is also its ``scenario`` (SynthTomogram, STAR).
    orientation_jitter_deg
        Default 10.
    stack_sheets
        Range (inclusive) of the number of sheets of a stack. Default (2, 2).
    stack_gap
        None (default): partners ``stack_spacing`` apart. Else the range of the gap between
        the *segmentations* of neighbouring sheets (grana-like, each sheet with its own
        constant thickness drawn from ``seg_thickness``).
    seg_thickness
        None (default): the segmentation is ``|d| <= seg_half_width``. Else a (min, max)
        range of segmentation thickness (voxels): a smooth random field (correlation length
        ``thickness_scale``) sets the local half width ``thickness / 2`` (stacks: one
        value per sheet). ``seg_half_width`` must then be >= max / 2 (it sets spacing and
        probes).
    thickness_scale
        Default 16.
    seg_hole_fraction, seg_hole_size
        Fraction of the segmentation removed in random patches (a thresholded smooth random
        field of correlation length ``seg_hole_size``). Defaults 0, 8.
    seg_drop_caps
        Remove the segmentation where the membrane normal is within ``90 - tilt_max_deg``
        degrees of z (the missing wedge's half angle), as real segmentations lose vesicle
        tops and bottoms. Not applied to face-on sheets (kept as the face-on scenario).
        Default False.
    seg_grid
        The in-plane edges of the segmentation (rims, holes, caps) are decided on a grid
        this many voxels coarser (nearest voxel, no smoothing): staircase edges. Default 1.
    protein_source
        "toy" (default: ellipsoid unions) or "maps": target = ``target_map`` (real PSII),
        large distractor = ``distractor_map`` (real b6f), both resampled to
        ``voxel_size_A`` (:mod:`membrain_dist.synth_maps`), their transmembrane slab on
        the mid-surface.
    target_map, distractor_map, hydrophobic_A
        Map paths (default the MemBrain v1 PSII and b6f maps, read in place) and the
        transmembrane slab thickness (Å) that places them. Default 40.
    both_sides_prob
        Probability that a membrane carries targets on both faces (side drawn per target;
        ``membrane_side`` 0). Default 0 (one face per membrane, stacks: outer faces).
    large_side
        "opposite" (default: large distractors on the non-target face) or "same" (on the
        target face(s): no side cue).
    large_spacing
        Exclusion diameter of large distractors; None (default) = ``target_spacing``.
    click_offset
        None (default): target centres on the segmentation face. Else a (min, max) range:
        each centre is ``U(min, max)`` voxels beyond the local segmentation face along
        the normal (where an annotator clicks), the protein itself stays in the membrane.
    ctf_defocus_um, ctf_voltage_kv, ctf_cs_mm, ctf_amplitude_contrast, ctf_phase_flip
        A radial CTF on the signal (:func:`synth_imaging.ctf_1d`; negative defocus =
        underfocus), times the Gaussian envelope ``lowpass_sigma``. 0 (default) = no CTF.
        Defaults 300 kV, 2.7 mm, 0.07, False (signed CTF, not phase-flipped).
    snr
        None (default): noise std from ``noise_ratio``. Else the noise std is
        ``sqrt(signal_variance(cfg) / snr)`` (:func:`signal_variance`).
    noise_model
        "white" (default) or "coloured": noise shaped by
        ``(1 + (k / noise_corner)^2)^(-noise_slope / 2)`` (k in cycles/voxel), rescaled to
        the noise std; ``noise_wedge`` also removes it from the missing wedge.
    noise_corner, noise_slope, noise_wedge
        Defaults 0.1, 1.0, False.
    """

    shape_zyx: tuple[int, int, int] = (80, 160, 160)
    voxel_size_A: float = 14.08
    n_membranes: int = 4
    kind_weights: tuple[float, float, float] = (0.45, 0.3, 0.25)
    vesicle_radius: tuple[float, float] = (20.0, 35.0)
    vesicle_aspect: float = 1.25
    sheet_radius: tuple[float, float] = (25.0, 45.0)
    sheet_min_curvature_radius: float = 40.0
    stack_spacing: tuple[float, float] = (10.0, 14.0)
    leaflet_offset: float = 1.75
    leaflet_fwhm: float = 1.5
    membrane_amplitude: float = 1.0
    seg_half_width: float = 2.5
    membrane_gap: float = 8.0
    border_margin: float = 3.0
    max_tries: int = 300
    target_density: float = 2.0
    target_spacing: float = 11.0
    rim_margin: float = 6.0
    small_per_target: float = 1.0
    large_per_target: float = 0.75
    ribosomes_per_mvox: float = 3.0
    gold_per_mvox: float = 0.5
    ribosome_radius: tuple[float, float] = (6.0, 8.0)
    gold_radius: tuple[float, float] = (2.0, 2.5)
    protein_amplitude: float = 1.0
    small_amplitude: float = 1.2
    large_amplitude: float = 1.2
    ribosome_amplitude: float = 1.0
    gold_amplitude: float = 6.0
    tilt_max_deg: float = 60.0
    lowpass_sigma: float = 0.8
    noise_ratio: float = 0.8
    invert: bool = False
    keep_density: bool = True
    sheet_orientation: str = "random"
    stack_orientation: str = "random"
    orientation_jitter_deg: float = 10.0
    stack_sheets: tuple[int, int] = (2, 2)
    stack_gap: tuple[float, float] | None = None
    seg_thickness: tuple[float, float] | None = None
    thickness_scale: float = 16.0
    seg_hole_fraction: float = 0.0
    seg_hole_size: float = 8.0
    seg_drop_caps: bool = False
    seg_grid: int = 1
    protein_source: str = "toy"
    target_map: str = PSII_MAP
    distractor_map: str = B6F_MAP
    hydrophobic_A: float = 40.0
    both_sides_prob: float = 0.0
    large_side: str = "opposite"
    large_spacing: float | None = None
    click_offset: tuple[float, float] | None = None
    ctf_defocus_um: float = 0.0
    ctf_voltage_kv: float = 300.0
    ctf_cs_mm: float = 2.7
    ctf_amplitude_contrast: float = 0.07
    ctf_phase_flip: bool = False
    snr: float | None = None
    noise_model: str = "white"
    noise_corner: float = 0.1
    noise_slope: float = 1.0
    noise_wedge: bool = False

    def __post_init__(self) -> None:
        if len(self.shape_zyx) != 3 or min(self.shape_zyx) < 16:
            raise ValueError(f"shape_zyx must be 3 sizes >= 16, got {self.shape_zyx}")
        if self.voxel_size_A <= 0:
            raise ValueError("voxel_size_A must be > 0")
        if not 0 < self.tilt_max_deg < 90:
            raise ValueError("tilt_max_deg must be in (0, 90)")
        if self.n_membranes > 250:
            raise ValueError("at most 250 membranes (uint8 labels)")
        if self.stack_spacing[0] < 2 * self.seg_half_width + 3:
            raise ValueError("stack_spacing must leave >= 3 voxels between the two sheets")
        if len(self.kind_weights) not in (3, 4):
            raise ValueError("kind_weights: 3 (vesicle, sheet, stack) or 4 (+ edge-on) weights")
        for name in ("sheet_orientation", "stack_orientation"):
            if getattr(self, name) not in _ORIENTATIONS:
                raise ValueError(f"{name} must be one of {_ORIENTATIONS}")
        if not 2 <= self.stack_sheets[0] <= self.stack_sheets[1]:
            raise ValueError("stack_sheets must be a range (lo, hi) with 2 <= lo <= hi")
        if self.seg_thickness is not None and (
            not 1.0 <= self.seg_thickness[0] <= self.seg_thickness[1]
            or self.seg_thickness[1] > 2 * self.seg_half_width + 1e-6
        ):
            raise ValueError("seg_thickness must be (lo, hi), 1 <= lo <= hi <= 2 seg_half_width")
        if not 0.0 <= self.seg_hole_fraction < 0.5 or self.seg_grid < 1:
            raise ValueError("seg_hole_fraction must be in [0, 0.5), seg_grid >= 1")
        if self.protein_source not in ("toy", "maps"):
            raise ValueError("protein_source must be 'toy' or 'maps'")
        if self.large_side not in ("opposite", "same"):
            raise ValueError("large_side must be 'opposite' or 'same'")
        if self.noise_model not in ("white", "coloured"):
            raise ValueError("noise_model must be 'white' or 'coloured'")
        if self.snr is not None and self.snr <= 0:
            raise ValueError("snr must be > 0 (or None)")
        if not 0.0 <= self.both_sides_prob <= 1.0:
            raise ValueError("both_sides_prob must be in [0, 1]")

    @property
    def damaged_segmentation(self) -> bool:
        """Whether the segmentation differs from the exact distance band (hard preset)."""
        return (
            self.seg_thickness is not None
            or self.seg_hole_fraction > 0
            or self.seg_drop_caps
            or self.seg_grid > 1
            or self.stack_gap is not None
        )


def benchmark_config(**overrides: object) -> SynthConfig:
    """A (300, 1000, 1000) configuration with ~10 larger membranes (benchmark scale)."""
    kw: dict[str, object] = dict(
        shape_zyx=(300, 1000, 1000),
        n_membranes=10,
        vesicle_radius=(40.0, 110.0),
        sheet_radius=(80.0, 220.0),
        sheet_min_curvature_radius=150.0,
        membrane_gap=10.0,
    )
    kw.update(overrides)
    return SynthConfig(**kw)  # type: ignore[arg-type]


def hard_config(**overrides: object) -> SynthConfig:
    """The "hard" preset: realistic imaging, damaged segmentations, no side cue, real maps.

    A (128, 256, 256) tomogram at 13.68 Å (``voxel_size_A`` overridable; lengths with a
    physical meaning -- bilayer, protein spacing, ribosomes, gold -- are set in Å and
    converted with it; the proteins come from the real maps so their size in voxels follows
    the voxel size; segmentation thickness and gaps stay in voxels):

    - imaging: CTF at -3.5 µm defocus, 300 kV, Cs 2.7 mm, 7 % amplitude contrast, **not**
      phase-flipped, times a Gaussian envelope (sigma 0.6 voxel), missing wedge +-60°;
      coloured noise (corner 0.1 cycles/voxel, slope 1, absent in the missing wedge) at
      SNR 0.3 (:func:`signal_variance`);
    - segmentations: thickness 3-7 voxels (smooth random field; one value per stack sheet),
      8 % holes, caps in the missing wedge removed, staircase edges (2-voxel grid);
    - membranes: vesicles, face-on sheets ("sheet"), grana stacks of 3-5 edge-on sheets
      with 4-7 voxel gaps between segmentations ("stack"), edge-on sheets ("edge-on");
    - proteins: real PSII targets, real b6f distractors on the same faces, half the
      membranes with targets on both faces; centres clicked 1-4 voxels off the face.
    """
    vs = float(overrides.get("voxel_size_A", 13.68))  # type: ignore[arg-type]
    kw: dict[str, object] = dict(
        shape_zyx=(128, 256, 256),
        voxel_size_A=vs,
        n_membranes=8,
        kind_weights=(0.3, 0.2, 0.3, 0.2),
        vesicle_radius=(20.0, 34.0),
        sheet_radius=(28.0, 50.0),
        sheet_orientation="face-on",
        stack_orientation="edge-on",
        stack_sheets=(3, 5),
        stack_gap=(4.0, 7.0),
        leaflet_offset=19.0 / vs,
        leaflet_fwhm=15.0 / vs,
        seg_half_width=3.5,
        seg_thickness=(3.0, 7.0),
        seg_hole_fraction=0.08,
        seg_drop_caps=True,
        seg_grid=2,
        membrane_gap=6.0,
        protein_source="maps",
        target_density=2.0,
        target_spacing=170.0 / vs,
        large_spacing=110.0 / vs,
        large_per_target=0.6,
        large_amplitude=1.0,
        both_sides_prob=0.5,
        large_side="same",
        click_offset=(1.0, 4.0),
        ribosome_radius=(110.0 / vs, 140.0 / vs),
        gold_radius=(30.0 / vs, 40.0 / vs),
        lowpass_sigma=0.6,
        ctf_defocus_um=-3.5,
        snr=0.3,
        noise_model="coloured",
        noise_wedge=True,
    )
    kw.update(overrides)
    return SynthConfig(**kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SynthTomogram:
    """One synthetic tomogram and its ground truth. Points are (z, y, x) voxels.

    Attributes
    ----------
    tomogram
        float32 (z, y, x) image (filtered density with noise; protein dark unless inverted).
    segmentation
        uint8 (z, y, x) binary membrane mask.
    labels
        uint8 (z, y, x) membrane labels 1..M (0 = background); ``segmentation == labels > 0``.
    density
        float32 (z, y, x) noiseless, unfiltered positive density, or None (``keep_density``).
    centres_zyx
        float32 (K, 3) target particle centres (on the membrane surface, protein side).
    matrices_zyx
        float32 (K, 3, 3) orientations, columns u, v, n in zyx.
    membrane_of_particle
        int32 (K,) membrane label of each target.
    membrane_kind
        Kind of membrane ``i + 1``: "vesicle", "sheet" or "stack".
    membrane_side
        int8 (M,) side of the targets relative to the membrane's own normal (vesicles:
        +1 = outside; sheets: +1 = along the patch normal).
    small_zyx, large_zyx
        float32 (S, 3), (L, 3) centres of membrane-attached distractors (on the surface).
    large_matrices_zyx
        float32 (L, 3, 3) their orientations.
    ribosome_zyx, gold_zyx
        float32 centres of the free blobs and gold beads.
    noise_std
        Std of the added noise (density units).
    scenario
        Scenario of membrane ``i + 1`` (= its kind: "vesicle", "sheet", "stack",
        "edge-on"; with ``sheet_orientation="face-on"`` a "sheet" is face-on).
    protein_zyx
        float32 (K, 3) frame origins the targets were rendered at (toy: = centres; maps:
        the transmembrane centre on the mid-surface).
    target_side
        int8 (K,) face of each target relative to its membrane's own normal (+-1).
    click_offset
        float32 (K,) distance of each centre beyond the local segmentation face (0 when
        the centres are on the face).
    labels_clean
        uint8 (z, y, x) undamaged membrane bands (before holes / caps / staircase), or None
        when the segmentation is not damaged (then equal to ``labels``).
    """

    tomogram: np.ndarray
    segmentation: np.ndarray
    labels: np.ndarray
    density: np.ndarray | None
    centres_zyx: np.ndarray
    matrices_zyx: np.ndarray
    membrane_of_particle: np.ndarray
    membrane_kind: tuple[str, ...]
    membrane_side: np.ndarray
    small_zyx: np.ndarray
    large_zyx: np.ndarray
    large_matrices_zyx: np.ndarray
    ribosome_zyx: np.ndarray
    gold_zyx: np.ndarray
    noise_std: float
    scenario: tuple[str, ...] = ()
    protein_zyx: np.ndarray | None = None
    target_side: np.ndarray | None = None
    click_offset: np.ndarray | None = None
    labels_clean: np.ndarray | None = None


# --------------------------------------------------------------------------- geometry


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform random rotation matrix (float64 (3, 3)), acting on zyx vectors."""
    q = rng.normal(size=4)
    return Rotation.from_quat(q / np.linalg.norm(q)).as_matrix()


def _fibonacci_sphere(n: int) -> np.ndarray:
    """(n, 3) nearly uniform unit vectors."""
    i = np.arange(n, dtype=np.float64) + 0.5
    z = 1.0 - 2.0 * i / n
    r = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([z, r * np.sin(phi), r * np.cos(phi)], axis=1)


@dataclass
class _Surface:
    """One membrane mid-surface (vesicle = ellipsoid, sheet = paraboloid patch).

    centre (3,) zyx; rot (3, 3) columns = local axes in zyx; for a vesicle ``axes`` are the
    semi-axes; for a sheet ``axes = (Rs, Rt)`` rim semi-axes, ``curv = (ks, kt)`` and
    ``offset`` shifts the surface along its normal (stack partners).
    """

    kind: str
    centre: np.ndarray
    rot: np.ndarray
    axes: np.ndarray
    curv: np.ndarray = field(default_factory=lambda: np.zeros(2))
    offset: float = 0.0
    hw: float | None = None  # segmentation half width of this surface (None: config / field)

    def points(self, spacing: float = 0.6) -> tuple[np.ndarray, ...]:
        """Mid-surface sample points.

        Returns
        -------
        pts (N, 3), normals (N, 3) unit, area (N,) voxel^2 each point stands for,
        rim (N,) distance to the patch rim (inf for vesicles). All relative to nothing:
        absolute zyx voxel coordinates.
        """
        if self.kind == "vesicle":
            a = self.axes
            area_est = 4 * math.pi * (np.prod(a) ** (2 / 3)) * 1.1
            n = max(200, int(area_est / spacing**2))
            u = _fibonacci_sphere(n)
            loc = u * a
            nrm = u / a
            nl = np.linalg.norm(nrm, axis=1, keepdims=True)
            area = np.prod(a) * nl[:, 0] * 4 * math.pi / n
            nrm = nrm / nl
            rim = np.full(n, np.inf)
        else:
            rs, rt = self.axes
            ks, kt = self.curv
            s = np.arange(-rs, rs + spacing, spacing)
            t = np.arange(-rt, rt + spacing, spacing)
            ss, tt = np.meshgrid(s, t, indexing="ij")
            rho = np.sqrt((ss / rs) ** 2 + (tt / rt) ** 2)
            keep = rho <= 1.0
            ss, tt, rho = ss[keep], tt[keep], rho[keep]
            h = 0.5 * (ks * ss**2 + kt * tt**2)
            g = np.sqrt(1.0 + (ks * ss) ** 2 + (kt * tt) ** 2)
            nrm = np.stack([-ks * ss, -kt * tt, np.ones_like(ss)], axis=1) / g[:, None]
            loc = np.stack([ss, tt, h], axis=1) + self.offset * nrm
            area = g * spacing**2
            rim = (1.0 - rho) * min(rs, rt)
        pts = loc @ self.rot.T + self.centre
        nrm = nrm @ self.rot.T
        return pts, nrm, area, rim

    def sdf(self, zz: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, ...]:
        """Approximate signed distance (voxels) and rim distance on broadcast grids.

        Returns float32 ``d`` (positive along the normal / outside) and ``rim`` (distance
        inside the rim, negative beyond it; +inf-like for vesicles).
        """
        c = self.centre
        r = self.rot.astype(np.float32)
        dz, dy, dx = (zz - np.float32(c[0])), (yy - np.float32(c[1])), (xx - np.float32(c[2]))
        loc = [dz * r[0, k] + dy * r[1, k] + dx * r[2, k] for k in range(3)]
        if self.kind == "vesicle":
            a = self.axes.astype(np.float32)
            q2 = sum((loc[k] / a[k]) ** 2 for k in range(3))
            q = np.sqrt(q2)
            grad = np.sqrt(sum((loc[k] / a[k] ** 2) ** 2 for k in range(3)))
            # (q - 1) / |grad q| with |grad q| = |loc / a^2| / q
            d = (q - 1.0) * q / np.maximum(grad, np.float32(1e-6))
            return d.astype(np.float32), np.full((1, 1, 1), np.float32(1e9))
        s, t, w = loc
        ks, kt = (np.float32(v) for v in self.curv)
        h = 0.5 * (ks * s * s + kt * t * t)
        g = np.sqrt(1.0 + (ks * s) ** 2 + (kt * t) ** 2)
        d = (w - h) / g - np.float32(self.offset)
        rs, rt = (np.float32(v) for v in self.axes)
        rho = np.sqrt((s / rs) ** 2 + (t / rt) ** 2)
        rim = (1.0 - rho) * min(rs, rt)
        return d.astype(np.float32), rim.astype(np.float32)


def _oriented_rot(rng: np.random.Generator, mode: str, jitter_deg: float) -> np.ndarray:
    """Rotation (columns s, t, normal in zyx) with the normal near z ("face-on") or near the
    x-y plane ("edge-on"), within ``jitter_deg``; random azimuth and in-plane angle."""
    phi = rng.uniform(0.0, 2.0 * math.pi)
    t = math.radians(rng.uniform(-jitter_deg, jitter_deg))
    if mode == "face-on":
        n = np.array([math.cos(t), math.sin(t) * math.sin(phi), math.sin(t) * math.cos(phi)])
    else:
        n = np.array([math.sin(t), math.cos(t) * math.sin(phi), math.cos(t) * math.cos(phi)])
    ref = np.array([1.0, 0.0, 0.0]) if abs(n[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    t1 = np.cross(n, ref)
    t1 /= np.linalg.norm(t1)
    t2 = np.cross(n, t1)
    psi = rng.uniform(0.0, 2.0 * math.pi)
    a = math.cos(psi) * t1 + math.sin(psi) * t2
    return np.stack([a, np.cross(n, a), n], axis=1)


def _make_membrane(
    kind: str, rng: np.random.Generator, cfg: SynthConfig, scale: float, n_left: int = 2
) -> list[_Surface]:
    """Random membrane surfaces (centred at the origin) of a kind; ``scale`` shrinks sizes.

    ``n_left`` caps the number of sheets of a stack (membranes still to place).
    """
    rot = _random_rotation(rng)
    if kind == "vesicle":
        r = rng.uniform(*cfg.vesicle_radius) * scale
        asp = rng.uniform(1.0, cfg.vesicle_aspect, size=3)
        axes = r * asp / np.prod(asp) ** (1 / 3)
        return [_Surface("vesicle", np.zeros(3), rot, axes)]
    orient = {"sheet": cfg.sheet_orientation, "stack": cfg.stack_orientation}.get(
        kind, "edge-on"
    )
    if orient != "random":
        rot = _oriented_rot(rng, orient, cfg.orientation_jitter_deg)
    axes = rng.uniform(*cfg.sheet_radius, size=2) * scale
    kmax = 1.0 / cfg.sheet_min_curvature_radius
    # keep the slope at the rim moderate (|k R| <= 0.8) so the first-order SDF holds
    curv = np.array(
        [
            rng.uniform(-1, 1) * min(kmax, 0.8 / axes[0]),
            rng.uniform(-1, 1) * min(kmax, 0.8 / axes[1]),
        ]
    )
    if kind != "stack":
        return [_Surface(kind, np.zeros(3), rot, axes, curv)]
    if cfg.stack_gap is None and cfg.stack_sheets == (2, 2):
        half = 0.5 * rng.uniform(*cfg.stack_spacing)
        return [
            _Surface("stack", np.zeros(3), rot, axes, curv, +half),
            _Surface("stack", np.zeros(3), rot, axes, curv, -half),
        ]
    lo, hi = cfg.stack_sheets
    n = lo if lo == hi else int(rng.integers(lo, max(lo, min(hi, n_left)) + 1))
    if cfg.seg_thickness is not None:
        hws = 0.5 * rng.uniform(*cfg.seg_thickness, size=n)
    else:
        hws = np.full(n, cfg.seg_half_width)
    if cfg.stack_gap is not None:
        gaps = rng.uniform(*cfg.stack_gap, size=n - 1)
        steps = gaps + hws[:-1] + hws[1:]
    else:
        steps = rng.uniform(*cfg.stack_spacing, size=n - 1)
    offs = np.concatenate([[0.0], np.cumsum(steps)])
    offs -= offs.mean()
    return [
        _Surface("stack", np.zeros(3), rot, axes, curv, float(o), float(h))
        for o, h in zip(offs, hws, strict=True)
    ]


# --------------------------------------------------------------------------- rendering


def _soft_ellipsoids(local: np.ndarray, prims: np.ndarray, edge: float = 0.6) -> np.ndarray:
    """Max over soft-edged ellipsoids.

    local (..., 3) coordinates in the object frame (u, v, n); prims (P, 7): offset (3),
    semi-axes (3), relative amplitude. Returns (...) float32 in [0, max amplitude].
    """
    out = np.zeros(local.shape[:-1], dtype=np.float32)
    for p in prims:
        q = np.sqrt((((local - p[:3]) / p[3:6]) ** 2).sum(-1))
        val = np.float32(p[6]) * 0.5 * (1.0 - np.tanh((q - 1.0) * (p[3:6].min() / edge)))
        np.maximum(out, val.astype(np.float32), out=out)
    return out


def _target_prims() -> np.ndarray:
    """PSII-like C2 complex, frame origin on the membrane surface (mid-surface at n = -2.5).

    Two transmembrane lobes in the bilayer, two extra-membrane lobes above and a cap: ~12
    voxels along u, ~6 along v, protruding ~7 along n. C2 about n, not mirror symmetric.
    """
    return np.array(
        [
            [+3.2, +0.6, -2.5, 2.6, 2.2, 2.4, 0.7],
            [-3.2, -0.6, -2.5, 2.6, 2.2, 2.4, 0.7],
            [+2.5, +0.6, +2.4, 3.0, 2.4, 2.6, 1.0],
            [-2.5, -0.6, +2.4, 3.0, 2.4, 2.6, 1.0],
            [0.0, 0.0, +4.6, 2.8, 2.1, 2.0, 1.0],
        ],
        dtype=np.float64,
    )


def _large_prims() -> np.ndarray:
    """Large elongated peripheral protein: one ellipsoid, no transmembrane part."""
    return np.array([[0.0, 0.0, 2.4, 5.5, 2.5, 2.4, 1.0]])


def _small_prims() -> np.ndarray:
    """Small round peripheral protein, diameter ~4.5 voxels."""
    return np.array([[0.0, 0.0, 2.3, 2.3, 2.3, 2.3, 1.0]])


def _ribosome_prims(r: float) -> np.ndarray:
    """Ribosome-like: large subunit sphere + flattened small subunit."""
    return np.array(
        [[0.0, 0.0, 0.0, r, r, r, 1.0], [0.0, 0.0, 0.85 * r, 0.8 * r, 0.7 * r, 0.5 * r, 1.0]]
    )


def _render(
    density: np.ndarray,
    centres: np.ndarray,
    mats: np.ndarray,
    prims: np.ndarray,
    amp: float | np.ndarray,
    batch: int = 32,
) -> None:
    """Add objects (same primitive set) into ``density`` in place.

    centres (K, 3) zyx voxels, mats (K, 3, 3) columns (u, v, n) in zyx, prims (P, 7).
    Each object is evaluated on a cube around its rounded centre (vectorised per batch of
    objects) and added by slices, clipped at the volume border.
    """
    k = len(centres)
    if k == 0:
        return
    amps = np.broadcast_to(np.asarray(amp, dtype=np.float32), (k,))
    rad = int(math.ceil((np.linalg.norm(prims[:, :3], axis=1) + prims[:, 3:6].max(1)).max() + 2))
    g = np.arange(-rad, rad + 1, dtype=np.float32)
    grid = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    shape = np.array(density.shape)
    w = 2 * rad + 1
    for b0 in range(0, k, batch):
        c = centres[b0 : b0 + batch].astype(np.float64)
        m = mats[b0 : b0 + batch].astype(np.float32)
        ci = np.rint(c).astype(np.int64)
        frac = (ci - c).astype(np.float32)
        # local coordinate of voxel p: (p - c) @ M  (components along u, v, n)
        local = np.einsum("bpj,bjk->bpk", grid[None] + frac[:, None, :], m)
        vals = _soft_ellipsoids(local, prims) * amps[b0 : b0 + batch, None]
        vals = vals.reshape(-1, w, w, w)
        for i in range(len(c)):
            lo = ci[i] - rad
            hi = lo + w
            a = np.maximum(lo, 0)
            e = np.minimum(hi, shape)
            if np.any(e <= a):
                continue
            density[a[0] : e[0], a[1] : e[1], a[2] : e[2]] += vals[
                i,
                a[0] - lo[0] : e[0] - lo[0],
                a[1] - lo[1] : e[1] - lo[1],
                a[2] - lo[2] : e[2] - lo[2],
            ]


def render_template(cfg: SynthConfig = SynthConfig(), size: int = 25) -> np.ndarray:
    """The target protein's density in its own frame, low-pass filtered.

    Returns
    -------
    np.ndarray
        float32 ``(size, size, size)`` (z, y, x): long axis u along x, v along y, membrane
        normal n along z (protein side up); the particle centre (membrane surface point) is
        the central voxel ``size // 2``. No membrane, no missing wedge. With
        ``protein_source="maps"``: the real target map, its centre of mass at the central
        voxel, and ``size`` grown to hold it.
    """
    m = np.array([[[0, 0, 1], [0, 1, 0], [1, 0, 0]]], np.float32)  # columns u=x, v=y, n=z
    if cfg.protein_source == "maps":
        pm = protein_map(cfg.target_map, cfg.voxel_size_A, cfg.hydrophobic_A)
        size = max(size, 2 * int(math.ceil(pm.radius)) + 5)
        vol = np.zeros((size,) * 3, np.float32)
        c = np.array([[size // 2 - pm.com_n, size // 2, size // 2]], np.float64)
        render_map(vol, c, m, pm, cfg.protein_amplitude)
        return ndimage.gaussian_filter(vol, cfg.lowpass_sigma).astype(np.float32)
    vol = np.zeros((size,) * 3, np.float32)
    c = np.full((1, 3), size // 2, np.float64)
    _render(vol, c, m, _target_prims(), cfg.protein_amplitude)
    return ndimage.gaussian_filter(vol, cfg.lowpass_sigma).astype(np.float32)


# --------------------------------------------------------------------------- imaging


def imaging_filter(vol: np.ndarray, cfg: SynthConfig) -> np.ndarray:
    """Missing wedge (tilt +-``tilt_max_deg`` about y) and Gaussian envelope, via one rFFT.

    Zeroes the Fourier coefficients whose (kx, kz) direction is within
    ``90 - tilt_max_deg`` degrees of the z axis (for every ky) and multiplies by
    ``exp(-2 pi^2 sigma^2 |k|^2)`` (k in cycles/voxel, sigma = ``lowpass_sigma``), and by
    the radial CTF when ``ctf_defocus_um != 0`` (:func:`synth_imaging.ctf_rfft`).

    Parameters
    ----------
    vol
        float32 (z, y, x).

    Returns
    -------
    np.ndarray
        float32 (z, y, x) filtered volume (new array).
    """
    nz, ny, nx = vol.shape
    spec = scipy.fft.rfftn(np.asarray(vol, np.float32), workers=-1)
    kz = scipy.fft.fftfreq(nz).astype(np.float32)
    ky = scipy.fft.fftfreq(ny).astype(np.float32)
    kx = scipy.fft.rfftfreq(nx).astype(np.float32)
    tan_half = math.tan(math.radians(90.0 - cfg.tilt_max_deg))
    measured = ~(np.abs(kx)[None, :] < tan_half * np.abs(kz)[:, None])
    s2 = np.float32(2.0 * math.pi**2 * cfg.lowpass_sigma**2)
    zx = measured * np.exp(-s2 * kz[:, None] ** 2) * np.exp(-s2 * kx[None, :] ** 2)
    spec *= zx[:, None, :].astype(np.complex64)
    spec *= np.exp(-s2 * ky**2)[None, :, None].astype(np.complex64)
    if cfg.ctf_defocus_um != 0.0:
        spec *= imaging.ctf_rfft(
            vol.shape,
            cfg.voxel_size_A,
            cfg.ctf_defocus_um,
            cfg.ctf_voltage_kv,
            cfg.ctf_cs_mm,
            cfg.ctf_amplitude_contrast,
            cfg.ctf_phase_flip,
        )
    out = scipy.fft.irfftn(spec, s=vol.shape, workers=-1)
    del spec
    return out.astype(np.float32, copy=False)


def _probe_frames(n: int = 16) -> np.ndarray:
    """(n, 3, 3) fixed, nearly uniform orientations (columns u, v, n in zyx): Fibonacci
    normals on a hemisphere (C2 and +-n give the same power), golden-angle in-plane angles."""
    nrm = _fibonacci_sphere(2 * n)[:n]
    ang = (np.arange(n) * math.pi * (3.0 - math.sqrt(5.0)))[:, None]
    ref = np.where(np.abs(nrm[:, :1]) < 0.9, [[1.0, 0, 0]], [[0, 1.0, 0]])
    t1 = np.cross(nrm, ref)
    t1 /= np.linalg.norm(t1, axis=1, keepdims=True)
    t2 = np.cross(t1, nrm)
    u = np.cos(ang) * t1 + np.sin(ang) * t2
    return np.stack([u, np.cross(u, nrm), nrm], axis=2)


@functools.lru_cache(maxsize=32)
def signal_variance(cfg: SynthConfig) -> float:
    """Signal power of one target: the variance of its imaging-filtered density over its support.

    The target alone (no membrane) is rendered in an empty cube (64 voxels or four protein
    radii, whichever is larger) in 16 fixed, nearly uniform orientations in turn, filtered
    with :func:`imaging_filter` (envelope, missing wedge, CTF); its **support** is where the
    unfiltered density exceeds 10 % of its peak; the variance of the filtered values over the
    support is averaged over the orientations (the wedge makes it orientation-dependent).
    The preset's **SNR** is this variance over the noise variance:
    ``snr = signal_variance(cfg) / noise_std^2``.
    """
    if cfg.protein_source == "maps":
        pm = protein_map(cfg.target_map, cfg.voxel_size_A, cfg.hydrophobic_A)
        size = max(64, 2 * int(math.ceil(2 * pm.radius)))
    else:
        size = 64
    c = np.full((1, 3), size / 2.0)
    vals = []
    for m in _probe_frames():
        vol = np.zeros((size,) * 3, np.float32)
        if cfg.protein_source == "maps":
            render_map(vol, c, m[None], pm, cfg.protein_amplitude)
        else:
            _render(vol, c, m[None], _target_prims(), cfg.protein_amplitude)
        sup = vol > 0.1 * vol.max()
        vals.append(float(imaging_filter(vol, cfg)[sup].astype(np.float64).var()))
    return float(np.mean(vals))


def _filtered_template_peak(cfg: SynthConfig) -> float:
    """Peak of the target (no membrane) after the imaging filter: the signal amplitude."""
    vol = np.zeros((32, 32, 32), np.float32)
    m = np.array([[[0, 0, 1], [0, 1, 0], [1, 0, 0]]], np.float32)
    _render(vol, np.full((1, 3), 16.0), m, _target_prims(), cfg.protein_amplitude)
    return float(imaging_filter(vol, cfg).max())


# --------------------------------------------------------------------------- placement


def _bbox(pts: np.ndarray, pad: float, shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    lo = np.maximum(np.floor(pts.min(0) - pad).astype(int), 0)
    hi = np.minimum(np.ceil(pts.max(0) + pad).astype(int) + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def _grids(sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = np.arange(sl[0].start, sl[0].stop, dtype=np.float32)[:, None, None]
    y = np.arange(sl[1].start, sl[1].stop, dtype=np.float32)[None, :, None]
    x = np.arange(sl[2].start, sl[2].stop, dtype=np.float32)[None, None, :]
    return z, y, x


@dataclass
class _Damage:
    """Segmentation damage of the hard preset: full-volume fields and the damaged labels."""

    hw: np.ndarray | None  # float32 (z, y, x) local segmentation half width, or None
    holes: np.ndarray | None  # bool (z, y, x) removed patches, or None
    seg: np.ndarray  # uint8 (z, y, x) damaged labels (filled by _place_membranes)


def _make_damage(rng: np.random.Generator, cfg: SynthConfig, shape: tuple[int, ...]) -> _Damage:
    hw = None
    if cfg.seg_thickness is not None:
        lo, hi = cfg.seg_thickness
        u = imaging.uniform_from_normal(imaging.smooth_field(rng, shape, cfg.thickness_scale))
        hw = (0.5 * (lo + (hi - lo) * u)).astype(np.float32)
    holes = None
    if cfg.seg_hole_fraction > 0:
        f = imaging.smooth_field(rng, shape, cfg.seg_hole_size)
        holes = f > np.quantile(f.ravel()[::61], 1.0 - cfg.seg_hole_fraction).astype(np.float32)
    return _Damage(hw, holes, np.zeros(shape, np.uint8))


def _blocky(mask: np.ndarray, sl: tuple[slice, slice, slice], f: int) -> np.ndarray:
    """Nearest-voxel resampling of ``mask`` (on ``sl``) from a grid ``f`` voxels coarser.

    Every voxel takes the value of its block's central voxel (blocks aligned to the whole
    volume, clipped to ``sl``): staircase edges.
    """
    if f <= 1:
        return mask
    idx = []
    for s_ in sl:
        g = np.arange(s_.start, s_.stop)
        rep = (g // f) * f + f // 2
        idx.append(np.clip(rep, s_.start, s_.stop - 1) - s_.start)
    return mask[np.ix_(*idx)]


def _damaged_band(
    cfg: SynthConfig,
    surf: _Surface,
    kind: str,
    d: np.ndarray,
    inside: np.ndarray,
    sl: tuple[slice, slice, slice],
    dmg: _Damage,
) -> tuple[np.ndarray, np.ndarray]:
    """Clean band (``|d| <= local half width``, inside the rim) and its damaged version.

    The damaged band is a subset of the clean one (the staircase rim included in both).
    """
    if surf.hw is not None:
        hw_loc: np.ndarray | float = np.float32(surf.hw)
    elif dmg.hw is not None:
        hw_loc = dmg.hw[sl]
    else:
        hw_loc = np.float32(cfg.seg_half_width)
    band = np.abs(d) <= hw_loc
    inside = np.broadcast_to(inside, d.shape)
    keep = inside.copy()
    if dmg.holes is not None:
        keep &= ~dmg.holes[sl]
    face_on_sheet = kind == "sheet" and cfg.sheet_orientation == "face-on"
    if cfg.seg_drop_caps and not face_on_sheet:
        gz, gy, gx = np.gradient(d)
        cos_cap = np.float32(math.cos(math.radians(90.0 - cfg.tilt_max_deg)))
        keep &= ~(np.abs(gz) > cos_cap * np.sqrt(gz * gz + gy * gy + gx * gx))
    damaged = band & _blocky(keep, sl, cfg.seg_grid)
    return (band & inside) | damaged, damaged


def _place_membranes(
    rng: np.random.Generator,
    cfg: SynthConfig,
    density: np.ndarray,
    labels: np.ndarray,
    dmg: _Damage | None = None,
) -> list[tuple[_Surface, str, tuple[np.ndarray, ...]]]:
    """Rejection-sample membranes; render bilayers into ``density``, fill ``labels``.

    With ``dmg``, ``labels`` receive the clean bands and ``dmg.seg`` the damaged ones.
    Returns one (surface, kind, points) per accepted membrane, label = index + 1.
    """
    shape = np.array(cfg.shape_zyx, dtype=np.float64)
    hw = cfg.seg_half_width
    excl_pad = 2 * hw + cfg.membrane_gap + 1.0
    excluded = np.zeros(labels.shape, dtype=bool)
    sig = cfg.leaflet_fwhm / (2 * math.sqrt(2 * math.log(2)))
    weights = np.asarray(cfg.kind_weights, np.float64)
    weights = weights / weights.sum()
    kinds = _KINDS[: len(weights)]
    out: list[tuple[_Surface, str, tuple[np.ndarray, ...]]] = []
    scale = 1.0
    for _ in range(cfg.max_tries):
        n_left = cfg.n_membranes - len(out)
        if n_left <= 0:
            break
        kind = str(rng.choice(kinds, p=weights))
        if kind == "stack" and n_left < cfg.stack_sheets[0]:
            kind = "sheet" if rng.random() < 0.5 else "vesicle"
        surfs = _make_membrane(kind, rng, cfg, scale, n_left)
        pts0 = [s.points() for s in surfs]
        allp = np.concatenate([p[0] for p in pts0])
        margin = hw + cfg.border_margin + 1.0
        lo = margin - allp.min(0)
        hi = shape - 1 - margin - allp.max(0)
        if np.any(hi < lo):
            scale *= 0.93  # does not fit: try smaller membranes
            continue
        shift = rng.uniform(lo, hi)
        idx = np.rint(allp + shift).astype(np.int64)
        if excluded[idx[:, 0], idx[:, 1], idx[:, 2]].any():
            scale = max(scale * 0.98, 0.5)
            continue
        scale = min(1.0, scale * 1.05)
        for s, p in zip(surfs, pts0, strict=True):
            s.centre = shift
            pts = (p[0] + shift, p[1], p[2], p[3])
            label = len(out) + 1
            sl = _bbox(pts[0], excl_pad + 1, labels.shape)
            d, rim = s.sdf(*_grids(sl))
            inside = rim >= 0
            prof = np.exp(-((d - cfg.leaflet_offset) ** 2) / (2 * sig * sig)) + np.exp(
                -((d + cfg.leaflet_offset) ** 2) / (2 * sig * sig)
            )
            taper = 0.5 * (1.0 + np.tanh(rim / 1.0))
            density[sl] += (cfg.membrane_amplitude * prof * taper).astype(np.float32)
            if dmg is None:
                seg = (np.abs(d) <= hw) & inside
                labels[sl][seg] = label
            else:
                clean, damaged = _damaged_band(cfg, s, kind, d, inside, sl, dmg)
                labels[sl][clean] = label
                dmg.seg[sl][damaged] = label
            excluded[sl] |= (np.abs(d) <= excl_pad) & (rim >= -excl_pad)
            out.append((s, kind, pts))
    if len(out) < cfg.n_membranes:
        log.warning("placed %d of %d membranes", len(out), cfg.n_membranes)
    return out


class _Occupancy:
    """Growing set of exclusion spheres (centre zyx, radius) for rejection sampling."""

    def __init__(self, cap: int = 1024) -> None:
        self.c = np.zeros((cap, 3))
        self.r = np.zeros(cap)
        self.n = 0

    def free(self, c: np.ndarray, r: float) -> bool:
        if self.n == 0:
            return True
        d2 = ((self.c[: self.n] - c) ** 2).sum(1)
        return bool(np.all(d2 >= (self.r[: self.n] + r) ** 2))

    def add(self, c: np.ndarray, r: float) -> None:
        if self.n == len(self.r):
            self.c = np.concatenate([self.c, np.zeros_like(self.c)])
            self.r = np.concatenate([self.r, np.zeros_like(self.r)])
        self.c[self.n] = c
        self.r[self.n] = r
        self.n += 1


def _frames(normals: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(K, 3, 3) matrices, columns u, v, n (zyx), random in-plane angle, v = n x u (XYZ)."""
    k = len(normals)
    n = normals / np.linalg.norm(normals, axis=1, keepdims=True)
    ref = np.where(np.abs(n[:, :1]) < 0.9, [[1.0, 0, 0]], [[0, 1.0, 0]])
    t1 = np.cross(n, ref)
    t1 /= np.linalg.norm(t1, axis=1, keepdims=True)
    t2 = np.cross(t1, n)
    ang = rng.uniform(0, 2 * math.pi, size=(k, 1))
    u = np.cos(ang) * t1 + np.sin(ang) * t2
    v = np.cross(u, n)  # zyx arrays: equals n x u in right-handed XYZ
    return np.stack([u, v, n], axis=2)


def _attach(
    rng: np.random.Generator,
    cfg: SynthConfig,
    labels: np.ndarray,
    occ: _Occupancy,
    pts: tuple[np.ndarray, ...],
    side: int,
    n_wanted: int,
    radius: float,
    reach: float,
    label: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Random sequential adsorption of membrane-attached objects on one surface.

    side +-1 relative to the surface normal, 0 = random per object. Objects sit at
    ``mid + seg_half_width * side * n``; their normal probe ``centre + k n, k = 1..reach``
    must stay in the volume and off other membranes. Returns centres (M, 3), normals (M, 3)
    and sides (M,) (+-1 relative to the surface normal).
    """
    p, nrm, area, rim = pts
    ok = rim >= cfg.rim_margin
    if n_wanted <= 0 or not ok.any():
        return np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0)
    prob = np.where(ok, area, 0.0)
    prob /= prob.sum()
    n_cand = 6 * n_wanted + 20
    idx = rng.choice(len(p), size=n_cand, p=prob)
    sd = rng.choice(np.array([-1.0, 1.0]), size=n_cand) if side == 0 else np.full(n_cand, side)
    nn = nrm[idx] * sd[:, None]
    cen = p[idx] + cfg.seg_half_width * nn
    steps = np.arange(1.0, reach + 1.0)
    probe = cen[:, None, :] + steps[None, :, None] * nn[:, None, :]
    shape = np.array(labels.shape)
    pi = np.rint(probe).astype(np.int64)
    inb = np.all((pi >= 0) & (pi < shape), axis=(1, 2))
    pi = np.clip(pi, 0, shape - 1)
    lab = labels[pi[..., 0], pi[..., 1], pi[..., 2]]
    good = inb & np.all((lab == 0) | (lab == label), axis=1)
    out_c, out_n, out_s = [], [], []
    for i in np.flatnonzero(good):
        if occ.free(cen[i], radius):
            occ.add(cen[i], radius)
            out_c.append(cen[i])
            out_n.append(nn[i])
            out_s.append(sd[i])
            if len(out_c) >= n_wanted:
                break
    if not out_c:
        return np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0)
    return np.array(out_c), np.array(out_n), np.array(out_s)


def _place_free(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    labels: np.ndarray,
    occ: _Occupancy,
    n_wanted: int,
    rrange: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Free-floating spheres off the membranes. Returns centres (M, 3), radii (M,)."""
    out_c, out_r = [], []
    shp = np.array(shape)
    for _ in range(20 * n_wanted):
        if len(out_c) >= n_wanted:
            break
        r = rng.uniform(*rrange)
        c = rng.uniform(r + 1, shp - 1 - r - 1)
        m = int(math.ceil(r + 3))
        ci = np.rint(c).astype(int)
        lo, hi = np.maximum(ci - m, 0), np.minimum(ci + m + 1, shp)
        if labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].any() or not occ.free(c, r + 1):
            continue
        occ.add(c, r + 1)
        out_c.append(c)
        out_r.append(r)
    return (np.array(out_c).reshape(-1, 3), np.array(out_r))


# --------------------------------------------------------------------------- public API


def generate_tomogram(rng: np.random.Generator, cfg: SynthConfig = SynthConfig()) -> SynthTomogram:
    """Generate one synthetic tomogram with its ground truth (in memory).

    Parameters
    ----------
    rng
        Seeded generator; the same seed gives identical arrays.
    cfg
        Parameters (shape, membranes, proteins, imaging, noise).

    Returns
    -------
    SynthTomogram
    """
    shape = tuple(int(s) for s in cfg.shape_zyx)
    density = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint8)
    dmg = _make_damage(rng, cfg, shape) if cfg.damaged_segmentation else None
    membranes = _place_membranes(rng, cfg, density, labels, dmg)
    maps = cfg.protein_source == "maps"
    pm_t = protein_map(cfg.target_map, cfg.voxel_size_A, cfg.hydrophobic_A) if maps else None
    pm_l = protein_map(cfg.distractor_map, cfg.voxel_size_A, cfg.hydrophobic_A) if maps else None
    hw = cfg.seg_half_width
    # probe lengths beyond the face: the protruding domain must not reach another membrane
    reach_t = max(2.0, math.ceil(pm_t.top - hw + 1.0)) if pm_t is not None else 8.0
    reach_l = max(2.0, math.ceil(pm_l.top - hw + 1.0)) if pm_l is not None else 6.0
    r_large = (cfg.large_spacing if cfg.large_spacing is not None else cfg.target_spacing) / 2

    # target side per membrane (stacks: the side facing away from the partner); 0 = both
    if cfg.both_sides_prob > 0:
        sides = np.array(
            [0 if rng.random() < cfg.both_sides_prob else rng.choice([-1, 1]) for _ in membranes],
            dtype=np.int8,
        )
    else:
        sides = np.array(
            [
                np.sign(s.offset) if kind == "stack" else rng.choice([-1, 1])
                for s, kind, _ in membranes
            ],
            dtype=np.int8,
        )
    occ = _Occupancy()
    targets_c, targets_n, targets_m, targets_s = [], [], [], []
    big_c, big_n, small_c, small_n = [], [], [], []
    for i, (_, _, pts) in enumerate(membranes):
        area = float(pts[2][pts[3] >= cfg.rim_margin].sum())
        n_t = int(rng.poisson(cfg.target_density * area / 1000.0))
        c, n, sd = _attach(
            rng,
            cfg,
            labels,
            occ,
            pts,
            int(sides[i]),
            n_t,
            cfg.target_spacing / 2,
            reach_t,
            i + 1,
        )
        targets_c.append(c)
        targets_n.append(n)
        targets_m.append(np.full(len(c), i + 1, np.int32))
        targets_s.append(sd)
    for i, (_, _, pts) in enumerate(membranes):
        area = float(pts[2][pts[3] >= cfg.rim_margin].sum())
        lam = cfg.target_density * area / 1000.0
        n_l = int(rng.poisson(cfg.large_per_target * lam))
        c, n, _ = _attach(
            rng,
            cfg,
            labels,
            occ,
            pts,
            int(sides[i]) if cfg.large_side == "same" else -int(sides[i]),
            n_l,
            r_large,
            reach_l,
            i + 1,
        )
        big_c.append(c)
        big_n.append(n)
        n_s = int(rng.poisson(cfg.small_per_target * lam))
        c, n, _ = _attach(rng, cfg, labels, occ, pts, 0, n_s, 3.0, 5.0, i + 1)
        small_c.append(c)
        small_n.append(n)
    tc = np.concatenate(targets_c) if targets_c else np.zeros((0, 3))
    tn = np.concatenate(targets_n) if targets_n else np.zeros((0, 3))
    tm = np.concatenate(targets_m) if targets_m else np.zeros(0, np.int32)
    ts = np.concatenate(targets_s) if targets_s else np.zeros(0)
    bc = np.concatenate(big_c) if big_c else np.zeros((0, 3))
    bn = np.concatenate(big_n) if big_n else np.zeros((0, 3))
    sc = np.concatenate(small_c) if small_c else np.zeros((0, 3))
    sn = np.concatenate(small_n) if small_n else np.zeros((0, 3))
    t_mats = _frames(tn, rng) if len(tn) else np.zeros((0, 3, 3))
    b_mats = _frames(bn, rng) if len(bn) else np.zeros((0, 3, 3))
    s_mats = _frames(sn, rng) if len(sn) else np.zeros((0, 3, 3))
    # targets: occupancy also blocks the protruding domain for free blobs
    if pm_t is None:
        for c, n in zip(tc, tn, strict=True):
            occ.add(c + 3.0 * n, 5.0)
    else:
        for c, n in zip(tc, tn, strict=True):
            occ.add(c + (0.5 * pm_t.top - hw) * n, 0.7 * pm_t.radius)

    # where the annotator clicks: U(click_offset) beyond the local segmentation face
    t_origin = tc - hw * tn  # mid-surface points under the targets
    clicks = np.zeros(len(tc))
    centres = tc
    if cfg.click_offset is not None and len(tc):
        face = np.full(len(tc), hw)
        surfs = [s for s, _, _ in membranes]
        for k in range(len(tc)):
            s_hw = surfs[tm[k] - 1].hw
            if s_hw is not None:
                face[k] = s_hw
            elif dmg is not None and dmg.hw is not None:
                zi = np.clip(np.rint(t_origin[k]).astype(int), 0, np.array(shape) - 1)
                face[k] = dmg.hw[zi[0], zi[1], zi[2]]
        clicks = rng.uniform(*cfg.click_offset, size=len(tc))
        centres = t_origin + (face + clicks)[:, None] * tn

    mvox = float(np.prod(shape)) / 1e6
    rc, rr = _place_free(
        rng,
        shape,
        labels,
        occ,
        int(rng.poisson(cfg.ribosomes_per_mvox * mvox)),
        cfg.ribosome_radius,
    )
    gc, gr = _place_free(
        rng, shape, labels, occ, int(rng.poisson(cfg.gold_per_mvox * mvox)), cfg.gold_radius
    )

    if pm_t is None or pm_l is None:
        _render(density, tc, t_mats, _target_prims(), cfg.protein_amplitude)
        _render(density, bc, b_mats, _large_prims(), cfg.large_amplitude)
        protein_zyx = tc
    else:
        render_map(density, t_origin, t_mats, pm_t, cfg.protein_amplitude)
        render_map(density, bc - hw * bn, b_mats, pm_l, cfg.large_amplitude)
        protein_zyx = t_origin
    _render(density, sc, s_mats, _small_prims(), cfg.small_amplitude)
    for c, r in zip(rc, rr, strict=True):
        _render(
            density,
            c[None],
            _random_rotation(rng)[None],
            _ribosome_prims(r),
            cfg.ribosome_amplitude,
        )
    for c, r in zip(gc, gr, strict=True):
        _render(
            density,
            c[None],
            np.eye(3)[None],
            np.array([[0, 0, 0, r, r, r, 1.0]]),
            cfg.gold_amplitude,
        )

    if cfg.snr is not None:
        noise_std = math.sqrt(signal_variance(cfg) / cfg.snr)
    else:
        noise_std = cfg.noise_ratio * _filtered_template_peak(cfg)
    tomo = imaging_filter(density, cfg)
    if not cfg.invert:
        np.negative(tomo, out=tomo)
    if noise_std > 0 and cfg.noise_model == "coloured":
        wedge = cfg.tilt_max_deg if cfg.noise_wedge else None
        tomo += imaging.coloured_noise(
            rng, shape, noise_std, cfg.noise_corner, cfg.noise_slope, wedge  # type: ignore[arg-type]
        )
    elif noise_std > 0:
        step = max(1, int(2e7 // (shape[1] * shape[2])))
        for z0 in range(0, shape[0], step):
            sl = tomo[z0 : z0 + step]
            noise = rng.standard_normal(sl.shape, dtype=np.float32)
            noise *= np.float32(noise_std)
            sl += noise
    seg_labels = dmg.seg if dmg is not None else labels
    kinds = tuple(kind for _, kind, _ in membranes)
    return SynthTomogram(
        tomogram=tomo,
        segmentation=(seg_labels > 0).astype(np.uint8),
        labels=seg_labels,
        density=density if cfg.keep_density else None,
        centres_zyx=centres.astype(np.float32).reshape(-1, 3),
        matrices_zyx=t_mats.astype(np.float32).reshape(-1, 3, 3),
        membrane_of_particle=tm.astype(np.int32),
        membrane_kind=kinds,
        membrane_side=sides,
        small_zyx=sc.astype(np.float32).reshape(-1, 3),
        large_zyx=bc.astype(np.float32).reshape(-1, 3),
        large_matrices_zyx=b_mats.astype(np.float32).reshape(-1, 3, 3),
        ribosome_zyx=rc.astype(np.float32).reshape(-1, 3),
        gold_zyx=gc.astype(np.float32).reshape(-1, 3),
        noise_std=float(noise_std),
        scenario=kinds,
        protein_zyx=protein_zyx.astype(np.float32).reshape(-1, 3),
        target_side=ts.astype(np.int8),
        click_offset=clicks.astype(np.float32),
        labels_clean=labels if dmg is not None else None,
    )


def tomogram_rng(seed: int, index: int) -> np.random.Generator:
    """The generator :func:`generate_campaign` uses for tomogram ``index`` of campaign ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def write_synth_tomogram(out: Path, name: str, st: SynthTomogram, voxel_size_A: float,
                         split: str, angles: bool = True):
    """Write one tomogram of a campaign: ``<name>.mrc``, ``<name>_seg.mrc`` and
    ``<name>_particles.star`` (targets with ``mbMembrane`` and ``mbScenario``; without
    angles when ``angles`` is False) in ``out``; returns its manifest entry and its STAR
    table (with angles)."""
    from .manifest import TomogramEntry
    from .mrc import write_volume
    from .star import ANGLE_COLUMNS, particles_frame, write_particles

    write_volume(out / f"{name}.mrc", st.tomogram, voxel_size_A)
    write_volume(out / f"{name}_seg.mrc", st.segmentation, voxel_size_A)
    df = particles_frame(
        name, st.centres_zyx, st.matrices_zyx, st.tomogram.shape, voxel_size_A,
        extra={
            "mbMembrane": st.membrane_of_particle,
            "mbScenario": np.array([st.scenario[m - 1] for m in st.membrane_of_particle],
                                   dtype=object),
        },
    )
    write_particles(out / f"{name}_particles.star",
                    df if angles else df.drop(columns=list(ANGLE_COLUMNS)))
    entry = TomogramEntry(name=name, tomogram=out / f"{name}.mrc",
                          segmentation=out / f"{name}_seg.mrc",
                          particles=out / f"{name}_particles.star", voxel_size_A=voxel_size_A,
                          split=split)
    return entry, df


def generate_campaign(
    out_dir: Path,
    n_tomos: int,
    seed: int,
    cfg: SynthConfig = SynthConfig(),
    n_train: int = 1,
    n_val: int = 0,
    angles: bool = True,
) -> Path:
    """Write a synthetic campaign and return its manifest path.

    Writes per tomogram ``<name>.mrc`` (tomogram), ``<name>_seg.mrc`` (binary uint8
    segmentation), ``<name>_particles.star`` (ground-truth targets with angles unless
    ``angles=False``, ``rlnTomoName = name``, ``mbMembrane`` = membrane label,
    ``mbScenario`` = the membrane's scenario), and for the campaign
    ``template.mrc`` (:func:`render_template`), ``ground_truth.star`` (all targets) and
    ``manifest.csv``: the first ``n_train`` rows ``train``, the next ``n_val`` ``val``, the
    rest ``test``; every row names its GT STAR (the pipeline ignores it for test rows).
    Names are ``synth_000``, ``synth_001``...; paths in the manifest are relative to
    ``out_dir``. Tomogram ``i`` depends only on ``(seed, i)`` and ``cfg``.

    Parameters
    ----------
    out_dir
        Output folder (created).
    n_tomos
        Number of tomograms.
    seed
        Campaign seed.
    cfg
        Tomogram parameters.
    n_train, n_val
        Number of training / validation rows.
    angles
        False: the per-tomogram STARs carry no ``rlnAngleRot/Tilt/Psi`` (picks without
        orientations); ``ground_truth.star`` always keeps them for evaluation.

    Returns
    -------
    Path
        ``out_dir / "manifest.csv"``.
    """
    import pandas as pd

    from .manifest import write_manifest
    from .mrc import write_volume
    from .star import write_particles

    if n_tomos < 1 or n_train < 0 or n_val < 0 or n_train + n_val > n_tomos:
        raise ValueError(f"need 0 <= n_train + n_val <= n_tomos, got {n_train}, {n_val}, {n_tomos}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    entries = []
    frames = []
    for i in range(n_tomos):
        name = f"synth_{i:03d}"
        st = generate_tomogram(tomogram_rng(seed, i), cfg)
        split = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
        entry, df = write_synth_tomogram(out, name, st, cfg.voxel_size_A, split, angles)
        entries.append(entry)
        frames.append(df)
        log.info("%s: %d membranes, %d targets", name, len(st.membrane_kind), len(st.centres_zyx))
        del st
    write_volume(out / "template.mrc", render_template(cfg), cfg.voxel_size_A)
    write_particles(out / "ground_truth.star", pd.concat(frames, ignore_index=True))
    manifest = out / "manifest.csv"
    write_manifest(entries, manifest)
    return manifest
