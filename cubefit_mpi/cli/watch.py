"""Sub-command ``watch``: follow a running solve from another shell."""
from __future__ import annotations

import sys

from ..config.errors import InputError


def register(sub) -> None:
    """Add the ``watch`` sub-parser to ``sub``.  Local (no MPI)."""
    p = sub.add_parser("watch", help="follow the newest fit-tracker sidecar of a file: epoch, tiles, rmse, ewma")
    p.add_argument("file", help="the cube file being solved")
    p.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between updates (default 2)")
    p.add_argument("--once", action="store_true", help="print one line and exit")
    p.add_argument("--plot", default=None, metavar="DIR",
                   help="also keep PNGs of the running fit in DIR up to date (convergence; spectra, population "
                        "weights, component totals of the latest x snapshot)")
    p.set_defaults(handler=cmd_watch)


def cmd_watch(args, comm) -> int:
    """``cubefit_mpi watch FILE``: rank 0 follows the sidecar, other ranks wait.  Collective over comm."""
    from ..parallel.collectives import agree, raise_if_any
    from ..stages.watch import watch

    if args.interval <= 0:
        raise InputError(f"--interval={args.interval}: expected a positive number of seconds")
    code, error = 0, None
    if comm.Get_rank() == 0:
        try:
            code = watch(args.file, interval=args.interval, once=args.once, stream=sys.stdout, plot_dir=args.plot)
        except InputError as exc:
            error = exc
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            code = 130
    raise_if_any(error, comm)
    return agree(code, comm)
