"""The task runner the flows submit through: prefect-dask's, less the costs Prefect repeats for
every task.

Profiled (py-spy) on a streamed 12-tomogram campaign (``benchmarks/campaign.py`` part (a), ~170
tasks, 2 cores), prefect-dask spent per task, on top of the task itself:

- in the flow process, ~46 ms of CPU in ``submit``: ~27 ms serializing the whole Prefect
  settings model (the task carries the flow's context to its worker, settings included, dumped
  anew each time although they do not change within a run) and ~12 ms tokenizing the task and
  its arguments for a dask key (a *pure* task's key is a hash of its content; a task run's
  arguments hold its fresh ``task_run_id``, so the key is unique anyway: PrefectHQ/prefect#18191);
- in the worker, ~90 ms before the task's function starts: the settings model rebuilt from
  that dump (pydantic-settings re-reads every source) and two to three new API clients, each
  loading the CA bundle into a fresh SSL context (~15 ms each), although the API is the same
  for every task.

Here the settings are dumped once per settings object (:class:`SettingsSnapshot`) and sent with
a token; each worker thread rebuilds them, and opens one API client, once per token and reuses
both (:func:`run_on_worker`); tasks are submitted impure, keyed by their task run id. The task
runs through Prefect's own engine (``run_task_sync``): the same task runs, states, retries and
logs in the Prefect API, on the same workers.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Set
from typing import Any

import distributed
from prefect.context import SettingsContext, SyncClientContext, serialize_context
from prefect.task_engine import run_task_sync
from prefect.utilities.engine import collect_task_run_inputs_sync
from prefect_dask import DaskTaskRunner
from prefect_dask.task_runners import PrefectDaskFuture
from pydantic import PrivateAttr

__all__ = ["CampaignTaskRunner", "SettingsSnapshot", "run_on_worker"]


class SettingsSnapshot(SettingsContext):
    """A settings context whose :meth:`serialize` is computed once (settings are immutable; the
    dict it returns is shared: read it, do not change it) and named by a random ``token``."""

    _serialized: dict[bool, dict[str, Any]] = PrivateAttr(default_factory=dict)
    _name: str = PrivateAttr(default_factory=lambda: uuid.uuid4().hex)  # (_token: the context's)

    @property
    def token(self) -> str:
        return self._name

    def serialize(self, include_secrets: bool = True) -> dict[str, Any]:
        if include_secrets not in self._serialized:
            self._serialized[include_secrets] = super().serialize(include_secrets=include_secrets)
        return self._serialized[include_secrets]


class CampaignTaskRunner(DaskTaskRunner):
    """``DaskTaskRunner`` that submits each synchronous Prefect task as
    :func:`run_on_worker` (see the module doc); asynchronous ones (the flows have none) as
    prefect-dask does."""

    _snapshot: SettingsSnapshot | None = None

    def _settings(self) -> SettingsSnapshot:
        """A snapshot of the settings in force now (a new one when they changed)."""
        current = SettingsContext.get()
        if current is None:
            raise RuntimeError("no Prefect settings context")
        snap = self._snapshot
        if snap is None or snap.settings is not current.settings:
            snap = SettingsSnapshot(profile=current.profile, settings=current.settings)
            self._snapshot = snap
        return snap

    def submit(self, task: Any, parameters: dict[str, Any],
               wait_for: Iterable[Any] | None = None,
               dependencies: dict[str, Set[Any]] | None = None) -> PrefectDaskFuture:
        if task.isasync:  # not one of ours: prefect-dask's own path
            return super().submit(task, parameters, wait_for, dependencies)
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        parameters = self._optimize_futures(parameters)
        wait_for = self._optimize_futures(wait_for) if wait_for else None
        snap = self._settings()
        task_run_id = uuid.uuid4()
        inputs = {k: collect_task_run_inputs_sync(v, future_cls=distributed.Future)
                  for k, v in parameters.items()}
        if dependencies:
            inputs = {k: v.union(dependencies.get(k, set())) for k, v in inputs.items()}
        with snap.model_copy():  # a copy per call: submit may run in several threads
            context = serialize_context(asset_ctx_kwargs={
                "task": task, "task_run_id": task_run_id, "task_inputs": inputs,
                "copy_to_child_ctx": True})
        context = {k: v for k, v in context.items() if k != "settings_context"}
        future = self.client.submit(
            run_on_worker, task, snap.token, snap.serialize(),
            key=f"{getattr(task.fn, '__name__', 'task')}-{task_run_id.hex}",
            task_run_id=task_run_id, parameters=parameters, wait_for=wait_for,
            dependencies=inputs, context=context, return_type="state")
        return PrefectDaskFuture(wrapped_future=future, task_run_id=task_run_id)


_THREAD = threading.local()


def _thread_contexts(token: str, settings: dict[str, Any]
                     ) -> tuple[SettingsContext, SyncClientContext]:
    """This thread's settings and API client for the settings named ``token``: built on the
    thread's first task with them and kept (a client opened once; the one of older settings
    closed)."""
    cached = getattr(_THREAD, "contexts", None)
    if cached is not None and cached[0] == token:
        return cached[1], cached[2]
    settings_ctx = SettingsContext(**settings)  # as Prefect's hydrated_context builds it
    with settings_ctx:
        client_ctx = SyncClientContext()  # its client talks to these settings' API
        client_ctx.__enter__()  # opens the client (and checks the API version) once
    if cached is not None:
        cached[2].client.__exit__(None, None, None)
    _THREAD.contexts = (token, settings_ctx, client_ctx)
    return settings_ctx, client_ctx


def run_on_worker(task: Any, token: str, settings: dict[str, Any], **kwargs: Any) -> Any:
    """Run one Prefect task run on a dask worker (``run_task_sync``, as prefect-dask does),
    inside this thread's cached settings and API client (Prefect's engine takes the client in
    force, ``SyncClientContext.get``, and rebuilds no settings: the context comes without
    them)."""
    settings_ctx, client_ctx = _thread_contexts(token, settings)
    with settings_ctx:
        var = SyncClientContext.__var__.set(client_ctx)
        try:
            return run_task_sync(task, **kwargs)
        finally:
            SyncClientContext.__var__.reset(var)
