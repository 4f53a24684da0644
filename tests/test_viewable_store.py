"""The store as viewers see it: a pyramid per tomogram (mean-binned 2x on z, y, x; labels
strided), an omero contrast window, a root that lists every tomogram (NGFF 0.5
bioformats2raw.layout + OME/series), each opened by ome-zarr-py's reader (napari-ome-zarr's)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from dataclasses import replace

import numpy as np
import pytest
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Reader

from membrain_dist import pipeline, store
from membrain_dist.config import PipelineConfig
from membrain_dist.manifest import read_manifest
from membrain_dist.mrc import write_volume

SHAPE = (20, 44, 36)  # level 1: (10, 22, 18), level 2: (5, 11, 9)
VS = 8.0


@pytest.fixture(scope="module")
def campaign_store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("viewable")
    rng = np.random.default_rng(2)
    rows = []
    for name in ("a", "b"):
        tomo = rng.normal(5, 2, SHAPE).astype(np.float32)
        seg = np.zeros(SHAPE, np.int8)
        seg[8:11] = 1
        tomo[8:11] -= 3
        write_volume(d / f"{name}.mrc", tomo, VS)
        write_volume(d / f"{name}_seg.mrc", seg, VS)
        rows.append(f"{name},{name}.mrc,{name}_seg.mrc,,,test")
    m = d / "m.csv"
    m.write_text("name,tomogram,segmentation,particles,voxel_size_A,split\n" + "\n".join(rows))
    cfg = PipelineConfig()
    cfg = replace(cfg, convert=replace(cfg.convert, chunk=16, pyramid_min=12))
    root = d / "c.zarr"
    pipeline.prepare_sequential(read_manifest(m), root, cfg)
    return {"root": root, "dir": d}


def test_pyramid_levels_bin_z_y_and_x(campaign_store):
    root = campaign_store["root"]
    import zarr

    g = zarr.open_group(str(root / "a"), mode="r")
    t0 = np.asarray(g["0"][...])
    t1, t2 = np.asarray(g["1"][...]), np.asarray(g["2"][...])
    assert (t1.shape, t2.shape) == ((10, 22, 18), (5, 11, 9)) and "3" not in g
    np.testing.assert_allclose(t1, t0.reshape(10, 2, 22, 2, 18, 2).mean(axis=(1, 3, 5)),
                               rtol=1e-6)
    np.testing.assert_allclose(t2[1, 2, 3], t0[4:8, 8:12, 12:16].mean(), rtol=1e-5)
    lab = g["labels/membranes"]
    np.testing.assert_array_equal(lab["1"][...], lab["0"][...][::2, ::2, ::2])
    ms = g.attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in ms] == ["0", "1", "2"]
    assert ms[2]["coordinateTransformations"] == [
        {"type": "scale", "scale": [32.0] * 3}, {"type": "translation", "translation": [12.0] * 3}]


def test_omero_window_from_the_intensity_statistics(campaign_store):
    meta = store.read_meta(campaign_store["root"], "a")
    import zarr

    om = zarr.open_group(str(campaign_store["root"] / "a"), mode="r").attrs["ome"]["omero"]
    w = om["channels"][0]["window"]
    c, s = meta.intensity["center"], meta.intensity["scale"]
    t0 = store.tomogram_array(campaign_store["root"], "a")[...]
    assert (w["min"], w["max"]) == pytest.approx((float(t0.min()), float(t0.max())))
    assert (w["start"], w["end"]) == pytest.approx((max(w["min"], c - 3 * s), min(w["max"], c + 3 * s)))
    assert w["min"] < w["start"] < c < w["end"] <= w["max"]


def test_root_lists_every_tomogram_and_ome_zarr_opens_each(campaign_store):
    root = campaign_store["root"]
    attrs = json.loads((root / "zarr.json").read_text())["attributes"]
    assert attrs["ome"] == {"version": "0.5", "bioformats2raw.layout": 3}
    series = json.loads((root / "OME" / "zarr.json").read_text())["attributes"]["ome"]["series"]
    assert series == ["a", "b"] == store.list_tomograms(root)
    # napari-ome-zarr's bioformats2raw reader: the OME-XML's Image IDs "Image:<path>" name the
    # image groups it opens from the root
    import xml.etree.ElementTree as ET

    xml = ET.parse(root / "OME" / "METADATA.ome.xml").getroot()
    ids = [c.attrib["ID"] for c in xml if c.tag.endswith("Image")]
    assert [i.replace("Image:", "") for i in ids] == series
    sizes = [c.find("{*}Pixels").attrib for c in xml if c.tag.endswith("Image")]
    assert [(int(p["SizeZ"]), int(p["SizeY"]), int(p["SizeX"])) for p in sizes] == [SHAPE] * 2
    for name in series:
        nodes = list(Reader(parse_url(str(root / name)))())
        image = [n for n in nodes if n.load(Multiscales) and not n.load(Label)]
        labels = [n for n in nodes if n.load(Label)]
        assert len(image) == 1 and len(labels) == 1
        assert [a.shape for a in image[0].data] == [SHAPE, (10, 22, 18), (5, 11, 9)]
        w = store.read_meta(root, name)
        assert image[0].metadata["contrast_limits"][0][0] < w.intensity["center"]
        assert labels[0].metadata["name"] == "membranes"
        assert [a.shape for a in labels[0].data] == [SHAPE, (10, 22, 18), (5, 11, 9)]


@pytest.mark.skipif(not os.environ.get("MEMBRAIN_NAPARI_PYTHON"),
                    reason="MEMBRAIN_NAPARI_PYTHON (a Python with napari + napari-ome-zarr) not set")
def test_napari_ome_zarr_opens_the_store_root(campaign_store):
    """napari's own OME-Zarr reader (napari-ome-zarr, which needs napari: not a dependency)
    opens the store root and gives every tomogram's pyramid and its membrane labels."""
    script = textwrap.dedent(f"""
        import json
        from napari_ome_zarr._reader import napari_get_reader
        path = {str(campaign_store["root"])!r}
        layers = napari_get_reader(path)(path)
        print(json.dumps([[kind, meta.get("name"), [list(d.shape) for d in data]]
                          for data, meta, kind in layers]))
        """)
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    res = subprocess.run([os.environ["MEMBRAIN_NAPARI_PYTHON"], "-c", script], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    layers = json.loads(res.stdout.strip().splitlines()[-1])
    images = {name.split(":")[0]: shapes for kind, name, shapes in layers if kind == "image"}
    assert set(images) == {"a", "b"}, layers
    assert all(shapes == [[20, 44, 36], [10, 22, 18], [5, 11, 9]] for shapes in images.values())
    assert sum(kind == "labels" for kind, _, _ in layers) == 2
