from pathlib import Path

import pytest

from membrain_dist.errors import InputError
from membrain_dist.manifest import TomogramEntry, read_manifest, write_manifest

HEADER = "name,tomogram,segmentation,particles,voxel_size_A,split\n"


@pytest.fixture
def files(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for n in ("t1.mrc", "s1.mrc", "p1.star", "t2.mrc", "s2.mrc", "sides.csv"):
        (d / n).write_bytes(b"x")
    return d


def test_read_resolves_relative_paths_and_defaults(files):
    m = files / "m.csv"
    m.write_text(HEADER + "a,t1.mrc,s1.mrc,p1.star,14.08,train\n"
                 f"b,{files / 't2.mrc'},s2.mrc,,,\n")
    e = read_manifest(m)
    assert [x.name for x in e] == ["a", "b"]
    assert e[0].tomogram == files.resolve() / "t1.mrc"
    assert e[0].particles == files.resolve() / "p1.star"
    assert e[0].voxel_size_A == pytest.approx(14.08) and e[0].split == "train"
    assert e[1].particles is None and e[1].voxel_size_A is None
    assert e[1].split == "test" and e[1].sides == "both"


def test_round_trip_writes_relative_inside_folder(files, tmp_path):
    outside = tmp_path / "elsewhere.mrc"
    outside.write_bytes(b"x")
    entries = [
        TomogramEntry("a", files / "t1.mrc", files / "s1.mrc", files / "p1.star", 10.0, "train",
                      sides="inside"),
        TomogramEntry("b", outside, files / "s2.mrc", None, None, "val",
                      sides=str(files / "sides.csv")),
    ]
    m = files / "out.csv"
    write_manifest(entries, m)
    text = m.read_text().splitlines()
    assert text[0] == "name,tomogram,segmentation,particles,voxel_size_A,split,sides"
    assert text[1] == "a,t1.mrc,s1.mrc,p1.star,10.0,train,inside"
    assert str(outside.resolve()) in text[2] and text[2].endswith(",,val,sides.csv")
    back = read_manifest(m)
    assert [b.tomogram for b in back] == [p.tomogram.resolve() for p in entries]
    assert back[1].sides == str(files.resolve() / "sides.csv")
    assert back[0].voxel_size_A == 10.0 and back[1].voxel_size_A is None
    assert [p.name for p in files.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.parametrize("body,match", [
    ("name,tomogram,segmentation,voxel_size_A,split\na,t1.mrc,s1.mrc,1,train\n",
     "missing column.*particles"),
    (HEADER + "a,t1.mrc,missing.mrc,,1,train\n", r"line 2 \(a\): segmentation file not found"),
    (HEADER + "a,t1.mrc,s1.mrc,nope.star,1,train\n", "particles file not found"),
    (HEADER + "a,t1.mrc,s1.mrc,,1,train\na,t2.mrc,s2.mrc,,1,test\n", "duplicate name 'a'"),
    (HEADER + "a,t1.mrc,s1.mrc,,1,training\n", "split 'training'"),
    (HEADER + "a,t1.mrc,s1.mrc,,0,train\n", "voxel_size_A must be > 0"),
    (HEADER + "a,t1.mrc,s1.mrc,,abc,train\n", "not a number"),
    (HEADER, "no rows"),
    (HEADER + "a/b,t1.mrc,s1.mrc,,1,train\n", "may not contain"),
])
def test_bad_manifests(files, body, match):
    m = files / "bad.csv"
    m.write_text(body)
    with pytest.raises(InputError, match=match) as ei:
        read_manifest(m)
    assert Path(ei.value.path) == m
    assert str(m) in str(ei.value)


def test_bad_sides_value(files):
    m = files / "m.csv"
    m.write_text(HEADER.strip() + ",sides\na,t1.mrc,s1.mrc,,1,train,upside\n")
    with pytest.raises(InputError, match="sides"):
        read_manifest(m)


def test_missing_manifest(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_manifest(tmp_path / "none.csv")
