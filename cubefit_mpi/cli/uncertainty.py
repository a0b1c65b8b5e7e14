"""Sub-command ``uncertainty``: bootstrap error bars of the exact fit."""
from __future__ import annotations


def register(sub) -> None:
    """Add the ``uncertainty`` sub-parser; defaults are :func:`bootstrap_uncertainty`'s own.  Local."""
    from ..config.options import default_of
    from ..numerics.bootstrap import BLOCKS, METHODS
    from ..solvers.uncertainty import bootstrap_uncertainty

    def default(name):
        return default_of(bootstrap_uncertainty, name)

    p = sub.add_parser("uncertainty", help="bootstrap uncertainties of the exact fit (writes /Uncertainty; a "
                                           "killed run resumes, more replicates extend a finished one)")
    p.add_argument("file")
    p.add_argument("--replicates", type=int, default=default("replicates"), metavar="N",
                   help="number of replicates (default %(default)s)")
    p.add_argument("--method", default=default("method"), choices=METHODS,
                   help="wild (Rademacher signs on the residuals), residual (resampled residuals) or parametric "
                        "(from /DataVar); default %(default)s")
    p.add_argument("--seed", type=int, default=default("seed"), help="default %(default)s")
    p.add_argument("--block", default=default("block"), choices=BLOCKS,
                   help="wild bootstrap signs per spectrum or per pixel (default %(default)s)")
    p.add_argument("--batch", type=int, default=default("batch"), metavar="N",
                   help="replicates per pass over the spaxels (default %(default)s)")
    p.set_defaults(handler=cmd_uncertainty)


def cmd_uncertainty(args, comm) -> int:
    from ..solvers.uncertainty import bootstrap_uncertainty

    out = bootstrap_uncertainty(args.file, replicates=args.replicates, method=args.method, seed=args.seed,
                                block=args.block, batch=args.batch, comm=comm)
    if comm.Get_rank() == 0:
        print(report_line(args.file, out))
    return 0


def report_line(path: str, out: dict) -> str:
    """One line: replicates, cost, component totals with their spread.  Local."""
    totals = ", ".join(f"{m:.6g} +- {s:.3g}" for m, s in zip(out["summary"]["mean"], out["summary"]["std"]))
    return (f"{path}:/Uncertainty: {out['replicates']} replicates ({out['computed']} computed now, "
            f"{out['seconds_per_replicate']:.3g} s each); component totals {totals}")

