"""Sub-command ``weights``: build the λ-weights.

``register(sub)`` adds both to the ``add_subparsers`` object of :mod:`cubefit_mpi.cli.main`; each
parser's ``handler(args, comm) -> int`` runs the command.
"""
from __future__ import annotations

from ..config.errors import InputError
from ..config.options import default_of
from ..stages.weights import ensure_lambda_weights


def register(sub) -> None:
    """Add the ``weights`` sub-parser to ``sub``.  Local (no MPI)."""
    p = sub.add_parser("weights", help="build the lambda-weights (median spectrum, boxcar DoG) and "
                       "print their min/max/mean")
    p.add_argument("file", help="cube file with /DataCube (and optionally /Mask)")
    p.add_argument("--small", type=int, default=default_of(ensure_lambda_weights, "small"), metavar="N",
                   help="small boxcar window in pixels, odd (default %(default)s)")
    p.add_argument("--large", type=int, default=default_of(ensure_lambda_weights, "large"), metavar="N",
                   help="large boxcar window in pixels, odd (default %(default)s)")
    p.add_argument("--min-w", type=float, default=default_of(ensure_lambda_weights, "min_w"), metavar="X",
                   help="weight of featureless continuum, 0 < X <= 1 (default %(default)s)")
    p.add_argument("--force", action="store_true", help="rebuild even if weights with these parameters exist")
    p.set_defaults(handler=cmd_weights)


def cmd_weights(args, comm) -> int:
    """``cubefit_mpi weights FILE``.  Collective over comm."""
    from ..config.knobs import get_knobs
    from ..io import layout as lay
    from ..io.h5file import open_h5
    from ..numerics.lambda_weights import weights_banner

    weights = ensure_lambda_weights(args.file, small=args.small, large=args.large, min_w=args.min_w,
                                    force=args.force, comm=comm)
    with open_h5(args.file, "r", comm) as f:
        mask = f[lay.MASK][...].astype(bool) if lay.MASK in f else None
    if comm.Get_rank() == 0:
        print(f"{args.file}:{get_knobs().lambda_weights_dset}")
        print(weights_banner(weights, mask))
    return 0
