"""Augmentations keep the label (distance from the cube centre) valid."""

from __future__ import annotations

import math

import pytest
import torch

from membrain_dist.augment import (
    AugmentConfig,
    add_noise,
    augment,
    random_flips,
    random_wedge,
    rotate_about_normal,
    shift_along_normal,
    wedge_mask,
)

S = 12


def _coords() -> torch.Tensor:
    """(3, S, S, S) voxel offsets from the cube centre, axis order (normal, y, x)."""
    g = torch.arange(S, dtype=torch.float32) - (S - 1) / 2
    return torch.stack(torch.meshgrid(g, g, g, indexing="ij"))


def _blob(offset: tuple[float, float, float], sigma: float = 1.0) -> torch.Tensor:
    c = _coords()
    off = torch.tensor(offset).view(3, 1, 1, 1)
    return torch.exp(-((c - off) ** 2).sum(0) / (2 * sigma**2))


def _centroid(cubes: torch.Tensor) -> torch.Tensor:
    """(B, 3) intensity centroid (offset from the centre) of each cube."""
    w = cubes.clamp(min=0)
    w = torch.where(w > 0.2 * w.amax(dim=(1, 2, 3), keepdim=True), w, torch.zeros_like(w))
    c = _coords()
    return torch.einsum("bijk,dijk->bd", w, c) / w.sum(dim=(1, 2, 3))[:, None]


def test_rotation_of_radial_cube_is_identity_up_to_interpolation():
    r2 = (_coords() ** 2).sum(0)
    cube = torch.exp(-r2 / (2 * 2.5**2)).expand(16, S, S, S).contiguous()
    angles = torch.linspace(0, 2 * math.pi, 16)
    out = rotate_about_normal(cube, angles)
    err = (out - cube).abs()
    assert err.max() < 0.05 and err.mean() < 0.005
    # a radial cube off-centre in-plane would not survive: the test can fail
    shifted = _blob((0.0, 2.0, 0.0), 2.5).expand(4, S, S, S).contiguous()
    moved = rotate_about_normal(shifted, torch.full((4,), math.pi / 2))
    assert (moved - shifted).abs().max() > 0.3


def test_quarter_turn_matches_rot90_exactly():
    x = torch.randn(3, S, S, S)
    out = rotate_about_normal(x, torch.full((3,), math.pi / 2))
    ok = [torch.allclose(out, torch.rot90(x, k, dims=(2, 3)), atol=1e-5) for k in (1, 3)]
    assert any(ok)


def test_flips_are_exact_and_all_occur():
    x = torch.randn(1, S, S, S).expand(64, S, S, S).contiguous()
    out = random_flips(x, torch.Generator().manual_seed(3))
    variants = [x[0], x[0].flip(1), x[0].flip(2), x[0].flip(1).flip(2)]
    seen = set()
    for o in out:
        match = [i for i, v in enumerate(variants) if torch.equal(o, v)]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("rotation", ["any", "quarter"])
def test_off_centre_feature_keeps_its_distance_to_the_centre(rotation: str):
    offset = (1.5, 2.0, -1.5)  # (normal, y, x) voxels from the centre
    x = _blob(offset).expand(64, S, S, S).contiguous()
    cfg = AugmentConfig(rotation=rotation, flip=True, noise_std=0.0)
    out = augment(x, cfg, torch.Generator().manual_seed(0))
    before = _centroid(x)
    after = _centroid(out)
    # distance to the cube centre and height along the normal are kept
    torch.testing.assert_close(after.norm(dim=1), before.norm(dim=1), atol=0.1, rtol=0)
    torch.testing.assert_close(after[:, 0], before[:, 0], atol=0.05, rtol=0)
    # ... while the in-plane position really moved for most cubes
    moved = (after[:, 1:] - before[:, 1:]).norm(dim=1) > 1.0
    assert moved.float().mean() > 0.5


def test_noise_std_and_seeded_reproducibility():
    x = torch.zeros(32, S, S, S)
    cfg = AugmentConfig(noise_std=0.5)
    a = augment(x, cfg, torch.Generator().manual_seed(7))
    b = augment(x, cfg, torch.Generator().manual_seed(7))
    c = augment(x, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.std().item() == pytest.approx(0.5, rel=0.02)
    assert torch.equal(x, torch.zeros_like(x))  # input untouched
    off = augment(x + 1, AugmentConfig("none", False, 0.0), torch.Generator())
    assert torch.equal(off, x + 1)
    with pytest.raises(ValueError):
        AugmentConfig(rotation="sideways")  # type: ignore[arg-type]


def test_wedge_mask_on_the_tomogram_axes_is_the_phantoms_wedge():
    """Beam along cube axis 0, tilt about axis 1: the synthetic tomogram's own missing wedge."""
    from membrain_dist.synth_imaging import wedge_rfft

    for deg in (45.0, 60.0):
        m = wedge_mask(16, torch.tensor([[1.0, 0, 0]]), torch.tensor([[0.0, 1, 0]]), deg)[0]
        ref = torch.from_numpy(wedge_rfft((16, 16, 16), deg)[:, 0, :])  # (kz, kx >= 0)
        for ky in range(16):  # the wedge does not depend on the tilt-axis frequency
            assert torch.equal(m[:, ky, :9], ref)
    # a beam along axis 2 puts the wedge about the k2 axis instead
    m = wedge_mask(16, torch.tensor([[0.0, 0, 1]]), torch.tensor([[0.0, 1, 0]]), 60.0)[0]
    assert m[0, 0, 5] == 0 and m[5, 0, 0] == 1 and m[0, 5, 0] == 1


def test_random_wedge_removes_energy_from_the_chosen_cubes_only():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, 12, 12, 12, generator=gen)
    assert torch.equal(random_wedge(x, 60.0, 0.0, gen), x)
    y = random_wedge(x, 60.0, 0.5, gen)
    changed = (y != x).flatten(1).any(1)
    assert 0.35 < changed.float().mean() < 0.65
    # a projection in Fourier space, then a crop: never more energy than the cube had, and a
    # +-60 degree wedge (a third of the directions) removes a clear share of white noise
    e_in, e_out = x.pow(2).sum((1, 2, 3)), y.pow(2).sum((1, 2, 3))
    assert torch.all(e_out <= e_in * (1 + 1e-5))
    assert torch.all(e_out[changed] < 0.9 * e_in[changed])


def test_random_wedge_along_the_normal_flattens_a_bilayer_profile():
    """A flat membrane (density varies along axis 0 only) keeps its profile under a wedge
    whose beam lies in the plane and loses most of it under one along the normal."""
    s = 12
    z = torch.arange(s, dtype=torch.float32) - (s - 1) / 2
    profile = torch.exp(-0.5 * ((z - 1.75) / 0.7) ** 2) + torch.exp(-0.5 * ((z + 1.75) / 0.7) ** 2)
    cube = profile[:, None, None].expand(s, s, s)[None].contiguous()

    def filtered(beam: list[float], tilt: list[float]) -> torch.Tensor:
        spec = torch.fft.fftn(cube, dim=(1, 2, 3))
        m = wedge_mask(s, torch.tensor([beam]), torch.tensor([tilt]), 60.0)
        return torch.fft.ifftn(spec * m, dim=(1, 2, 3)).real

    edge_on = filtered([0.0, 0, 1], [0.0, 1, 0])
    face_on = filtered([1.0, 0, 0], [0.0, 1, 0])
    assert torch.allclose(edge_on, cube, atol=1e-5)
    assert face_on.std() < 0.05 * cube.std()


def test_coloured_noise_has_the_gaussian_correlation_of_its_sigma():
    """White noise blurred by a Gaussian of sigma: lag-1 correlation exp(-1 / (4 sigma^2))."""
    gen = torch.Generator().manual_seed(5)
    x = torch.zeros(256, 16, 16, 16)
    for sigma in (0.0, 1.0):
        n = add_noise(x, 0.7, gen, sigma)[:, 4:12, 4:12, 4:12]  # interior: no padding effects
        assert abs(float(n.std()) - 0.7) < 0.05
        corr = float((n[:, 1:] * n[:, :-1]).mean() / n.pow(2).mean())
        expected = math.exp(-1 / (4 * sigma**2)) if sigma else 0.0
        assert abs(corr - expected) < 0.03


def test_wedge_beams_stay_in_their_cone_and_a_face_on_wedge_erases_a_flat_membrane():
    from membrain_dist.augment import _random_in_cone

    gen = torch.Generator().manual_seed(7)
    for cone in (0.0, 30.0, 90.0):
        b = _random_in_cone(4000, cone, gen)
        assert torch.allclose(b.norm(dim=1), torch.ones(4000), atol=1e-5)
        ang = torch.rad2deg(torch.arccos(b[:, 0].clamp(-1, 1)))
        assert float(ang.max()) <= cone + 1e-3
        # uniform on the cap: cos(angle) uniform on [cos(cone), 1]
        assert abs(float(b[:, 0].mean()) - (1 + math.cos(math.radians(cone))) / 2) < 0.02
    # a flat membrane (profile along the normal only), every cube filtered with the beam
    # along the normal: the profile is gone from the cube's interior (zero padding leaves
    # only a rim near the faces)
    s = 12
    z = torch.arange(s, dtype=torch.float32) - (s - 1) / 2
    profile = torch.exp(-0.5 * ((z - 1.75) / 0.7) ** 2) + torch.exp(-0.5 * ((z + 1.75) / 0.7) ** 2)
    cubes = (profile - profile.mean())[:, None, None].expand(s, s, s).repeat(8, 1, 1, 1)
    face_on = random_wedge(cubes, 60.0, 1.0, gen, cone_deg=0.0)
    inner = (slice(None), slice(None), slice(3, 9), slice(3, 9))
    assert face_on[inner].std() < 0.3 * cubes[inner].std()


def test_shift_along_normal_moves_a_blob_by_whole_voxels_and_repeats_the_edge():
    """A blob moves by exactly the shift along the normal axis, not in plane; the slices a
    shift uncovers repeat the cube's edge slice."""
    cubes = torch.stack([_blob((0.5, -1.5, 2.5)), _blob((0.5, -1.5, 2.5))])
    out = shift_along_normal(cubes, torch.tensor([2, -3]))
    moved = _centroid(out) - _centroid(cubes)
    torch.testing.assert_close(moved, torch.tensor([[2.0, 0.0, 0.0], [-3.0, 0.0, 0.0]]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(out[0, 2:], cubes[0, :-2])
    torch.testing.assert_close(out[0, :2], cubes[0, :1].expand(2, S, S))
    torch.testing.assert_close(out[1, -3:], cubes[1, -1:].expand(3, S, S))
    with pytest.raises(ValueError):
        AugmentConfig(normal_shift=-1)


def test_normal_shift_augmentation_draws_every_shift_in_its_range():
    """``normal_shift = 2``: shifts -2..2 all occur, nothing further."""
    cube = _blob((0.5, 0.5, 0.5), sigma=0.8)
    cfg = AugmentConfig(rotation="none", flip=False, noise_std=0.0, normal_shift=2)
    out = augment(cube.expand(400, S, S, S), cfg, torch.Generator().manual_seed(0))
    dz = torch.round(_centroid(out)[:, 0] - _centroid(cube[None])[0, 0]).int()
    assert set(dz.tolist()) == {-2, -1, 0, 1, 2}
