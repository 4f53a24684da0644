"""deploy/: the SLURM cluster config turns into the intended job scripts (no sbatch needed:
building a SLURMCluster only starts its scheduler, on this machine), and the Prefect project
file parses, its entrypoints load and its parameters validate against the flow signatures."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SLURM_YAML = ROOT / "deploy" / "slurm.yaml"
PREFECT_YAML = ROOT / "deploy" / "prefect.yaml"

pytestmark = pytest.mark.timeout(120)

# Parameters a run of an on-demand deployment must give (deploy/README.md shows them).
RUN_TIME_PARAMS = {
    "predict": {"manifest", "model_dir", "out_dir", "store"},
    "train": {"manifest", "model_dir", "store"},
}


# --------------------------------------------------------------------------- slurm.yaml
def _mem_directive(memory: str) -> str:
    """SLURM's --mem for a dask memory string: rounded up to whole units (K/M/G)."""
    from dask.utils import parse_bytes

    n = parse_bytes(memory)
    for unit, size in (("G", 2**30), ("M", 2**20)):
        if n >= size:
            return f"{math.ceil(n / size)}{unit}"
    return f"{math.ceil(n / 2**10)}K"


@pytest.fixture(scope="module")
def slurm_cfg():
    from flows.runtime import load_slurm_config

    return load_slurm_config(SLURM_YAML)


@pytest.fixture(scope="module")
def job_scripts(tmp_path_factory):
    """The job scripts of the CPU and GPU cluster (built from the real file, then closed)."""
    import os

    from flows.runtime import slurm_clusters

    # log_directory is relative (the install dir in production): create it under tmp here.
    old = Path.cwd()
    os.chdir(tmp_path_factory.mktemp("slurm-cwd"))
    try:
        cpu, gpu = slurm_clusters(SLURM_YAML)
        try:
            # Nothing was submitted: no jobs exist until scale/adapt.
            assert len(cpu.workers) == 0 and len(gpu.workers) == 0
            assert cpu.scheduler_address.startswith("tcp://")
            yield cpu.job_script(), gpu.job_script()
        finally:
            gpu.close()
            cpu.close()
    finally:
        os.chdir(old)


def test_slurm_config_has_both_sections(slurm_cfg):
    assert set(slurm_cfg) == {"cpu", "gpu"}
    for sec in ("cpu", "gpu"):
        for key in ("queue", "cores", "processes", "memory", "walltime", "job_script_prologue",
                    "local_directory", "log_directory"):
            assert key in slurm_cfg[sec], (sec, key)
        assert slurm_cfg[sec]["cores"] % slurm_cfg[sec]["processes"] == 0
    # one GPU worker process per GPU job: every process would claim the job's one GPU
    assert slurm_cfg["gpu"]["processes"] == 1
    assert slurm_cfg["gpu"]["worker_extra_args"][-2:] == ["--resources", "GPU=1"]
    assert "--gres=gpu:1" in slurm_cfg["gpu"]["job_extra_directives"]


def test_gpu_job_script_asks_for_a_gpu(job_scripts, slurm_cfg):
    _, gpu = job_scripts
    assert "#SBATCH --gres=gpu:1" in gpu
    worker_cmd = gpu.strip().splitlines()[-1]
    assert "distributed.cli.dask_worker" in worker_cmd
    assert worker_cmd.endswith("--resources GPU=1")
    assert worker_cmd.count("--resources") == 1  # not appended twice by slurm_clusters


def test_cpu_job_script_has_no_gpu(job_scripts):
    cpu, _ = job_scripts
    assert "--gres" not in cpu
    assert "--resources" not in cpu
    assert "GPU=1" not in cpu


@pytest.mark.parametrize("section, index", [("cpu", 0), ("gpu", 1)])
def test_job_script_matches_yaml(job_scripts, slurm_cfg, section, index):
    script = job_scripts[index]
    cfg = slurm_cfg[section]
    assert f"#SBATCH -p {cfg['queue']}" in script
    assert f"#SBATCH --cpus-per-task={cfg['cores']}" in script
    assert f"#SBATCH --mem={_mem_directive(cfg['memory'])}" in script
    assert f"#SBATCH -t {cfg['walltime']}" in script
    if cfg.get("account"):
        assert f"#SBATCH -A {cfg['account']}" in script
    else:
        assert "#SBATCH -A" not in script
    worker_cmd = script.strip().splitlines()[-1]
    threads = cfg["cores"] // cfg["processes"]
    assert re.search(rf"--nthreads {threads}\b", worker_cmd)
    if cfg["processes"] > 1:
        assert f"--nworkers {cfg['processes']}" in worker_cmd
    else:
        assert "--nworkers" not in worker_cmd
    from dask.utils import parse_bytes

    from flows.runtime import MEMORY_HEADROOM, lifetime_args, walltime_seconds, with_tmp_fallback

    # scratch that exists whether or not the site sets $TMPDIR (SLURM does not)
    assert f"--local-directory {with_tmp_fallback(cfg['local_directory'])}" in worker_cmd
    assert "${TMPDIR:-/tmp}" in worker_cmd
    # the workers' memory limits leave headroom under --mem
    limit = parse_bytes(re.search(r"--memory-limit (\S+)", worker_cmd).group(1))
    headroom = cfg.get("memory_headroom", MEMORY_HEADROOM)
    assert headroom > 0
    assert limit * cfg["processes"] <= (1 - headroom) * parse_bytes(cfg["memory"]) * 1.001
    # workers retire gracefully before the walltime: lifetime + stagger < walltime
    lifetime = lifetime_args(cfg["walltime"])
    assert " ".join(lifetime) in worker_cmd
    assert "--lifetime-restart" not in worker_cmd  # the job ends and is replaced
    life, stagger = (int(v.rstrip("s")) for v in lifetime[1::2])
    assert 0 < stagger and life + stagger < walltime_seconds(cfg["walltime"])
    for line in cfg["job_script_prologue"]:
        assert line in script
    # the venv is activated before the worker starts
    assert script.index("activate") < script.index("distributed.cli.dask_worker")
    # the workers' heap tuning travels in the job script (the nanny's environment wins over
    # dask's MALLOC_TRIM_THRESHOLD_=65536 default), and so does their dask config (profiler
    # off, 200 ms loop checks)
    from flows.runtime import MALLOC_ENV

    exports = {**MALLOC_ENV, "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
               "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "200ms"}
    for k, v in exports.items():
        assert script.index(f"export {k}={v}") < script.index("distributed.cli.dask_worker")


@pytest.mark.filterwarnings("ignore:Port .* is already in use")
def test_slurm_clusters_appends_gpu_resource(tmp_path, monkeypatch, slurm_cfg):
    """A config whose gpu section forgets --resources still gets GPU workers."""
    from flows.runtime import slurm_clusters

    cfg = {k: dict(v) for k, v in slurm_cfg.items()}
    del cfg["gpu"]["worker_extra_args"]
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    cpu, gpu = slurm_clusters(path)
    try:
        assert gpu.job_script().strip().endswith("--resources GPU=1")
        assert "--resources" not in cpu.job_script()
    finally:
        gpu.close()
        cpu.close()


@pytest.mark.parametrize("text, seconds", [
    ("04:00:00", 4 * 3600), ("30", 1800), ("10:30", 630), ("1-0", 86400), ("2-03:04", 183840),
    ("1-00:00:10", 86410)])
def test_walltime_formats(text, seconds):
    from flows.runtime import walltime_seconds

    assert walltime_seconds(text) == seconds


@pytest.mark.parametrize("section, key, value, message", [
    ("gpu", "walltime", "4 hours", "gpu.walltime"),
    ("cpu", "walltime", "-1", "cpu.walltime"),
    ("cpu", "memory_headroom", 1.5, "memory_headroom"),
    ("gpu", "memory", "lots", "gpu.memory"),
])
def test_bad_slurm_values_are_named(tmp_path, monkeypatch, slurm_cfg, section, key, value,
                                    message):
    from flows.runtime import slurm_clusters
    from membrain_dist.errors import InputError

    cfg = {k: dict(v) for k, v in slurm_cfg.items()}
    cfg[section][key] = value
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=message):
        slurm_clusters(path)


def test_job_scripts_worker_commands_start_without_tmpdir(tmp_path, monkeypatch, slurm_cfg):
    """The last line of each generated job script, run here by bash with TMPDIR unset (as
    SLURM leaves it at many sites), starts workers that join the cluster's real scheduler,
    spill to /tmp, advertise GPU=1 on the GPU cluster, and retire by themselves before the
    walltime (a test walltime of 20 s), exiting 0."""
    import os
    import signal
    import subprocess
    import time

    from distributed import Client

    from flows.runtime import slurm_clusters

    cfg = {k: dict(v) for k, v in slurm_cfg.items()}
    small = {"cpu": dict(cores=2, processes=2, memory="2GiB"),
             "gpu": dict(cores=1, processes=1, memory="1GiB")}
    for sec in ("cpu", "gpu"):  # the file as shipped, scaled to this machine, on loopback
        cfg[sec].update(small[sec], walltime="00:00:20", interface="lo",
                        scheduler_options={"dashboard_address": "127.0.0.1:0"})
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "TMPDIR"}
    # the workers' INFO lines say why they stop ("lifetime"); an in-process CLI test earlier
    # in the session may have set this to warning in os.environ
    env["DASK_LOGGING__DISTRIBUTED"] = "info"
    cpu, gpu = slurm_clusters(path)
    procs = []
    try:
        for cluster in (cpu, gpu):
            cmd = cluster.job_script().strip().splitlines()[-1]
            procs.append(subprocess.Popen(["bash", "-c", cmd], env=env, cwd=tmp_path,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, start_new_session=True))
        for cluster, n, resources in ((cpu, 2, {}), (gpu, 1, {"GPU": 1})):
            with Client(cluster, timeout=30) as client:
                client.wait_for_workers(n, timeout=60)
                workers = client.scheduler_info(n_workers=-1)["workers"]
                assert len(workers) == n
                assert all(w["host"] == "127.0.0.1" for w in workers.values())
                assert [w["resources"] for w in workers.values()] == [resources] * n
                dirs = client.run(lambda dask_worker: dask_worker.local_directory)
                assert all(d.startswith("/tmp/") for d in dirs.values()), dirs
        # lifetime 15 s +- 1 s: the workers close themselves, the command (the job) ends
        outs = [p.communicate(timeout=60)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
        assert all("lifetime" in o for o in outs), [o[-2000:] for o in outs]
        deadline = time.monotonic() + 10
        while (cpu.scheduler.workers or gpu.scheduler.workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not cpu.scheduler.workers and not gpu.scheduler.workers
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        gpu.close()
        cpu.close()


_FAKE_SBATCH = """#!/bin/bash
# sbatch where SLURM is absent: run a copy of the job script in its own session, locally
cp "$1" "{dir}/job-$$.sh"
setsid bash "{dir}/job-$$.sh" > "{dir}/job-$$.log" 2>&1 < /dev/null &
echo $! >> "{dir}/jobs"
echo "Submitted batch job $!"
"""
_FAKE_SCANCEL = """#!/bin/bash
for j in "$@"; do kill -- -"$j" 2>/dev/null; done
exit 0
"""


def test_gpu_cluster_replaces_a_job_that_ended(tmp_path, monkeypatch, slurm_cfg):
    """Finding 3: the GPU cluster of open_clusters (adaptive, minimum = maximum = gpu_jobs)
    submits a new job when its worker's job ends (here: the lifetime derived from a 10 s
    walltime). No SLURM on this machine: `sbatch` is a script that runs the
    generated job script locally (the job script, worker and scheduler are the real ones)."""
    import os
    import signal
    import time

    import dask
    from distributed import Client

    from flows.runtime import ClusterSpec, open_clusters

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", _FAKE_SBATCH.format(dir=tmp_path)), ("scancel", _FAKE_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.delenv("TMPDIR", raising=False)
    monkeypatch.setenv("DASK_LOGGING__DISTRIBUTED", "info")  # the jobs log "lifetime-reached"
    cfg = {k: dict(v) for k, v in slurm_cfg.items()}
    for sec in ("cpu", "gpu"):
        cfg[sec].update(cores=1, processes=1, memory="1GiB", walltime="00:00:10", interface="lo",
                        job_script_prologue=[], scheduler_options={"dashboard_address": "127.0.0.1:0"})
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    joined: list[str] = []  # worker addresses, in the order they joined
    try:
        # the job of a worker that left is closed after this timeout (dask: 15 s), then
        # replaced; shortened to keep the test short
        spec = ClusterSpec(kind="slurm", slurm_config=str(path), n_workers=1, gpu_jobs=1)
        with dask.config.set({"distributed.deploy.lost-worker-timeout": "1s"}), \
                open_clusters(spec) as cl, Client(cl.gpu_address, timeout=30) as client:
            deadline = time.monotonic() + 60
            while len(joined) < 2 and time.monotonic() < deadline:
                workers = client.scheduler_info(n_workers=-1)["workers"]
                assert len(workers) <= 1  # never two GPU jobs at once
                for addr, w in workers.items():
                    if addr not in joined:
                        assert w["resources"] == {"GPU": 1}
                        joined.append(addr)
                time.sleep(0.2)
    finally:
        jobs = tmp_path / "jobs"
        for job in jobs.read_text().split() if jobs.exists() else []:
            try:  # whatever a failure left running: the job's process group
                os.killpg(int(job), signal.SIGKILL)
            except ProcessLookupError:
                pass
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("job-*.log")))
    assert len(joined) == 2, logs[-3000:]  # the first job ended, a second one took over
    assert "worker-lifetime-reached" in logs
    assert len(list(tmp_path.glob("job-*.sh"))) >= 2


def test_load_slurm_config_rejects_missing_section(tmp_path):
    from flows.runtime import load_slurm_config
    from membrain_dist.errors import InputError

    bad = tmp_path / "slurm.yaml"
    bad.write_text(yaml.safe_dump({"cpu": {"cores": 4}}))
    with pytest.raises(InputError, match="gpu"):
        load_slurm_config(bad)


# --------------------------------------------------------------------------- prefect.yaml
@pytest.fixture(scope="module")
def project() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


@pytest.fixture(scope="module")
def deployments(project) -> dict[str, dict]:
    return {d["name"]: d for d in project["deployments"]}


def test_prefect_yaml_is_a_valid_project_file(project, deployments):
    """The same pydantic model `prefect deploy` validates the file with."""
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(project)
    assert {d.name for d in model.deployments} == {"nightly-campaign", "predict", "train"}
    for d in model.deployments:
        assert d.work_pool is not None and d.work_pool.name == "membrain-slurm"
    assert set(deployments) == {"nightly-campaign", "predict", "train"}
    steps = project["pull"]
    assert list(steps[0]) == ["prefect.deployments.steps.set_working_directory"]
    assert steps[0]["prefect.deployments.steps.set_working_directory"]["directory"]


def test_pull_step_is_importable(project):
    from prefect.utilities.importtools import import_object

    for step in project["pull"]:
        (name,) = step
        assert callable(import_object(name))


def test_job_variables_fit_a_process_pool(deployments):
    from prefect.workers.process import ProcessWorker

    variables = ProcessWorker.job_configuration_variables
    for d in deployments.values():
        jv = d["work_pool"]["job_variables"]
        assert set(jv) <= set(variables.model_fields), d["name"]
        variables.model_validate(jv)


def test_schedules(deployments):
    from prefect.client.schemas.schedules import CronSchedule

    nightly = deployments["nightly-campaign"]["schedules"]
    assert len(nightly) == 1
    sched = CronSchedule(cron=nightly[0]["cron"], timezone=nightly[0]["timezone"])
    assert sched.cron == "0 2 * * *"
    for name in ("predict", "train"):
        assert not deployments[name].get("schedules")
    # the validation is real: a broken cron or timezone is refused
    with pytest.raises(ValueError):
        CronSchedule(cron="0 25 * * *", timezone="Europe/Berlin")
    with pytest.raises(ValueError):
        CronSchedule(cron="0 2 * * *", timezone="Europe/Atlantis")


def _run_params(name: str, params: dict) -> dict:
    """The deployment's parameters plus the ones a run must give (placeholder paths)."""
    return {**{k: f"/runs/{k}" for k in RUN_TIME_PARAMS.get(name, ())}, **params}


@pytest.mark.parametrize("name", ["nightly-campaign", "predict", "train"])
def test_entrypoint_loads_and_parameters_validate(deployments, name, monkeypatch):
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    from flows.runtime import ClusterSpec

    dep = deployments[name]
    # entrypoints are relative to the repository root (where `prefect deploy` runs and where
    # the pull step puts the worker)
    path, _ = dep["entrypoint"].split(":")
    assert (ROOT / path).is_file()
    monkeypatch.chdir(ROOT)
    flow = load_flow_from_entrypoint(dep["entrypoint"])
    params = dep.get("parameters") or {}
    schema = parameter_schema(flow)
    assert set(params) <= set(schema.properties), set(params) - set(schema.properties)
    # what the run must still provide is exactly what the flow requires and the file omits
    assert set(schema.required or []) - set(params) == RUN_TIME_PARAMS.get(name, set())
    full = _run_params(name, params)
    # client side: the flow's own pydantic validation (what the engine does at run start)
    validated = flow.validate_parameters(full)
    cluster = validated["cluster"]
    # a file entrypoint is loaded as its own module tree ("campaign.runtime"), so compare by
    # name: the dict became the flow's ClusterSpec dataclass, validated by its __post_init__
    assert type(cluster).__name__ == ClusterSpec.__name__
    assert dataclasses.is_dataclass(cluster)
    assert cluster.kind == "slurm"
    assert (ROOT / cluster.slurm_config).is_file()  # relative to the install dir (pull step)
    # server side: the JSON schema `prefect deploy` registers (enforce_parameter_schema)
    errors = validate(full, schema.model_dump_for_openapi(), raise_on_error=False)
    assert not errors, [e.message for e in errors]


def test_parameter_validation_can_fail():
    from prefect.exceptions import ParameterTypeError, SignatureMismatchError
    from prefect.flows import load_flow_from_entrypoint

    flow = load_flow_from_entrypoint(f"{ROOT / 'flows' / 'campaign.py'}:run_campaign")
    with pytest.raises(ParameterTypeError):
        flow.validate_parameters({"manifest": "m.csv", "out_dir": "o",
                                  "cluster": {"kind": "slurm"}})  # no slurm_config
    with pytest.raises(ParameterTypeError, match="n_workerz"):
        flow.validate_parameters({"manifest": "m.csv", "out_dir": "o",
                                  "cluster": {"kind": "slurm", "slurm_config": "s.yaml",
                                              "n_workerz": 8}})
    with pytest.raises(ParameterTypeError, match="band_widht"):
        flow.validate_parameters({"manifest": "m.csv", "out_dir": "o",
                                  "cfg": {"geometry": {"band_widht": 3.0}}})
    with pytest.raises(SignatureMismatchError):
        flow.validate_parameters({"manifest": "m.csv", "out_dir": "o", "clusters": {}})


def test_nightly_watches_a_manifest_with_a_fixed_model(deployments):
    p = deployments["nightly-campaign"]["parameters"]
    assert p["manifest"].endswith(".csv")
    assert p["model_dir"]  # a nightly run predicts with the production model, no retraining
    assert deployments["nightly-campaign"]["concurrency_limit"] == 1


@pytest.mark.parametrize("url, warns", [
    (None, True),
    ("http://127.0.0.1:4200/api", True),
    ("http://localhost:4200/api", True),
    ("http://login01.example.org:4200/api", False),
    ("http://10.1.2.3:4200/api", False),
])
def test_slurm_runs_warn_about_an_api_compute_nodes_cannot_reach(monkeypatch, url, warns):
    """SLURM jobs inherit PREFECT_API_URL; a loopback URL points them at themselves."""
    from flows.runtime import _loopback_api_warning

    if url is None:
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
    else:
        monkeypatch.setenv("PREFECT_API_URL", url)
    msg = _loopback_api_warning()
    assert (msg is not None) == warns
    if warns:
        assert "PREFECT_API_URL" in msg and "deploy/README.md" in msg
