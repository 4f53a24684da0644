"""Tests of the synthetic campaign generator (membrain_dist.synth)."""

from __future__ import annotations

import math
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from scipy import ndimage
from scipy.spatial import cKDTree

from membrain_dist import axes
from membrain_dist.manifest import read_manifest
from membrain_dist.star import read_particles
from membrain_dist.synth import (
    SynthConfig,
    SynthTomogram,
    generate_campaign,
    generate_tomogram,
    render_template,
    tomogram_rng,
)

SMALL = SynthConfig(
    shape_zyx=(64, 128, 128), vesicle_radius=(18.0, 26.0), sheet_radius=(22.0, 36.0), n_membranes=3
)
HIT_RADIUS = 4.5


@pytest.fixture(scope="module")
def tomos() -> list[SynthTomogram]:
    """Default-size tomograms (noise included) for the property tests."""
    return [generate_tomogram(np.random.default_rng(s)) for s in range(5)]


def test_deterministic_for_seed() -> None:
    a = generate_tomogram(np.random.default_rng(7), SMALL)
    b = generate_tomogram(np.random.default_rng(7), SMALL)
    c = generate_tomogram(np.random.default_rng(8), SMALL)
    assert np.array_equal(a.tomogram, b.tomogram)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.centres_zyx, b.centres_zyx)
    assert np.array_equal(a.matrices_zyx, b.matrices_zyx)
    assert not np.array_equal(a.tomogram, c.tomogram)
    assert not np.array_equal(a.labels, c.labels)


def test_arrays_and_counts(tomos: list[SynthTomogram]) -> None:
    for st in tomos:
        assert st.tomogram.dtype == np.float32 and st.tomogram.shape == (80, 160, 160)
        assert st.segmentation.dtype == np.uint8 and set(np.unique(st.segmentation)) <= {0, 1}
        assert np.array_equal(st.segmentation, (st.labels > 0).astype(np.uint8))
        assert 3 <= len(st.membrane_kind) <= 4
        assert st.centres_zyx.shape[1] == 3 and st.matrices_zyx.shape[1:] == (3, 3)
        assert len(st.membrane_of_particle) == len(st.centres_zyx) > 0
        assert len(st.small_zyx) > 0
    # ~17 targets per unit of density on the default tomogram's membranes (Poisson)
    density = SynthConfig().target_density
    assert 10 * density <= np.mean([len(st.centres_zyx) for st in tomos]) <= 25 * density


def test_membranes_are_separate_components(tomos: list[SynthTomogram]) -> None:
    for st in tomos:
        _, n = ndimage.label(st.segmentation, structure=np.ones((3, 3, 3)))
        assert n == len(st.membrane_kind) == st.labels.max()
        for m in range(1, n + 1):
            _, nm = ndimage.label(st.labels == m, structure=np.ones((3, 3, 3)))
            assert nm == 1


def test_centres_on_own_membrane_boundary_and_spaced(tomos: list[SynthTomogram]) -> None:
    for st in tomos:
        seg = st.segmentation.astype(bool)
        boundary = seg & ~ndimage.binary_erosion(seg)
        for m in np.unique(st.membrane_of_particle):
            sel = st.membrane_of_particle == m
            d, _ = cKDTree(np.argwhere(boundary & (st.labels == m))).query(st.centres_zyx[sel])
            assert d.max() <= 1.25
        d, _ = cKDTree(st.centres_zyx).query(st.centres_zyx, k=2)
        assert d[:, 1].min() >= SynthConfig().target_spacing - 1e-3


def _at(vol: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Trilinear samples of ``vol`` at (N, 3) zyx points."""
    return ndimage.map_coordinates(vol, p.T, order=1)


def _ball(vol: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Mean of ``vol`` over the 19-voxel ball (|offset|^2 <= 2) around each (N, 3) point."""
    g = np.arange(-1, 2)
    off = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    off = off[(off**2).sum(1) <= 2]
    return np.mean([_at(vol, p + o) for o in off], axis=0)


def test_orientations_are_proper_and_normal_points_to_protein(tomos: list[SynthTomogram]) -> None:
    for st in tomos:
        m = axes.matrix_zyx_to_xyz(st.matrices_zyx.astype(np.float64))
        assert np.allclose(m.transpose(0, 2, 1) @ m, np.eye(3), atol=1e-5)
        assert np.allclose(np.linalg.det(m), 1.0, atol=1e-5)
        assert np.allclose(np.cross(m[:, :, 2], m[:, :, 0]), m[:, :, 1], atol=1e-5)  # v = n x u
        c = st.centres_zyx.astype(np.float64)
        n = st.matrices_zyx[:, :, 2].astype(np.float64)

        dens = st.density
        assert dens is not None
        assert _at(dens, c + 4 * n).mean() > _at(dens, c - 4 * n).mean()
        assert np.all(_ball(dens, c + 4 * n) > _ball(dens, c - 4 * n))
        assert np.all(_at(dens, c + 5 * n) > _at(dens, c - 5 * n))


def test_missing_wedge_present() -> None:
    cfg = SynthConfig(noise_ratio=0.0)
    st = generate_tomogram(np.random.default_rng(3), cfg)
    nz, ny, nx = st.tomogram.shape
    power = np.abs(np.fft.rfftn(st.tomogram.astype(np.float64))) ** 2
    kz = np.abs(np.fft.fftfreq(nz))[:, None, None]
    kx = np.abs(np.fft.rfftfreq(nx))[None, None, :]
    tan_half = math.tan(math.radians(90 - cfg.tilt_max_deg))
    wedge = np.broadcast_to((kx < 0.9 * tan_half * kz) & (kz > 0.02), power.shape)
    measured = np.broadcast_to((kx > 1.1 * tan_half * kz) & (kx < 0.25), power.shape)
    assert power[wedge].mean() < 1e-8 * power[measured].mean()
    # and the noise is added on top (white, so it fills the wedge)
    noisy = generate_tomogram(np.random.default_rng(3))
    p2 = np.abs(np.fft.rfftn(noisy.tomogram.astype(np.float64))) ** 2
    assert p2[wedge].mean() > 1e-2 * p2[measured].mean()


def test_invert_flips_contrast() -> None:
    a = generate_tomogram(
        np.random.default_rng(5),
        SynthConfig(shape_zyx=(48, 96, 96), noise_ratio=0.0, n_membranes=2),
    )
    b = generate_tomogram(
        np.random.default_rng(5),
        SynthConfig(shape_zyx=(48, 96, 96), noise_ratio=0.0, n_membranes=2, invert=True),
    )
    assert np.allclose(a.tomogram, -b.tomogram)
    assert a.tomogram[a.segmentation > 0].mean() < 0  # protein/membrane dark by default


def _naive_picker_f1(st: SynthTomogram, sigma: float = 1.5, spacing: float = 11.0) -> float:
    """Local maxima of smoothed -tomogram within 8 voxels of the segmentation, NMS, top-K."""
    sm = ndimage.gaussian_filter(-st.tomogram, sigma)
    near = ndimage.distance_transform_edt(st.segmentation == 0) <= 8.0
    peaks = (ndimage.maximum_filter(sm, size=3) == sm) & near
    idx = np.argwhere(peaks)[np.argsort(-sm[peaks])].astype(np.float64)
    k = len(st.centres_zyx)
    chosen: list[np.ndarray] = []
    for p in idx:
        if all(((p - q) ** 2).sum() >= spacing**2 for q in chosen):
            chosen.append(p)
            if len(chosen) >= k:
                break
    pred = np.array(chosen).reshape(-1, 3)
    dp, _ = cKDTree(st.centres_zyx).query(pred)
    dg, _ = cKDTree(pred).query(st.centres_zyx)
    prec, rec = float(np.mean(dp <= HIT_RADIUS)), float(np.mean(dg <= HIT_RADIUS))
    return 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)


def test_naive_density_picker_is_not_enough(tomos: list[SynthTomogram]) -> None:
    f1 = [_naive_picker_f1(st) for st in tomos]
    print(f"naive density picker F1 per tomogram: {np.round(f1, 3)}, mean {np.mean(f1):.3f}")
    assert np.mean(f1) < 0.6


def test_template_elongated_along_x(tmp_path: Path) -> None:
    t = render_template()
    assert t.shape == (25, 25, 25) and t.dtype == np.float32
    g = np.indices(t.shape).reshape(3, -1).astype(np.float64)
    w = t.reshape(-1) / t.sum()
    mu = (g * w).sum(1)
    var = ((g - mu[:, None]) ** 2 * w).sum(1)
    assert var[2] > var[0] and var[2] > 2 * var[1]  # x longest, y narrow
    assert abs(mu[1] - 12) < 1e-3 and abs(mu[2] - 12) < 1e-3  # C2: centred in-plane
    assert mu[0] > 12  # protein mass on the +z (normal) side


def test_campaign_files(tmp_path: Path) -> None:
    seed = 11
    manifest = generate_campaign(
        tmp_path / "camp", n_tomos=3, seed=seed, cfg=SMALL, n_train=1, n_val=1
    )
    out = tmp_path / "camp"
    assert manifest == out / "manifest.csv"
    df = pd.read_csv(manifest, keep_default_na=False)
    assert list(df["name"]) == ["synth_000", "synth_001", "synth_002"]
    assert list(df["split"]) == ["train", "val", "test"]
    assert {"name", "tomogram", "segmentation", "particles", "voxel_size_A", "split"} <= set(
        df.columns
    )
    with mrcfile.open(out / "template.mrc") as mrc:
        assert mrc.data.shape == (25, 25, 25)
    all_gt = []
    for i, row in df.iterrows():
        st = generate_tomogram(tomogram_rng(seed, int(i)), SMALL)
        for col, arr in (("tomogram", st.tomogram), ("segmentation", st.segmentation)):
            with mrcfile.open(out / row[col]) as mrc:
                assert mrc.data.shape == SMALL.shape_zyx
                assert np.isclose(float(mrc.voxel_size.x), SMALL.voxel_size_A, rtol=1e-4)
                assert np.array_equal(np.asarray(mrc.data).astype(arr.dtype), arr)
        star = starfile.read(out / row["particles"])
        assert (star["rlnTomoName"] == row["name"]).all()
        xyz = star[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy()
        assert np.allclose(xyz, st.centres_zyx[:, ::-1], atol=1e-3)
        m = axes.euler_to_matrix(star[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy())
        ref = axes.matrix_zyx_to_xyz(st.matrices_zyx)
        assert np.allclose(m[:, :, 2], ref[:, :, 2], atol=1e-3)  # normal
        assert np.allclose(m[:, :, 0], ref[:, :, 0], atol=1e-3)  # long axis
        all_gt.append(len(star))
    entries = read_manifest(manifest)
    assert [e.split for e in entries] == ["train", "val", "test"]
    assert all(e.particles is not None and e.particles.is_file() for e in entries)
    assert all(e.voxel_size_A == pytest.approx(SMALL.voxel_size_A) for e in entries)
    assert len(read_particles(entries[2].particles)) == all_gt[2]
    gt = starfile.read(out / "ground_truth.star")
    assert len(gt) == sum(all_gt)
    assert sorted(set(gt["rlnTomoName"])) == list(df["name"])


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        SynthConfig(shape_zyx=(8, 64, 64))
    with pytest.raises(ValueError):
        SynthConfig(tilt_max_deg=95.0)
