"""The MPI suite: ``mpiexec -n N python -m mpi4py -m pytest --with-mpi tests/mpi`` (N = 1..4).

One verdict for all ranks.  After each phase of each test (setup, call, teardown) the ranks
agree, within :data:`VERDICT_SECONDS`, on whether it failed anywhere:

* a rank whose test passed while another rank's failed fails too, naming the failed ranks, so
  the report is the same on every rank;
* a rank that failed while another rank is stuck (typically in a collective call the failed
  rank will never make) prints its traceback and aborts the job (``MPI_Abort``) after
  :data:`VERDICT_SECONDS`: a failing assertion on one rank ends the run in seconds, never in
  a 300 s timeout.

Tests decide collective verdicts with :func:`mpi_helpers.assert_all` (decide, share, assert
everywhere).
"""
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # share tests/conftest helpers

VERDICT_SECONDS = 10.0


def _world():
    from mpi4py import MPI

    return MPI, MPI.COMM_WORLD


def _agree(failed: bool, what: str, longrepr) -> list[int]:
    """Ranks whose phase failed; aborts the job when the others do not answer in time."""
    MPI, comm = _world()
    if comm.Get_size() == 1:
        return [0] if failed else []
    mine = np.zeros(comm.Get_size(), dtype=np.int32)
    mine[comm.Get_rank()] = 1 if failed else 0
    every = np.zeros_like(mine)
    request = comm.Iallreduce([mine, MPI.INT], [every, MPI.INT], op=MPI.MAX)
    deadline = time.monotonic() + VERDICT_SECONDS
    while not request.Test():
        if time.monotonic() > deadline:
            sys.stderr.write(f"\n[rank {comm.Get_rank()}] {what} failed here and the other ranks did not reach "
                             f"the verdict within {VERDICT_SECONDS:g}s (stuck in a collective call): aborting.\n"
                             f"{longrepr}\n")
            sys.stderr.flush()
            comm.Abort(1)
        time.sleep(0.005)
    return [r for r, flag in enumerate(every) if flag]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when == "setup" and report.skipped:
        return                                      # skips depend on the size: the same on every rank
    failed = report.failed
    longrepr = str(report.longrepr) if failed else ""
    bad = _agree(failed, f"{item.nodeid} ({call.when})", longrepr)
    if bad and not failed:
        report.outcome = "failed"
        report.longrepr = f"{call.when} failed on rank(s) {', '.join(map(str, bad))}: see that rank's report"
