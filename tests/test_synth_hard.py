"""Tests of the "hard" synthetic preset (synth.hard_config) and of the unchanged default."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import starfile
from scipy import ndimage

from membrain_dist import axes
from membrain_dist.star import ANGLE_COLUMNS
from membrain_dist.synth import (
    SynthConfig,
    SynthTomogram,
    generate_campaign,
    generate_tomogram,
    hard_config,
    imaging_filter,
    render_template,
)
from membrain_dist.synth_imaging import ctf_1d, electron_wavelength_A, radial_power
from membrain_dist.synth_maps import B6F_MAP, PSII_MAP, protein_map, render_map

pytestmark = pytest.mark.skipif(
    not (Path(PSII_MAP).is_file() and Path(B6F_MAP).is_file()),
    reason="MemBrain v1 maps (shared/data/membrain-v1) not available",
)

# A hard tomogram small enough for tests (the preset's own shape is (128, 256, 256)).
HARD = hard_config(
    shape_zyx=(96, 160, 160),
    n_membranes=6,
    vesicle_radius=(18.0, 26.0),
    sheet_radius=(24.0, 36.0),
)
SEEDS = (0, 1, 2)


def _h(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


# Computed from the ORIGINAL generator (base commit 59e26d1, before the hard preset) with
# the same configurations and seeds: the default output must stay bit for bit the same.
_REFERENCE = {
    "small": dict(
        cfg=SynthConfig(
            shape_zyx=(48, 96, 96),
            n_membranes=3,
            vesicle_radius=(14.0, 20.0),
            sheet_radius=(16.0, 28.0),
        ),
        seed=3,
        hashes={
            "segmentation": "b65d8872a3176301",
            "labels": "af0e971924eddba2",
            "centres_zyx": "fc2b851d1a4f400a",
            "matrices_zyx": "1d480da4664d5f64",
            "membrane_of_particle": "c8c362c52a33bdd8",
            "membrane_side": "ff9b5729d5ed88f9",
            "small_zyx": "abeec4ae69fa2508",
            "large_zyx": "e0ce74a05af9d68e",
            "large_matrices_zyx": "d1f994685b534199",
            "ribosome_zyx": "7bcc9e40b65d2de1",
        },
        float_hashes={"tomogram": "821f81bf4206c43a", "density": "9570b61f0b527288"},
        kinds=("vesicle", "sheet", "vesicle"),
        noise_std=0.5074456214904786,
        tomo_sum=-21448.077767257848,
        tomo_sq=122839.96172920559,
        dens_sum=21639.037387683347,
    ),
    "default": dict(
        cfg=SynthConfig(),
        seed=0,
        hashes={
            "segmentation": "970c23def5848200",
            "labels": "47c3e77b024c564b",
            "centres_zyx": "a347b7305c221caf",
            "matrices_zyx": "8e11ec27cf35c08a",
            "membrane_of_particle": "3617c3c80cdb8441",
            "membrane_side": "fe0012116171e7bb",
            "small_zyx": "a39288eb6e6319f0",
            "large_zyx": "531d4259cc569755",
            "large_matrices_zyx": "cc9cc85a1a0a5fc2",
            "ribosome_zyx": "c758447f1d41614c",
        },
        float_hashes={"tomogram": "54c36c5830da9ffe", "density": "e25a2083b955d0ad"},
        kinds=("sheet", "stack", "stack", "sheet"),
        noise_std=0.5074456214904786,
        tomo_sum=-62750.77699494021,
        tomo_sq=545757.1208217999,
        dens_sum=63014.81702779269,
    ),
}


@pytest.mark.parametrize("name", sorted(_REFERENCE))
def test_default_output_unchanged(name: str) -> None:
    ref = _REFERENCE[name]
    st = generate_tomogram(np.random.default_rng(ref["seed"]), ref["cfg"])
    for f, h in ref["hashes"].items():
        assert _h(getattr(st, f)) == h, f
    assert st.membrane_kind == ref["kinds"]
    assert st.noise_std == pytest.approx(ref["noise_std"], rel=1e-12)
    t64 = st.tomogram.astype(np.float64)
    # FFT / SIMD rounding may differ on another CPU: exact hashes there, sums everywhere
    assert t64.sum() == pytest.approx(ref["tomo_sum"], rel=1e-6)
    assert (t64**2).sum() == pytest.approx(ref["tomo_sq"], rel=1e-6)
    assert st.density is not None
    assert st.density.astype(np.float64).sum() == pytest.approx(ref["dens_sum"], rel=1e-6)
    if _h(st.tomogram) != ref["float_hashes"]["tomogram"]:
        pytest.xfail("tomogram equal to 1e-6 but not bit for bit (different CPU / FFT?)")


@pytest.fixture(scope="module")
def hard() -> list[tuple[SynthTomogram, SynthTomogram]]:
    """(noisy, noise-free) pairs of hard tomograms: same seed, so only the noise differs."""
    quiet = replace(HARD, snr=None, noise_ratio=0.0)
    return [
        (
            generate_tomogram(np.random.default_rng(s), HARD),
            generate_tomogram(np.random.default_rng(s), quiet),
        )
        for s in SEEDS
    ]


def test_hard_snr(hard: list[tuple[SynthTomogram, SynthTomogram]]) -> None:
    """SNR = variance of the filtered targets over their support / noise variance ~ 0.3."""
    pm = protein_map(HARD.target_map, HARD.voxel_size_A, HARD.hydrophobic_A)
    snrs = []
    for noisy, clean in hard:
        assert noisy.protein_zyx is not None
        noise = noisy.tomogram.astype(np.float64) - clean.tomogram
        assert noise.std() == pytest.approx(noisy.noise_std, rel=1e-3)
        targets = np.zeros(HARD.shape_zyx, np.float32)
        render_map(targets, noisy.protein_zyx, noisy.matrices_zyx, pm, HARD.protein_amplitude)
        support = targets > 0.1
        signal = imaging_filter(targets, HARD)[support].astype(np.float64).var()
        snrs.append(signal / noise.var())
    print(f"measured SNR per tomogram: {np.round(snrs, 3)}")
    assert abs(np.mean(snrs) - 0.3) < 0.1
    assert all(abs(s - 0.3) < 0.15 for s in snrs)


def test_hard_noise_coloured_and_not_in_wedge(
    hard: list[tuple[SynthTomogram, SynthTomogram]],
) -> None:
    noisy, clean = hard[0]
    noise = noisy.tomogram - clean.tomogram
    k, p = radial_power(noise)
    low = p[(k > 0.03) & (k < 0.1)].mean()
    high = p[(k > 0.35) & (k < 0.5)].mean()
    assert low > 5 * high  # white noise: ratio ~1
    power = np.abs(np.fft.rfftn(noise.astype(np.float64))) ** 2
    nz, _, nx = noise.shape
    kz = np.abs(np.fft.fftfreq(nz))[:, None, None]
    kx = np.abs(np.fft.rfftfreq(nx))[None, None, :]
    tan_half = math.tan(math.radians(90 - HARD.tilt_max_deg))
    wedge = np.broadcast_to((kx < 0.9 * tan_half * kz) & (kz > 0.02), power.shape)
    measured = np.broadcast_to((kx > 1.1 * tan_half * kz) & (kx < 0.25), power.shape)
    assert power[wedge].mean() < 1e-6 * power[measured].mean()


def test_ctf_band_pass() -> None:
    lam = electron_wavelength_A(300.0)
    assert lam == pytest.approx(0.01969, abs=1e-4)
    k = np.linspace(0, 0.08, 4001)
    c = ctf_1d(k, -3.5)
    assert c[0] == pytest.approx(0.07, abs=1e-6)  # amplitude contrast only at k = 0
    assert c[np.argmin(np.abs(k - 0.02))] > 0.7  # underfocus: positive lobe
    k0 = k[np.argmax(c < 0)]  # first zero ~ sqrt(1 / (lambda dz)) (a bit below: A)
    assert 0.9 * math.sqrt(1 / (lam * 3.5e4)) < k0 < math.sqrt(1 / (lam * 3.5e4))
    assert (ctf_1d(k, -3.5, phase_flip=True) >= 0).all()
    assert (ctf_1d(k, -3.5) < 0).any()


def test_segmentation_thickness_holes_caps(hard: list[tuple[SynthTomogram, SynthTomogram]]) -> None:
    thick = []
    holes = []
    cap_kept, belt_kept = [], []
    for st, _ in hard:
        assert st.labels_clean is not None
        assert np.all(st.labels_clean[st.labels > 0] == st.labels[st.labels > 0])  # damage ⊆
        for m, scen in enumerate(st.scenario, start=1):
            clean = st.labels_clean == m
            if scen == "sheet":  # face-on: thickness = voxels per z column; holes only
                cnt = clean.sum(0)
                thick.append(cnt[cnt > 0])
                holes.append(1.0 - (st.labels == m).sum() / clean.sum())
            if scen == "vesicle":  # caps: normal within 30° of z (the missing wedge) lost
                p = np.argwhere(clean)
                r = p - p.mean(0)
                cz = np.abs(r[:, 0]) / np.linalg.norm(r, axis=1)
                kept = st.labels[tuple(p.T)] == m
                cap_kept.append(kept[cz > 0.95].mean())
                belt_kept.append(kept[cz < 0.5].mean())
    t = np.concatenate(thick)
    print("thickness percentiles 1/5/50/95/99:", np.percentile(t, [1, 5, 50, 95, 99]))
    assert np.percentile(t, 5) <= 3.5 and np.percentile(t, 95) >= 6.5
    assert np.percentile(t, 1) >= 2 and np.percentile(t, 99) <= 8
    print("hole fraction of face-on sheets:", np.round(holes, 3))
    assert np.mean(holes) > 0.03
    print("vesicles: kept in the caps / around the equator:", cap_kept, belt_kept)
    assert len(cap_kept) > 0 and max(cap_kept) < 0.1 and min(belt_kept) > 0.7


def test_grana_stack_gaps() -> None:
    cfg = hard_config(shape_zyx=(96, 160, 160), n_membranes=5, kind_weights=(0, 0, 1, 0),
                      sheet_radius=(24.0, 36.0))
    st = generate_tomogram(np.random.default_rng(4), cfg)
    assert st.labels_clean is not None
    assert set(st.scenario) == {"stack"} and 3 <= len(st.scenario) <= 5
    gaps = []
    for m in range(1, len(st.scenario)):
        dist = ndimage.distance_transform_edt(st.labels_clean != m + 1)
        d = dist[st.labels_clean == m]
        gaps.append(np.percentile(d, 2) - 1.0)  # empty voxels between the two bands
    print("gaps between neighbouring sheet segmentations:", np.round(gaps, 2))
    assert all(3.0 <= g <= 8.0 for g in gaps)
    assert 4.0 <= np.median(gaps) <= 7.0


def test_centres_clicked_off_the_face(hard: list[tuple[SynthTomogram, SynthTomogram]]) -> None:
    d_all = []
    for st, _ in hard:
        assert st.click_offset is not None
        assert np.all((st.click_offset >= 1.0) & (st.click_offset <= 4.0))
        dist = ndimage.distance_transform_edt(st.segmentation == 0)
        d_all.append(ndimage.map_coordinates(dist, st.centres_zyx.T.astype(np.float64), order=1))
    d = np.concatenate(d_all)
    print("distance of GT centres to the segmentation, percentiles:", np.percentile(d, [5, 50, 95]))
    assert np.mean((d >= 0.5) & (d <= 5.0)) > 0.8  # the rest: over holes / lost caps
    assert 1.5 <= np.median(d) <= 4.0
    assert np.mean(d < 0.5) < 0.02


def test_targets_on_both_faces_and_distractors_on_the_same(
    hard: list[tuple[SynthTomogram, SynthTomogram]],
) -> None:
    both = 0
    same = []
    for st, _ in hard:
        assert st.target_side is not None
        for m, scen in enumerate(st.scenario, start=1):
            if scen != "vesicle":
                continue
            centre = np.argwhere(st.labels_clean == m).mean(0)
            sel = st.membrane_of_particle == m
            out = np.sign(((st.centres_zyx[sel] - centre) * st.matrices_zyx[sel, :, 2]).sum(1))
            assert np.array_equal(out, st.target_side[sel])  # +1 = outside
            both += int((out > 0).any() and (out < 0).any())
            if st.membrane_side[m - 1] != 0 and len(st.large_zyx):
                # large (b6f) distractors of this vesicle: on the targets' face
                dc = np.linalg.norm(st.large_zyx - centre, axis=1)
                r = np.linalg.norm(st.centres_zyx[sel] - centre, axis=1)
                if len(r) == 0:
                    continue
                near = np.abs(dc - np.median(r)) < 8
                n = st.large_matrices_zyx[near, :, 2]
                side = np.sign(((st.large_zyx[near] - centre) * n).sum(1))
                same.extend(side == st.membrane_side[m - 1])
    assert both >= 1
    assert len(same) > 0 and np.mean(same) > 0.9


def test_protein_size_follows_voxel_size() -> None:
    ext = {}
    for vs in (13.68, 10.0):
        pm = protein_map(PSII_MAP, vs)
        pts = np.argwhere(pm.density > 0.2) - pm.origin
        local = pts @ pm.axes  # u, v, n components
        w = pm.density[pm.density > 0.2].astype(np.float64)
        mu = (local * w[:, None]).sum(0) / w.sum()
        ext[vs] = np.sqrt((((local - mu) ** 2) * w[:, None]).sum(0) / w.sum())  # rms extent
        t = render_template(hard_config(voxel_size_A=vs))
        assert t.shape[0] >= 2 * math.ceil(pm.radius) + 5
    ratio = ext[10.0] / ext[13.68]
    print("rms extent (u, v, n) at 13.68 / 10 Å:", ext[13.68], ext[10.0])
    assert np.allclose(ratio, 13.68 / 10.0, rtol=0.1)
    # rms extent along u of the 4.667 Å map: 9.65 map voxels = 45 Å
    assert ext[13.68][0] * 13.68 == pytest.approx(45.0, rel=0.1)
    assert ext[13.68][0] > ext[13.68][1] and ext[13.68][0] > ext[13.68][2]


def test_map_frame_orientation() -> None:
    """u = long in-plane axis, n = C2 axis towards the protruding (lumenal) domain."""
    pm = protein_map(PSII_MAP, 13.68)
    m = axes.matrix_zyx_to_xyz(pm.axes)
    assert np.linalg.det(m) == pytest.approx(1.0, abs=1e-6)  # proper: no mirror
    assert np.allclose(np.cross(m[:, 2], m[:, 0]), m[:, 1], atol=1e-6)  # v = n x u
    assert pm.top > -pm.bottom + 1  # more protein beyond the membrane along +n
    assert 0 < pm.com_n < pm.top
    t = render_template(hard_config())  # u = x, v = y, n = z; centre of mass at the centre
    c = t.shape[0] // 2
    g = np.indices(t.shape).reshape(3, -1).astype(np.float64)
    w = np.clip(t, 0, None).reshape(-1) / np.clip(t, 0, None).sum()
    mu = (g * w).sum(1)
    var = ((g - mu[:, None]) ** 2 * w).sum(1)
    assert var[2] > var[1] > var[0]  # x (u) longest, z (n) thinnest
    assert np.allclose(mu, c, atol=0.5)
    # C2 about z: rotating by 180° (y -> -y, x -> -x about the centre) leaves it unchanged
    r = t[:, ::-1, ::-1]
    if t.shape[1] % 2 == 0:
        r = np.roll(r, 1, axis=(1, 2))
    assert np.corrcoef(r.ravel(), t.ravel())[0, 1] > 0.95
    # beyond the 40 Å transmembrane slab there is much more protein on the +n side
    pts = np.argwhere(pm.density > 0.1)
    ln = (pts - pm.origin) @ pm.axes[:, 2]
    w = pm.density[pm.density > 0.1]
    half = 20.0 / 13.68
    assert w[ln > half].sum() > 2 * w[ln < -half].sum()


def test_campaign_without_angles_and_scenario(tmp_path: Path) -> None:
    cfg = hard_config(shape_zyx=(64, 128, 128), n_membranes=3, vesicle_radius=(16.0, 22.0),
                      sheet_radius=(20.0, 30.0))
    generate_campaign(tmp_path, n_tomos=1, seed=2, cfg=cfg, angles=False)
    star = starfile.read(tmp_path / "synth_000_particles.star")
    assert len(star) > 0
    assert not set(ANGLE_COLUMNS) & set(star.columns)
    assert set(star["mbScenario"]) <= {"vesicle", "sheet", "stack", "edge-on"}
    gt = starfile.read(tmp_path / "ground_truth.star")
    assert set(ANGLE_COLUMNS) <= set(gt.columns) and "mbScenario" in gt.columns
    st = generate_tomogram(np.random.default_rng(np.random.SeedSequence([2, 0])), cfg)
    assert list(star["mbScenario"]) == [st.scenario[m - 1] for m in st.membrane_of_particle]
