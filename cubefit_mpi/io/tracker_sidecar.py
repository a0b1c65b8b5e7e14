"""The fit-tracker sidecar (layout ``fit-sidecar/1``): its name, the writer that owns it, and the
readers that follow it live (SWMR).

Sidecar layout (plots, ``watch`` and ``--warm-start resume`` read it)::

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

``status`` is ``running`` until the tracker closes (``complete``, ``failed``, ...), or
``orphaned`` when a writer process sees the solver process disappear.  ``crc32`` is the CRC-32
of the snapshot's float64 bytes: a reader accepts a snapshot only when it matches, so a writer
killed half-way through a snapshot leaves the previous consistent one readable.

Open sidecars with :func:`open_sidecar` (SWMR read mode): a plain read-only open of a sidecar
whose writer was killed fails with "file is already open for write".  Local (no MPI).
"""
from __future__ import annotations

import logging
import os
import re
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..config.knobs import get_knobs

_LOG = logging.getLogger("cubefit_mpi.tracker")


LAYOUT = "fit-sidecar/1"
HISTORY_FIELDS = (("step", "i8"), ("epoch", "i8"), ("rmse", "f8"), ("ewma", "f8"), ("time", "f8"))
SNAPSHOT_HISTORY = 16
EWMA_ALPHA = 0.1
_NAME = re.compile(r"\.fit\.(?P<id>[^.]+)\.(?P<ts>\d{8}T\d{6})(?:-(?P<n>\d+))?\.h5$")


def sidecar_h5py(file_locking: bool | None = None):
    if file_locking is None:
        file_locking = get_knobs().hdf5_use_file_locking
    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "TRUE" if file_locking else "FALSE")
    import h5py

    return h5py


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
    h5py = sidecar_h5py()
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


def read_snapshot(sidecar, n_params: int | None = None):
    """The most recent consistent ``x`` snapshot of one sidecar (highest sequence number).  Local.

    Returns ``(x (N,) float64, epoch)`` or None when it holds none (snapshots whose CRC-32 does
    not match, or of another length than ``n_params``, are skipped).
    """
    with open_sidecar(sidecar, retries=2) as f:
        candidates = _snapshot_candidates(f, n_params)
    if not candidates:
        return None
    epoch, _, x = max(candidates, key=lambda c: c[1])
    return x, epoch


def latest_snapshot(main_path, n_params: int | None = None):
    """The newest consistent ``x`` snapshot over all sidecars of ``main_path``.  Local.

    Parameters
    ----------
    main_path : str, the main cube file
    n_params : int, optional; snapshots of another length are skipped

    Returns
    -------
    ``(x (N,) float64, epoch, sidecar_path)`` or None.  "Newest" is the most recent snapshot
    (highest sequence number) of the latest run (the sidecar started last, by the timestamp in
    its name) that has one -- never by epoch number across runs (a later run restarted from
    epoch 1 is newer than an earlier run's epoch 9), never by file time.  Unreadable or corrupt
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
            key = (order, seq, epoch)
            if best is None or key > best[0]:
                best = (key, x, path)
    if best is None:
        return None
    return best[1], best[0][2], best[2]


class SidecarWriter:
    """Creates the sidecar, switches it to SWMR and applies messages.  Used by the writer only."""

    def __init__(self, path: str, meta: dict, file_locking: bool):
        h5py = sidecar_h5py(file_locking)
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
