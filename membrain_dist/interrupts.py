"""SIGINT / SIGTERM for the command line: stop within seconds, leave nothing running.

:func:`install` (the CLI calls it once) handles both signals. On the first one

1. one line is printed saying what is kept (finished work is stored atomically; a rerun
   resumes),
2. this process's logging and stderr are silenced (a Prefect flow whose API is going away
   would otherwise print hundreds of lines of connection errors),
3. every descendant process (dask workers, the temporary Prefect server) gets SIGTERM,
4. :class:`Interrupted` is raised in the main thread, so ``finally`` blocks run (temporary
   store keys removed, clusters closed, locks released),
5. a watchdog kills the descendants that are left and, should the unwinding hang (a flow
   engine retrying its dead API), removes the locks and ends the process with ``os._exit``
   after :data:`GRACE_S` seconds.

Steps 1-3 and 5 run from a thread reading the signal wakeup fd, so they happen at once even
while a Prefect flow has replaced the SIGTERM handler with its own (which reports a crash
through the API before it passes the signal on). The exit status is ``128 + signal``: 130 for
SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

__all__ = ["Interrupted", "install", "restore", "set_kept", "stopping", "reap_children",
           "GRACE_S", "quiet_children"]

GRACE_S = 3.0

_state: dict = {"signum": None, "raised": False,
                "kept": "finished work is kept; rerun to resume"}
_lock = threading.Lock()


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """Raised in the main thread by the SIGINT / SIGTERM handler."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(signal.Signals(signum).name)


def _children():
    try:
        import psutil

        return psutil.Process().children(recursive=True)
    except Exception:  # noqa: BLE001
        return []


def reap_children(timeout: float = 3.0) -> None:
    """SIGTERM every descendant, wait up to ``timeout`` s, then SIGKILL the survivors."""
    try:
        import psutil
    except ImportError:
        return
    procs = _children()
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=1.0)


def _silence() -> None:
    logging.disable(logging.CRITICAL)
    try:
        sys.stderr.flush()
        devnull = open(os.devnull, "w")  # noqa: SIM115 - lives until the process ends
        sys.stderr = devnull
        os.dup2(devnull.fileno(), 2)
    except (OSError, ValueError):
        pass


def _watchdog(code: int) -> None:
    deadline = time.monotonic() + GRACE_S
    reap_children(timeout=1.5)
    time.sleep(max(0.0, deadline - time.monotonic()))
    from .lock import release_all

    release_all()
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


def _begin_stop(signum: int) -> bool:
    """Steps 1-3 and 5 of the module docstring, once; False when already stopping."""
    with _lock:
        if _state["signum"] is not None:
            return False
        _state["signum"] = signum
    try:
        name = signal.Signals(signum).name
        print(f"membrain-dist: {name} received: stopping; {_state['kept']}", file=sys.stderr,
              flush=True)
    except (OSError, ValueError):
        pass
    _silence()
    for p in _children():
        try:
            p.terminate()
        except Exception:  # noqa: BLE001 - exited meanwhile
            pass
    threading.Thread(target=_watchdog, args=(128 + signum,), name="membrain-interrupt",
                     daemon=True).start()
    return True


def _handler(signum: int, frame) -> None:  # noqa: ANN001
    _begin_stop(signum)
    if not _state["raised"]:
        _state["raised"] = True
        raise Interrupted(_state["signum"])


def _listen(sock: socket.socket) -> None:
    """Every signal this process catches is written to the wakeup fd, whichever Python
    handler is installed at the time."""
    while True:
        try:
            data = sock.recv(64)
        except OSError:
            return
        if not data:
            return
        for b in data:
            if b in (signal.SIGINT, signal.SIGTERM):
                _begin_stop(int(b))


def stopping() -> int | None:
    """The exit status while a signal is being handled (128 + its number), else None."""
    sig = _state["signum"]
    return None if sig is None else 128 + sig


def install(kept: str | None = None) -> dict:
    """Handle SIGINT and SIGTERM as described in the module docstring (main thread only);
    returns what :func:`restore` needs."""
    if kept:
        _state["kept"] = kept
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict = {sig: signal.signal(sig, _handler)
                      for sig in (signal.SIGINT, signal.SIGTERM)}
    r, w = socket.socketpair()
    w.setblocking(False)
    try:
        previous["wakeup"] = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
    except ValueError:
        r.close()
        w.close()
        return previous
    previous["socks"] = (r, w)
    threading.Thread(target=_listen, args=(r,), name="membrain-signals", daemon=True).start()
    return previous


def restore(previous: dict) -> None:
    """Put back what :func:`install` replaced (a CLI called in-process, by tests)."""
    if _state["signum"] is not None:
        return  # stopping: keep ignoring repeated signals until the process ends
    if "wakeup" in previous:
        signal.set_wakeup_fd(previous["wakeup"])
    for sig in (signal.SIGINT, signal.SIGTERM):
        if previous.get(sig) is not None:
            signal.signal(sig, previous[sig])
    for sock in previous.get("socks", ()):
        sock.close()


def set_kept(kept: str) -> None:
    """What the interrupt line says is kept (e.g. the store and output folders)."""
    _state["kept"] = kept


class quiet_children:  # noqa: N801 - used as a context manager
    """Processes started in this block ignore SIGINT (inherited ``SIG_IGN``).

    A Ctrl-C in a terminal reaches the whole foreground process group; dask worker processes
    would each die printing a traceback. The CLI's handler stops them instead (SIGTERM)."""

    def __enter__(self):
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
