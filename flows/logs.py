"""The library's own log lines (``membrain_dist.*``) in the Prefect run logs.

Prefect sends the records of its run loggers (``get_run_logger()``) to the API; the library
logs through plain ``logging`` (per tomogram: "converted ...", "... points", "... particles",
QC figures, skipped stages) and those records never reached the dashboard.
:func:`forward_library_logs` attaches one :class:`RunLogForwarder` to the ``membrain_dist``
logger of this process: every record of level INFO and above that is emitted while a Prefect
flow or task run is active in this thread (the flow process, or a dask worker running a
task) goes to the API with that run's ids. Outside a run (``--sequential``, the CLI's own
checks) it does nothing.

Called when a flow starts and when :mod:`flows.tasks` is imported, which happens in every dask
worker that runs one of its tasks.
"""

from __future__ import annotations

import logging

LIBRARY_LOGGER = "membrain_dist"


class RunLogForwarder(logging.Handler):
    """Hands records emitted inside a Prefect run to Prefect's ``APILogHandler``."""

    membrain_forwarder = True  # how forward_library_logs finds an installed one

    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__(level)
        self._api: logging.Handler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from prefect.context import FlowRunContext, TaskRunContext

            if TaskRunContext.get() is None and FlowRunContext.get() is None:
                return
            if self._api is None:
                from prefect.logging.handlers import APILogHandler

                self._api = APILogHandler()
            self._api.handle(record)
        except Exception:  # noqa: BLE001 - logging must never break a stage
            self.handleError(record)


def forward_library_logs(level: int = logging.INFO) -> None:
    """Install the forwarder on the ``membrain_dist`` logger once per process, and let that
    logger pass records of ``level`` (a process whose root logger is at WARNING, such as a
    dask worker or a deployment's flow process, would otherwise drop them before any
    handler)."""
    logger = logging.getLogger(LIBRARY_LOGGER)
    if not any(getattr(h, "membrain_forwarder", False) for h in logger.handlers):
        logger.addHandler(RunLogForwarder(level))
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(min(level, logging.getLogger().getEffectiveLevel()))
