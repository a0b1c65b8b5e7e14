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

Sidecar layout (the ``fit-sidecar/1`` layout; plots and resume read it)::

    /history/step   (n,) int64     solver step of each recorded RMSE sample
    /history/epoch  (n,) int64
    /history/rmse   (n,) float64
    /history/ewma   (n,) float64   exponentially weighted mean of rmse (alpha = attr ewma_alpha)
    /history/time   (n,) float64   seconds since the tracker started
    /progress                      attrs epoch, tiles_done, tiles_total, updated (unix time)
    /snapshots/best/x (N,)         attrs epoch, rmse, seq, crc32, time   (lowest rmse)
    /snapshots/last/x (N,)         same attrs                            (most recent)
    /snapshots/history/x (k, N)    ring of the last 16 snapshots (k <= 16), rows in ring
    /snapshots/history/{epoch,rmse,seq,crc32} (k,)    order: sort by seq for chronology
    root attrs main_file, method, started (ISO), status, dropped, n_params, writer, pid,
               rmse_stride, ewma_alpha, history_capacity, layout

``status`` is ``running`` until :meth:`FitTracker.close` (``complete``, ``failed``, ...), or
``orphaned`` when a writer process sees the solver process disappear.  ``crc32`` is the CRC-32
of the snapshot's float64 bytes: a reader accepts a snapshot only when it matches, so a writer
killed half-way through a snapshot leaves the previous consistent one readable.

Open sidecars with :func:`open_sidecar` (SWMR read mode): a plain read-only open of a sidecar
whose writer was killed fails with "file is already open for write".
"""
from __future__ import annotations

import atexit
import datetime as _dt
import logging
import os
import queue as _queue
import re
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .knobs import get_knobs

_LOG = logging.getLogger("cubefit_mpi.tracker")
LAYOUT = "fit-sidecar/1"
HISTORY_FIELDS = (("step", "i8"), ("epoch", "i8"), ("rmse", "f8"), ("ewma", "f8"), ("time", "f8"))
SNAPSHOT_HISTORY = 16
EWMA_ALPHA = 0.1
START_TIMEOUT = 60.0                 # seconds to wait for the writer to create the sidecar
_NAME = re.compile(r"\.fit\.(?P<id>[^.]+)\.(?P<ts>\d{8}T\d{6})(?:-(?P<n>\d+))?\.h5$")


def _h5py(file_locking: bool | None = None):
    if file_locking is None:
        file_locking = get_knobs().hdf5_use_file_locking
    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "TRUE" if file_locking else "FALSE")
    import h5py

    return h5py


# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------
def sidecar_path(main_path, *, job_id: str | None = None, when: float | None = None) -> str:
    """A new sidecar name next to ``main_path`` (never an existing file's).  Local.

    ``<main>.fit.<SLURM_JOB_ID or pid>.<YYYYmmddTHHMMSS>.h5``, with ``-2``, ``-3``, ... before
    ``.h5`` when that name is taken.
    """
    main = Path(os.path.abspath(os.fspath(main_path)))
    job = job_id or os.environ.get("SLURM_JOB_ID") or str(os.getpid())
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(when))
    base = main.parent / f"{main.name}.fit.{job}.{stamp}"
    candidate, n = Path(f"{base}.h5"), 1
    while candidate.exists():
        n += 1
        candidate = Path(f"{base}-{n}.h5")
    return str(candidate)


def find_sidecars(main_path) -> list[str]:
    """Sidecars of ``main_path``, oldest first (by the timestamp in the name).  Local."""
    main = Path(os.path.abspath(os.fspath(main_path)))
    found = []
    for path in main.parent.glob(f"{main.name}.fit.*.h5"):
        m = _NAME.search(path.name[len(main.name):])
        if m is None or not path.name.startswith(f"{main.name}.fit."):
            continue
        found.append(((m["ts"], int(m["n"] or 1), path.stat().st_mtime), str(path)))
    return [p for _, p in sorted(found)]


@contextmanager
def open_sidecar(path, *, retries: int = 10, backoff: float = 0.05):
    """Open a sidecar for reading in SWMR mode (works while it is written, or after a kill).  Local."""
    h5py = _h5py()
    attempt = 0
    while True:
        try:
            handle = h5py.File(os.fspath(path), "r", libver="latest", swmr=True)
            break
        except OSError:
            attempt += 1
            if attempt > retries:
                raise
            time.sleep(backoff * attempt)
    try:
        yield handle
    finally:
        handle.close()


# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------
def _fresh(dset) -> np.ndarray:
    dset.refresh()
    return np.asarray(dset[...])


def read_history(sidecar) -> dict:
    """RMSE history of a sidecar: ``{"step", "epoch", "rmse", "ewma", "time"}`` arrays.  Local.

    Arrays are cut to a common length (a live writer extends them one after the other).
    """
    with open_sidecar(sidecar) as f:
        data = {name: _fresh(f[f"history/{name}"]) for name, _ in HISTORY_FIELDS}
    n = min(len(v) for v in data.values())
    return {k: v[:n] for k, v in data.items()}


def read_progress(sidecar) -> dict:
    """Status, progress and the latest RMSE/EWMA of a sidecar.  Local.

    Returns ``{"path", "status", "method", "started", "dropped", "epoch", "tiles_done",
    "tiles_total", "updated", "n_history", "rmse", "ewma", "best_rmse", "n_snapshots"}``
    (``rmse``/``ewma`` NaN before the first sample).
    """
    with open_sidecar(sidecar) as f:
        attrs, prog = f.attrs, f["progress"].attrs
        rmse, ewma = f["history/rmse"], f["history/ewma"]
        rmse.refresh()
        ewma.refresh()
        n = min(rmse.shape[0], ewma.shape[0])
        last = (float(rmse[n - 1]), float(ewma[n - 1])) if n else (float("nan"), float("nan"))
        seq = f["snapshots/history/seq"]
        seq.refresh()
        return {"path": os.fspath(sidecar), "status": _text(attrs["status"]), "method": _text(attrs["method"]),
                "started": _text(attrs["started"]), "dropped": int(attrs["dropped"]),
                "epoch": int(prog["epoch"]), "tiles_done": int(prog["tiles_done"]),
                "tiles_total": int(prog["tiles_total"]), "updated": float(prog["updated"]),
                "n_history": n, "rmse": last[0], "ewma": last[1],
                "best_rmse": float(f["snapshots/best"].attrs["rmse"]), "n_snapshots": int(seq.shape[0])}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _snapshot_candidates(f, n_params):
    """``(epoch, seq, x)`` of every consistent snapshot stored in an open sidecar."""
    out = []
    slots = [f["snapshots/best"], f["snapshots/last"]]
    for group in slots:
        x = _fresh(group["x"])
        a = group.attrs
        out.append((int(a["epoch"]), int(a["seq"]), int(a["crc32"]), x))
    hist = f["snapshots/history"]
    xs = _fresh(hist["x"])
    meta = [_fresh(hist[k]) for k in ("epoch", "seq", "crc32")]
    k = min(xs.shape[0], *(len(m) for m in meta))
    out.extend((int(meta[0][i]), int(meta[1][i]), int(meta[2][i]), xs[i]) for i in range(k))
    good = []
    for epoch, seq, crc, x in out:
        x = np.ascontiguousarray(x, dtype=np.float64)
        if epoch < 0 or seq < 0 or x.size == 0 or (n_params is not None and x.size != n_params):
            continue
        if zlib.crc32(x.tobytes()) != crc or not np.all(np.isfinite(x)):
            continue
        good.append((epoch, seq, x))
    return good


def latest_snapshot(main_path, n_params: int | None = None):
    """The newest consistent ``x`` snapshot over all sidecars of ``main_path``.  Local.

    Parameters
    ----------
    main_path : str, the main cube file
    n_params : int, optional; snapshots of another length are skipped

    Returns
    -------
    ``(x (N,) float64, epoch, sidecar_path)`` or None.  "Newest" is by recorded epoch, then by
    sidecar start time and snapshot sequence -- never by file time.  Unreadable or corrupt
    sidecars, snapshots whose CRC-32 does not match (a writer killed mid-write) and snapshots
    of the wrong length are skipped.
    """
    best = None
    for order, path in enumerate(find_sidecars(main_path)):
        try:
            with open_sidecar(path, retries=2) as f:
                candidates = _snapshot_candidates(f, n_params)
        except Exception as exc:             # unreadable / corrupt / foreign file: skip it
            _LOG.debug("skipping sidecar %s: %s", path, exc)
            continue
        for epoch, seq, x in candidates:
            key = (epoch, order, seq)
            if best is None or key > best[0]:
                best = (key, x, path)
    if best is None:
        return None
    return best[1], best[0][0], best[2]


# ---------------------------------------------------------------------------------------------
# the writer (runs in a thread or a process; owns the sidecar file)
# ---------------------------------------------------------------------------------------------
class _SidecarWriter:
    """Creates the sidecar, switches it to SWMR and applies messages.  Used by the writer only."""

    def __init__(self, path: str, meta: dict, file_locking: bool):
        h5py = _h5py(file_locking)
        self.f = f = h5py.File(path, "w-", libver="latest")
        self.n_params = meta["n_params"]
        for name, dtype in HISTORY_FIELDS:
            f.create_dataset(f"history/{name}", shape=(0,), maxshape=(None,), chunks=(1024,), dtype=dtype)
        prog = f.create_group("progress")
        for key in ("epoch", "tiles_done", "tiles_total"):
            prog.attrs[key] = np.int64(-1 if key == "epoch" else 0)
        prog.attrs["updated"] = float(meta["t0"])
        n = self.n_params if self.n_params is not None else 0
        col_chunk = max(1, min(n or 8192, 65536))
        for slot in ("best", "last"):
            g = f.create_group(f"snapshots/{slot}")
            g.create_dataset("x", shape=(n,), maxshape=(None,), chunks=(col_chunk,), dtype="f8")
            for key, value in (("epoch", np.int64(-1)), ("rmse", np.nan), ("seq", np.int64(-1)),
                               ("crc32", np.int64(-1)), ("time", np.nan)):
                g.attrs[key] = value
        h = f.create_group("snapshots/history")
        h.create_dataset("x", shape=(0, n), maxshape=(SNAPSHOT_HISTORY, None), chunks=(1, col_chunk), dtype="f8")
        for key, dtype in (("epoch", "i8"), ("rmse", "f8"), ("seq", "i8"), ("crc32", "i8")):
            h.create_dataset(key, shape=(0,), maxshape=(SNAPSHOT_HISTORY,), chunks=(SNAPSHOT_HISTORY,), dtype=dtype)
        for key, value in meta["attrs"].items():
            f.attrs[key] = value
        f.attrs["status"] = "running"
        f.attrs["dropped"] = np.int64(0)
        f.swmr_mode = True
        f.flush()
        self.pending: list[tuple] = []
        self.ewma = None
        self.alpha = float(meta["attrs"]["ewma_alpha"])
        self.progress = None
        self.best_rmse = np.inf
        self.seq = 0

    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "rmse":
            _, step, epoch, rmse, t = msg
            if np.isfinite(rmse):
                self.ewma = rmse if self.ewma is None else self.alpha * rmse + (1 - self.alpha) * self.ewma
            self.pending.append((step, epoch, rmse, np.nan if self.ewma is None else self.ewma, t))
        elif kind == "progress":
            self.progress = msg[1:]
        elif kind == "snapshot":
            self._snapshot(*msg[1:])

    def _snapshot(self, x: np.ndarray, epoch: int, rmse: float, t: float) -> None:
        crc = np.int64(zlib.crc32(x.tobytes()))
        seq = self.seq
        self.seq += 1
        slots = ["last"] + (["best"] if np.isfinite(rmse) and rmse < self.best_rmse else [])
        for slot in slots:
            g = self.f[f"snapshots/{slot}"]
            if g["x"].shape != x.shape:
                g["x"].resize(x.shape)
            g["x"][...] = x
            for key, value in (("epoch", np.int64(epoch)), ("rmse", float(rmse)), ("seq", np.int64(seq)),
                               ("crc32", crc), ("time", float(t))):
                g.attrs.modify(key, value)
        if "best" in slots:
            self.best_rmse = rmse
        h = self.f["snapshots/history"]
        k = h["epoch"].shape[0]
        row = k if k < SNAPSHOT_HISTORY else seq % SNAPSHOT_HISTORY
        if row == k:
            h["x"].resize((k + 1, x.size))
            for key in ("epoch", "rmse", "seq", "crc32"):
                h[key].resize((k + 1,))
        h["x"][row, :] = x
        for key, value in (("epoch", epoch), ("rmse", rmse), ("seq", seq), ("crc32", crc)):
            h[key][row] = value
        self.flush()                      # snapshots are rare and are what a resume needs

    def flush(self) -> None:
        if self.pending:
            cols = list(zip(*self.pending))
            n0 = self.f["history/step"].shape[0]
            for (name, dtype), values in zip(HISTORY_FIELDS, cols):
                d = self.f[f"history/{name}"]
                d.resize((n0 + len(values),))
                d[n0:] = np.asarray(values, dtype=dtype)
            self.pending = []
        if self.progress is not None:
            prog = self.f["progress"].attrs
            epoch, done, total, t_unix = self.progress
            for key, value in (("epoch", epoch), ("tiles_done", done), ("tiles_total", total)):
                prog.modify(key, np.int64(value))
            prog.modify("updated", float(t_unix))
            self.progress = None
        self.f.flush()

    def finish(self, status: str, dropped: int) -> None:
        self.flush()
        self.f.attrs.modify("dropped", np.int64(dropped))
        self.f.attrs.modify("status", str(status))
        self.f.flush()
        self.f.close()


def _writer_loop(path, meta, settings, msgs, report) -> None:
    """Drain ``msgs`` into the sidecar until ``("close", status, dropped)`` (or ``("eof",)``).

    ``report(error)`` is called once: with None when the sidecar exists, else with the error.
    """
    try:
        writer = _SidecarWriter(path, meta, settings["file_locking"])
    except Exception as exc:
        report(f"{type(exc).__name__}: {exc}")
        return
    report(None)
    since_flush, last_flush = 0, time.monotonic()
    poll = max(0.05, min(0.5, settings["flush_sec"] or 0.5))
    while True:
        try:
            msg = msgs.get(timeout=poll)
        except _queue.Empty:
            msg = None
        if msg is not None:
            if msg[0] in ("close", "eof"):       # eof: the solver process is gone
                writer.finish(*(msg[1:] if msg[0] == "close" else ("orphaned", -1)))
                return
            writer.handle(msg)
            since_flush += 1
        now = time.monotonic()
        if since_flush and (since_flush >= settings["flush_every"] or now - last_flush >= settings["flush_sec"]):
            writer.flush()
            since_flush, last_flush = 0, now


def _writer_main() -> None:
    """Body of a writer process: messages arrive pickled on stdin, ``ready`` goes to stdout."""
    import pickle

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

    threading.Thread(target=read_pipe, daemon=True).start()
    _writer_loop(path, meta, settings, local, report)


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
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "MPIR_", "OMPI_"))}
        env["HDF5_USE_FILE_LOCKING"] = "TRUE" if settings["file_locking"] else "FALSE"
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from cubefit_mpi.fit_tracker import _writer_main; _writer_main()"],
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
    ``path`` is the sidecar on the tracking rank, None elsewhere.
    """

    def __init__(self, main_path, *, comm=None, method: str = "", n_params: int | None = None,
                 enabled: bool = True):
        from .parallel import get_comm

        self.path: str | None = None
        self.dropped = 0
        self.active = False
        self.n_params = None if n_params is None else int(n_params)
        self._calls = 0
        self._closed = False
        if not enabled or get_comm(comm).Get_rank() != 0:
            return
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

    def _put(self, msg: tuple) -> None:
        try:
            self._writer.queue.put_nowait(msg)
        except _queue.Full:
            self.dropped += 1

    def log_rmse(self, step: int, epoch: int, rmse: float) -> None:
        """Record an RMSE sample; only every ``CUBEFIT_RMSE_STRIDE``-th call is kept.  Local."""
        if not self.active:
            return
        call = self._calls
        self._calls += 1
        if call % self.stride == 0:
            self._put(("rmse", int(step), int(epoch), float(rmse), time.time() - self._t0))

    def progress(self, epoch: int, tiles_done: int, tiles_total: int) -> None:
        """Record progress (written as ``/progress`` attributes at the next flush).  Local."""
        if self.active:
            self._put(("progress", int(epoch), int(tiles_done), int(tiles_total), time.time()))

    def snapshot(self, x, epoch: int, rmse: float) -> None:
        """Record a copy of ``x (N,)`` (best by rmse, last, and the ring of the last 16).  Local.

        Raises ValueError when ``x`` does not have the tracker's length N.
        """
        if not self.active:
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
