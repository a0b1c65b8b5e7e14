"""The communicator: ``comm`` passed in (default ``MPI.COMM_WORLD``, started on first use), the
abort hook that turns an exception on one rank into the end of the job, ranks per node.

Importing this module does not start MPI: ``mpi4py.MPI`` is imported on the first call that
needs a communicator.  Every function runs unchanged with one rank and without ``mpiexec``.
"""
from __future__ import annotations

import sys
import time


# ---------------------------------------------------------------------------------------------
# the communicator
# ---------------------------------------------------------------------------------------------
def get_comm(comm=None):
    """Return ``comm``, or ``MPI.COMM_WORLD`` when it is None (starting MPI on first use).  Local."""
    if comm is not None:
        return comm
    from mpi4py import MPI  # lazy: importing cubefit_mpi must not start MPI

    return MPI.COMM_WORLD


def mpi():
    """The ``mpi4py.MPI`` module (imported lazily).  Local."""
    from mpi4py import MPI

    return MPI


_ON_ABORT: list = []          # callables run (best effort) just before MPI_Abort, e.g. releasing a lock


def on_abort(fn) -> None:
    """Run ``fn()`` before this process aborts the job (release a lock file, ...).  Local."""
    _ON_ABORT.append(fn)


def forget_on_abort(fn) -> None:
    """Undo :func:`on_abort`.  Local."""
    if fn in _ON_ABORT:
        _ON_ABORT.remove(fn)


def run_abort_hooks() -> None:
    """Run the :func:`on_abort` callables, ignoring their errors.  Local."""
    for fn in list(_ON_ABORT):
        try:
            fn()
        except Exception:          # noqa: BLE001 -- the job is ending; the traceback that matters is printed
            pass


def install_abort_excepthook(comm=None) -> None:
    """Make an uncaught exception on any rank abort the whole job instead of hanging it.  Collective-free.

    The traceback is printed (with the rank) first, then ``comm.Abort(1)`` ends every rank.
    With one rank the default hook is kept (the interpreter exits with 1 by itself).
    """
    comm = get_comm(comm)
    if comm.Get_size() == 1:
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        try:
            sys.stderr.write(f"[rank {comm.Get_rank()}] uncaught exception, aborting the job:\n")
            previous(exc_type, exc, tb)
            sys.stderr.flush()
            run_abort_hooks()
            time.sleep(0.5)          # let the launcher forward the traceback before the kill
        finally:
            comm.Abort(1)

    sys.excepthook = hook


def ranks_on_node(comm=None) -> int:
    """How many ranks of ``comm`` share this rank's node.  Collective over comm."""
    comm = get_comm(comm)
    if comm.Get_size() == 1:
        return 1
    node = comm.Split_type(mpi().COMM_TYPE_SHARED)
    count = node.Get_size()
    node.Free()
    return count

