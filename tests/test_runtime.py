"""The local dask cluster that the flows open by default."""

import os

import pytest

from flows.runtime import MALLOC_ENV, ClusterSpec, dask_env_name, open_clusters


def _env() -> tuple[str | None, str | None, str | None]:
    return (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            os.environ.get("OMP_NUM_THREADS"))


def test_local_workers_get_the_malloc_tuning(monkeypatch):
    """dask's MALLOC_TRIM_THRESHOLD_=65536 halves the geometry stage's speed: workers get the
    tuned thresholds whatever the parent carries, and one BLAS/OpenMP thread per thread."""
    from distributed import Client

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # as a parent process may carry
    with open_clusters(ClusterSpec(n_workers=2, threads_per_worker=1)) as cl, \
            Client(cl.cpu_address) as client:
        envs = client.run(_env)
    assert len(envs) == 2
    assert set(envs.values()) == {
        (MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"], MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"], "1")}
    assert MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"] != "65536"


def _monitors(dask_worker) -> tuple[bool, bool, str]:
    """(profiler config, whether the worker has a stack sampler, tick interval) in a worker."""
    import dask

    return (bool(dask.config.get("distributed.worker.profile.enabled")),
            "profile" in dask_worker.periodic_callbacks,
            str(dask.config.get("distributed.admin.tick.interval")))


@pytest.mark.parametrize("user_value, expected", [(None, False), ("True", True)])
def test_local_workers_monitors_tuned_unless_asked(monkeypatch, user_value, expected):
    """dask's 10 ms stack sampler costs the geometry stage 4-5 % on busy cores and the 20 ms
    event-loop check half of an idle cluster's CPU: the campaign's workers run without the
    sampler and check each 200 ms, unless the environment sets the sampler explicitly."""
    from distributed import Client

    key = "distributed.worker.profile.enabled"
    assert dask_env_name(key) == "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"
    if user_value is None:
        monkeypatch.delenv(dask_env_name(key), raising=False)
    else:
        monkeypatch.setenv(dask_env_name(key), user_value)
    with open_clusters(ClusterSpec(n_workers=1, threads_per_worker=1)) as cl, \
            Client(cl.cpu_address) as client:
        (state,) = client.run(_monitors).values()
    assert state == (expected, expected, "200ms")


def test_job_script_exports_leave_a_user_setting(monkeypatch):
    """SLURM jobs get the dask settings as exports, except one the submitting environment sets
    (sbatch passes that on as it is); the heap tuning is always exported."""
    from flows.runtime import worker_exports

    name = dask_env_name("distributed.worker.profile.enabled")
    monkeypatch.delenv(name, raising=False)
    assert worker_exports()[name] == "False"
    monkeypatch.setenv(name, "True")
    exports = worker_exports()
    assert name not in exports
    assert exports[dask_env_name("distributed.admin.tick.interval")] == "200ms"
    assert set(MALLOC_ENV) <= set(exports)
