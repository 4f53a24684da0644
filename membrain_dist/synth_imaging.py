"""Imaging pieces of the "hard" synthetic preset: CTF, coloured noise, smooth random fields.

Pure functions on ``(z, y, x)`` float32 arrays. Spatial frequencies are in cycles/voxel
(``scipy.fft.fftfreq`` units) unless a name says ``_inv_A`` (cycles/Å); lengths in voxels.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft
from scipy import ndimage, special

__all__ = [
    "electron_wavelength_A",
    "ctf_1d",
    "ctf_rfft",
    "noise_amplitude",
    "wedge_rfft",
    "coloured_noise",
    "smooth_field",
    "uniform_from_normal",
    "radial_power",
]


def electron_wavelength_A(voltage_kv: float) -> float:
    """Relativistic electron wavelength (Å) at an acceleration voltage in kV (300 kV: 0.0197)."""
    v = voltage_kv * 1e3
    return 12.2643247 / math.sqrt(v * (1.0 + 0.978466e-6 * v))


def ctf_1d(
    k_inv_A: np.ndarray,
    defocus_um: float,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    phase_flip: bool = False,
) -> np.ndarray:
    """Radial contrast transfer function (no envelope).

    ``CTF(k) = sqrt(1 - A^2) sin(chi) + A cos(chi)``,
    ``chi(k) = pi lambda dz k^2 - pi/2 Cs lambda^3 k^4`` with ``dz = -defocus_um`` (µm -> Å):
    **negative ``defocus_um`` is underfocus** (e.g. -3.5), where ``CTF > 0`` at low ``k``, so
    a positive density times the CTF stays positive up to the first zero (the tomogram negates
    it: protein dark). ``phase_flip=True`` returns ``|CTF|`` (phase-flipped data), else the
    signed CTF (contrast reversals past each zero, as in uncorrected data).

    Parameters
    ----------
    k_inv_A
        Spatial frequency magnitudes, cycles/Å (any shape).

    Returns
    -------
    np.ndarray
        float32, same shape as ``k_inv_A``.
    """
    lam = electron_wavelength_A(voltage_kv)
    dz = -defocus_um * 1e4
    cs = cs_mm * 1e7
    k2 = np.asarray(k_inv_A, np.float64) ** 2
    chi = math.pi * lam * dz * k2 - 0.5 * math.pi * cs * lam**3 * k2 * k2
    a = amplitude_contrast
    ctf = math.sqrt(1.0 - a * a) * np.sin(chi) + a * np.cos(chi)
    if phase_flip:
        ctf = np.abs(ctf)
    return ctf.astype(np.float32)


def _rfft_k2(shape: tuple[int, int, int]) -> np.ndarray:
    """|k|^2 (cycles/voxel)^2 on the ``rfftn`` grid of a (z, y, x) volume, float32."""
    nz, ny, nx = shape
    kz = scipy.fft.fftfreq(nz).astype(np.float32)[:, None, None]
    ky = scipy.fft.fftfreq(ny).astype(np.float32)[None, :, None]
    kx = scipy.fft.rfftfreq(nx).astype(np.float32)[None, None, :]
    return kz * kz + ky * ky + kx * kx


def ctf_rfft(
    shape: tuple[int, int, int],
    voxel_size_A: float,
    defocus_um: float,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    phase_flip: bool = False,
) -> np.ndarray:
    """The 1D radial CTF (:func:`ctf_1d`) laid on the ``rfftn`` grid of a (z, y, x) volume.

    Returns float32 of shape ``(nz, ny, nx // 2 + 1)``; ``k`` in cycles/Å is
    ``|k_voxel| / voxel_size_A``. The CTF is isotropic: a stand-in for the tilt-averaged
    transfer of a tomogram (no per-tilt defocus gradient).
    """
    k = np.sqrt(_rfft_k2(shape)) / np.float32(voxel_size_A)
    return ctf_1d(k, defocus_um, voltage_kv, cs_mm, amplitude_contrast, phase_flip)


def noise_amplitude(k: np.ndarray, corner: float, slope: float) -> np.ndarray:
    """Amplitude filter of the coloured noise: ``(1 + (k / corner)^2)^(-slope / 2)``.

    ``k`` in cycles/voxel; the noise power spectrum is its square (flat below ``corner``,
    falling as ``k^(-2 slope)`` above). float32.
    """
    k = np.asarray(k, np.float32)
    return ((1.0 + (k / np.float32(corner)) ** 2) ** np.float32(-0.5 * slope)).astype(np.float32)


def wedge_rfft(shape: tuple[int, int, int], tilt_max_deg: float) -> np.ndarray:
    """Measured-region mask (tilt +-``tilt_max_deg`` about y) on the rfft grid, float32 (nz, 1, nx')."""
    nz, _, nx = shape
    kz = scipy.fft.fftfreq(nz).astype(np.float32)
    kx = scipy.fft.rfftfreq(nx).astype(np.float32)
    tan_half = math.tan(math.radians(90.0 - tilt_max_deg))
    measured = ~(np.abs(kx)[None, :] < tan_half * np.abs(kz)[:, None])
    return measured[:, None, :].astype(np.float32)


def coloured_noise(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    std: float,
    corner: float,
    slope: float,
    tilt_max_deg: float | None = None,
) -> np.ndarray:
    """Gaussian noise with a smooth (coloured) spectrum, rescaled to exactly ``std``.

    White float32 noise is filtered in Fourier space by :func:`noise_amplitude` and, when
    ``tilt_max_deg`` is given, by the missing wedge (noise of a reconstruction lives only
    where projections were measured). Returns float32 (z, y, x).
    """
    white = rng.standard_normal(shape, dtype=np.float32)
    spec = scipy.fft.rfftn(white, workers=-1)
    del white
    filt = noise_amplitude(np.sqrt(_rfft_k2(shape)), corner, slope)
    if tilt_max_deg is not None:
        filt *= wedge_rfft(shape, tilt_max_deg)
    spec *= filt
    out = scipy.fft.irfftn(spec, s=shape, workers=-1).astype(np.float32, copy=False)
    del spec
    out -= np.float32(out.mean(dtype=np.float64))
    sd = float(out.std(dtype=np.float64))
    if sd > 0:
        out *= np.float32(std / sd)
    return out


def smooth_field(
    rng: np.random.Generator, shape: tuple[int, int, int], step: float
) -> np.ndarray:
    """Smooth random field, standardised (mean 0, std 1), correlation length ~``step`` voxels.

    Gaussian noise on a grid ``step`` voxels coarser, smoothed (sigma 1 coarse voxel),
    upsampled linearly to ``shape``. Cheap (no full-size FFT). float32 (z, y, x).
    """
    cs = tuple(int(math.ceil(s / step)) + 2 for s in shape)
    coarse = ndimage.gaussian_filter(rng.standard_normal(cs), 1.0, mode="wrap")
    f = [s / c for s, c in zip(shape, cs, strict=True)]
    fine = ndimage.zoom(coarse.astype(np.float32), f, order=1, grid_mode=True, mode="nearest")
    fine = fine[: shape[0], : shape[1], : shape[2]]
    fine -= fine.mean(dtype=np.float64)
    sd = float(fine.std(dtype=np.float64))
    return (fine / max(sd, 1e-12)).astype(np.float32)


def uniform_from_normal(field: np.ndarray) -> np.ndarray:
    """Map a standardised field to ~U(0, 1) through the normal CDF (float32)."""
    return special.ndtr(field).astype(np.float32)


def radial_power(vol: np.ndarray, n_bins: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of a (z, y, x) volume.

    Returns bin centres (cycles/voxel, up to 0.5) and the mean power per bin (float64).
    """
    p = np.abs(scipy.fft.rfftn(np.asarray(vol, np.float32), workers=-1)) ** 2
    k = np.sqrt(_rfft_k2(vol.shape)).ravel()
    edges = np.linspace(0.0, 0.5, n_bins + 1)
    idx = np.clip(np.digitize(k, edges) - 1, 0, n_bins)
    s = np.bincount(idx, weights=p.ravel().astype(np.float64), minlength=n_bins + 1)
    c = np.bincount(idx, minlength=n_bins + 1)
    return 0.5 * (edges[1:] + edges[:-1]), s[:n_bins] / np.maximum(c[:n_bins], 1)
