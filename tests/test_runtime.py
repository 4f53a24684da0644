"""The local dask cluster that the flows open by default."""

import os

from flows.runtime import MALLOC_ENV, ClusterSpec, open_clusters


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
