"""One writer per file: an exclusive lock file next to the cube, ``FILE.lock``.

HDF5's own file locking stays off by default (``HDF5_USE_FILE_LOCKING``): shared file systems
break it.  Every command that writes a cube file takes :func:`write_lock` first:

* rank 0 creates ``FILE.lock`` with ``O_CREAT | O_EXCL`` and writes who holds it (PID, host,
  process start time, command, since); every rank gets rank 0's verdict;
* a lock held by a live process is an :class:`~cubefit_mpi.config.errors.InputError` (exit 2)
  naming the holder; a stale one (its PID gone, or reused by another process, on this host) is
  broken with a warning; one held on another host cannot be checked and is refused with the
  command that removes it;
* it is released on every way out: normal return, an exception, ``WriteFailure`` (before
  ``os._exit``) and ``MPI_Abort`` (by whichever rank aborts: the lock file names the job).

Readers (``status``, ``watch``, ``validate``, ``plot``) never take it.  Collective over comm.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager

from ..config.errors import InputError
from ..parallel.collectives import agree
from ..parallel.comm import forget_on_abort, on_abort

_LOG = logging.getLogger("cubefit_mpi.io")
SUFFIX = ".lock"
_HELD: dict[str, int] = {}          # lock path -> nesting depth in this process
UNREADABLE_STALE_SEC = 60.0         # an empty or unreadable lock file older than this is stale


def lock_path(path) -> str:
    """``FILE.lock`` next to ``FILE`` (absolute).  Local."""
    return os.path.abspath(os.fspath(path)) + SUFFIX


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), or None.  Local."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode(errors="replace")
        return text[text.rindex(")") + 2:].split()
    except (OSError, ValueError):
        return None


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (``/proc/PID/stat`` field 22), or None.  Local."""
    fields = _proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def read_holder(path) -> dict | None:
    """What ``FILE.lock`` says (pid, host, command, since, ...), or None when there is none.  Local."""
    try:
        with open(lock_path(path), encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        return holder if isinstance(holder, dict) else {"raw": text}
    except ValueError:
        return {"raw": text}


def describe(holder: dict) -> str:
    """``PID 123 on host node1 (cubefit_mpi build, since 2024-01-01T10:00:00)``.  Local."""
    if "pid" not in holder:
        return f"an unreadable lock ({holder.get('raw', '')[:60]!r})"
    return (f"PID {holder['pid']} on host {holder.get('host', '?')} "
            f"(cubefit_mpi {holder.get('command', '?')}, since {holder.get('since', '?')})")


def holder_alive(holder: dict) -> bool | None:
    """True/False for a holder on this host (False: PID gone or reused), None when it cannot be told.  Local."""
    if holder.get("host") != socket.gethostname() or "pid" not in holder:
        return None
    pid = int(holder["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if fields is not None and fields[0] in ("Z", "X"):      # killed, not yet reaped: gone
        return False
    started = holder.get("started")
    return started is None or _start_time(pid) in (None, started)


def _age(lock: str) -> float:
    try:
        return time.time() - os.stat(lock).st_mtime
    except OSError:
        return 0.0


def _try_create(lock: str, content: str) -> bool:
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(content)
    return True


def _acquire(path, command: str) -> tuple[str | None, str | None]:
    """Rank 0: create the lock; returns (token, None) or (None, the refusal).  Local."""
    lock = lock_path(path)
    pid = os.getpid()
    token = uuid.uuid4().hex
    content = json.dumps({"pid": pid, "host": socket.gethostname(), "started": _start_time(pid),
                          "command": command, "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "token": token})
    for _ in range(3):
        try:
            if _try_create(lock, content):
                return token, None
        except OSError as exc:
            return None, f"{path}: cannot create the lock file {lock} ({exc.strerror})"
        holder = read_holder(path)
        if holder is None:
            continue                                  # released meanwhile: try again
        alive = holder_alive(holder)
        if "pid" not in holder and _age(lock) > UNREADABLE_STALE_SEC:
            alive = False                             # a writer killed between creating and filling it
        if alive is False:
            _LOG.warning("%s: broke the stale lock of %s: that process is gone", path, describe(holder))
            try:
                os.remove(lock)
            except FileNotFoundError:
                pass
            continue
        if alive is None:
            return None, (f"{path}: locked by {describe(holder)}, which cannot be checked from "
                          f"{socket.gethostname()}; if that job has ended, remove {lock} and rerun")
        return None, f"{path}: being written by {describe(holder)}; wait for it to finish (or stop it) and rerun"
    return None, f"{path}: could not take the lock {lock} (it keeps changing hands)"


def _release(path, token: str) -> None:
    """Remove ``FILE.lock`` if it is still ours.  Local."""
    holder = read_holder(path)
    if holder is not None and holder.get("token") == token:
        try:
            os.remove(lock_path(path))
        except FileNotFoundError:
            pass


@contextmanager
def write_lock(path, command: str, comm):
    """Hold the one-writer lock of ``path`` for the block.  Collective over comm.

    Re-entrant within a process (a step of ``run`` inside the lock ``run`` took).  Raises
    :class:`InputError` (exit 2) naming the holder when another process writes the file.
    """
    lock = lock_path(path)
    if _HELD.get(lock):
        _HELD[lock] += 1
        try:
            yield
        finally:
            _HELD[lock] -= 1
        return
    token, refusal = _acquire(path, command) if comm.Get_rank() == 0 else (None, None)
    token, refusal = agree((token, refusal), comm)
    if refusal is not None:
        raise InputError(refusal)

    def release():
        _release(path, token)

    _HELD[lock] = 1
    on_abort(release)
    try:
        yield
    finally:
        _HELD.pop(lock, None)
        forget_on_abort(release)
        if comm.Get_rank() == 0:
            release()

