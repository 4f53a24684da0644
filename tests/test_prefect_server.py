"""Against a REAL Prefect server (``prefect server start``, private SQLite in tmp): a project
flow reports its run state and table artifact there; ``prefect deploy`` registers
deploy/prefect.yaml (schedule, parameters, work pool) and the server accepts runs of it; and
``flows.runtime.prefect_api`` starts, exports and stops its temporary API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))

pytestmark = pytest.mark.timeout(180)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _server_env(home: Path) -> dict[str, str]:
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_ENABLED="false", PREFECT_UI_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``prefect server start`` on a free loopback port; yields (api_url, PREFECT_HOME)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=_server_env(home), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not _healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({proc.returncode}): "
                                   f"{(home / 'server.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError("prefect server not healthy after 90 s")
            time.sleep(0.25)
        yield url, home
    finally:
        # the server's process group: `prefect server start` and anything it spawned
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert not _healthy(url)


@contextlib.contextmanager
def _use_api(url: str):
    """Point this process at ``url``: the settings object (flows started here) AND the
    environment (anything spawned here), as flows.runtime.prefect_api does."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    finally:
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old


def _write_stars(tmp: Path) -> tuple[Path, Path]:
    """Ground truth: 3 particles of t1; predictions: 2 of them (shifted 1 voxel) + 1 far off."""
    from membrain_dist.star import particles_frame, write_particles

    gt_zyx = np.array([[10, 10, 10], [20, 30, 40], [40, 20, 30]], np.float32)
    pred_zyx = np.array([[11, 10, 10], [20, 31, 40], [5, 50, 50]], np.float32)
    gt = tmp / "gt.star"
    write_particles(gt, particles_frame("t1", gt_zyx, None, (64, 64, 64), 10.0))
    pred = tmp / "pred"
    pred.mkdir()
    write_particles(pred / "t1.star", particles_frame("t1", pred_zyx, None, (64, 64, 64), 10.0))
    return pred, gt


def test_flow_state_and_artifact_on_server(server, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    from flows.evaluate import evaluate_predictions

    url, _ = server
    pred, gt = _write_stars(tmp_path)
    with _use_api(url):
        state = evaluate_predictions(str(pred), str(gt), radius=2.0,
                                     json_out=str(tmp_path / "ev.json"), return_state=True)
        assert state.is_completed(), state
        result = state.result()
        flow_run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
            arts = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["evaluation"])),
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert run.state is not None and run.state.type.value == "COMPLETED"
    assert run.flow_id is not None and run.name
    assert result["overall"]["precision"] == pytest.approx(2 / 3)
    assert result["overall"]["recall"] == pytest.approx(2 / 3)
    assert json.loads((tmp_path / "ev.json").read_text())["overall"]["n_gt"] == 3
    assert len(arts) == 1 and arts[0].type == "table"
    assert arts[0].flow_run_id == flow_run_id
    table = arts[0].data if isinstance(arts[0].data, list) else json.loads(arts[0].data)
    assert [row["tomogram"] for row in table] == ["t1", "ALL"]
    assert table[-1]["n_pred"] == 3 and table[-1]["n_gt"] == 3
    with _use_api(url), get_client(sync_client=True) as client:
        assert client.read_flow(run.flow_id).name == "membrain-evaluate"


@pytest.fixture(scope="module")
def deployed(server):
    """`prefect deploy --all --prefect-file deploy/prefect.yaml`, as deploy/README.md says,
    into the module's server (once); yields its API URL."""
    url, home = server
    env = dict(_server_env(home), PREFECT_API_URL=url)
    subprocess.run([PREFECT, "--no-prompt", "work-pool", "create", "membrain-slurm", "--type",
                    "process"], env=env, cwd=ROOT, check=True, capture_output=True, timeout=60)
    out = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file",
                          "deploy/prefect.yaml"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return url


def test_prefect_deploy_registers_the_project(deployed):
    from prefect import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    url = deployed
    with _use_api(url), get_client(sync_client=True) as client:
        deps = {d.name: d for d in client.read_deployments()}
        assert set(deps) == {"nightly-campaign", "predict", "train"}
        nightly = deps["nightly-campaign"]
        assert nightly.entrypoint == "flows/campaign.py:run_campaign"
        assert nightly.work_pool_name == "membrain-slurm"
        assert nightly.parameters["cluster"] == {"kind": "slurm",
                                                 "slurm_config": "deploy/slurm.yaml",
                                                 "n_workers": 8, "gpu_jobs": 1}
        assert nightly.parameters["model_dir"]
        (sched,) = nightly.schedules
        assert sched.schedule.cron == "0 2 * * *" and sched.schedule.timezone
        assert sched.active
        assert nightly.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
            "directory": "/shared/software/membrain-dist"}}]
        assert nightly.enforce_parameter_schema
        for name in ("predict", "train"):
            assert not deps[name].schedules
        assert client.read_flow(nightly.flow_id).name == "membrain-campaign"

        # the server validates run parameters against the registered flow signature
        predict = deps["predict"]
        run = client.create_flow_run_from_deployment(
            predict.id, parameters={"manifest": "/data/m.csv", "model_dir": "/data/model",
                                    "out_dir": "/data/pred", "store": "/data/pred/c.zarr"})
        assert run.state is not None and run.state.type.value == "SCHEDULED"
        assert run.parameters["cluster"]["kind"] == "slurm"
        with pytest.raises(PrefectHTTPStatusError, match="Validation failed"):
            client.create_flow_run_from_deployment(predict.id, parameters={"manifest": "m.csv"})
        with pytest.raises(PrefectHTTPStatusError, match="Validation failed"):
            client.create_flow_run_from_deployment(
                deps["nightly-campaign"].id, parameters={"cluster": {"kind": "slurm", "gpu_jobs": "x"}})
        # typed parameters: a misspelt key of a ClusterSpec or a stage config, or an unknown
        # cluster kind, is refused when the run is created, not when it starts
        good = dict(nightly.parameters)
        for bad in ({"cluster": {**good["cluster"], "n_workerz": 8}},
                    {"cluster": {**good["cluster"], "kind": "slurmm"}},
                    {"cfg": {"cluster": {"score_treshold": 3.0}}}):
            with pytest.raises(PrefectHTTPStatusError, match="Validation failed") as err:
                client.create_flow_run_from_deployment(nightly.id, parameters={**good, **bad})
            assert ("n_workerz" in str(err.value.response.text) or "slurmm" in
                    err.value.response.text or "score_treshold" in err.value.response.text)
        ok = client.create_flow_run_from_deployment(
            nightly.id, parameters={**good, "cfg": {"cluster": {"score_threshold": 3.0}}})
        assert ok.parameters["cfg"] == {"cluster": {"score_threshold": 3.0}}


def test_server_schedules_the_nightly_runs(deployed, server):
    """The server's own scheduler service turns the nightly cron into scheduled flow runs
    (prefect 3.8 with SQLAlchemy 2.1 raised on every scheduler loop and created none): at
    least 3 runs, every one at 02:00 Europe/Berlin, none for the on-demand deployments."""
    from zoneinfo import ZoneInfo

    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    url, home = deployed, server[1]
    runs = []
    deadline = time.monotonic() + 60  # the recent-deployments loop runs every 5 s
    with _use_api(url), get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["nightly-campaign"]))) if r.auto_scheduled]
            if len(runs) >= 3 or "Can't evaluate bulk DML" in (home / "server.log").read_text():
                break
            time.sleep(1)
        others = client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=["predict", "train"])))
    log = (home / "server.log").read_text()
    assert "Can't evaluate bulk DML" not in log, log[-3000:]
    assert len(runs) >= 3, f"no scheduled runs after 60 s; server log:\n{log[-3000:]}"
    berlin = ZoneInfo("Europe/Berlin")
    for run in runs:
        assert run.state is not None and run.state.type.value == "SCHEDULED"
        local = run.expected_start_time.astimezone(berlin)
        assert (local.hour, local.minute) == (2, 0), run.expected_start_time
        assert run.parameters["model_dir"] and run.parameters["cluster"]["kind"] == "slurm"
    # the on-demand deployments have no schedule: their only run is the one asked for above
    assert all(not r.auto_scheduled for r in others)


def test_prefect_api_starts_exports_and_stops(monkeypatch, tmp_path):
    import psutil
    from prefect.settings import PREFECT_API_URL

    from flows.runtime import prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))  # the temporary API's SQLite lives here
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with prefect_api(timeout=90) as url:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
        assert os.environ["PREFECT_API_URL"] == url
        assert PREFECT_API_URL.value() == url
        assert _healthy(url)
        new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        servers = [p for p in new if any("uvicorn" in a for a in p.cmdline())]
        assert len(servers) == 1
        server = servers[0]
        port = url.split(":")[2].split("/")[0]
        assert port in server.cmdline()
        assert server.environ().get("PREFECT__SERVER_EPHEMERAL") == "1"  # no scheduler loops
    assert "PREFECT_API_URL" not in os.environ
    assert PREFECT_API_URL.value() != url
    assert not _healthy(url)
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
    assert (tmp_path / "prefect.db").exists()


def test_prefect_api_reuses_an_existing_server(server, monkeypatch):
    import psutil

    from flows.runtime import prefect_api

    url, _ = server
    monkeypatch.setenv("PREFECT_API_URL", url)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with prefect_api() as got:
        assert got == url
        assert {p.pid for p in psutil.Process().children(recursive=True)} == before
    assert os.environ["PREFECT_API_URL"] == url  # not ours to remove


# --------------------------------------------------------------------------- a CLI run
@pytest.fixture(scope="module")
def cli_run(server, test_manifest, trained_model, tmp_path_factory):
    """``membrain-dist predict`` at the default verbosity, in the default (flow) mode, on one
    tomogram, reporting to the module's server; stderr made a terminal for rich
    (TTY_COMPATIBLE=1). Yields (completed process, its top flow run, the out folder)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    from membrain_dist.manifest import read_manifest, write_manifest

    url, home = server
    work = tmp_path_factory.mktemp("cli-run")
    manifest = work / "night-42.csv"
    rows = read_manifest(test_manifest)[:1]
    write_manifest(rows, manifest)
    env = dict(_server_env(home), PREFECT_API_URL=url, TTY_COMPATIBLE="1", COLUMNS="120")
    for var in ("PREFECT_LOGGING_LEVEL", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"):
        env.pop(var, None)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "membrain_dist.cli", "predict", "--manifest",
                          str(manifest), "--model", str(trained_model), "--out",
                          str(work / "pred"), "--workers", "1"], env=env, capture_output=True,
                         text=True, timeout=400)
    (work / "cli.log").write_text(f"{time.monotonic() - t0:.1f} s\n{out.stdout}\n{out.stderr}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with _use_api(url), get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["membrain-predict"])),
            sort=FlowRunSort.START_TIME_DESC, limit=1)
    return out, run, work / "pred", rows[0].name


def _runs_of(client, top):
    """The flow run and its stage subflows."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    subs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[top.id])))
    return [top, *subs]


def test_library_log_lines_reach_the_run_logs_at_default_verbosity(server, cli_run):
    """Finding 4: per-tomogram and per-stage lines of membrain_dist.* loggers, from the flow
    process and from the dask worker's tasks, are in the API's logs of the run."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    url, _ = server
    proc, top, _, name = cli_run
    with _use_api(url), get_client(sync_client=True) as client:
        runs = _runs_of(client, top)
        logs = client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])), limit=200)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[r.id for r in runs])))
    library = [rec for rec in logs if rec.name.startswith("membrain_dist")]
    text = "\n".join(f"{rec.name}: {rec.message}" for rec in library)
    # the streamed run's tasks, in the run itself: a tomogram's conversion, one task per
    # membrane (no inference workers apart) and its outputs
    assert {t.name.split("-")[0] for t in tasks} >= {"convert", "membrane", "outputs"}
    # from tasks on the dask worker (a task run id) and per stage, naming the tomogram
    assert any(rec.task_run_id for rec in library), text
    for logger, words in (("membrain_dist.convert", "converted"),
                          ("membrain_dist.geometry", "points"),
                          ("membrain_dist.pipeline", "particles")):
        assert any(rec.name == logger and name in rec.message and words in rec.message
                   for rec in library), f"{logger} {words!r} missing in:\n{text}"
    # and the flows' own run-logger lines (INFO) as well
    assert any("tomograms done" in rec.message for rec in logs)
    # the terminal stayed quiet: no Prefect INFO state lines at the default verbosity, and
    # the workers stopped in time (finding 7: "Worker process still alive after 4.0 s")
    assert "Finished in state" not in proc.stderr + proc.stdout
    assert "still alive" not in proc.stderr + proc.stdout


def test_progress_artifact_run_name_and_terminal_display(server, cli_run):
    """Finding 6: a progress artifact (tomograms done / total) that was updated to 100 %,
    a flow run named after the manifest and the time, and the rich display on the
    terminal."""
    import datetime as dt

    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterType,
        FlowRunFilter,
        FlowRunFilterId,
    )

    url, _ = server
    proc, top, _, _ = cli_run
    assert top.name.startswith("night-42-"), top.name
    started = dt.datetime.strptime(top.name.removeprefix("night-42-"), "%Y-%m-%dT%H:%M:%S")
    assert abs(started - dt.datetime.now()) < dt.timedelta(minutes=15)
    with _use_api(url), get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[top.id])))
    assert art.key == "progress"
    assert float(art.data) == 100.0
    assert art.description.startswith("1/1 tomograms done"), art.description
    assert art.updated > art.created  # created at 0 % and updated as the run went
    err = proc.stderr
    assert "tomograms" in err and "1/1" in err and " left" in err, err[-3000:]
    for stage in ("convert", "geometry", "inference", "particles"):
        assert stage in err, err[-3000:]


def test_qc_figures_are_files_with_thumbnails(server, cli_run):
    """Finding 5: the qc-figures artifact links the PNG files and holds only small
    thumbnails (the whole figures were 1.2 MB of base64 for 3 tomograms)."""
    import base64
    import io
    import re

    from PIL import Image
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    url, _ = server
    _, top, pred, name = cli_run
    png = (pred / "qc" / f"{name}.png").resolve()
    assert png.is_file()
    with _use_api(url), get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["qc-figures", "qc-folder"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[top.id])))}
    md = arts["qc-figures"].data
    assert png.as_uri() in md
    thumbs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", md)
    assert len(thumbs) == 1
    data = base64.b64decode(thumbs[0])
    assert len(data) <= 40_000 < png.stat().st_size
    with Image.open(io.BytesIO(data)) as im:
        assert im.width <= 240
    assert len(md) < 60_000
    # a link artifact (Prefect stores it as markdown) to the folder of the figures
    assert f"({png.parent.as_uri()})" in arts["qc-folder"].data
