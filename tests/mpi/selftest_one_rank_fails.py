"""Deliberately failing MPI tests, run by tests/test_mpi_launch.py (not collected by the suite: the
file name does not start with ``test_``).  Each fails on rank 1 only."""
import os

import pytest
from mpi4py import MPI

pytestmark = pytest.mark.mpi(min_size=2)
comm = MPI.COMM_WORLD
CASE = os.environ.get("CUBEFIT_SELFTEST_CASE", "")


@pytest.mark.skipif(CASE != "verdict", reason="case not selected")
def test_assertion_on_rank_1_while_rank_0_passes():
    assert comm.rank != 1, "rank 1 disagrees"


@pytest.mark.skipif(CASE != "stuck", reason="case not selected")
def test_assertion_on_rank_1_while_rank_0_waits_in_a_collective():
    if comm.rank == 1:
        raise AssertionError("rank 1 failed before the collective call")
    comm.bcast(None, root=1)               # never completed: rank 1 is gone from this test


@pytest.mark.skipif(CASE != "verdict", reason="case not selected")
def test_the_next_test_still_runs():
    assert comm.allreduce(1) == comm.size
