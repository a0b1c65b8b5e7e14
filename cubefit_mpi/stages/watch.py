"""Stage ``watch``: follow the newest fit-tracker sidecar of a file from another shell (epoch,
tiles, rmse, ewma).  Local: one process reads the sidecar (SWMR) while the solve runs."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..config.errors import InputError
from ..io.tracker_sidecar import find_sidecars, read_progress


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


def watch(main_path, *, interval: float = 2.0, once: bool = False, stream=None) -> int:
    """Follow the newest sidecar of ``main_path``, printing a progress line.  Local.

    On a TTY the line is rewritten in place; otherwise a new line is printed whenever the epoch,
    tiles, sample count or status change.  Returns 0 when the sidecar's status is no longer
    ``running`` (or after one line with ``once``).

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
    last_key, width = None, 0
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
        last_key = key
        if finished:
            return 0
        time.sleep(interval)
