"""Tests of side assignment and side selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from membrain_dist.errors import InputError
from membrain_dist.normals import vote_normals
from membrain_dist.sampling import sample_membrane
from membrain_dist.sides import SideSpec, assign_sides, enclosed_volume, parse_sides, select_sides


def _run(lab: np.ndarray, **kw):
    sp = sample_membrane(lab.__getitem__, 1, [0, lab.shape[0], 0, lab.shape[1], 0, lab.shape[2]],
                         lab.shape, **kw)
    normal = vote_normals(sp.zyx, sp.raw_normal, sp.weight)
    cavity = enclosed_volume(sp.coarse_mask)
    side = assign_sides(sp.zyx, normal, cavity=cavity, cavity_origin=sp.coarse_origin,
                        cavity_factor=sp.coarse_factor)
    return sp, normal, side, cavity


def _sphere(n=64, radius=20.0, thickness=4.0):
    c = (n - 1) / 2
    g = np.indices((n, n, n), dtype=np.float32) - np.float32(c)
    r = np.sqrt((g * g).sum(0))
    return ((r >= radius - thickness / 2) & (r < radius + thickness / 2)).astype(np.int32), c


@pytest.mark.parametrize("coarse_max", [128, 20])
def test_sphere_inside_outside(coarse_max):
    lab, c = _sphere()
    sp, normal, side, cavity = _run(lab, coarse_max=coarse_max)
    assert cavity is not None
    r = np.linalg.norm(sp.zyx - np.float32(c), axis=1)
    np.testing.assert_array_equal(side, np.where(r < 20, -1, 1).astype(np.int8))
    # normals point to the side they sample: inward for inside points
    radial = np.einsum("ij,ij->i", normal, (sp.zyx - np.float32(c)) / r[:, None])
    assert np.all(np.sign(radial) == side)
    inside = select_sides(SideSpec("inside"), sp.zyx, normal, side, closed=True)
    assert np.array_equal(inside, r < 20)
    outside = select_sides(SideSpec("outside"), sp.zyx, normal, side, closed=True)
    assert np.array_equal(outside, r > 20)


def test_plane_two_faces_and_point_selection():
    rng = np.random.default_rng(4)
    nrm = rng.normal(size=3).astype(np.float32)
    nrm /= np.linalg.norm(nrm)
    n = 48
    g = np.indices((n, n, n), dtype=np.float32) - np.float32((n - 1) / 2)
    h = np.einsum("a,azyx->zyx", nrm, g)
    lab = (np.abs(h) < 2).astype(np.int32)
    sp, normal, side, cavity = _run(lab)
    assert cavity is None
    above = (sp.zyx - np.float32((n - 1) / 2)) @ nrm > 0
    # the two faces get opposite sides, each face one side
    assert len(np.unique(side[above])) == 1 and len(np.unique(side[~above])) == 1
    assert side[above][0] == -side[~above][0]
    q = tuple(float(v) for v in np.float32((n - 1) / 2) + 8 * nrm)  # a point above the plane
    keep = select_sides(SideSpec("point", q), sp.zyx, normal, side, closed=False)
    np.testing.assert_array_equal(keep, above)
    q2 = tuple(float(v) for v in np.float32((n - 1) / 2) - 8 * nrm)
    keep2 = select_sides(SideSpec("point", q2), sp.zyx, normal, side, closed=False)
    np.testing.assert_array_equal(keep2, ~above)
    # inside/outside on an open membrane: both kept (logged)
    assert select_sides(SideSpec("inside"), sp.zyx, normal, side, closed=False).all()


def test_parse_sides(tmp_path: Path):
    assert parse_sides("", tmp_path)(3) == SideSpec("both")
    assert parse_sides("Inside", tmp_path)(1) == SideSpec("inside")
    (tmp_path / "s.csv").write_text("membrane,side\n1,inside\n2,outside\n")
    f = parse_sides("s.csv", tmp_path)
    assert f(1).kind == "inside" and f(2).kind == "outside" and f(7).kind == "both"
    (tmp_path / "p.csv").write_text("membrane,x,y,z\n4,10,20,30\n")
    assert parse_sides(str(tmp_path / "p.csv"), Path("/nonexistent"))(4) == SideSpec(
        "point", (30.0, 20.0, 10.0))
    (tmp_path / "bad.csv").write_text("membrane,side\n1,upwards\n")
    with pytest.raises(InputError, match="bad.csv.*line 2"):
        parse_sides("bad.csv", tmp_path)
    (tmp_path / "cols.csv").write_text("id,side\n1,inside\n")
    with pytest.raises(InputError, match="cols.csv"):
        parse_sides("cols.csv", tmp_path)
    with pytest.raises(InputError, match="missing.csv"):
        parse_sides("missing.csv", tmp_path)
    (tmp_path / "dup.csv").write_text("membrane,side\n1,inside\n1,outside\n")
    with pytest.raises(InputError, match="twice"):
        parse_sides("dup.csv", tmp_path)


def test_small_bubble_is_not_closed():
    m = np.zeros((20, 20, 20), bool)
    m[5:15] = True
    m[9, 9, 9] = False  # one-voxel hole inside a thick sheet
    assert enclosed_volume(m) is None
    m2 = np.ones((9, 9, 9), bool)
    m2[2:7, 2:7, 2:7] = False
    assert enclosed_volume(m2).sum() == 125
