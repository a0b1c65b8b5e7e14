"""Sub-command ``velocity-bias``: measure (and with ``--apply`` correct) the global velocity
offset between the data and the mean model.  Runs under ``mpiexec`` or alone; rank 0 prints."""
from __future__ import annotations


def register(sub) -> None:
    """Add the ``velocity-bias`` sub-parser to ``sub``.  Local (no MPI)."""
    p = sub.add_parser("velocity-bias", help="global velocity offset of the data against the mean model "
                                             "(cross-correlation; --apply shifts /VelPix)")
    p.add_argument("file")
    p.add_argument("--range", dest="v_range", type=float, default=500.0, metavar="KMS",
                   help="trial offsets from -KMS to +KMS (default 500)")
    p.add_argument("--step", type=float, default=10.0, metavar="KMS", help="trial offset spacing (default 10)")
    p.add_argument("--degree", type=int, default=4,
                   help="Legendre degree of the continuum removed from data and model (default 4; -1 none)")
    p.add_argument("--bootstrap", type=int, default=200, metavar="B",
                   help="bootstrap replicates over spaxels for the uncertainty (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap weights (default 0)")
    p.add_argument("--template", default="auto",
                   help="auto | optimal | mean | x: the model's templates (default auto: the mixtures of "
                        "/X_global when present, else one template fitted to the integrated spectrum)")
    p.add_argument("--apply", action="store_true", help="add the offset to /VelPix (recorded as attributes)")
    p.add_argument("--force", action="store_true",
                   help="with --apply: add the residual even when an offset was applied before")
    p.set_defaults(handler=cmd_velocity_bias)


def cmd_velocity_bias(args, comm) -> int:
    """``cubefit_mpi velocity-bias FILE [--apply]``.  Collective over comm."""
    from ..stages.velocity_bias import apply_velocity_bias, estimate_velocity_bias

    result = estimate_velocity_bias(args.file, v_range=args.v_range, step=args.step, degree=args.degree,
                                    n_boot=args.bootstrap, seed=args.seed, template=args.template, comm=comm)
    applied = apply_velocity_bias(args.file, result, force=args.force, comm=comm) if args.apply else None
    if comm.Get_rank() == 0:
        print(f"{args.file}: velocity offset {result['offset_kms']:+.2f} +- {result['sigma_kms']:.2f} km/s "
              f"(data against the {result['template']} model; {result['spaxels']} spaxels, "
              f"{result['pixels_used']} pixels, {result['n_boot']} bootstrap replicates)")
        if applied is not None:
            print(f"{args.file}:/VelPix " + (f"shifted; recorded offset {applied['offset_kms']:+.2f} km/s"
                                             if applied["applied"] else
                                             f"unchanged: an offset of {applied['offset_kms']:+.2f} km/s was "
                                             f"applied before (--force adds the residual)"))
    return 0
