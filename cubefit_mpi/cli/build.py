"""Sub-commands of the hypercube stage: ``build``, ``convert-norm``, ``energy``, ``done``, ``recompress``."""
from __future__ import annotations

from ..config.errors import InputError


def parse_chunks(text: str | None):
    """``"S,C,P"`` -> three ints (None -> three Nones); InputError otherwise.  Local."""
    if text is None:
        return None, None, None
    try:
        parts = [int(v) for v in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3:
        raise InputError(f"--chunks {text}: expected three integers S,C,P")
    return tuple(parts)


def register(sub) -> None:
    """Add the hypercube sub-parsers; defaults are :func:`build_hypercube`'s own.  Local."""
    from ..config.options import default_of
    from ..stages.build import build_hypercube

    p = sub.add_parser("build", help="build /HyperCube/models (resumes an interrupted build; makes /R_T "
                                     "when the file has none)")
    p.add_argument("file")
    p.add_argument("--norm", default=default_of(build_hypercube, "norm_mode"),
                   help="model | data (default %(default)s)")
    p.add_argument("--amp", default=default_of(build_hypercube, "amp_mode"),
                   help="LOSVD amplitude: sum | trapz (default %(default)s)")
    p.add_argument("--rebin-mode", default=default_of(build_hypercube, "rebin_mode"),
                   help="how a missing /R_T is made: overlap | interp (default %(default)s)")
    p.add_argument("--chunks", default=None, metavar="S,C,P", help="chunk shape (default: ~8 MiB chunks)")
    p.add_argument("--compression", default=None, metavar="gzip[:level]|lzf|none")
    p.add_argument("--force", action="store_true", help="discard an existing hypercube and rebuild")
    p.set_defaults(handler=cmd_build)

    p = sub.add_parser("rebin", help="write /R_T, the rebin operator from the template to the observed grid")
    p.add_argument("file")
    p.add_argument("--mode", default=default_of(build_hypercube, "rebin_mode"),
                   help="overlap (exact, flux-conserving) | interp (two-tap, the predecessor's); default %(default)s")
    p.add_argument("--force", action="store_true", help="rewrite an existing /R_T")
    p.set_defaults(handler=cmd_rebin)

    p = sub.add_parser("convert-norm", help="flip /HyperCube/models between norm model and data (no FFT)")
    p.add_argument("file")
    p.add_argument("--to", required=True, help="model | data")
    p.add_argument("--no-energy", action="store_true", help="do not recompute /HyperCube/col_energy")
    p.set_defaults(handler=cmd_convert)

    p = sub.add_parser("energy", help="recompute /HyperCube/col_energy (optionally lambda-weighted)")
    p.add_argument("file")
    p.add_argument("--weighted", action="store_true", help="weight by /HyperCube/lambda_weights")
    p.set_defaults(handler=cmd_energy)

    p = sub.add_parser("done", help="show the build's tile map; --invalidate resets tiles for the next build")
    p.add_argument("file")
    p.add_argument("--invalidate", default=None, metavar="S0:S1|all")
    p.set_defaults(handler=cmd_done)

    p = sub.add_parser("recompress", help="rewrite /HyperCube/models with other filters (copy, verify, swap); "
                                          "--compact rewrites the whole file to reclaim the space")
    p.add_argument("file")
    p.add_argument("--compression", default=None, metavar="gzip[:level]|lzf|none")
    p.add_argument("--compact", action="store_true",
                   help="then copy the whole file to a new one, verify, fsync and rename it over the original "
                        "(HDF5 never shrinks a file by itself)")
    p.set_defaults(handler=cmd_recompress)


def cmd_build(args, comm) -> int:
    from ..stages.build import build_hypercube

    s, c, p = parse_chunks(args.chunks)
    out = build_hypercube(args.file, norm_mode=args.norm, amp_mode=args.amp, S_chunk=s, C_chunk=c, P_chunk=p,
                          compression=args.compression, comm=comm, force=args.force,
                          rebin_mode=args.rebin_mode)
    if comm.Get_rank() == 0:
        print(f"built {args.file}:/HyperCube/models: {out['units_built']} units built, {out['units_skipped']} "
              f"already done, chunks {out['chunks']}, {out['seconds']:.1f}s on {comm.Get_size()} rank(s)")
    return 0


def cmd_rebin(args, comm) -> int:
    from ..io.manager import H5Manager

    wrote = H5Manager(args.file, comm=comm).ensure_rebin_and_resample(args.mode, force=args.force)
    if comm.Get_rank() == 0:
        print(f"{args.file}:/R_T {'written' if wrote else 'kept (already ' + args.mode + '; --force rewrites it)'}")
    return 0


def cmd_convert(args, comm) -> int:
    from ..stages.convert_norm import convert_hypercube_norm

    out = convert_hypercube_norm(args.file, args.to, recompute_energy=not args.no_energy, comm=comm)
    if comm.Get_rank() == 0:
        print(f"{args.file}: norm.mode={out['norm.mode']}" + ("" if out["converted"] else " (already)"))
    return 0


def cmd_energy(args, comm) -> int:
    from ..stages.hypercube_maintenance import recompute_col_energy

    energy = recompute_col_energy(args.file, weighted=args.weighted, comm=comm)
    if comm.Get_rank() == 0:
        print(f"{args.file}:/HyperCube/col_energy recomputed ({'weighted' if args.weighted else 'unweighted'}): "
              f"min {energy.min():.4g} max {energy.max():.4g}")
    return 0


def cmd_done(args, comm) -> int:
    from ..stages.hypercube_maintenance import done_map, invalidate_tiles

    if args.invalidate:
        reset = invalidate_tiles(args.file, args.invalidate, comm=comm)
        if comm.Get_rank() == 0:
            print(f"{args.file}: reset {reset} tile(s); run `cubefit_mpi build {args.file}` to redo them")
        return 0
    info = done_map(args.file, comm=comm)
    if comm.Get_rank() == 0:
        print(f"{args.file}: {info['tiles_done']}/{info['tiles_total']} tiles done "
              f"({info['s_tiles_done']}/{info['s_tiles_total']} S-tiles), chunks {tuple(info['chunks'])}")
        row = "".join("#" if t else "." for t in info["done"].all(axis=(1, 2)))
        for i in range(0, len(row), 80):
            print(f"  S-tiles {i:>6}: {row[i:i + 80]}")
        if info["missing_spaxels"]:
            print("  missing spaxels: " + ", ".join(f"{a}:{b}" for a, b in info["missing_spaxels"][:20]))
    return 0


def cmd_recompress(args, comm) -> int:
    if args.compression is None and not args.compact:
        raise InputError("recompress: give --compression gzip[:level]|lzf|none, --compact, or both")
    if args.compression is not None:
        from ..stages.hypercube_maintenance import recompress

        recompress(args.file, args.compression, comm=comm)
        if comm.Get_rank() == 0:
            print(f"{args.file}:/HyperCube/models recompressed with {args.compression}")
    if args.compact:
        from ..stages.compact import compact_file

        out = compact_file(args.file, comm=comm)
        if comm.Get_rank() == 0:
            print(f"{args.file}: compacted, {out['bytes_before']} -> {out['bytes_after']} bytes "
                  f"({out['bytes_before'] - out['bytes_after']} reclaimed)")
    return 0
