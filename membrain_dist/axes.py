"""Axis-order, Euler-angle and RELION 5 centred-Å conversions (the only place for them).

Inside the code points are ``(z, y, x)`` voxel coordinates and orientations are
``(3, 3)`` matrices whose columns (u, v, n) are given in zyx order. Files use XYZ
(``rlnCoordinateX`` = MRC column index) and RELION ZYZ Euler angles in degrees; see
``/work/shared/design/CONVENTIONS.md``.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.spatial.transform import Rotation

__all__ = [
    "zyx_to_xyz",
    "xyz_to_zyx",
    "matrix_zyx_to_xyz",
    "matrix_xyz_to_zyx",
    "euler_to_matrix",
    "matrix_to_euler",
    "centered_angstrom",
    "from_centered_angstrom",
]


def zyx_to_xyz(a: np.ndarray) -> np.ndarray:
    """Reverse the last axis: ``(..., 3)`` (z, y, x) -> (x, y, z). Units unchanged."""
    return np.asarray(a)[..., ::-1].copy()


def xyz_to_zyx(a: np.ndarray) -> np.ndarray:
    """Reverse the last axis: ``(..., 3)`` (x, y, z) -> (z, y, x). Units unchanged."""
    return np.asarray(a)[..., ::-1].copy()


def matrix_zyx_to_xyz(m: np.ndarray) -> np.ndarray:
    """In-code orientation ``(..., 3, 3)`` (columns u, v, n in zyx) -> CONVENTIONS' ``M``.

    Each column vector is re-expressed in XYZ order, i.e. the rows are reversed; the
    column order (u, v, n) is kept.
    """
    return np.asarray(m)[..., ::-1, :].copy()


def matrix_xyz_to_zyx(m: np.ndarray) -> np.ndarray:
    """CONVENTIONS' ``M`` ``(..., 3, 3)`` (columns in XYZ) -> in-code matrix (columns in zyx)."""
    return np.asarray(m)[..., ::-1, :].copy()


def euler_to_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """RELION Euler angles -> particle-to-tomogram rotation matrices in XYZ.

    Parameters
    ----------
    angles_deg
        ``(N, 3)`` (or ``(3,)``) rot, tilt, psi in degrees (ZYZ, RELION).

    Returns
    -------
    np.ndarray
        ``(N, 3, 3)`` (or ``(3, 3)``) float32 ``M`` whose columns are the particle's
        axes in tomogram XYZ; equals RELION's ``Euler_angles2matrix`` =
        ``Rotation.from_euler("ZYZ", a, degrees=True).inv().as_matrix()``.
    """
    a = np.asarray(angles_deg, dtype=np.float64)
    flat = a.reshape(-1, 3)
    m = Rotation.from_euler("ZYZ", flat, degrees=True).inv().as_matrix()
    return m.reshape(a.shape[:-1] + (3, 3)).astype(np.float32)


def matrix_to_euler(m_xyz: np.ndarray) -> np.ndarray:
    """Inverse of :func:`euler_to_matrix`.

    Parameters
    ----------
    m_xyz
        ``(N, 3, 3)`` (or ``(3, 3)``) rotation matrices, columns in tomogram XYZ.

    Returns
    -------
    np.ndarray
        ``(N, 3)`` float32 rot, tilt, psi in degrees, tilt in [0, 180]. At tilt 0 or 180
        (gimbal lock) only rot + psi (or rot - psi) is defined; psi is then set to 0.
    """
    m = np.asarray(m_xyz, dtype=np.float64)
    flat = m.reshape(-1, 3, 3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Gg]imbal.*")
        e = Rotation.from_matrix(flat).inv().as_euler("ZYZ", degrees=True)
    return e.reshape(m.shape[:-2] + (3,)).astype(np.float32)


def _centre_xyz(shape_zyx: tuple[int, int, int]) -> np.ndarray:
    nz, ny, nx = (int(s) for s in shape_zyx)
    return np.array([nx, ny, nz], dtype=np.float64) / 2.0


def centered_angstrom(
    xyz_vox: np.ndarray, shape_zyx: tuple[int, int, int], voxel_size_A: float
) -> np.ndarray:
    """Voxel coordinates -> RELION 5 ``rlnCenteredCoordinate{X,Y,Z}Angst``.

    RELION 5 converts centred Å to its (0-based, un-centred) pixel coordinates as
    ``pixel = centred_A / pixel_size + centre`` with ``centre = (w/2.0, h/2.0, d/2.0)``
    (float division): ``ParticleSet::getParticleCoordDecenteredPixel`` and
    ``setParticleCoordDecenteredPixel`` in ``src/jaz/tomography/particle_set.cpp`` and
    ``out.centre = d3Vector(out.w0/2.0, out.h0/2.0, out.d0/2.0)`` in
    ``TomogramSet::loadTomogram`` (``src/jaz/tomography/tomogram_set.cpp``), 3dem/relion
    5.0. So ``centred_A = (x - N/2) * voxel_size_A`` per axis; for N = 64 the voxel with
    index 32 has centred coordinate 0.

    Parameters
    ----------
    xyz_vox
        ``(N, 3)`` x, y, z in voxels (x = MRC column index).
    shape_zyx
        Tomogram shape (z, y, x) in voxels.
    voxel_size_A
        Voxel size in Å.

    Returns
    -------
    np.ndarray
        ``(N, 3)`` float64 centred X, Y, Z in Å.
    """
    xyz = np.asarray(xyz_vox, dtype=np.float64)
    return (xyz - _centre_xyz(shape_zyx)) * float(voxel_size_A)


def from_centered_angstrom(
    xyz_A: np.ndarray, shape_zyx: tuple[int, int, int], voxel_size_A: float
) -> np.ndarray:
    """Inverse of :func:`centered_angstrom`: centred Å ``(N, 3)`` -> x, y, z voxels (float64)."""
    xyz = np.asarray(xyz_A, dtype=np.float64)
    return xyz / float(voxel_size_A) + _centre_xyz(shape_zyx)
