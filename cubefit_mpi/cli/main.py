"""Command line: ``python -m cubefit_mpi <command> FILE.h5 [options]``.

The same under ``mpiexec -n N``, ``srun``, or alone.  Exit codes: 0 success; 2 bad input or
usage (one line on stderr from rank 0, the file untouched); 1 internal error (traceback of the
failing rank, the other ranks aborted) or a failed write (one line).  ``--help`` and ``info``
never start MPI.  Every command that writes a file holds its one-writer lock
(:func:`~cubefit_mpi.io.lock.write_lock`, see :func:`written_file`) for its whole run.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from ..config.errors import ConsistencyError, InputError, WriteFailure
from ..config.version import VERSION as __version__
from ..numerics.synthetic_galaxy import DEFAULT_POPULATIONS, TEMPLATE_SOURCES
from ..parallel.launcher import launcher_rank

_LOG = logging.getLogger("cubefit_mpi")
COMMANDS: dict[str, Callable] = {}


def command(name: str):
    """Register ``fn(args, comm) -> int`` as the handler of a sub-command."""

    def wrap(fn):
        COMMANDS[name] = fn
        return fn

    return wrap


class _Parser(argparse.ArgumentParser):
    """argparse that prints usage errors on rank 0 only and exits 2 (one line)."""

    def error(self, message):
        if launcher_rank() == 0:
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)

    def print_help(self, file=None):
        if launcher_rank() == 0:
            super().print_help(file)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cubefit_mpi", description="MPI-parallel LOSVD-convolved stellar-population "
                     "fitting of IFU data cubes.  Run any command under mpiexec/srun or alone.")
    parser.add_argument("--version", action="version", version=f"cubefit_mpi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    sub.add_parser("info", help="MPI library, ranks, h5py MPI build, HDF5 and pyFFTW versions (no MPI start)")

    p = sub.add_parser("mock", help="write a galaxy with known truth (synthetic or shipped MILES templates)")
    p.add_argument("file", help="output HDF5 file (replaced once the new one is complete)")
    p.add_argument("--templates", choices=TEMPLATE_SOURCES, default="synthetic",
                   help="synthetic SSP-like templates (default), or the MILES SSP subset shipped with the "
                   "package (53 ages x 4 [M/H], 4750-5450 A: at most 619 wavelengths)")
    p.add_argument("--spaxels", type=int, default=400, help="S (default 400)")
    p.add_argument("--components", type=int, default=3, help="C (default 3)")
    p.add_argument("--populations", type=int, default=None,
                   help=f"P (default {DEFAULT_POPULATIONS}; with --templates miles all 212 of the library)")
    p.add_argument("--wavelengths", type=int, default=600, help="L (default 600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=None, metavar="SNR",
                   help="add Gaussian noise at this signal-to-noise ratio (default: noise-free)")
    p.add_argument("--masked-pixels", type=int, default=0, metavar="K", help="mask K pixels")

    p = sub.add_parser("status", help="what the file holds and how complete it is")
    p.add_argument("file")

    p = sub.add_parser("validate", help="check a file's inputs (grids, shapes, NaN, LOSVD >= 0, mask); read-only")
    p.add_argument("file")

    import importlib

    for name in CLI_MODULES:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


# stage modules that add sub-commands: each has register(sub), setting handler=fn(args, comm) -> int
CLI_MODULES = ("ingest", "build", "weights", "watch", "solve", "uncertainty", "recon", "pipeline", "scaling", "velocity_bias",
               "preflight")


# ---------------------------------------------------------------------------------------------
@command("info")
def cmd_info(args, comm) -> int:
    import mpi4py

    mpi4py.rc.initialize = False          # report without starting MPI
    import h5py
    import numpy
    import scipy
    from mpi4py import MPI

    try:
        import pyfftw
        fftw = f"pyFFTW {pyfftw.__version__}"
    except ImportError:
        fftw = "pyFFTW not installed"
    from ..parallel.launcher import world_size_hint

    lines = [
        f"cubefit_mpi {__version__}",
        f"python      {sys.version.split()[0]}  numpy {numpy.__version__}  scipy {scipy.__version__}",
        f"MPI library {MPI.Get_library_version().splitlines()[0].strip()}",
        f"mpi4py      {mpi4py.__version__}  (MPI initialised: {'yes' if MPI.Is_initialized() else 'no'})",
        f"ranks       {world_size_hint()} (from the launcher's environment)",
        f"h5py        {h5py.version.version}  HDF5 {h5py.version.hdf5_version}  MPI build: {h5py.get_config().mpi}",
        f"FFT         {fftw}",
    ]
    if launcher_rank() == 0:
        print("\n".join(lines))
    return 0


@command("mock")
def cmd_mock(args, comm) -> int:
    from ..numerics.synthetic_galaxy import MockSpec
    from ..stages.mock import default_populations, make_mock

    populations = args.populations if args.populations is not None else default_populations(args.templates)
    try:
        spec = MockSpec(spaxels=args.spaxels, components=args.components, populations=populations,
                        wavelengths=args.wavelengths, seed=args.seed, snr=args.noise,
                        masked_pixels=args.masked_pixels, templates=args.templates)
        out = make_mock(args.file, spec, comm)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if comm.Get_rank() == 0:
        d = out["dims"]
        print(f"wrote {args.file}: S={d.S} C={d.C} P={d.P} L={d.L} T={d.T} V={d.V} "
              f"in {out['seconds']:.1f}s on {comm.Get_size()} rank(s)")
    return 0


@command("status")
def cmd_status(args, comm) -> int:
    from ..parallel.collectives import raise_if_any
    from ..stages.status import file_status, format_table

    rows, error = None, None
    if comm.Get_rank() == 0:          # read-only summary: rank 0 alone opens the file
        try:
            rows = file_status(args.file)
        except InputError as exc:
            error = exc
    raise_if_any(error, comm)
    if rows is not None:
        print(format_table(rows))
    return 0


@command("validate")
def cmd_validate(args, comm) -> int:
    from ..io.h5file import open_h5
    from ..io.validation import validate_inputs

    with open_h5(args.file, "r", comm) as f:
        info = validate_inputs(f, comm=comm)
    if comm.Get_rank() == 0:
        d = info["dims"]
        print(f"{args.file}: inputs OK (S={d.S} L={d.L} T={d.T} V={d.V} C={d.C} P={d.P})")
    return 0


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (``python -m cubefit_mpi`` exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:          # --help, --version, usage errors: no MPI_Abort for these
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "info":
        return cmd_info(args, None)
    from ..config.knobs import get_knobs, warn_predecessor_knobs
    from ..io.lock import write_lock
    from ..parallel.comm import get_comm, install_abort_excepthook, run_abort_hooks
    from ..parallel.failure import FailureAgreement
    from ..parallel.output import setup_logging
    from ..parallel.threads import limit_blas_threads

    comm = get_comm()
    install_abort_excepthook(comm)
    agreement = FailureAgreement(comm)
    rank = comm.Get_rank()
    try:
        knobs = get_knobs()
        setup_logging(comm, knobs.log_level)
        limit_blas_threads(comm, knobs.blas_threads)
        if rank == 0 and knobs.differing_from_defaults():
            _LOG.info("knobs: %s", knobs.differing_from_defaults())
        if rank == 0:
            warn_predecessor_knobs(logging.getLogger("cubefit_mpi.knobs"))
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        target = written_file(args)
        if target is None:
            return handler(args, comm)
        with write_lock(target, args.command, comm):
            return handler(args, comm)
    except (InputError, ConsistencyError) as exc:
        agreement.settle(exc, f"in `cubefit_mpi {args.command}`")      # one rank alone: abort, never hang
        if rank == 0:
            sys.stderr.write(f"cubefit_mpi {args.command}: error: {exc}\n")
            sys.stderr.flush()
        return exc.exit_code
    except WriteFailure as exc:        # end now: no HDF5 close/atexit on a file whose writes failed
        if rank == 0 or not exc.everywhere:
            sys.stderr.write(f"cubefit_mpi {args.command}: error: {exc}\n")
            sys.stderr.flush()
        run_abort_hooks()              # release the write lock
        if comm.Get_size() > 1:
            if exc.everywhere and rank != 0:   # rank 0 prints the line and releases the lock, then aborts
                import time                    # the job, this rank with it (an abort from here could
                                               # kill rank 0 first: no message, a lock left behind)
                time.sleep(ABORT_WAIT_SEC)
            comm.Abort(exc.exit_code)
        os._exit(exc.exit_code)


ABORT_WAIT_SEC = 30.0     # how long the other ranks wait for rank 0's abort after a write failure on every rank
# commands that write the file named by their `file` argument (`run` locks its configured file itself)
WRITING_COMMANDS = ("mock", "ingest", "build", "rebin", "convert-norm", "energy", "recompress", "weights",
                    "solve", "recon", "uncertainty")
WRITING_WITH = {"done": "invalidate", "velocity-bias": "apply"}    # commands that write only with this option


def written_file(args) -> str | None:
    """The file a command writes (it takes the one-writer lock on it), or None for readers.  Local."""
    option = WRITING_WITH.get(args.command)
    if args.command in WRITING_COMMANDS or (option is not None and getattr(args, option, None)):
        return args.file
    return None


def run() -> None:
    """Console-script / ``-m`` wrapper: exit with :func:`main`'s code.

    A non-zero code that every rank agrees on (bad input, usage) ends MPI cleanly and exits
    with that code: a plain ``sys.exit(2)`` under ``python -m mpi4py`` would call ``MPI_Abort``.
    """
    code = main()
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        mpi_module = sys.modules.get("mpi4py.MPI")
        if mpi_module is not None and mpi_module.Is_initialized() and not mpi_module.Is_finalized():
            mpi_module.Finalize()
        os._exit(code)
    sys.exit(0)
