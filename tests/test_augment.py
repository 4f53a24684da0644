"""Augmentations keep the label (distance from the cube centre) valid."""

from __future__ import annotations

import math

import pytest
import torch

from membrain_dist.augment import AugmentConfig, augment, random_flips, rotate_about_normal

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
