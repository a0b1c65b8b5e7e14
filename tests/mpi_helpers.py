"""Helpers of the MPI tests (``tests/mpi``): verdicts shared by every rank; and a Kaczmarz tracker
keeping every epoch's iterate (used by the serial and the MPI suites)."""
import numpy as np
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


class EpochSnapshots:
    """A Kaczmarz fit tracker keeping every epoch's iterate (``xs``)."""

    def __init__(self):
        self.xs = []

    def log_rmse(self, *args):
        pass

    def progress(self, *args):
        pass

    def snapshot(self, x, epoch, rmse):
        self.xs.append(np.array(x, copy=True))


def built_mock(directory, spec, comm=None, s_chunk: int = 4):
    """A mock of ``spec`` (a MockSpec) with its hypercube in ``directory``, and a copy of it made by
    rank 0 for the serial reference: ``(path, reference_path)``.  Collective."""
    import shutil

    from cubefit_mpi.stages.build import build_hypercube
    from cubefit_mpi.stages.mock import make_mock

    comm = comm or MPI.COMM_WORLD
    path = directory / "g.h5"
    make_mock(str(path), spec, comm)
    build_hypercube(str(path), S_chunk=s_chunk, comm=comm)
    if comm.rank == 0:
        shutil.copy(path, directory / "ref.h5")
    comm.Barrier()
    return path, directory / "ref.h5"
