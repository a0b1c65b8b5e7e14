"""BLAS threads per rank: ranks x threads within the node's cores."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager

from .comm import get_comm, ranks_on_node
from .launcher import THREAD_VARIABLES


def limit_blas_threads(comm=None, threads: int = 0) -> int:
    """Keep ranks x BLAS threads within the node's cores.  Collective over comm.

    ``threads`` > 0 (``CUBEFIT_BLAS_THREADS``) is used as given.  Otherwise, when the launcher set
    none of ``OMP_NUM_THREADS`` & co., each rank gets ``cores // ranks on this node`` (at least 1):
    OpenBLAS would otherwise start one thread per core in every rank and the ranks would fight
    for the cores (measured: a 2-rank Gram pass 5x slower).  Returns the limit applied (0: none).
    """
    comm = get_comm(comm)
    if threads <= 0:
        if any(var in os.environ for var in THREAD_VARIABLES):
            return 0
        on_node = ranks_on_node(comm)
        if on_node <= 1:
            return 0
        threads = max(1, (os.cpu_count() or 1) // on_node)
    import scipy.linalg  # noqa: F401 -- load every BLAS first: threadpoolctl limits the loaded ones
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=int(threads), user_api="blas")
    return int(threads)


@contextmanager
def matvec_blas_threads(threads: int = 0):
    """One BLAS thread per rank inside the block, unless told otherwise.  Local.

    For stages made of matrix-vector products (the Kaczmarz solver): they are memory-bound, so
    more threads gain little, and OpenBLAS's worker threads, spinning between calls, made the
    HDF5 reads between those calls 3x slower (measured, 2 cores).  ``threads`` > 0
    (``CUBEFIT_BLAS_THREADS``) or a launcher that set ``OMP_NUM_THREADS`` & co. (a hybrid run)
    keeps the current limits.
    """
    if threads > 0 or any(var in os.environ for var in THREAD_VARIABLES):
        yield
        return
    import scipy.linalg  # noqa: F401 -- load every BLAS first: threadpoolctl limits the loaded ones
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def process_cores() -> int:
    """Cores this process may run on (its affinity mask; ``os.cpu_count()`` where unknown).  Local."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def idle_cores(sample_seconds: float = 0.05) -> float:
    """Cores of this process's affinity mask that were idle over the last ``sample_seconds``.  Local.

    From ``/proc/stat`` (idle + iowait time of each of those CPUs, sampled twice); the count of
    :func:`process_cores` where that is unavailable.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return float(process_cores())

    def snapshot():
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit():
                    values = [int(v) for v in fields]
                    out[int(name[3:])] = (values[3] + values[4], sum(values))
        return out

    try:
        first = snapshot()
        time.sleep(sample_seconds)
        second = snapshot()
    except (OSError, ValueError, IndexError):
        return float(process_cores())
    idle = 0.0
    for cpu in cpus:
        if cpu in first and cpu in second:
            total = second[cpu][1] - first[cpu][1]
            idle += (second[cpu][0] - first[cpu][0]) / total if total > 0 else 1.0
    return idle


@contextmanager
def node_blas_threads(threads: int = 0):
    """The cores free for it as BLAS threads inside the block; yields the count.  Local.

    For rank 0's exact NNLS while the other ranks sleep in
    :func:`~cubefit_mpi.parallel.collectives.wait_for_root`: its factorizations are BLAS-3 and
    scale with the cores.  The count is the cores of the affinity mask idle right now
    (:func:`idle_cores`, this process's own included: it sleeps while sampling), at least 1: all
    of them on a dedicated node, fewer where other work holds cores --
    measured on the shared 2-core development machine under load, two OpenBLAS threads made the
    NNLS 5-7x *slower* than one (``docs/performance.md``).  ``threads`` > 0
    (``CUBEFIT_BLAS_THREADS``) is used as given.  A launcher that binds each rank to one core
    (``srun --cpu-bind=cores``) leaves rank 0 one core: launch the exact solve unbound or with one
    rank per node.
    """
    import scipy.linalg  # noqa: F401 -- load every BLAS first: threadpoolctl limits the loaded ones
    from threadpoolctl import threadpool_limits

    if threads > 0:
        count = int(threads)
    else:
        count = max(1, min(process_cores(), int(idle_cores() + 0.5)))    # this process sleeps meanwhile
    with threadpool_limits(limits=count, user_api="blas"):
        yield count
