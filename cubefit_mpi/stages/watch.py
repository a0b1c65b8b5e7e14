"""Stage ``watch``: follow the newest fit-tracker sidecar of a file from another shell (epoch,
tiles, rmse, ewma), and with ``plot_dir`` keep PNGs of the running fit up to date.

Local: one process reads the sidecar (SWMR) and, for the plots, the cube file (read-only) while
the solve runs.  The plots are those of :mod:`cubefit_mpi.stages.plots`:
``convergence.png`` from the sidecar's history, and from its latest ``x`` snapshot (when the
cube file can be read) ``spectra_best_worst.png`` (an evenly spaced sample of spaxels, models
from ``/HyperCube/models``), ``population_weights.png`` and ``component_totals.png``.  Each PNG
is replaced atomically, so an image viewer never shows half a file.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from ..config.errors import InputError
from ..io.tracker_sidecar import find_sidecars, read_progress, read_snapshot

_LOG = logging.getLogger("cubefit_mpi.stages.watch")


def format_progress(info: dict, now: float | None = None) -> str:
    """One status line from :func:`read_progress`.  Local."""
    now = time.time() if now is None else now
    total = info["tiles_total"]
    tiles = f"{info['tiles_done']}/{total}" + (f" ({100.0 * info['tiles_done'] / total:.0f}%)" if total > 0 else "")
    epoch = info["epoch"] if info["epoch"] >= 0 else "-"
    line = (f"{info['method'] or 'fit'}: epoch {epoch} | tiles {tiles} | rmse {info['rmse']:.6g} | "
            f"ewma {info['ewma']:.6g} | {info['n_history']} samples, {info['n_snapshots']} snapshots | "
            f"{info['status']}")
    idle = now - info["updated"]
    if info["status"] == "running" and idle > 60:
        line += f" (no update for {idle:.0f}s)"
    if info["dropped"] > 0:
        line += f" | {info['dropped']} dropped"
    return line


def refresh_plots(main_path, sidecar: str, out_dir: str, *, n_spaxels: int = 3) -> dict:
    """Redraw the live PNGs of a running fit into ``out_dir``.  Local.

    Returns ``{"written": [paths], "epoch": epoch of the snapshot drawn or None, "skipped": reason
    or None}``.  The convergence plot needs only the sidecar; the others are skipped (with the
    reason) while the sidecar has no snapshot or the cube file cannot be read (being written,
    no complete hypercube).
    """
    from ..io.h5file import open_h5
    from ..parallel.comm import mpi
    from .plots import CONVERGENCE_PNG, draw_fit, plot_convergence

    os.makedirs(out_dir, exist_ok=True)
    written = []
    done = plot_convergence(sidecar, os.path.join(out_dir, CONVERGENCE_PNG))
    if done:
        written.append(done)
    try:
        snapshot = read_snapshot(sidecar)
    except (OSError, KeyError) as exc:
        return {"written": written, "epoch": None, "skipped": f"sidecar snapshot unreadable ({exc})"}
    if snapshot is None:
        return {"written": written, "epoch": None, "skipped": "no x snapshot yet"}
    x, epoch = snapshot
    try:
        with open_h5(os.fspath(main_path), "r", mpi().COMM_SELF, retries=0) as f:
            written += draw_fit(f, os.fspath(main_path), out_dir, x, n_spaxels=n_spaxels,
                                x_note=f"live x snapshot of epoch {epoch}, {time.strftime('%H:%M:%S')}")
    except (InputError, OSError, KeyError, RuntimeError) as exc:     # the solver may be writing it
        return {"written": written, "epoch": None, "skipped": f"{main_path} not readable now ({exc})"}
    return {"written": written, "epoch": epoch, "skipped": None}


def watch(main_path, *, interval: float = 2.0, once: bool = False, stream=None, plot_dir: str | None = None) -> int:
    """Follow the newest sidecar of ``main_path``, printing a progress line.  Local.

    On a TTY the line is rewritten in place; otherwise a new line is printed whenever the epoch,
    tiles, sample count or status change.  With ``plot_dir`` the PNGs of :func:`refresh_plots`
    are redrawn whenever the sidecar changed, and once more at the end.  Returns 0 when the
    sidecar's status is no longer ``running`` (or after one line with ``once``).

    Raises
    ------
    InputError
        No sidecar next to ``main_path``.
    """
    stream = sys.stdout if stream is None else stream
    sidecars = find_sidecars(main_path)
    if not sidecars:
        raise InputError(f"{main_path}: no fit-tracker sidecar ({Path(main_path).name}.fit.*.h5) next to it")
    path = sidecars[-1]
    tty = bool(getattr(stream, "isatty", lambda: False)())
    last_key, width, reported = None, 0, set()
    while True:
        info = read_progress(path)
        line = format_progress(info)
        key = (info["epoch"], info["tiles_done"], info["n_history"], info["n_snapshots"], info["status"])
        finished = once or info["status"] != "running"
        if tty:
            stream.write("\r" + line.ljust(width) + ("\n" if finished else ""))
            width = len(line)
        elif key != last_key or finished:
            stream.write(line + "\n")
        stream.flush()
        if plot_dir is not None and (key != last_key or finished):
            skipped = refresh_plots(main_path, path, plot_dir)["skipped"]
            reason = skipped.split(" (")[0] if skipped else None
            if reason and reason not in reported:            # say each reason once, not every interval
                reported.add(reason)
                _LOG.warning("watch --plot: %s; drawing what can be drawn", skipped)
        last_key = key
        if finished:
            return 0
        time.sleep(interval)
