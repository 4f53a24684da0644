"""On-the-fly, batched augmentation of rotation-normalised cubes (torch).

Cubes are ``(B, s, s, s)`` float32 with axis 0 along the membrane normal and axes 1, 2 in the
membrane plane (stage 2). The label of a cube is the distance from its *centre* to the nearest
particle centre. Every augmentation here is an isometry of the cube that fixes its centre and maps
the normal axis to itself:

* a rotation by any angle about the normal axis through the cube centre,
* a flip of in-plane axis 1 and/or axis 2 (a mirror through the centre),

so a particle at offset ``d`` from the cube centre ends up at an offset of the same length (and,
for the Mahalanobis label, at the same height along the normal and with the same in-plane
distance), and the label stays exact. The extraction stage already fixes the in-plane angle
arbitrarily, so rotations about the normal add no information the model could rely on; flips
mirror the particle, which for the distance label only matters through chirality the 12^3 cube
cannot resolve at bin-4. Additive Gaussian noise (white, or coloured by a Gaussian correlation
length like a reconstruction's) and a missing wedge in a random orientation leave the geometry
untouched too.

The **random wedge** stands in for the membranes a single annotated membrane does not show: a
tomogram lacks the Fourier directions within ``90 - tilt_max`` degrees of the beam, so a membrane
seen face-on (normal along the beam) loses its bilayer profile and one seen edge-on keeps it. A
cube cut from an edge-on membrane, filtered by a second wedge whose beam axis is drawn uniformly on
the sphere *in the cube's frame*, looks like the same membrane at another tilt (more information
missing, never less), so the model learns to score membranes at every orientation from one.

Exact 90-degree multiples (``torch.rot90``, ``rotation="quarter"``) are the default: they are
what inference sees (``InferenceConfig.rotations`` averages the same quarter turns), with no
interpolation blur and no empty corners. Arbitrary angles (``"any"``) use ``affine_grid`` +
``grid_sample`` (trilinear, ``align_corners=False``): on equal in-plane axes the normalised grid
coordinates scale the same in both, so the map is a rigid rotation about the voxel centre
``(s - 1) / 2``; samples falling outside the cube (its corners) read 0, the normalised tomogram
mean, which real cubes never show. On the hard phantom quarter turns picked better (held-out F1
0.825 against 0.694 from one annotated tomogram; ``TrainConfig``). ``"none"`` disables it.

All random draws come from the given ``torch.Generator`` (on the generator's device), so a seeded
generator reproduces the same augmentation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from membrain_dist.train_config import AugmentConfig

__all__ = [
    "AugmentConfig",
    "augment",
    "rotate_about_normal",
    "shift_along_normal",
    "random_flips",
    "add_noise",
    "random_wedge",
    "wedge_mask",
]

def _check(cubes: torch.Tensor) -> None:
    if cubes.dim() != 4 or cubes.shape[2] != cubes.shape[3]:
        raise ValueError(f"expected (B, s, s, s) cubes, got {tuple(cubes.shape)}")


def rotate_about_normal(cubes: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each cube about its normal axis (axis 0) through the cube centre.

    Parameters
    ----------
    cubes : (B, s, s, s) float tensor
    angles : (B,) tensor, radians. Output voxel at in-plane offset ``(y, x)`` from the centre
        reads the input at ``(x sin a + y cos a, x cos a - y sin a)`` (the sense is irrelevant
        for augmentation, angles are uniform on the circle).

    Returns
    -------
    (B, s, s, s) tensor, trilinear interpolation, zeros outside the cube.
    """
    _check(cubes)
    b = cubes.shape[0]
    a = angles.to(device=cubes.device, dtype=cubes.dtype)
    c, s = torch.cos(a), torch.sin(a)
    theta = torch.zeros(b, 3, 4, device=cubes.device, dtype=cubes.dtype)
    # grid components are (x, y, z) = (axis 2, axis 1, axis 0): rotate x, y; keep z
    theta[:, 0, 0], theta[:, 0, 1] = c, -s
    theta[:, 1, 0], theta[:, 1, 1] = s, c
    theta[:, 2, 2] = 1.0
    x = cubes.unsqueeze(1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(1)


def _rot90_batched(cubes: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate cube ``i`` by ``k[i]`` quarter turns in the plane of axes 1, 2 (exact)."""
    out = cubes
    for turns in (1, 2, 3):
        sel = k == turns
        out = torch.where(sel[:, None, None, None], torch.rot90(cubes, turns, dims=(2, 3)), out)
    return out


def random_flips(cubes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each cube along in-plane axis 1 and axis 2, each with probability 1/2 (exact)."""
    _check(cubes)
    f = torch.rand(2, cubes.shape[0], generator=generator, device=generator.device) < 0.5
    f = f.to(cubes.device)[:, :, None, None, None]
    out = torch.where(f[0], cubes.flip(2), cubes)
    return torch.where(f[1], out.flip(3), out)


def shift_along_normal(cubes: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Move each cube's content by ``shifts[b]`` whole voxels along axis 0 (the normal); the
    slices a shift uncovers repeat the cube's edge slice."""
    _check(cubes)
    s = cubes.shape[1]
    src = torch.arange(s, device=cubes.device)[None, :] - shifts.to(cubes.device)[:, None]
    src = src.clamp(0, s - 1)  # (B, s): the slice each output slice reads
    return torch.gather(cubes, 1, src[:, :, None, None].expand_as(cubes))


def _gaussian_smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, s, s, s)`` along its three cube axes (zero padding)."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    out = x.unsqueeze(1)
    for shape in ((-1, 1, 1), (1, -1, 1), (1, 1, -1)):
        pad = tuple(r if n == -1 else 0 for n in shape)
        out = F.conv3d(out, k.reshape(1, 1, *shape), padding=pad)
    return out.squeeze(1)


def add_noise(
    cubes: torch.Tensor, std: float, generator: torch.Generator, sigma: float = 0.0
) -> torch.Tensor:
    """Add Gaussian noise of standard deviation ``std`` (intensity units).

    ``sigma`` > 0 colours it: white noise blurred by a Gaussian of that sigma (voxels), then
    rescaled to ``std`` (measured over the batch), like a reconstruction's band-limited noise.
    """
    if std == 0:
        return cubes
    noise = torch.randn(
        cubes.shape, generator=generator, device=generator.device, dtype=cubes.dtype
    ).to(cubes.device)
    if sigma > 0:
        noise = _gaussian_smooth(noise, sigma)
        noise = noise / noise.std().clamp_min(1e-12)
    return cubes + std * noise


def _random_unit(n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 3)`` unit vectors uniform on the sphere."""
    v = torch.randn(n, 3, generator=generator, device=generator.device)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _random_in_cone(n: int, cone_deg: float, generator: torch.Generator) -> torch.Tensor:
    """``(n, 3)`` unit vectors uniform on the cap within ``cone_deg`` of axis 0 (90: the
    hemisphere, which for a wedge's beam is the whole sphere)."""
    u = torch.rand(2, n, generator=generator, device=generator.device)
    cos_t = 1.0 - u[0] * (1.0 - math.cos(math.radians(cone_deg)))
    sin_t = (1.0 - cos_t**2).clamp_min(0.0).sqrt()
    phi = u[1] * (2 * math.pi)
    return torch.stack([cos_t, sin_t * torch.cos(phi), sin_t * torch.sin(phi)], dim=1)


def wedge_mask(size: int, beam: torch.Tensor, tilt_axis: torch.Tensor,
               tilt_max_deg: float) -> torch.Tensor:
    """Measured-region masks on a ``size``^3 ``fftn`` grid, one per beam axis.

    Parameters
    ----------
    size : int
        Grid edge (voxels).
    beam, tilt_axis : (B, 3) unit tensors, cube axes order (0, 1, 2); ``tilt_axis`` must be
        perpendicular to ``beam``.
    tilt_max_deg : float
        Tilt range +- this about ``tilt_axis``.

    Returns
    -------
    (B, size, size, size) float tensor: 1 where a projection at tilt within the range measured
    the frequency ``k`` (``|k.beam| <= tan(tilt_max) |k.p|`` with ``p = beam x tilt_axis``),
    0 in the missing wedge. For ``beam`` = axis 0 and ``tilt_axis`` = axis 1 this is the usual
    tomogram wedge (z beam, tilt about y).
    """
    f = torch.fft.fftfreq(size, device=beam.device, dtype=beam.dtype)
    k = torch.stack(torch.meshgrid(f, f, f, indexing="ij"), dim=-1)  # (s, s, s, 3)
    p = torch.linalg.cross(beam, tilt_axis, dim=1)
    kb = torch.einsum("zyxc,bc->bzyx", k, beam).abs()
    kp = torch.einsum("zyxc,bc->bzyx", k, p).abs()
    return (kb <= math.tan(math.radians(tilt_max_deg)) * kp + 1e-6).to(beam.dtype)


def random_wedge(cubes: torch.Tensor, tilt_max_deg: float, prob: float,
                 generator: torch.Generator, cone_deg: float = 90.0) -> torch.Tensor:
    """Filter a random ``prob`` share of the cubes by a wedge with a random beam axis.

    Each chosen cube is zero-padded to twice its size (no wrap-around), Fourier transformed,
    multiplied by :func:`wedge_mask` for a beam axis uniform within ``cone_deg`` of the
    normal (cube axis 0; 90 = any direction) and a tilt axis uniform about it, transformed
    back and cropped. The others are returned unchanged.
    """
    _check(cubes)
    b, s = cubes.shape[0], cubes.shape[1]
    chosen = torch.rand(b, generator=generator, device=generator.device) < prob
    chosen = chosen.to(cubes.device)
    n = int(chosen.sum())
    if n == 0:
        return cubes
    beam = _random_in_cone(n, cone_deg, generator).to(device=cubes.device, dtype=torch.float32)
    other = _random_unit(n, generator).to(device=cubes.device, dtype=torch.float32)
    tilt = other - (other * beam).sum(1, keepdim=True) * beam
    tilt = tilt / tilt.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sub = cubes[chosen].float()
    padded = F.pad(sub, (0, s, 0, s, 0, s))
    spec = torch.fft.fftn(padded, dim=(1, 2, 3))
    filtered = torch.fft.ifftn(spec * wedge_mask(2 * s, beam, tilt, tilt_max_deg),
                               dim=(1, 2, 3)).real[:, :s, :s, :s]
    out = cubes.clone()
    out[chosen] = filtered.to(cubes.dtype)
    return out


def augment(cubes: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Apply rotation about the normal, in-plane flips and noise to a batch; labels unchanged.

    Parameters
    ----------
    cubes : (B, s, s, s) float32 tensor, axis 0 along the normal.
    cfg : AugmentConfig
    generator : torch.Generator
        Source of all randomness (put it on the cubes' device to avoid transfers).

    Returns
    -------
    (B, s, s, s) float32 tensor, a new tensor (the input is not modified).
    """
    _check(cubes)
    b = cubes.shape[0]
    out = cubes
    if cfg.rotation == "any":
        angles = torch.rand(b, generator=generator, device=generator.device) * (2 * math.pi)
        out = rotate_about_normal(out, angles)
    elif cfg.rotation == "quarter":
        k = torch.randint(0, 4, (b,), generator=generator, device=generator.device)
        out = _rot90_batched(out, k.to(cubes.device))
    if cfg.flip:
        out = random_flips(out, generator)
    if cfg.normal_shift > 0:
        shifts = torch.randint(-cfg.normal_shift, cfg.normal_shift + 1, (b,),
                               generator=generator, device=generator.device)
        out = shift_along_normal(out, shifts)
    if cfg.wedge_prob > 0:
        out = random_wedge(out, cfg.wedge_deg, cfg.wedge_prob, generator, cfg.wedge_cone_deg)
    out = add_noise(out, cfg.noise_std, generator, cfg.noise_sigma)
    return out if out is not cubes else cubes.clone()
