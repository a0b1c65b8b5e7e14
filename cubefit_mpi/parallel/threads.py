"""BLAS threads per rank: ranks x threads within the node's cores."""
from __future__ import annotations

import os
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


@contextmanager
def node_blas_threads(threads: int = 0):
    """All this process's cores as BLAS threads inside the block; yields the count.  Local.

    For rank 0's exact NNLS while the other ranks sleep in
    :func:`~cubefit_mpi.parallel.collectives.wait_for_root`: its factorizations are BLAS-3 and
    scale with the cores.  ``threads`` > 0 (``CUBEFIT_BLAS_THREADS``) is used as given.  A
    launcher that binds each rank to one core (``srun --cpu-bind=cores``) leaves rank 0 one core:
    launch the exact solve unbound or with one rank per node.
    """
    import scipy.linalg  # noqa: F401 -- load every BLAS first: threadpoolctl limits the loaded ones
    from threadpoolctl import threadpool_limits

    count = int(threads) if threads > 0 else process_cores()
    with threadpool_limits(limits=count, user_api="blas"):
        yield count
