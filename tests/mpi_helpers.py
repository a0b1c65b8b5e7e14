"""Helpers of the MPI tests (``tests/mpi``): verdicts shared by every rank."""
from mpi4py import MPI


def assert_all(condition, message: str = "", comm=None) -> None:
    """Assert ``condition`` on every rank once every rank has decided it: the verdicts are shared first.

    Use it after collective work, so that a failure on one rank fails the test on all ranks
    together instead of leaving the others waiting in the next collective call.  Collective.
    """
    comm = MPI.COMM_WORLD if comm is None else comm
    ok = bool(condition)
    verdicts = comm.allgather((ok, "" if ok else str(message)))
    bad = [f"rank {r}: {text or 'assertion failed'}" for r, (good, text) in enumerate(verdicts) if not good]
    assert not bad, "; ".join(bad)


def same_everywhere(value, comm=None) -> bool:
    """True when ``value``'s bytes (an array or anything picklable) are equal on every rank.  Collective."""
    import pickle

    import numpy as np

    comm = MPI.COMM_WORLD if comm is None else comm
    data = np.ascontiguousarray(value).tobytes() if isinstance(value, np.ndarray) else pickle.dumps(value)
    return len(set(comm.allgather(data))) == 1
