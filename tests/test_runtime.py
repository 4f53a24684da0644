"""The local dask cluster that the flows open by default."""

import os

from flows.runtime import ClusterSpec, open_clusters


def _env() -> tuple[str | None, str | None]:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")


def test_local_workers_keep_glibc_default_trimming():
    """dask's MALLOC_TRIM_THRESHOLD_ halves the geometry stage's speed; workers run without it
    and with one BLAS/OpenMP thread per worker thread."""
    from distributed import Client

    with open_clusters(ClusterSpec(n_workers=2, threads_per_worker=1)) as cl, \
            Client(cl.cpu_address) as client:
        envs = client.run(_env)
    assert len(envs) == 2
    assert set(envs.values()) == {(None, "1")}
