"""Stage helper: the fit tracker, a non-blocking SWMR sidecar of a running solve.

Rank 0 of a solve creates a :class:`FitTracker`; the other ranks get the same object inactive
(every method returns at once).  The solver pushes small messages (RMSE samples, progress,
``x`` snapshots) into a bounded queue without ever waiting: when the queue is full the message
is dropped and counted.  A separate writer drains the queue into
``<main>.fit.<jobid-or-pid>.<YYYYmmddTHHMMSS>.h5`` next to the main file, in HDF5 SWMR mode, so
``cubefit_mpi watch`` or any reader can follow it live.

The writer is a separate Python process by default (``FITTRACKER_START`` = ``spawn``,
``forkserver`` or ``fork``: all give a fresh interpreter fed through a pipe), or a thread of
the solver process (``thread``).  A process is the default because h5py serialises all HDF5
calls of a process behind one lock: a writer thread stalled on a slow disk would also stall the
solver's own HDF5 reads.  ``multiprocessing`` is not used: its spawn/forkserver children re-run
the user's main script (which usually starts MPI) and forking an MPI rank is unsafe.

The sidecar's layout and readers are in :mod:`cubefit_mpi.io.tracker_sidecar`.
"""
from __future__ import annotations

import atexit
import datetime as _dt
import logging
import os
import queue as _queue
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ..config.knobs import get_knobs
from ..io.tracker_sidecar import EWMA_ALPHA, LAYOUT, SNAPSHOT_HISTORY, SidecarWriter, sidecar_path
from ..parallel.launcher import child_environment

_LOG = logging.getLogger("cubefit_mpi.tracker")
START_TIMEOUT = 60.0                 # seconds to wait for the writer to create the sidecar
_ABANDONED: list = []                # sidecar writers whose writes failed (never closed)


# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# the writer (runs in a thread or a process; owns the sidecar file)
# ---------------------------------------------------------------------------------------------


def _writer_loop(path, meta, settings, msgs, report) -> bool:
    """Drain ``msgs`` into the sidecar until ``("close", status, dropped)`` (or ``("eof",)``); True
    when a write failed (the sidecar was then abandoned and the messages after it dropped).

    ``report(error)`` is called once: with None when the sidecar exists, else with the error.
    """
    try:
        writer = SidecarWriter(path, meta, settings["file_locking"])
    except Exception as exc:
        from ..io.h5file import write_reason

        report(f"{type(exc).__name__}: {write_reason(exc)}")
        return True
    report(None)
    since_flush, last_flush = 0, time.monotonic()
    poll = max(0.05, min(0.5, settings["flush_sec"] or 0.5))
    failed = False

    def attempt(action, *args) -> bool:
        """Run a write; a failure (a full disk) stops the tracking, never the solve."""
        try:
            action(*args)
            return False
        except Exception as exc:                 # noqa: BLE001 -- reported on one line below
            from ..io.h5file import write_reason

            _ABANDONED.append(writer)            # not closed: HDF5 may not survive closing it now
            sys.stderr.write(f"WARNING cubefit_mpi.tracker: writing {path} failed ({write_reason(exc)}); "
                             f"the solve goes on without its fit tracker\n")
            sys.stderr.flush()
            return True

    while True:
        try:
            msg = msgs.get(timeout=poll)
        except _queue.Empty:
            msg = None
        if msg is not None:
            if msg[0] in ("close", "eof"):       # eof: the solver process is gone
                if not failed:
                    failed = attempt(writer.finish, *(msg[1:] if msg[0] == "close" else ("orphaned", -1)))
                return failed
            if not failed:
                failed = attempt(writer.handle, msg)
            since_flush += 1
        now = time.monotonic()
        if since_flush and (since_flush >= settings["flush_every"] or now - last_flush >= settings["flush_sec"]):
            if not failed:
                failed = attempt(writer.flush)
            since_flush, last_flush = 0, now


def writer_process_main() -> None:
    """Body of a writer process: messages arrive pickled on stdin, ``ready`` goes to stdout."""
    import pickle

    from ..io.h5file import quiet_write_errors

    quiet_write_errors()                         # a full disk is reported once, by _writer_loop
    stdin = sys.stdin.buffer
    path, meta, settings = pickle.load(stdin)
    local: _queue.Queue = _queue.Queue(maxsize=settings["qsize"])   # full: back-pressure on the pipe

    def read_pipe():
        try:
            while True:
                msg = pickle.load(stdin)
                local.put(msg)
                if msg[0] == "close":
                    return
        except Exception:                        # EOF or a torn message: the solver died
            local.put(("eof",))

    def report(error):
        sys.stdout.write("ready\n" if error is None else f"error {error}\n")
        sys.stdout.flush()
        if error is not None:                    # reported once; HDF5 freeing the half-made file says no more
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)

    threading.Thread(target=read_pipe, daemon=True).start()
    if _writer_loop(path, meta, settings, local, report):
        os._exit(0)                              # a failed sidecar is abandoned, not closed


class _ThreadWriter:
    """The writer as a thread of the solver process."""

    pid = None

    def __init__(self, path, meta, settings):
        self.queue: _queue.Queue = _queue.Queue(maxsize=settings["qsize"])
        self._ready = threading.Event()
        self.error = None
        self._thread = threading.Thread(target=_writer_loop, name="cubefit-fit-tracker", daemon=True,
                                        args=(path, meta, settings, self.queue, self._report))
        self._thread.start()
        self._ready.wait(START_TIMEOUT)
        if not self._ready.is_set():
            self.error = "writer thread did not start"

    def _report(self, error):
        self.error = error
        self._ready.set()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def stop(self) -> None:
        pass                                     # a daemon thread ends with the process


class _ProcessWriter:
    """The writer as a fresh Python process fed through a pipe by a feeder thread.

    A fresh interpreter (not ``multiprocessing``) because a spawned or forkserver child re-runs
    the user's main script, which under MPI usually starts MPI in the child; and forking an MPI
    rank is unsafe.  The child never imports mpi4py.
    """

    def __init__(self, path, meta, settings):
        import pickle
        import select
        import subprocess

        self.queue: _queue.Queue = _queue.Queue(maxsize=settings["qsize"])
        self.error = None
        env = child_environment()
        env["HDF5_USE_FILE_LOCKING"] = "TRUE" if settings["file_locking"] else "FALSE"
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from cubefit_mpi.stages.tracker import writer_process_main; writer_process_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        self.pid = self._proc.pid
        self._pickle = pickle
        try:
            pickle.dump((path, meta, settings), self._proc.stdin)
            self._proc.stdin.flush()
        except OSError as exc:
            self.error = f"cannot start the writer process ({exc})"
            return
        ready, _, _ = select.select([self._proc.stdout], [], [], START_TIMEOUT)
        line = self._proc.stdout.readline().decode(errors="replace").strip() if ready else ""
        if line != "ready":
            self.error = line[len("error "):] if line.startswith("error ") else "writer process did not start"
            return
        self._feeder = threading.Thread(target=self._feed, name="cubefit-fit-tracker-feeder", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        while True:
            msg = self.queue.get()
            try:
                self._pickle.dump(msg, self._proc.stdin, protocol=self._pickle.HIGHEST_PROTOCOL)
                self._proc.stdin.flush()
            except (OSError, ValueError):        # the writer died: stop feeding, messages will drop
                return
            if msg[0] == "close":
                self._proc.stdin.close()
                return

    def alive(self) -> bool:
        return self._proc.poll() is None and self.error is None and self._feeder.is_alive()

    def join(self, timeout: float) -> None:
        try:
            self._proc.wait(timeout)
        except Exception:
            pass

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout):
            try:
                pipe.close()
            except (OSError, ValueError):
                pass


# ---------------------------------------------------------------------------------------------
# the solver side
# ---------------------------------------------------------------------------------------------
class FitTracker:
    """Non-blocking tracker of a solve: RMSE history, progress and ``x`` snapshots.  Local.

    Parameters
    ----------
    main_path : str, the cube file; the sidecar is created next to it
    comm : MPI communicator, default ``MPI.COMM_WORLD``; only its rank 0 tracks
    method : str, the solver's name (root attribute ``method``)
    n_params : int, optional, length N of ``x``; fixed by the first snapshot when None
    enabled : bool, False gives an inactive tracker on every rank

    Knobs: ``FITTRACKER_START`` (``thread``: a writer thread; any other value: a writer
    process), ``CUBEFIT_TRACKER_QSIZE``, ``CUBEFIT_TRACKER_FLUSH_EVERY``,
    ``CUBEFIT_TRACKER_FLUSH_SEC``, ``CUBEFIT_RMSE_STRIDE``.  Construction waits (up to a
    minute) until the writer has created the sidecar; if it cannot, a warning is logged and the
    tracker is inactive -- tracking never stops a solve.  Every method is Local and never
    blocks on disk; use it as a context manager (an exception closes it as ``failed``).
    ``path`` is the sidecar on the tracking rank, None elsewhere.  With ``lazy=True`` the
    sidecar is created at the first message, so a solve refused before its first step leaves
    no sidecar behind.
    """

    def __init__(self, main_path, *, comm=None, method: str = "", n_params: int | None = None,
                 enabled: bool = True, lazy: bool = False):
        from ..parallel.comm import get_comm

        self.path: str | None = None
        self.dropped = 0
        self.active = False
        self.n_params = None if n_params is None else int(n_params)
        self._calls = 0
        self._closed = False
        self._pending = None
        if not enabled or get_comm(comm).Get_rank() != 0:
            return
        self._pending = (main_path, method)
        if not lazy:
            self._start()

    def _start(self) -> None:
        if self._pending is None:
            return
        main_path, method = self._pending
        self._pending = None
        knobs = get_knobs()
        self.stride = knobs.rmse_stride
        self.mode = "thread" if knobs.fittracker_start == "thread" else "process"
        self._t0 = time.time()
        path = sidecar_path(main_path, when=self._t0)
        meta = {"n_params": self.n_params, "t0": self._t0, "attrs": {
            "main_file": os.path.abspath(os.fspath(main_path)), "method": str(method),
            "started": _dt.datetime.fromtimestamp(self._t0).isoformat(timespec="seconds"),
            "n_params": np.int64(-1 if self.n_params is None else self.n_params),
            "writer": self.mode, "pid": np.int64(os.getpid()), "rmse_stride": np.int64(self.stride),
            "ewma_alpha": EWMA_ALPHA, "history_capacity": np.int64(SNAPSHOT_HISTORY), "layout": LAYOUT}}
        settings = {"flush_every": knobs.tracker_flush_every, "flush_sec": knobs.tracker_flush_sec,
                    "file_locking": knobs.hdf5_use_file_locking, "qsize": knobs.tracker_qsize}
        self._writer = (_ThreadWriter if self.mode == "thread" else _ProcessWriter)(path, meta, settings)
        if self._writer.error is not None:
            _LOG.warning("fit tracker disabled: could not create %s (%s)", path, self._writer.error)
            self._writer.stop()
            return
        self.path = path
        self.active = True
        atexit.register(self._at_exit)
        _LOG.info("fit tracker: %s (writer: %s)", self.path, self.mode)

    @property
    def writer_pid(self) -> int | None:
        """Process id of the writer process (None for a thread writer or an inactive tracker)."""
        return self._writer.pid if self.active else None

    def _live(self) -> bool:
        if self._pending is not None and not self._closed:
            self._start()
        return self.active

    def _put(self, msg: tuple) -> None:
        try:
            self._writer.queue.put_nowait(msg)
        except _queue.Full:
            self.dropped += 1

    def log_rmse(self, step: int, epoch: int, rmse: float) -> None:
        """Record an RMSE sample; only every ``CUBEFIT_RMSE_STRIDE``-th call is kept.  Local."""
        if not self._live():
            return
        call = self._calls
        self._calls += 1
        if call % self.stride == 0:
            self._put(("rmse", int(step), int(epoch), float(rmse), time.time() - self._t0))

    def progress(self, epoch: int, tiles_done: int, tiles_total: int) -> None:
        """Record progress (written as ``/progress`` attributes at the next flush).  Local."""
        if self._live():
            self._put(("progress", int(epoch), int(tiles_done), int(tiles_total), time.time()))

    def snapshot(self, x, epoch: int, rmse: float) -> None:
        """Record a copy of ``x (N,)`` (best by rmse, last, and the ring of the last 16).  Local.

        Raises ValueError when ``x`` does not have the tracker's length N.
        """
        if not self._live():
            return
        x = np.array(x, dtype=np.float64, copy=True).reshape(-1)
        if self.n_params is None:
            self.n_params = x.size
        if x.size != self.n_params:
            raise ValueError(f"FitTracker.snapshot: x has {x.size} values, expected {self.n_params}")
        self._put(("snapshot", x, int(epoch), float(rmse), time.time() - self._t0))

    def close(self, status: str = "complete") -> None:
        """Flush everything, store ``status`` and the drop count, stop the writer.  Local.

        Waits for the writer to finish (at most 30 s); a dead writer is not waited for.
        """
        self._pending = None                    # a lazy tracker that never started stays so
        if not self.active or self._closed:
            return
        self._closed = True
        atexit.unregister(self._at_exit)
        deadline = time.monotonic() + 30.0
        while self._writer.alive() and time.monotonic() < deadline:
            try:
                self._writer.queue.put(("close", str(status), int(self.dropped)), timeout=0.2)
                break
            except _queue.Full:
                continue
        self._writer.join(max(0.0, deadline - time.monotonic()))
        self._writer.stop()
        if self.dropped:
            _LOG.warning("fit tracker: %d messages dropped (queue full); raise CUBEFIT_TRACKER_QSIZE",
                         self.dropped)

    def _at_exit(self) -> None:
        self.close("unclosed")

    def __enter__(self) -> "FitTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("complete" if exc_type is None else "failed")
