"""One failing rank never hangs the others.

An exception leaves a collective section on one rank, or on all of them.  When every rank
raised (a bad input found by all, a decision broadcast from rank 0) they may clean up together
(close a parallel file, return exit code 2).  When only some did, any collective clean-up hangs:
the others wait in their next collective call for a rank that never comes.

:class:`FailureAgreement` tells the two apart without a hang: a failing rank enters a
non-blocking barrier on a private duplicate of the communicator (so it can never be matched with
another collective) and waits at most ``CUBEFIT_FAIL_GRACE_SEC``.  If all ranks arrive, they
all failed; otherwise :func:`abort_job` prints this rank's traceback and calls ``MPI_Abort``.
With one rank nothing is waited for.
"""
from __future__ import annotations

import sys
import time
import traceback

from .comm import get_comm, run_abort_hooks

def abort_job(comm, exc: BaseException | None, reason: str, code: int = 1) -> None:
    """Print ``reason`` and this rank's traceback of ``exc``, then ``MPI_Abort(code)``.  Local (ends the job)."""
    try:
        sys.stderr.write(f"[rank {comm.Get_rank()}] {reason}\n")
        if exc is not None:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        sys.stderr.flush()
        run_abort_hooks()
        time.sleep(0.5)                # let the launcher forward the traceback before the kill
    finally:
        comm.Abort(code)


class FailureAgreement:
    """A private duplicate of ``comm`` on which failing ranks find out whether all of them failed.

    Create it collectively where every rank is (e.g. when a parallel file is opened); call
    :meth:`all_failed` on a failing rank; :meth:`free` collectively on the way out when nobody failed.
    """

    def __init__(self, comm=None):
        comm = get_comm(comm)
        self.comm = comm
        self.dup = comm.Dup() if comm.Get_size() > 1 else None

    def all_failed(self, grace: float | None = None) -> bool:
        """True when every rank reached this call within ``grace`` seconds.  Collective-or-timeout."""
        if self.dup is None:
            return True
        if grace is None:
            from ..config.errors import KnobError
            from ..config.knobs import Knobs, get_knobs

            try:
                grace = get_knobs().fail_grace_sec
            except KnobError:                  # a bad knob is the failure being settled: the default
                grace = Knobs.fail_grace_sec
        request = self.dup.Ibarrier()
        deadline = time.monotonic() + float(grace)
        while not request.Test():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        self.free()
        return True

    def free(self) -> None:
        """Release the duplicate.  Collective over comm (when it was not already freed)."""
        if self.dup is not None:
            self.dup.Free()
            self.dup = None

    def settle(self, exc: BaseException, where: str) -> None:
        """On a failing rank: return when all ranks failed, else abort the job with the traceback.  Local."""
        if not self.all_failed():
            abort_job(self.comm, exc, f"{type(exc).__name__} {where} on this rank only (the other ranks did not "
                                      f"fail within CUBEFIT_FAIL_GRACE_SEC): aborting the job")
