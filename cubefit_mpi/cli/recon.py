"""Sub-commands ``recon`` and ``plot``: register them with :func:`register`.

``cubefit_mpi recon FILE [--out /ReconCube] [--x /X_global] [--s-tile N]`` writes ``Ŷ = A·x``
and per-spaxel χ²/RMSE; ``cubefit_mpi plot FILE [--out DIR] [--n N] [--recon DATASET]`` draws
the diagnostic PNGs.  Both run under ``mpiexec`` or alone; only rank 0 prints.
"""
from __future__ import annotations

import os

from ..io.layout import X_GLOBAL
from .solve import add_operator_options, operator_options



def register(sub) -> None:
    """Add the ``recon`` and ``plot`` sub-parsers to ``sub`` (an argparse sub-parsers object).

    Each parser gets ``handler=fn`` with ``fn(args, comm) -> int``; defaults are those of
    :func:`~cubefit_mpi.stages.recon.reconstruct` and :func:`~cubefit_mpi.stages.plots.make_plots`.
    """
    from ..config.options import default_of
    from ..stages.plots import make_plots
    from ..stages.recon import reconstruct

    RECON_DEFAULT = default_of(reconstruct, "out")
    p = sub.add_parser("recon", help="reconstruct the model cube A·x and per-spaxel chi2/rmse "
                                     "(writes /ReconCube, /ReconCube_chi2, /ReconCube_rmse)")
    p.add_argument("file")
    p.add_argument("--out", default=RECON_DEFAULT, metavar="DATASET",
                   help=f"dataset to write (default {RECON_DEFAULT}); the statistics go to "
                        f"DATASET_chi2 and DATASET_rmse")
    p.add_argument("--x", dest="x_dataset", default=X_GLOBAL, metavar="DATASET",
                   help=f"weights (C*P,) to use (default {X_GLOBAL})")
    p.add_argument("--s-tile", type=int, default=None, metavar="N",
                   help="spaxels per tile (rounded up to whole chunks; default: one chunk)")
    add_operator_options(p)
    p.set_defaults(handler=cmd_recon)

    p = sub.add_parser("plot", help="diagnostic PNGs: best/worst spectra, population weights, "
                                    "component totals, convergence, rmse map")
    p.add_argument("file")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: FILE without .h5, plus _plots)")
    p.add_argument("--n", type=int, default=default_of(make_plots, "n_spaxels"), metavar="N",
                   help="N best and N worst spaxels (default %(default)s)")
    p.add_argument("--recon", default=RECON_DEFAULT, metavar="DATASET",
                   help=f"reconstruction to read (default {RECON_DEFAULT})")
    p.add_argument("--x", dest="x_dataset", default=X_GLOBAL, metavar="DATASET",
                   help=f"weights (default {X_GLOBAL})")
    p.add_argument("--rank-by", choices=("rmse", "chi2"), default=default_of(make_plots, "rank_by"),
                   help="statistic ordering best and worst (default rmse)")
    p.set_defaults(handler=cmd_plot)


def default_plot_dir(path: str) -> str:
    """``galaxy.h5`` -> ``galaxy_plots`` (beside the file).  Local."""
    root, ext = os.path.splitext(os.fspath(path))
    return (root if ext in (".h5", ".hdf5") else os.fspath(path)) + "_plots"


def cmd_recon(args, comm) -> int:
    """Handler of ``recon``.  Collective over comm."""
    from ..stages.recon import reconstruct

    result = reconstruct(args.file, out=args.out, x_dataset=args.x_dataset, s_tile=args.s_tile, comm=comm,
                         **operator_options(args))
    if comm.Get_rank() == 0:
        n_s, n_l = result["shape"]
        print(f"wrote {result['out']} ({n_s}x{n_l}), {result['chi2']}, {result['rmse']} of {args.file} "
              f"from {result['x_dataset']}: chi2 total {result['chi2_total']:.6g} ({result['weighting']}), "
              f"rmse {result['rmse_global']:.6g}, {result['components_read']}/{result['components_total']} "
              f"components read, {result['seconds']:.1f}s on {comm.Get_size()} rank(s)")
    return 0


def cmd_plot(args, comm) -> int:
    """Handler of ``plot``.  Collective over comm."""
    from ..stages.plots import make_plots

    out_dir = args.out or default_plot_dir(args.file)
    written = make_plots(args.file, out_dir, n_spaxels=args.n, recon=args.recon,
                         x_dataset=args.x_dataset, rank_by=args.rank_by, comm=comm)
    if comm.Get_rank() == 0:
        print(f"wrote {len(written)} plot(s) to {out_dir}:")
        for path in written:
            print(f"  {path}")
    return 0
