"""flows.runner: the flows' task runner (real dask workers, a real temporary Prefect API).

Its tasks must behave as prefect-dask's: task runs and their final states in the API, retries,
the flow's settings on the worker; what it saves (settings dumped once, one API client per
worker thread) must hold across tasks."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.timeout(300)


def test_settings_snapshot_is_kept_until_the_settings_change():
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from flows.runner import CampaignTaskRunner

    runner = CampaignTaskRunner(address="tcp://127.0.0.1:1")  # never started: no connection
    first = runner._settings()
    assert runner._settings() is first
    assert first.serialize() is first.serialize()  # dumped once
    with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 9}):
        changed = runner._settings()
        assert changed is not first and changed.token != first.token
        assert changed.serialize()["settings"]["client"]["max_retries"] == 9
    assert runner._settings() is not changed


def test_tasks_run_report_retry_and_reuse_one_client_per_worker_thread(tmp_path):
    from distributed import LocalCluster
    from prefect import flow, get_client, task
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.context import SyncClientContext
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, get_current_settings, temporary_settings

    from flows.runtime import prefect_api, task_runner

    marker = tmp_path / "failed-once"

    @task(name="probe", retries=1, retry_delay_seconds=0)
    def probe(i: int) -> tuple:
        import os
        import threading

        if i == 0 and not marker.exists():  # the first attempt of task 0 fails
            marker.write_text("x")
            raise RuntimeError("first attempt")
        client = SyncClientContext.get().client
        return (os.getpid(), threading.get_ident(), id(client),
                get_current_settings().client.max_retries)

    with prefect_api(), LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                     dashboard_address=None) as cluster:
        @flow(name="runner-probe", task_runner=task_runner(cluster.scheduler_address))
        def probe_flow() -> list:
            futures = [probe.submit(i) for i in range(4)]
            return [f.result() for f in futures]

        # a setting of this process only (not in the workers' environment) reaches the tasks
        with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 7}):
            state = probe_flow(return_state=True)
            results = state.result()
        # the server records task run states from the tasks' events, asynchronously: wait
        # (at most 60 s) until all four are there in a final state
        deadline = time.monotonic() + 60
        with get_client(sync_client=True) as client:
            while True:
                runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
                if (len(runs) == 4 and all(r.state is not None and r.state.is_final()
                                           for r in runs)) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)

    assert state.is_completed()
    assert [r[3] for r in results] == [7, 7, 7, 7]
    # one worker, one thread: every task on it used the same API client
    assert len({(r[0], r[1]) for r in results}) == 1
    assert len({r[2] for r in results}) == 1
    # every task run is in the API, completed; task 0 after one retry
    assert len(runs) == 4 and all(r.state.is_completed() for r in runs)
    assert sorted(r.run_count for r in runs) == [1, 1, 1, 2]
    assert marker.exists()
