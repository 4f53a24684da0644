"""Tests of the real-membrane phantom (MemBrain v1's annotated thylakoid membrane T1S1M1)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from membrain_dist.synth import hard_config
from membrain_dist.synth_maps import MEMBRAIN_V1_DATA
from membrain_dist.synth_real import (
    REAL_NAME,
    membrane_density,
    protein_frames,
    read_annotations,
    read_mask,
)

pytestmark = pytest.mark.skipif(
    not (MEMBRAIN_V1_DATA / f"{REAL_NAME}_positions.xml").is_file(),
    reason="MemBrain v1 data (shared/data/membrain-v1) not available",
)


def test_annotations_sit_on_the_real_mask():
    """The data README: 48 PSII, 32 b6f, 25 unknown; each point ~2 voxels above the mask's
    mid-plane on the protein's side; long axes in the membrane plane."""
    mask = read_mask()
    assert mask.shape == (80, 466, 431) and set(np.unique(mask)) == {0, 1}
    ann = read_annotations()
    assert {k: len(v.centres) for k, v in ann.items()} == {"psii": 48, "b6f": 32, "unknown": 25}
    psii = ann["psii"]
    assert (psii.centres > 0).all() and (psii.centres < np.array(mask.shape) - 1).all()
    frames, origins = protein_frames(mask, psii)
    depth = np.linalg.norm(psii.centres - origins, axis=1)
    assert 1.5 < np.median(depth) < 2.5, np.median(depth)
    inside = mask[tuple(np.rint(origins).astype(int).T)]
    assert inside.mean() > 0.9  # origins on the mid-plane, inside the mask
    # the normal points away from the membrane: no mask 4-6 voxels beyond the point
    beyond = psii.centres[:, None, :] + np.array([4.0, 5.0, 6.0])[None, :, None] * \
        frames[:, None, :, 2]
    out = ndimage.map_coordinates(mask.astype(np.float32), beyond.reshape(-1, 3).T, order=0)
    assert out.mean() < 0.1
    # proper frames, u in the membrane plane and close to the annotated axis
    np.testing.assert_allclose(np.einsum("kai,kaj->kij", frames, frames),
                               np.broadcast_to(np.eye(3), frames.shape), atol=1e-9)
    cos = np.abs(np.einsum("ki,ki->k", frames[:, :, 0], psii.axes))
    assert np.median(cos) > 0.95


def test_membrane_density_has_two_leaflets_at_the_offset():
    """A flat 5-voxel slab mask: the leaflets peak ``leaflet_offset`` from its mid-plane."""
    cfg = hard_config()
    mask = np.zeros((40, 24, 24), np.uint8)
    mask[18:23] = 1  # mid-plane z = 20
    dens = membrane_density(mask, cfg)
    profile = dens[:, 12, 12]
    peaks = np.sort(np.argsort(profile)[-2:])
    assert list(peaks) == [20 - round(cfg.leaflet_offset), 20 + round(cfg.leaflet_offset)]
    assert profile[10] < 1e-3 * profile.max() and profile[30] < 1e-3 * profile.max()
    np.testing.assert_allclose(profile[20 - 5:20], profile[20 + 5:20:-1], rtol=1e-5)
    sigma = cfg.leaflet_fwhm / (2 * np.sqrt(2 * np.log(2)))
    want = np.exp(-0.5 * ((np.abs(np.arange(40) - 20) - cfg.leaflet_offset) / sigma) ** 2)
    np.testing.assert_allclose(profile[14:27], want[14:27], atol=1e-6)  # analytic profile
