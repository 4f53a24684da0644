"""One writer per output folder or store: a lock file holding the writer's host and PID.

``with output_lock(folder):`` creates ``<folder>/.membrain-dist.lock`` exclusively
(``O_CREAT | O_EXCL``) and removes it on exit. A second writer gets an :class:`InputError`
naming the folder and the holder (host, PID, command, start time). A lock whose holder is dead
(same host, PID gone or reused by a younger process) is taken over with a warning, so a run
killed with SIGKILL does not block the next one. A lock written on another host is never taken
over: that host may still be writing (shared filesystems); the message says which file to
remove if that run is gone.

A store directory is locked with a sibling file ``.<store name>.lock`` (outside the store's
own key space, so zarr never lists it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError

__all__ = ["LOCK_FILE", "output_lock", "held_locks", "release_all", "lock_path"]

log = logging.getLogger(__name__)

LOCK_FILE = ".membrain-dist.lock"

_held: dict[Path, int] = {}  # lock file -> pid that wrote it (this process)
_guard = threading.Lock()


def lock_path(target: str | os.PathLike, kind: str = "folder") -> Path:
    """The lock file of an output folder (inside it) or of a store (a sibling file)."""
    p = Path(target).absolute()
    if kind == "store":
        return p.parent / f".{p.name}.lock"
    return p / LOCK_FILE


def _create_time(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # noqa: BLE001 - no psutil, no such process, no permission
        return None


def _alive(pid: int, started: float | None) -> bool:
    """Whether ``pid`` on this host is the process that wrote the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    if started is not None:
        ct = _create_time(pid)
        if ct is not None and ct > started + 1.0:  # the PID was reused by a younger process
            return False
    return True


def _describe(info: dict) -> str:
    when = info.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if when else "?"
    return (f"PID {info.get('pid')} on host {info.get('host')} since {since} "
            f"({info.get('command', '?')})")


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _acquire(path: Path, target: Path) -> None:
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": _create_time(os.getpid()) or time.time(),
          "command": " ".join(["membrain-dist", *sys.argv[1:]])[:300]}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = _read(path)
            if info is None:  # removed meanwhile: try again
                continue
            if not info:  # being written this instant, or garbage
                time.sleep(0.2)
                info = _read(path)
                if info is None:
                    continue
            if info and info.get("host") == me["host"] and info.get("pid") == me["pid"]:
                raise InputError(target, "is already being written by this process") from None
            if (info and info.get("host") == me["host"] and isinstance(info.get("pid"), int)
                    and not _alive(info["pid"], info.get("started"))):
                log.warning("%s: taking over the lock of a run that is gone (%s)", target,
                            _describe(info))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            holder = _describe(info) if info else "an unreadable lock file"
            raise InputError(target, f"another membrain-dist run is writing here: {holder}; "
                                     f"wait for it to finish, or remove {path} if that run "
                                     "is gone") from None
        except FileNotFoundError:
            raise InputError(target, "cannot create the lock file: the folder does not "
                                     "exist") from None
        except OSError as exc:
            raise InputError(target, f"not writable ({exc.strerror or exc})") from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        with _guard:
            _held[path] = os.getpid()
        return
    raise InputError(target, f"could not take the lock {path} (it keeps changing)")


def _release(path: Path) -> None:
    with _guard:
        pid = _held.pop(path, None)
    if pid != os.getpid():
        return
    info = _read(path)
    if info and info.get("pid") == pid and info.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, kind: str = "folder") -> Iterator[Path]:
    """Hold the lock of an output folder (``kind="folder"``, which must exist) or of a store
    (``kind="store"``: its parent folder must exist) for the block."""
    t = Path(target).absolute()
    path = lock_path(t, kind)
    _acquire(path, t)
    try:
        yield path
    finally:
        _release(path)


def held_locks() -> list[Path]:
    with _guard:
        return list(_held)


def release_all() -> None:
    """Remove every lock this process holds (an interrupt handler about to ``os._exit``)."""
    for path in held_locks():
        _release(path)
