"""QC figure: a PNG of the expected pixel size, written atomically."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from membrain_dist.qc import qc_figure


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])  # width, height


def _inputs(rng):
    yy, xx = np.mgrid[0:64:1.5, 0:64:1.5]
    pts = np.stack([np.full(yy.size, 20.0), yy.ravel(), xx.ravel()], axis=1).astype(np.float32)
    picks = np.array([[20.0, 20.0, 20.0], [20.0, 40.0, 45.0]], np.float32)
    scores = np.min(np.linalg.norm(pts[:, None] - picks[None], axis=2), axis=1)
    return pts, np.minimum(scores, 7.0), picks


def test_png_written_with_expected_size(tmp_path):
    rng = np.random.default_rng(0)
    pts, scores, picks = _inputs(rng)
    image = rng.normal(size=(64, 64)).astype(np.float32)
    out = qc_figure(
        tmp_path / "tomo.png",
        pts,
        scores,
        picks,
        gt_zyx=picks + 1.0,
        image=image,
        image_z=20.0,
        score_threshold=3.0,
        title="tomo",
        figsize=(12.0, 4.0),
        dpi=50,
    )
    assert out == tmp_path / "tomo.png" and out.is_file()
    assert _png_size(out) == (600, 200)
    assert [p.name for p in tmp_path.iterdir()] == ["tomo.png"]  # no temporary left


def test_png_without_optional_inputs(tmp_path):
    out = qc_figure(tmp_path / "empty.png", np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)))
    assert _png_size(out) == (1500, 500)
    with pytest.raises(ValueError):
        qc_figure(
            tmp_path / "bad.png",
            np.zeros((2, 3)),
            np.zeros(2),
            np.zeros((0, 3)),
            image=np.zeros((4, 4, 4)),
        )
    assert not (tmp_path / "bad.png").exists()
