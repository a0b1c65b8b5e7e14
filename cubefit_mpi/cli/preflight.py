"""Sub-command ``preflight``: the go/no-go table of every check a long job needs (rank 0 prints)."""
from __future__ import annotations

from ..config.errors import InputError


def register(sub) -> None:
    """Add the ``preflight`` sub-parser to ``sub``.  Local (no MPI)."""
    p = sub.add_parser("preflight", help="go/no-go table before a long job: inputs, chunks, memory per rank "
                                         "(build, solve), disk space; exit 2 on no-go")
    p.add_argument("file")
    p.add_argument("--method", default="exact", help="exact | kaczmarz: the solver the job runs (default exact)")
    p.add_argument("--ranks", type=int, default=None, metavar="N", help="ranks of the job (default: this run's)")
    p.add_argument("--ranks-per-node", type=int, default=None, metavar="N",
                   help="ranks sharing a node (default: min(--ranks, cores of this node))")
    p.add_argument("--node-memory", type=float, default=None, metavar="GIB",
                   help="memory of a node in GiB (default: this node's)")
    p.add_argument("--chunks", default=None, metavar="S,C,P", help="the chunk shape the build will use")
    p.set_defaults(handler=cmd_preflight)


def cmd_preflight(args, comm) -> int:
    """``cubefit_mpi preflight FILE``: exit 0 on go, 2 naming the no-go rows.  Collective over comm."""
    from ..stages.preflight import failing, format_table, preflight
    from .build import parse_chunks

    chunks = parse_chunks(args.chunks) if args.chunks else None
    if args.node_memory is not None and not args.node_memory > 0:
        raise InputError(f"--node-memory {args.node_memory}: expected a positive number of GiB")
    memory = None if args.node_memory is None else int(args.node_memory * 2**30)
    rows = preflight(args.file, method=args.method, ranks=args.ranks, ranks_per_node=args.ranks_per_node,
                     node_memory=memory, chunks=chunks, comm=comm)
    if comm.Get_rank() == 0:
        print(format_table(rows))
    bad = failing(rows)
    if bad:
        raise InputError(f"{args.file}: no-go: " + ", ".join(bad))
    return 0
