"""Safe under abuse (issue 15): one writer per output, honest failure on blank data, clean
interrupts, nothing exposed, markers outside the name space, exit 2 before any work.

Real processes where the finding is about processes: ``predict`` subprocesses on one folder,
real SIGINT / SIGTERM / SIGKILL to a real CLI in the default mode (dask + temporary Prefect
server), then psutil for what is left and for listening addresses. Bad-input cases call
``cli.main`` in this process (same code path as the console script, without the start-up
cost) and check that nothing was computed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np
import psutil
import pytest

from membrain_dist import cli, pipeline, store
from membrain_dist.errors import InputError
from membrain_dist.manifest import read_manifest, write_manifest

CLI = [sys.executable, "-m", "membrain_dist.cli"]
LOOPBACK = ("127.0.0.1", "::1")


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def one_row(test_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first test row as its own manifest (the cheapest real prediction)."""
    path = tmp_path_factory.mktemp("one") / "one.csv"
    write_manifest(read_manifest(test_manifest)[:1], path)
    return path


class Live:
    """A CLI subprocess in its own session (so a group signal is a terminal's Ctrl-C) whose
    merged output is collected by a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if pattern in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in the output:\n{''.join(self.lines)[-3000:]}")

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def listening(self) -> list[tuple[int, str, int]]:
        out = []
        for p in [psutil.Process(self.proc.pid), *self.descendants()]:
            try:
                out += [(p.pid, c.laddr.ip, c.laddr.port) for c in p.net_connections("inet")
                        if c.status == psutil.CONN_LISTEN]
            except psutil.Error:
                pass
        return out

    def kill_all(self) -> None:
        """Test cleanup: whatever of this run is still alive (nothing, when the code is
        right)."""
        procs = []
        try:
            procs = [psutil.Process(self.proc.pid), *self.descendants()]
        except psutil.Error:
            pass
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass


def _alive(procs: list[psutil.Process]) -> list[str]:
    gone, alive = psutil.wait_procs(procs, timeout=5)
    out = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
        except psutil.Error:
            pass
    return out


def _still_listening(ports: set[int]) -> list:
    return [c for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port in ports]


def _interrupt(live: Live, sig: int, group: bool) -> tuple[int, float, list[str], list]:
    """Send ``sig``; return exit status, seconds to exit, lines printed after it, and the
    processes and listening ports the run had just before."""
    procs = live.descendants()
    for p in procs:
        try:
            p.command = " ".join(p.cmdline())
        except psutil.Error:
            p.command = ""
    ports = {port for _, _, port in live.listening()}
    n = len(live.lines)
    t0 = time.monotonic()
    if group:
        os.killpg(live.proc.pid, sig)
    else:
        os.kill(live.proc.pid, sig)
    try:
        rc = live.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        rc = None
    took = time.monotonic() - t0
    live.reader.join(timeout=10)
    return rc, took, live.lines[n:], [procs, ports]


def _run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse
        rc = int(exc.code or 0)
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------- 1. one writer
def test_1_second_writer_on_one_folder_is_refused(one_row: Path, trained_model: Path,
                                                  tmp_path: Path) -> None:
    test_manifest = one_row
    out = tmp_path / "pred"
    first = subprocess.Popen([*CLI, "predict", "--manifest", str(test_manifest), "--model",
                              str(trained_model), "--out", str(out), "--sequential"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / ".membrain-dist.lock").exists() or (out / "campaign.zarr").exists()):
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.1)
        second = subprocess.run([*CLI, "predict", "--manifest", str(test_manifest), "--model",
                                 str(trained_model), "--out", str(out), "--sequential",
                                 "--threshold", "2.3"], capture_output=True, text=True,
                                timeout=300)
        log1, _ = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, log1[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    assert str(out) in second.stderr and f"PID {first.pid}" in second.stderr, second.stderr
    assert socket.gethostname() in second.stderr
    assert not (out / ".membrain-dist.lock").exists()  # released by the first run
    # particles.star is the first run's per-tomogram STARs, nothing of the second
    from membrain_dist.star import read_particles

    per_tomo = [read_particles(out / f"{e.name}.star") for e in read_manifest(test_manifest)]
    campaign = read_particles(out / pipeline.CAMPAIGN_STAR)
    assert len(campaign) == sum(len(t) for t in per_tomo)
    np.testing.assert_allclose(
        campaign[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy(),
        np.concatenate([t[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy()
                        for t in per_tomo if len(t)]), atol=1e-4)

    # a lock left by a run that is gone (SIGKILL) is taken over; a live holder is not
    from membrain_dist.lock import output_lock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (out / ".membrain-dist.lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": int(dead), "started": time.time() - 60}))
    with output_lock(out):
        assert json.loads((out / ".membrain-dist.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(InputError, match="already being written"):
            with output_lock(out):
                pass
    assert not (out / ".membrain-dist.lock").exists()


# --------------------------------------------------------------------------- 2. blank data
def _blank_copy(entry, folder: Path, corner: float | None):
    """The row with its tomogram replaced by a constant volume (one corner voxel differs
    when ``corner`` is given: near-blank)."""
    from dataclasses import replace

    with mrcfile.open(entry.tomogram, permissive=True) as m:
        shape, vs = m.data.shape, float(m.voxel_size.x)
    data = np.full(shape, 0.5, np.float32)
    if corner is not None:
        data[0, 0, 0] = corner
    path = folder / f"{'near' if corner is not None else 'blank'}.mrc"
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = vs
    return replace(entry, name=path.stem, tomogram=path)


def test_2_blank_tomogram_fails_and_near_blank_gives_no_picks(test_manifest: Path,
                                                               trained_model: Path,
                                                               tmp_path: Path) -> None:
    entry = read_manifest(test_manifest)[0]
    cfg = pipeline.model_pipeline_config(trained_model)
    root, out = tmp_path / "s.zarr", tmp_path / "pred"
    blank = _blank_copy(entry, tmp_path, None)
    with pytest.raises(InputError, match="blank tomogram") as err:
        pipeline.predict_sequential([blank], root, trained_model, out, cfg)
    assert str(blank.tomogram) in str(err.value)
    assert not (out / "blank.star").exists() and store.read_meta(root, "blank") is None

    near = _blank_copy(entry, tmp_path, 1.0)  # converts; every cube the network sees is flat
    [summary] = pipeline.predict_sequential([near], root, trained_model, out, cfg)
    assert summary["points"] > 0 and summary["particles"] == 0
    from membrain_dist.star import read_particles

    assert len(read_particles(out / "near.star")) == 0
    assert (out / "qc" / "near.png").stat().st_size > 0  # histogram of constant scores


# --------------------------------------------------------------------------- 3 + 4. processes
@pytest.fixture(scope="module")
def live_predict(one_row: Path, trained_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """``predict`` in the default mode (local dask cluster + temporary Prefect server), up
    to its LocalCluster."""
    out = tmp_path_factory.mktemp("live") / "pred"
    live = Live("predict", "--manifest", str(one_row), "--model", str(trained_model),
                "--out", str(out), "--workers", "1")
    live.out = out
    try:
        live.dashboard_line = live.wait_for("dask LocalCluster")
        yield live
    finally:
        live.kill_all()


def test_4_every_listener_on_loopback_and_logged_as_bound(live_predict: Live) -> None:
    listening = live_predict.listening()
    assert listening
    assert all(ip in LOOPBACK for _, ip, _ in listening), listening
    m = re.search(r"dashboard http://([\d.]+):(\d+)/status", live_predict.dashboard_line)
    assert m, live_predict.dashboard_line
    assert (m.group(1), int(m.group(2))) in {(ip, port) for _, ip, port in listening}


def test_3_ctrl_c_in_the_default_mode(live_predict: Live) -> None:
    """A terminal's Ctrl-C (SIGINT to the whole process group)."""
    rc, took, after, (procs, ports) = _interrupt(live_predict, signal.SIGINT, group=True)
    assert rc == 130, "".join(after)[-3000:]
    assert took < 15, took
    text = "".join(after)
    assert len(after) <= 3 and "Traceback" not in text, text[-3000:]
    assert "SIGINT received" in text and "kept" in text
    assert any("uvicorn" in p.command for p in procs)  # the server was running
    assert _alive(procs) == []
    assert _still_listening(ports) == []
    assert not (live_predict.out / ".membrain-dist.lock").exists()


def test_3_sigterm_in_the_default_mode(one_row: Path, trained_model: Path,
                                       tmp_path: Path) -> None:
    """SIGTERM to the CLI alone, while Prefect flows run (they replace the SIGTERM handler)."""
    after, procs = _sigterm_while_flows_run(Live(
        "predict", "--manifest", str(one_row), "--model", str(trained_model),
        "--out", str(tmp_path / "pred"), "--workers", "1"))
    assert len(after) <= 3, "".join(after)[-3000:]


def _sigterm_while_flows_run(live: Live) -> tuple[list[str], list]:
    """SIGTERM to the CLI alone once its dask cluster is up: exit 143 within 15 s, one line,
    no child process and no listening port left. Returns the lines after the signal and the
    processes that ran."""
    try:
        live.wait_for("dask LocalCluster")
        rc, took, after, (procs, ports) = _interrupt(live, signal.SIGTERM, group=False)
    finally:
        live.kill_all()
    assert rc == 143, "".join(after)[-3000:]
    assert took < 15, took
    assert "SIGTERM received" in "".join(after), "".join(after)[-3000:]
    assert _alive(procs) == []
    assert _still_listening(ports) == []
    return after, procs


def test_3_sigterm_to_train_stops_its_prefect_server(campaign: Path, tmp_path: Path) -> None:
    """Issue 14, finding 7: SIGTERM to ``train`` (default mode) while its flows run: exit
    143, its temporary Prefect server and dask workers gone, no port left listening."""
    _, procs = _sigterm_while_flows_run(Live(
        "train", "--manifest", str(campaign), "--out", str(tmp_path / "model"), "--epochs", "2",
        "--template", str(campaign.parent / "template.mrc"), "--workers", "1"))
    assert any("uvicorn" in p.command for p in procs)  # its temporary server was running


def test_3_sigkill_leaves_no_prefect_server(one_row: Path, trained_model: Path,
                                            tmp_path: Path) -> None:
    live = Live("predict", "--manifest", str(one_row), "--model", str(trained_model),
                "--out", str(tmp_path / "pred"), "--workers", "1")
    try:
        deadline = time.monotonic() + 180
        server = []
        while not server:
            assert live.proc.poll() is None and time.monotonic() < deadline, "".join(live.lines)
            server = [(pid, port) for pid, _, port in live.listening() if pid != live.proc.pid]
            time.sleep(0.2)
        procs = live.descendants()
        live.proc.kill()
        live.proc.wait(timeout=30)
        left = _alive(procs)
        listening = _still_listening({port for _, port in server})
    finally:
        live.kill_all()
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
    assert left == [], left
    assert listening == []


# --------------------------------------------------------------------------- 5. name space
def test_5_a_name_with_old_marker_keeps_its_group(tmp_path: Path) -> None:
    root = tmp_path / "s.zarr"
    for name in ("t", "t.old-1", "t.old-0123456789abcdef0123456789abcdef"):
        with store.atomic_group(root, name) as g:
            g.attrs.update({"complete": True})
    with store.atomic_group(root, "t") as g:  # replaces t: a trash node on the way
        g.attrs.update({"complete": True})
    leftover = root / f".t.tmp-{'a' * 32}"  # what a writer killed mid-write leaves
    leftover.mkdir()
    names = ["t", "t.old-1", "t.old-0123456789abcdef0123456789abcdef"]
    assert store.sweep_orphans(root, names) == [leftover.name]
    for name in names:
        assert (root / name / "zarr.json").is_file(), name
    assert sorted(p.name for p in root.iterdir()) == sorted([*names, "zarr.json"])


# --------------------------------------------------------------------------- 6. exit 2
def test_6_bad_inputs_exit_2_before_any_work(test_manifest: Path, trained_model: Path,
                                             tmp_path: Path, capsys) -> None:
    base = ["predict", "--manifest", str(test_manifest), "--model", str(trained_model),
            "--sequential"]
    # a manifest row with one extra field
    extra = tmp_path / "extra.csv"
    lines = test_manifest.read_text().splitlines()
    extra.write_text("\n".join([lines[0], lines[1] + ",surplus", *lines[2:]]) + "\n")
    rc, err = _run_main(["predict", "--manifest", str(extra), "--model", str(trained_model),
                         "--out", str(tmp_path / "p0"), "--sequential"], capsys)
    assert rc == 2 and "extra.csv" in err and "line 2" in err and "surplus" in err, err
    # --out and --store under a regular file
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    rc, err = _run_main([*base, "--out", str(plain / "pred")], capsys)
    assert rc == 2 and "plain.txt is a file" in err, err
    rc, err = _run_main([*base, "--out", str(tmp_path / "p1"), "--store",
                         str(plain / "s.zarr")], capsys)
    assert rc == 2 and "plain.txt is a file" in err, err
    # a wrong type in --config, and in the model's pipeline.json; a JSON list
    toml = tmp_path / "c.toml"
    toml.write_text('[cluster]\nscore_threshold = "x"\n')
    rc, err = _run_main([*base, "--out", str(tmp_path / "p2"), "--config", str(toml)], capsys)
    assert rc == 2 and "c.toml" in err and "score_threshold" in err, err
    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    pj = json.loads((model / "pipeline.json").read_text())
    pj["cluster"]["score_threshold"] = "x"
    (model / "pipeline.json").write_text(json.dumps(pj))
    argv = ["predict", "--manifest", str(test_manifest), "--model", str(model), "--sequential"]
    rc, err = _run_main([*argv, "--out", str(tmp_path / "p3")], capsys)
    assert rc == 2 and "pipeline.json" in err and "score_threshold" in err, err
    (model / "pipeline.json").write_text(json.dumps([pj]))
    rc, err = _run_main([*argv, "--out", str(tmp_path / "p4")], capsys)
    assert rc == 2 and "pipeline.json" in err and "JSON object" in err, err
    assert not any((tmp_path / f"p{i}" / "campaign.zarr").exists() for i in range(5))


# --------------------------------------------------------------------------- 7. early checks
def test_7_model_and_star_checked_before_any_work(test_manifest: Path, trained_model: Path,
                                                  tmp_path: Path, capsys) -> None:
    # a broken model in the default mode: exit 2 before Prefect or dask start
    broken = tmp_path / "broken"
    shutil.copytree(trained_model, broken)
    meta = json.loads((broken / "model.json").read_text())
    (broken / "model.json").write_text(json.dumps({**meta, "weights_sha256": "0" * 64}))
    rc, err = _run_main(["predict", "--manifest", str(test_manifest), "--model", str(broken),
                         "--out", str(tmp_path / "p0"), "--workers", "1"], capsys)
    assert rc == 2 and "weights.safetensors" in err and "sha256" in err, err
    assert "FAILED" not in err
    # a model of another voxel size (the manifest says 7.04 Å)
    entries = read_manifest(test_manifest)
    from dataclasses import replace

    other = tmp_path / "other.csv"
    write_manifest([replace(e, voxel_size_A=7.04) for e in entries], other)
    rc, err = _run_main(["predict", "--manifest", str(other), "--model", str(trained_model),
                         "--out", str(tmp_path / "p1"), "--sequential"], capsys)
    assert rc == 2 and "model.json" in err and "7.04 Å/voxel" in err, err
    assert "14.08 Å/voxel" in err and "0799" not in err, err  # float32 headers, 4 digits
    # a ground-truth STAR missing a column
    star = tmp_path / "gt.star"
    text = entries[0].particles.read_text()
    # (neither the voxel nor the RELION 5 centred-Å z column: either set alone would do)
    star.write_text(text.replace("_rlnCoordinateZ", "_rlnSomethingElse")
                    .replace("_rlnCenteredCoordinateZAngst", "_rlnOtherThing"))
    nocol = tmp_path / "nocol.csv"
    write_manifest([replace(entries[0], particles=star)], nocol)
    rc, err = _run_main(["predict", "--manifest", str(nocol), "--model", str(trained_model),
                         "--out", str(tmp_path / "p2"), "--sequential"], capsys)
    assert rc == 2 and "gt.star" in err and "rlnCoordinateZ" in err, err
    assert not any((tmp_path / f"p{i}" / "campaign.zarr").exists() for i in range(3))


# --------------------------------------------------------------------------- 8. smaller
def test_8_manifest_messages_evaluate_warning_campaign_before_prefect(
        test_manifest: Path, sequential_prediction: Path, tmp_path: Path, capsys,
        caplog) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    rc, err = _run_main(["convert", "--manifest", str(empty), "--store",
                         str(tmp_path / "s.zarr"), "--sequential"], capsys)
    assert rc == 2 and "empty (0 bytes)" in err, err
    semi = tmp_path / "semi.csv"
    semi.write_text(test_manifest.read_text().replace(",", ";"))
    rc, err = _run_main(["convert", "--manifest", str(semi), "--store",
                         str(tmp_path / "s.zarr"), "--sequential"], capsys)
    assert rc == 2 and "';'-separated" in err and "read header 'name;tomogram" in err, err
    rc, err = _run_main(["convert", "--manifest", str(tmp_path), "--store",
                         str(tmp_path / "s.zarr"), "--sequential"], capsys)
    assert rc == 2 and "is a folder" in err, err

    # ground truth outside the volume: evaluate says so
    from dataclasses import replace

    entries = read_manifest(test_manifest)
    shifted = tmp_path / "shifted.star"
    from membrain_dist.star import read_particles, write_particles

    df = read_particles(entries[0].particles)
    df["rlnCoordinateX"] += 10_000
    df["rlnCenteredCoordinateXAngst"] += 10_000 * entries[0].voxel_size_A  # (these win)
    write_particles(shifted, df)
    gt = tmp_path / "gt.csv"
    write_manifest([replace(entries[0], particles=shifted)], gt)
    with caplog.at_level("WARNING"):
        rc, _ = _run_main(["evaluate", "--pred", str(sequential_prediction), "--gt", str(gt)],
                          capsys)
    assert rc == 0
    assert any("outside the volume" in r.getMessage() and "shifted.star" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]

    # campaign reads (and checks) its manifest before the Prefect server starts
    caplog.clear()
    with caplog.at_level("INFO"):
        t0 = time.monotonic()
        rc, err = _run_main(["campaign", "--manifest", str(semi), "--out",
                             str(tmp_path / "camp")], capsys)
    assert rc == 2 and "semi.csv" in err, err
    assert not any("Prefect API" in r.getMessage() for r in caplog.records)
    assert time.monotonic() - t0 < 20
