"""Membrane contrast: measured with a margin, forced by the manifest, one sign per campaign."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from membrain_dist import pipeline, store
from membrain_dist.convert import ConvertConfig, convert_tomogram
from membrain_dist.errors import InputError
from membrain_dist.manifest import TomogramEntry, read_manifest, write_manifest
from membrain_dist.mrc import write_volume

CFG = ConvertConfig(chunk=16, min_membrane_voxels=1)


def _entry(tmp_path, name: str, membrane_offset: float, polarity: int | None = None):
    """A noise volume whose slab z = 10..13 (the membrane) is shifted by ``membrane_offset``
    standard deviations."""
    rng = np.random.default_rng(len(name))
    tomo = rng.normal(size=(24, 24, 24)).astype(np.float32)
    seg = np.zeros(tomo.shape, np.uint8)
    seg[10:14] = 1
    tomo[seg > 0] += membrane_offset
    t, s = tmp_path / f"{name}.mrc", tmp_path / f"{name}_seg.mrc"
    write_volume(t, tomo, 10.0)
    write_volume(s, seg, 10.0)
    return TomogramEntry(name, t, s, None, None, "test", polarity=polarity)


def test_dark_membranes_flip_and_the_margin_is_recorded(tmp_path) -> None:
    meta = convert_tomogram(_entry(tmp_path, "dark", -1.0), tmp_path / "s.zarr", CFG)
    assert meta.intensity["polarity"] == -1
    assert meta.intensity["polarity_margin"] < -0.5
    assert meta.intensity["polarity_from"] == "data"


def test_ambiguous_contrast_warns_and_the_campaign_sign_wins(tmp_path, caplog) -> None:
    root = tmp_path / "s.zarr"
    with caplog.at_level(logging.WARNING, logger="membrain_dist.convert"):
        for name, off in (("a", -1.0), ("b", -0.8), ("faint", 0.04)):
            convert_tomogram(_entry(tmp_path, name, off), root, CFG)
    assert any("ambiguous" in r.message and "faint" in r.message for r in caplog.records)
    assert store.read_meta(root, "faint").intensity["polarity"] == 1  # its own guess
    assert pipeline.harmonise_polarity(root, ["a", "b", "faint"]) == -1
    faint = store.read_meta(root, "faint").intensity
    assert faint["polarity"] == -1 and faint["polarity_from"] == "campaign"
    assert store.read_meta(root, "a").intensity["polarity"] == -1


def test_a_later_tomogram_takes_the_sign_the_first_ones_voted(tmp_path) -> None:
    """Streaming: the first window votes, a tomogram converted later is switched to that sign
    without a vote of its own, even when its own margin is clear (one contrast per campaign)."""
    root = tmp_path / "s.zarr"
    for name, off in (("a", -1.0), ("b", -0.8)):
        convert_tomogram(_entry(tmp_path, name, off), root, CFG)
    sign = pipeline.harmonise_polarity(root, ["a", "b"])
    assert sign == -1
    convert_tomogram(_entry(tmp_path, "late", 1.0), root, CFG)  # bright on its own
    assert store.read_meta(root, "late").intensity["polarity"] == 1
    assert pipeline.harmonise_polarity(root, ["late"], sign=sign) == -1
    late = store.read_meta(root, "late").intensity
    assert late["polarity"] == -1 and late["polarity_from"] == "campaign"


def test_manifest_polarity_is_forced_and_not_overruled(tmp_path) -> None:
    root = tmp_path / "s.zarr"
    convert_tomogram(_entry(tmp_path, "a", -1.0), root, CFG)
    convert_tomogram(_entry(tmp_path, "forced", -1.0, polarity=1), root, CFG)
    assert store.read_meta(root, "forced").intensity["polarity"] == 1
    assert pipeline.harmonise_polarity(root, ["a", "forced"]) == -1
    assert store.read_meta(root, "forced").intensity["polarity"] == 1


def test_manifest_polarity_column_round_trips_and_rejects_nonsense(tmp_path) -> None:
    e = _entry(tmp_path, "a", -1.0)
    rows = [dataclasses.replace(e, polarity=-1), dataclasses.replace(e, name="b", polarity=None)]
    path = tmp_path / "m.csv"
    write_manifest(rows, path)
    assert [r.polarity for r in read_manifest(path)] == [-1, None]
    path.write_text(path.read_text().replace(",dark", ",sideways"))
    with pytest.raises(InputError, match="polarity 'sideways'"):
        read_manifest(path)
