"""The command-line contract of CONVENTIONS.md, driven as a user (or the outside benchmark)
drives it: subprocesses, real files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from membrain_dist.manifest import read_manifest, write_manifest

CLI = [sys.executable, "-m", "membrain_dist.cli"]


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", ["train", "predict", "evaluate", "convert", "demo", "synth"])
def test_help(command: str) -> None:
    res = run(command, "--help", timeout=60)
    assert res.returncode == 0, res.stderr
    assert "--manifest" in res.stdout or "--out" in res.stdout or "--pred" in res.stdout


def test_demo_refuses_a_campaign_without_test_tomograms(tmp_path: Path) -> None:
    """One training and one validation tomogram leave nothing to pick: a usage error naming
    the folder, before any tomogram is written."""
    out = tmp_path / "demo"
    res = run("demo", "--out", str(out), "--n-tomos", "2", "--n-val", "1", timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert str(out) in res.stderr and "--n-val 1" in res.stderr
    assert not (out / "data").exists()


def test_predict_refuses_missing_tomogram_before_any_work(campaign: Path, trained_model: Path,
                                                          tmp_path: Path) -> None:
    entries = read_manifest(campaign)
    broken = tmp_path / "broken.csv"
    shutil.copy(entries[0].segmentation, tmp_path / "seg.mrc")
    write_manifest(entries[:1], broken)
    text = broken.read_text().replace(str(entries[0].tomogram), str(tmp_path / "missing.mrc"))
    broken.write_text(text)
    res = run("predict", "--manifest", str(broken), "--model", str(trained_model),
              "--out", str(tmp_path / "pred"), timeout=120)
    assert res.returncode == 2, res.stderr
    assert "missing.mrc" in res.stderr or "broken.csv" in res.stderr
    assert not (tmp_path / "pred" / "campaign.zarr").exists()


def test_predict_refuses_a_tampered_model(test_manifest: Path, trained_model: Path,
                                          tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    meta = json.loads((model / "model.json").read_text())
    meta["weights_sha256"] = "0" * 64
    (model / "model.json").write_text(json.dumps(meta))
    res = run("predict", "--manifest", str(test_manifest), "--model", str(model),
              "--out", str(tmp_path / "pred"), "--sequential", timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "weights.safetensors" in res.stderr or "model.json" in res.stderr


def test_train_through_the_flows_writes_a_loadable_model(campaign: Path, tmp_path: Path) -> None:
    """`train --manifest --out` on the default local dask cluster + temporary Prefect API:
    one progress line per epoch, and no dask worker left running while the CPU trains."""
    import psutil

    from membrain_dist.model import load_model

    out = tmp_path / "model"
    # the template relative to the working directory, as a user types it
    proc = subprocess.Popen(
        [*CLI, "train", "--manifest", str(campaign), "--out", str(out), "--epochs", "2",
         "--template", "template.mrc", "--workers", "2"], cwd=campaign.parent,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, during_training = [], None
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if during_training is None and "epoch 1/2" in line:
            during_training = _child_commands(proc.pid, psutil)
    assert proc.wait(timeout=600) == 0, "".join(lines)[-3000:]
    # the run's log records reached the temporary API before it stopped (none retried
    # against a stopped server at exit)
    assert "Error logging to API" not in "".join(lines), "".join(lines)[-3000:]
    epoch_lines = [ln for ln in lines if "membrain_dist.training: epoch" in ln]
    assert [ln.split("epoch ")[1].split()[0] for ln in epoch_lines] == ["0/2", "1/2", "2/2"]
    assert "s left" in epoch_lines[1] and "cubes in" in epoch_lines[1]
    assert during_training is not None
    workers = [c for c in during_training if "spawn_main" in c or "dask" in c]
    assert not workers, workers  # the LocalCluster of convert + geometry is closed by then
    model, meta = load_model(out)
    assert meta.voxel_size_A == pytest.approx(14.08)
    assert meta.metrics["epochs_run"] >= 1
    assert (out / "pipeline.json").is_file()
    _assert_self_contained(out, campaign.parent / "template.mrc")
    assert (tmp_path / "model.train.zarr" / "zarr.json").is_file()  # beside, not inside


def test_train_an_ensemble(campaign: Path, trained_model: Path, tmp_path: Path) -> None:
    """`train --members 2`: one model directory with both networks, prediction at half the
    quarter turns per network (each member scores its own turn), one progress line per
    member's epoch. (The training store of ``trained_model`` is reused: geometry done.)"""
    from membrain_dist.model import MemBrainEnsemble, load_model

    store = tmp_path / "train.zarr"
    shutil.copytree(trained_model.parent / "train.zarr", store)
    out = tmp_path / "model"
    res = run("train", "--manifest", str(campaign), "--out", str(out), "--epochs", "1",
              "--template", str(campaign.parent / "template.mrc"), "--members", "2",
              "--store", str(store), "--sequential", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    epochs = [ln.split("training: ")[1].split("  ")[0].split(" (")[0]
              for ln in res.stderr.splitlines() if "training: member" in ln]
    assert epochs == ["member 1/2 epoch 0/1", "member 1/2 epoch 1/1", "member 2/2 epoch 0/1",
                      "member 2/2 epoch 1/1"], epochs
    model, meta = load_model(out)
    assert isinstance(model, MemBrainEnsemble) and meta.members == 2
    assert len(meta.metrics["members"]) == 2 and meta.train_config["members"] == 2
    assert json.loads((out / "pipeline.json").read_text())["inference"]["rotations"] == 2


def _assert_self_contained(model_dir: Path, template: Path) -> None:
    """Finding 8 of issue 14: the model directory holds its own template copy (named relative
    to itself), no store, and files a group can read (0o666 less the umask, not 0o600)."""
    import os

    from membrain_dist.pipeline import model_pipeline_config

    cfg = json.loads((model_dir / "pipeline.json").read_text())
    assert cfg["labels"]["template"] == "template.mrc"
    assert (model_dir / "template.mrc").read_bytes() == template.read_bytes()
    assert not [p for p in model_dir.rglob("*") if p.suffix == ".zarr"]
    mask = os.umask(0o022)
    os.umask(mask)
    for p in model_dir.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, (p, oct(p.stat().st_mode))
    moved = model_dir.parent / "moved" / "model"
    shutil.copytree(model_dir, moved)
    assert model_pipeline_config(moved).labels.template == str(moved / "template.mrc")


def _child_commands(pid: int, psutil) -> list[str]:
    """Command lines of the live descendants of ``pid``."""
    commands = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            commands.append(" ".join(child.cmdline()))
        except psutil.Error:  # exited meanwhile
            pass
    return commands


def test_evaluate_reports_figures_as_json(sequential_prediction: Path, test_manifest: Path,
                                          tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    res = run("evaluate", "--pred", str(sequential_prediction), "--gt", str(test_manifest),
              "--symmetry", "2", "--json", str(out), timeout=120)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    names = {e.name for e in read_manifest(test_manifest)}
    assert {r["tomogram"] for r in data["per_tomogram"]} == names
    o = data["overall"]
    assert 0.0 <= o["precision"] <= 1.0 and 0.0 <= o["recall"] <= 1.0


def test_calibrate_writes_the_threshold_that_maximises_f1_on_the_rows(
        test_manifest: Path, trained_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    res = run("calibrate", "--manifest", str(test_manifest), "--model", str(model),
              "--rows", "test", "--store", str(tmp_path / "cal.zarr"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "score threshold" in res.stdout and "validation F1" in res.stdout
    cal = json.loads((model / "calibration.json").read_text())["calibration"]
    # the best F1 averaged over +-2 threshold steps (calibration.SMOOTH_STEPS)
    best = max(r["f1_smoothed"] for r in cal["table"])
    chosen = [r for r in cal["table"] if r["score_threshold"] == cal["score_threshold"]
              and r["bandwidth_scale"] == cal["bandwidth_scale"]]
    assert chosen and chosen[0]["f1_smoothed"] == best and cal["f1"] == chosen[0]["f1"]
    pipe = json.loads((model / "pipeline.json").read_text())
    assert pipe["cluster"]["score_threshold"] == cal["score_threshold"]
    # the weights are untouched: the model still loads with its recorded fingerprint
    assert json.loads((model / "model.json").read_text())["weights_sha256"] == json.loads(
        (trained_model / "model.json").read_text())["weights_sha256"]


def _calibrated_copy(trained_model: Path, tmp_path: Path) -> Path:
    """A copy of the trained model whose ``pipeline.json`` carries a calibrated threshold
    (2.75) and a learnt pick height (1.5), neither of them the default."""
    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    pipe = json.loads((model / "pipeline.json").read_text())
    pipe["cluster"]["score_threshold"] = 2.75
    pipe["picks"]["height"] = 1.5
    (model / "pipeline.json").write_text(json.dumps(pipe))
    return model


def test_predict_config_file_overrides_only_what_it_sets(trained_model: Path,
                                                         tmp_path: Path) -> None:
    """``--config`` on predict: its keys on top of the model's settings, not the defaults."""
    import argparse

    from membrain_dist.cli import _predict_config

    model = _calibrated_copy(trained_model, tmp_path)
    toml = tmp_path / "params.toml"
    toml.write_text("[cluster]\nmin_points = 6\n")
    ns = argparse.Namespace(model=str(model), config=str(toml), threshold=None, device=None,
                            batch_size=None, rotations=None, precision=None)
    cfg = _predict_config(ns)
    assert cfg.cluster.min_points == 6
    assert cfg.cluster.score_threshold == 2.75 and cfg.picks.height == 1.5
    ns.threshold = 3.5
    assert _predict_config(ns).cluster.score_threshold == 3.5


def test_predict_refine_margin_and_screen_options(trained_model: Path) -> None:
    """``--refine-margin`` and ``--screen``: voxels or ``off``; anything else is a usage error."""
    from membrain_dist.cli import _predict_config, build_parser

    parser = build_parser()
    base = ["predict", "--manifest", "m.csv", "--model", str(trained_model), "--out", "o"]
    assert _predict_config(parser.parse_args(base)).inference.refine_margin == 1.0
    args = parser.parse_args([*base, "--refine-margin", "0.5"])
    assert _predict_config(args).inference.refine_margin == 0.5
    args = parser.parse_args([*base, "--refine-margin", "off"])
    assert _predict_config(args).inference.refine_margin is None
    for bad in ("-1", "many"):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, "--refine-margin", bad])
    # --screen: a cell in voxels (> 0) or off; not given: the configuration's (3)
    assert _predict_config(parser.parse_args(base)).inference.screen == 3.0
    args = parser.parse_args([*base, "--screen", "2.5"])
    assert _predict_config(args).inference.screen == 2.5
    assert _predict_config(parser.parse_args([*base, "--screen", "off"])).inference.screen is None
    for bad in ("0", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, "--screen", bad])


def test_campaign_settings_go_on_top_of_the_model_ones(trained_model: Path,
                                                       tmp_path: Path) -> None:
    """``campaign --model M --config c.toml`` (issue 14, left open there): the model's own
    settings (calibrated threshold, height, geometry, scoring passes) with what the file sets
    on top -- before, the model's cluster/picks sections replaced the file's and the rest came
    from the defaults."""
    from membrain_dist.config import PipelineConfig
    from membrain_dist.pipeline import over_model

    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    pipe = json.loads((model / "pipeline.json").read_text())
    pipe["cluster"]["score_threshold"] = 2.75  # as calibrated
    pipe["picks"]["height"] = 1.5
    pipe["geometry"]["band_width"] = 11.0  # as trained
    (model / "pipeline.json").write_text(json.dumps(pipe))
    toml = tmp_path / "params.toml"
    toml.write_text("[cluster]\nmin_points = 6\n[picks]\nnms_distance = 6.0\n"
                    "[train]\nmax_epochs = 3\n")
    cfg = over_model(PipelineConfig.from_toml(toml), model)
    assert cfg.cluster.min_points == 6 and cfg.picks.nms_distance == 6.0  # the file's
    assert cfg.cluster.score_threshold == 2.75 and cfg.picks.height == 1.5  # the model's
    assert cfg.geometry.band_width == 11.0
    assert cfg.inference.rotations == pipe["inference"]["rotations"]
    assert cfg.train.max_epochs == 3
    toml.write_text("[cluster]\nscore_threshold = 3.5\n")
    assert over_model(PipelineConfig.from_toml(toml), model).cluster.score_threshold == 3.5


def test_predict_settings_go_on_top_of_the_model_ones(trained_model: Path, tmp_path: Path) -> None:
    """A deployment's ``settings`` change exactly the fields given: the model's calibrated
    threshold and height stay, and an unknown field is refused naming it."""
    from membrain_dist import pipeline
    from membrain_dist.errors import InputError

    model = _calibrated_copy(trained_model, tmp_path)
    cfg = pipeline.predict_config(model, settings={"cluster": {"min_points": 6}})
    assert cfg.cluster.min_points == 6
    assert cfg.cluster.score_threshold == 2.75 and cfg.picks.height == 1.5
    assert pipeline.predict_config(model) == pipeline.model_pipeline_config(model)
    with pytest.raises(InputError, match="min_pointz"):
        pipeline.predict_config(model, settings={"cluster": {"min_pointz": 6}})


def test_scheduling_processes_do_not_import_torch():
    """The predict driver and the CLI read configurations and schedule work; torch (~3 s to
    import) is for the workers that train and score."""
    code = ("import sys, flows.predict, flows.stream, membrain_dist.cli, membrain_dist.config; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1])
    assert done.returncode == 0, "importing the driver's modules imported torch"


def test_precision_option(trained_model: Path) -> None:
    """``--precision``: one of the configuration's values, onto the inference section; not
    given, the model's (saved by train: the default, auto)."""
    from membrain_dist.cli import _predict_config, build_parser
    from membrain_dist.config import PRECISIONS

    parser = build_parser()
    base = ["predict", "--manifest", "m.csv", "--model", str(trained_model), "--out", "o"]
    saved = json.loads((trained_model / "pipeline.json").read_text())["inference"]["precision"]
    assert saved == "auto"
    assert _predict_config(parser.parse_args(base)).inference.precision == saved
    for value in PRECISIONS:
        args = parser.parse_args([*base, "--precision", value])
        assert _predict_config(args).inference.precision == value
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--precision", "float16"])
