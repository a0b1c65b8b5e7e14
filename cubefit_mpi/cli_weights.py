"""Sub-commands ``weights`` (build the λ-weights) and ``watch`` (follow a running solve).

``register(sub)`` adds both to the ``add_subparsers`` object of :mod:`cubefit_mpi.cli`; each
parser's ``handler(args, comm) -> int`` runs the command.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .errors import InputError
from .lambda_weights import DEFAULT_LARGE, DEFAULT_MIN_W, DEFAULT_SMALL


def register(sub) -> None:
    """Add the ``weights`` and ``watch`` sub-parsers to ``sub``.  Local (no MPI)."""
    p = sub.add_parser("weights", help="build the lambda-weights (median spectrum, boxcar DoG) and "
                       "print their min/max/mean")
    p.add_argument("file", help="cube file with /DataCube (and optionally /Mask)")
    p.add_argument("--small", type=int, default=DEFAULT_SMALL, metavar="N",
                   help=f"small boxcar window in pixels, odd (default {DEFAULT_SMALL})")
    p.add_argument("--large", type=int, default=DEFAULT_LARGE, metavar="N",
                   help=f"large boxcar window in pixels, odd (default {DEFAULT_LARGE})")
    p.add_argument("--min-w", type=float, default=None, metavar="X",
                   help=f"weight of featureless continuum, 0 < X <= 1 (default {DEFAULT_MIN_W})")
    p.add_argument("--force", action="store_true", help="rebuild even if weights with these parameters exist")
    p.set_defaults(handler=cmd_weights)

    p = sub.add_parser("watch", help="follow the newest fit-tracker sidecar of a file: epoch, tiles, rmse, ewma")
    p.add_argument("file", help="the cube file being solved")
    p.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between updates (default 2)")
    p.add_argument("--once", action="store_true", help="print one line and exit")
    p.set_defaults(handler=cmd_watch)


def cmd_weights(args, comm) -> int:
    """``cubefit_mpi weights FILE``.  Collective over comm."""
    from . import layout as lay
    from .hdf5_manager import open_h5
    from .knobs import get_knobs
    from .lambda_weights import weights_banner
    from .lambda_weights_stage import ensure_lambda_weights

    weights = ensure_lambda_weights(args.file, small=args.small, large=args.large, min_w=args.min_w,
                                    force=args.force, comm=comm)
    with open_h5(args.file, "r", comm) as f:
        mask = f[lay.MASK][...].astype(bool) if lay.MASK in f else None
    if comm.Get_rank() == 0:
        print(f"{args.file}:{get_knobs().lambda_weights_dset}")
        print(weights_banner(weights, mask))
    return 0


def cmd_watch(args, comm) -> int:
    """``cubefit_mpi watch FILE``: rank 0 follows the sidecar, other ranks wait.  Collective over comm."""
    from .parallel import agree, raise_if_any

    if args.interval <= 0:
        raise InputError(f"--interval={args.interval}: expected a positive number of seconds")
    code, error = 0, None
    if comm.Get_rank() == 0:
        try:
            code = watch(args.file, interval=args.interval, once=args.once, stream=sys.stdout)
        except InputError as exc:
            error = exc
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            code = 130
    raise_if_any(error, comm)
    return agree(code, comm)


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
    from .fit_tracker import find_sidecars, read_progress

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
