"""Where flows run: the Prefect API and the dask clusters.

Prefect without a server (the default) starts a temporary API in every process that needs one;
dask worker processes would each start their own on one SQLite file ("database is locked").
:func:`prefect_api` therefore starts ONE temporary API server on a free loopback port and
exports its URL, so the flow process and every worker it spawns report to the same place.
With ``PREFECT_API_URL`` already set (a ``prefect server start`` or Prefect Cloud), that server
is used and nothing is started.

:func:`open_clusters` gives the scheduler addresses the flows' ``DaskTaskRunner`` s connect to:
one ``LocalCluster`` sized to the machine (default), an existing scheduler, or two
``dask_jobqueue.SLURMCluster`` s (CPU workers; GPU workers started with ``--resources GPU=1``).
Inference tasks are annotated with ``resources={"GPU": 1}`` exactly when GPU workers exist.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _drain_api_logs(timeout: float = 5.0) -> None:
    """Send the run log records Prefect still holds (its API log worker batches them) while
    the server is up; otherwise they are retried at interpreter exit and print "Error
    logging to API" after the temporary server has stopped."""
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - a shutdown step must not mask the run's outcome
        log.debug("draining Prefect's API logs failed: %s", exc)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"temporary Prefect server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"temporary Prefect server at {url} not healthy after {timeout:.0f} s")


def _die_with_parent_fn():
    """A ``preexec_fn`` that makes the child get SIGKILL when this process ends (Linux
    ``prctl(PR_SET_PDEATHSIG)``), or None where that does not exist.

    The death signal follows the *thread* that starts the child: start it from the main thread
    (the CLI does) or from a thread that lives as long as the child should."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def _die_with_parent() -> None:
        prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return _die_with_parent


@contextlib.contextmanager
def prefect_api(timeout: float = 120.0) -> Iterator[str]:
    """Yield the Prefect API URL every process of this run reports to (see module docstring)."""
    existing = os.environ.get("PREFECT_API_URL")
    if existing:
        yield existing
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    # PREFECT__SERVER_EPHEMERAL: only the services a run needs (events, run recorders), not
    # the scheduler, late-run and cancellation loops of a facility server (nothing is deployed
    # to this one): 2.6 -> 1.5 % of a core while idle beside a training run, measured
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_ENABLED="false", PREFECT_SERVER_LOGGING_LEVEL="WARNING",
               PREFECT__SERVER_EPHEMERAL="1")
    # its own session: a Ctrl-C in the terminal reaches the CLI, which stops the server last
    # (a server gone first leaves the flow retrying its API); it dies with this process even
    # when this one is killed with SIGKILL (see _die_with_parent)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "error"],
        env=env, stdout=subprocess.DEVNULL, start_new_session=True,
        preexec_fn=_die_with_parent_fn(),
    )
    try:
        _wait_healthy(url, proc, timeout)
        os.environ["PREFECT_API_URL"] = url
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        _drain_api_logs()  # sent now, not retried against a stopped server at exit
        os.environ.pop("PREFECT_API_URL", None)
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass(frozen=True)
class ClusterSpec:
    """Which dask cluster(s) a run uses.

    Attributes
    ----------
    kind
        ``local`` (a LocalCluster on this machine), ``address`` (an existing scheduler) or
        ``slurm`` (two dask-jobqueue SLURMClusters: CPU and GPU workers).
    n_workers
        Local: worker processes (default: one per core, at most 8). SLURM: CPU jobs.
    threads_per_worker
        Threads per worker process (1: numpy/scipy/torch parallelism stays per process).
    memory_limit
        Per local worker ("auto" splits the machine's memory).
    address
        Scheduler address for ``kind="address"``.
    gpu_resource
        ``address``: the scheduler has workers started with ``--resources GPU=1``; inference
        tasks then ask for that resource.
    slurm_config
        YAML file with ``cpu`` and ``gpu`` sections of SLURMCluster keyword arguments
        (``deploy/slurm.yaml``); ``gpu_jobs`` GPU jobs are started.
    gpu_jobs
        SLURM GPU worker jobs.
    dashboard_address
        Local: where the dask dashboard listens (``host:port``; loopback unless asked,
        ``:0`` would listen on every interface without authentication).
    """

    # a misspelt field (n_workerz) is refused by pydantic: client side and, through the
    # registered schema (additionalProperties: false), by the server when a run is created
    __pydantic_config__ = ConfigDict(extra="forbid")

    kind: Literal["local", "address", "slurm"] = "local"
    n_workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    address: str | None = None
    gpu_resource: bool = False
    slurm_config: str | None = None
    gpu_jobs: int = 1
    dashboard_address: str = "127.0.0.1:0"
    local_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("local", "address", "slurm"):
            raise ValueError(f"unknown cluster kind {self.kind!r}")
        if self.kind == "address" and not self.address:
            raise ValueError("cluster kind 'address' needs an address")
        if self.kind == "slurm" and not self.slurm_config:
            raise ValueError("cluster kind 'slurm' needs a slurm_config YAML")


@dataclass(frozen=True)
class Clusters:
    """Scheduler addresses of a run: CPU stages and GPU (inference) stage."""

    cpu_address: str
    gpu_address: str
    gpu_resource: bool


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def load_slurm_config(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read ``deploy/slurm.yaml``: ``{"cpu": {...}, "gpu": {...}}`` SLURMCluster kwargs."""
    import yaml

    from membrain_dist.errors import InputError

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(path, f"cannot read SLURM config: {exc}") from exc
    if not isinstance(data, dict) or not {"cpu", "gpu"} <= set(data):
        raise InputError(path, "SLURM config needs 'cpu' and 'gpu' sections")
    return data


def slurm_clusters(path: str | os.PathLike) -> tuple[Any, Any]:
    """The CPU and GPU SLURMClusters of a config (not yet scaled). Needs ``[slurm]``.

    Each job script first exports :func:`worker_exports`, each variable unless the config's
    ``job_script_prologue`` already mentions it: the heap tuning of :data:`MALLOC_ENV` (in the
    nanny's own environment it wins over dask's pre-spawn default, see :func:`worker_environ`)
    and :func:`cluster_dask_config`. The schedulers, started in this process, get the latter.
    """
    import dask
    from dask_jobqueue import SLURMCluster

    cfg = load_slurm_config(path)
    cpu, gpu = (_job_section(path, k, dict(cfg[k])) for k in ("cpu", "gpu"))
    if "--resources" not in gpu["worker_extra_args"]:
        gpu["worker_extra_args"] += ["--resources", "GPU=1"]
    with dask.config.set(cluster_dask_config()):
        return SLURMCluster(**cpu), SLURMCluster(**gpu)


#: share of a job's ``memory`` (``--mem``) kept out of the dask workers' memory limits: the
#: job's shell, the nanny processes and what dask does not count (libraries, fragmentation)
MEMORY_HEADROOM = 0.1


def _job_section(path: str | os.PathLike, name: str, section: dict[str, Any]) -> dict[str, Any]:
    """SLURMCluster kwargs of one section of ``slurm.yaml``: worker exports, a scratch
    directory that exists without ``$TMPDIR``, lifetimes before the walltime, memory headroom.
    """
    from membrain_dist.errors import InputError

    section = _with_worker_exports(section)
    if isinstance(section.get("local_directory"), str):
        section["local_directory"] = with_tmp_fallback(section["local_directory"])
    extra = [str(a) for a in section.get("worker_extra_args") or []]
    if "--lifetime" not in extra and section.get("walltime"):
        try:
            extra = lifetime_args(str(section["walltime"])) + extra
        except ValueError as exc:
            raise InputError(path, f"{name}.walltime: {exc}") from None
    section["worker_extra_args"] = extra
    headroom = section.pop("memory_headroom", MEMORY_HEADROOM)
    if not isinstance(headroom, int | float) or not 0 <= headroom < 1:
        raise InputError(path, f"{name}.memory_headroom must be a fraction in [0, 1), "
                               f"not {headroom!r}")
    if section.get("memory") and not section.get("job_mem"):
        from dask.utils import parse_bytes
        from dask_jobqueue.slurm import slurm_format_bytes_ceil

        try:
            total = parse_bytes(str(section["memory"]))
        except ValueError as exc:
            raise InputError(path, f"{name}.memory: {exc}") from None
        section["job_mem"] = slurm_format_bytes_ceil(total)  # sbatch --mem: all of it
        section["memory"] = f"{int(total * (1 - headroom))}B"  # the workers' limits: less
    return section


def with_tmp_fallback(directory: str) -> str:
    """``$TMPDIR`` / ``${TMPDIR}`` (a value that is one variable) -> ``${TMPDIR:-/tmp}``.

    SLURM does not set ``TMPDIR`` by itself: an unset variable left ``--local-directory``
    without a value, and the dask worker exited with code 2 (on the GPU worker "unexpected
    extra argument (GPU=1)"). The job's shell now expands it to ``/tmp`` there."""
    import re

    m = re.fullmatch(r"\$(?:\{(\w+)\}|(\w+))", directory.strip())
    if not m:
        return directory
    return "${%s:-/tmp}" % (m.group(1) or m.group(2))


def walltime_seconds(walltime: str) -> int:
    """SLURM's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    text = walltime.strip()
    days, dash, rest = text.rpartition("-")
    try:
        if dash and not days:
            raise ValueError
        d = int(days) if days else 0
        parts = [int(p) for p in rest.split(":")]
    except ValueError:
        raise ValueError(f"not a SLURM time limit: {walltime!r}") from None
    if days:
        parts += [0] * (3 - len(parts))  # D-H, D-H:M
        h, m, s = parts if len(parts) == 3 else (None, None, None)
    elif len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = parts if len(parts) == 3 else (None, None, None)
    if h is None or min(d, h, m, s) < 0:
        raise ValueError(f"not a SLURM time limit: {walltime!r}")
    total = ((d * 24 + h) * 60 + m) * 60 + s
    if total <= 0:
        raise ValueError(f"not a SLURM time limit: {walltime!r}")
    return total


def lifetime_args(walltime: str) -> list[str]:
    """``--lifetime``/``--lifetime-stagger`` that end a worker before SLURM kills its job.

    The worker closes gracefully (its results move to other workers, its tasks are
    rescheduled) between ``walltime - margin - stagger`` and ``walltime - margin + stagger``;
    margin: a quarter of the walltime, at most 15 min; stagger: a third of the margin, so the
    jobs of one cluster do not all leave at once. The job then ends and the cluster's adaptive
    scaling submits a replacement (flows.runtime.open_clusters)."""
    total = walltime_seconds(walltime)
    margin = min(15 * 60, total // 4)
    stagger = margin // 3
    return ["--lifetime", f"{total - margin}s", "--lifetime-stagger", f"{stagger}s"]


def _with_worker_exports(section: dict[str, Any]) -> dict[str, Any]:
    prologue = [str(line) for line in section.get("job_script_prologue") or []]
    exports = [f"export {k}={v}" for k, v in worker_exports().items()
               if not any(k in line for line in prologue)]
    return {**section, "job_script_prologue": exports + prologue}


def _loopback_api_warning() -> str | None:
    """Why SLURM workers on other nodes cannot report to the current Prefect API, or None.

    :func:`prefect_api` binds its temporary server to 127.0.0.1; SLURM jobs inherit
    ``PREFECT_API_URL`` from the flow process, but on a compute node 127.0.0.1 is the node
    itself, so task runs there cannot reach the API.
    """
    from urllib.parse import urlparse

    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return ("PREFECT_API_URL is not set: SLURM workers start their own temporary Prefect "
                "API; run a Prefect server reachable from compute nodes and export "
                "PREFECT_API_URL (deploy/README.md)")
    host = urlparse(url).hostname or ""
    if host in ("localhost", "::1") or host.startswith("127."):
        return (f"PREFECT_API_URL={url} is a loopback address: SLURM workers on compute "
                "nodes cannot reach it; start the server on an address compute nodes reach "
                "(prefect server start --host <login-node>) and export that URL "
                "(deploy/README.md)")
    return None


@contextlib.contextmanager
def open_clusters(spec: ClusterSpec) -> Iterator[Clusters]:
    """Start (or connect to) the cluster(s) of ``spec`` for the duration of a run."""
    if spec.kind == "address":
        yield Clusters(spec.address, spec.address, spec.gpu_resource)
        return
    if spec.kind == "slurm":
        if problem := _loopback_api_warning():
            log.warning(problem)
        cpu, gpu = slurm_clusters(spec.slurm_config)
        try:
            # both adaptive, counted in jobs: a job that ends (walltime lifetime, node
            # failure, scancel) is replaced; CPU jobs follow the work, GPU jobs stay at gpu_jobs
            cpu.adapt(minimum_jobs=0, maximum_jobs=spec.n_workers or 4)
            gpu.adapt(minimum_jobs=spec.gpu_jobs, maximum_jobs=spec.gpu_jobs)
            yield Clusters(cpu.scheduler_address, gpu.scheduler_address, True)
        finally:
            gpu.close()
            cpu.close()
        return
    from distributed import LocalCluster

    kwargs = dict(n_workers=spec.n_workers or default_workers(),
                  threads_per_worker=spec.threads_per_worker, processes=True,
                  memory_limit=spec.memory_limit, host="127.0.0.1",
                  dashboard_address=spec.dashboard_address)
    kwargs.update(spec.local_kwargs)
    from membrain_dist.interrupts import quiet_children

    # BLAS/OpenMP pools of threads_per_worker, the malloc tuning and the cluster's dask config;
    # workers ignore a terminal's Ctrl-C (the CLI stops them, see membrain_dist.interrupts)
    with spawn_environment(spec.threads_per_worker), quiet_children():
        cluster = LocalCluster(**kwargs)
    try:
        log.info("dask LocalCluster: %d workers, scheduler %s, dashboard %s",
                 kwargs["n_workers"], cluster.scheduler_address, dashboard_address(cluster))
        yield Clusters(cluster.scheduler_address, cluster.scheduler_address, False)
    finally:
        cluster.close()


def dashboard_address(cluster: Any) -> str:
    """The address the dashboard of a LocalCluster really listens on (``http://host:port``)."""
    try:
        socks = cluster.scheduler.http_server._sockets.values()
        names = sorted({s.getsockname()[:2] for s in socks})
    except Exception:  # noqa: BLE001 - no dashboard (bokeh missing) or another server type
        names = []
    if not names:
        return str(getattr(cluster, "dashboard_link", None) or "none")
    return ", ".join(f"http://{h if ':' not in h else f'[{h}]'}:{p}/status" for h, p in names)


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables of this process for the block, then restore them."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# glibc malloc tuning of the workers (bytes): see worker_environ
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(256 * 2**20), "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}


# dask settings of the clusters a run starts (dotted keys), see cluster_dask_config
CLUSTER_DASK_CONFIG: dict[str, Any] = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "200ms",
}


def dask_env_name(key: str) -> str:
    """The environment variable dask reads for a dotted config key."""
    return "DASK_" + key.upper().replace(".", "__").replace("-", "_")


def cluster_dask_config() -> dict[str, Any]:
    """:data:`CLUSTER_DASK_CONFIG` less what this process's environment sets explicitly.

    Two of dask's monitors are tuned for interactive work, not for a campaign that keeps every
    core busy with tasks of seconds:

    - the workers' statistical profiler samples every thread's stack each 10 ms, holding the
      GIL; its only use is the dask dashboard's Profile page (runs are monitored in Prefect).
      On 2 busy workers it cost the geometry stage 4-5 % of its throughput
      (benchmarks/geometry.py; on 1 worker nothing: the sampler ran on the idle core);
    - every scheduler, nanny and worker checks its event loop's health each 20 ms. An idle
      2-worker LocalCluster spent 0.40 s CPU per 8 s in the flow process (scheduler and
      nannies) and 0.20 s in each worker; checking each 200 ms: 0.22 s and 0.08 s. Blocked
      loops are still reported (after ``distributed.admin.tick.limit``, 3 s).

    A variable such as ``DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=True`` in the environment
    keeps dask's own setting.
    """
    return {k: v for k, v in CLUSTER_DASK_CONFIG.items() if dask_env_name(k) not in os.environ}


def worker_exports() -> dict[str, str]:
    """Environment a SLURM job script exports for its workers: heap tuning and dask config
    (a dask variable of this process's environment reaches the jobs as it is, sbatch exports
    the submitting environment)."""
    return {**MALLOC_ENV, **{dask_env_name(k): str(v) for k, v in cluster_dask_config().items()}}


def worker_environ(threads: int) -> dict[str, str]:
    """Environment of spawned dask workers: dask's, with glibc's heap tuned for big temporaries.

    dask sets ``MALLOC_TRIM_THRESHOLD_=65536`` (and a parent process may carry it). Setting
    it switches off glibc's dynamic mmap threshold, so every array temporary above 128 kB is
    a fresh ``mmap`` whose pages are faulted in and zeroed again: the geometry stage ran at
    half speed in such workers (benchmarks/scale.py: ~3 k against ~6 k points/s; a numpy
    loop of 800 kB temporaries: 29.9 s against 17.8 s). An unset variable cannot be passed
    down, so both thresholds are set explicitly: temporaries up to 32 MiB reuse the heap,
    larger ones are mapped and unmapped, and free heap above 256 MiB is returned to the OS
    (16.2 s on that loop). Task memory stays bounded by the membrane's box.
    """
    import dask

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    env.update(MALLOC_ENV)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


@contextlib.contextmanager
def spawn_environment(threads: int) -> Iterator[dict[str, str]]:
    """Workers spawned in this block (LocalCluster nannies) get :func:`worker_environ`, and
    schedulers, nannies and workers created in it :func:`cluster_dask_config`.

    The nanny lets a variable of this process win over its pre-spawn config, so both are set;
    it hands its worker the dask config of this process as it was when the nanny was created
    (a worker's own environment loses to it), so that config is set here too. Restarted
    workers keep what their nanny read at start.
    """
    import dask

    env = worker_environ(threads)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env, **cluster_dask_config()}), \
            _environ(env):
        yield env


def task_runner(address: str):  # -> CampaignTaskRunner
    """A DaskTaskRunner on an already running scheduler (:mod:`flows.runner`: less CPU per
    submitted task)."""
    from .runner import CampaignTaskRunner

    return CampaignTaskRunner(address=address)


def manifest_run_name() -> str:
    """Flow run name: the manifest's file name (without .csv) and the local start time,
    e.g. ``watched-2026-12-04T02:00:03`` (Prefect would pick two random words)."""
    from datetime import datetime

    from prefect.runtime import flow_run

    try:
        manifest = (flow_run.parameters or {}).get("manifest")
    except Exception:  # noqa: BLE001 - outside a run: a name without the manifest
        manifest = None
    stem = Path(str(manifest)).stem if manifest else "run"
    return f"{stem}-{datetime.now():%Y-%m-%dT%H:%M:%S}"
