"""The parallel layer: the communicator, who owns what, reductions, rank-0 output.

Nothing here touches HDF5 or numerics.  Every function takes ``comm`` (default
``MPI.COMM_WORLD``), never a module global, and runs unchanged with one rank and without
``mpiexec`` (MPI singleton start).  Importing this module does not start MPI: ``mpi4py.MPI``
is imported on the first call that needs a communicator.

Ownership model
---------------
Work comes in *tiles* (chunk-aligned blocks of spaxels, or cells of a tile grid).  Tiles are
dealt to ranks in contiguous, balanced blocks (:func:`block_range`); a rank may own none.
Collective HDF5 writes happen in *rounds*: every rank calls the write the same number of times
(:func:`n_rounds`), writing an empty selection when it has nothing left.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Sequence

import numpy as np

_LOG = logging.getLogger("cubefit_mpi")
MAX_MSG_ELEMENTS = 2**27          # keep every single MPI message far below 2**31 elements


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


def world_size_hint() -> int:
    """Number of ranks as announced by the launcher, without starting MPI.  Local.

    Used by code that must decide something (e.g. which driver to use) before MPI starts.
    Returns 1 when no launcher variable is present.
    """
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS", "MPI_LOCALNRANKS"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 1


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
            time.sleep(0.5)          # let the launcher forward the traceback before the kill
        finally:
            comm.Abort(1)

    sys.excepthook = hook


_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def ranks_on_node(comm=None) -> int:
    """How many ranks of ``comm`` share this rank's node.  Collective over comm."""
    comm = get_comm(comm)
    if comm.Get_size() == 1:
        return 1
    node = comm.Split_type(mpi().COMM_TYPE_SHARED)
    count = node.Get_size()
    node.Free()
    return count


def limit_blas_threads(comm=None, threads: int = 0) -> int:
    """Keep ranks x BLAS threads within the node's cores.  Collective over comm.

    ``threads`` > 0 (``CUBEFIT_BLAS_THREADS``) is used as given.  Otherwise, when the launcher set
    none of ``OMP_NUM_THREADS`` & co., each rank gets ``cores // ranks on this node`` (at least 1):
    OpenBLAS would otherwise start one thread per core in every rank and the ranks would fight
    for the cores (measured: a 2-rank Gram pass 5x slower).  Returns the limit applied (0: none).
    """
    comm = get_comm(comm)
    if threads <= 0:
        if any(var in os.environ for var in _THREAD_VARS):
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
    if threads > 0 or any(var in os.environ for var in _THREAD_VARS):
        yield
        return
    import scipy.linalg  # noqa: F401 -- load every BLAS first: threadpoolctl limits the loaded ones
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


# ---------------------------------------------------------------------------------------------
# ownership
# ---------------------------------------------------------------------------------------------
def block_range(n_items: int, size: int, rank: int) -> tuple[int, int]:
    """Half-open range ``[start, stop)`` of ``n_items`` owned by ``rank`` of ``size``.  Local.

    Balanced contiguous blocks: the first ``n_items % size`` ranks get one item more.  A rank
    gets an empty range when ``n_items < size``.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in a communicator of size {size}")
    base, extra = divmod(int(n_items), size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return start, stop


def owned_tiles(n_tiles: int, comm=None) -> range:
    """Tile indices owned by this rank (contiguous, balanced; possibly empty).  Local."""
    comm = get_comm(comm)
    start, stop = block_range(n_tiles, comm.Get_size(), comm.Get_rank())
    return range(start, stop)


def n_rounds(n_tiles: int, size: int) -> int:
    """Number of collective rounds needed when each rank does one tile per round.  Local."""
    return -(-int(n_tiles) // int(size)) if n_tiles > 0 else 0


def tile_bounds(n_items: int, tile: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of consecutive tiles of length ``tile`` covering ``n_items``.  Local."""
    tile = max(1, int(tile))
    return [(s, min(s + tile, n_items)) for s in range(0, n_items, tile)]


def padded_schedule(items: Sequence[Any], comm=None) -> list[Any | None]:
    """Pad this rank's work list with ``None`` to the longest list over ranks.  Collective over comm.

    Iterating over the result makes every rank take the same number of steps, so each step may
    contain a collective call (a rank with ``None`` makes it with an empty selection).
    """
    comm = get_comm(comm)
    longest = comm.allreduce(len(items), op=mpi().MAX)
    return list(items) + [None] * (longest - len(items))


# ---------------------------------------------------------------------------------------------
# reductions (float64)
# ---------------------------------------------------------------------------------------------
def _as_f64(array) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float64)


def allreduce_sum(array, comm=None) -> np.ndarray:
    """Element-wise sum over ranks, in float64, returned on every rank.  Collective over comm.

    Large arrays are reduced in pieces so no MPI message exceeds 2**27 elements.
    """
    comm = get_comm(comm)
    send = _as_f64(array)
    out = np.empty_like(send)
    if comm.Get_size() == 1:
        out[...] = send
        return out
    flat_in, flat_out = send.reshape(-1), out.reshape(-1)
    for lo in range(0, max(flat_in.size, 1), MAX_MSG_ELEMENTS):
        hi = min(lo + MAX_MSG_ELEMENTS, flat_in.size)
        comm.Allreduce(flat_in[lo:hi], flat_out[lo:hi], op=mpi().SUM)
    return out


def reduce_sum(array, comm=None, root: int = 0) -> np.ndarray | None:
    """Element-wise float64 sum over ranks, on ``root`` only (None elsewhere).  Collective over comm."""
    comm = get_comm(comm)
    send = _as_f64(array)
    if comm.Get_size() == 1:
        return send.copy()
    is_root = comm.Get_rank() == root
    out = np.empty_like(send) if is_root else None
    flat_in = send.reshape(-1)
    flat_out = out.reshape(-1) if is_root else None
    for lo in range(0, max(flat_in.size, 1), MAX_MSG_ELEMENTS):
        hi = min(lo + MAX_MSG_ELEMENTS, flat_in.size)
        comm.Reduce(flat_in[lo:hi], flat_out[lo:hi] if is_root else None, op=mpi().SUM, root=root)
    return out


def allreduce_scalar(value: float, comm=None, op: str = "sum") -> float:
    """Sum / max / min of a Python scalar over ranks.  Collective over comm."""
    comm = get_comm(comm)
    ops = {"sum": mpi().SUM, "max": mpi().MAX, "min": mpi().MIN}
    return comm.allreduce(value, op=ops[op])


def bcast_array(array, comm=None, root: int = 0) -> np.ndarray:
    """Broadcast a NumPy array from ``root`` (shape and dtype travel too).  Collective over comm."""
    comm = get_comm(comm)
    if comm.Get_size() == 1:
        return np.asarray(array)
    meta = comm.bcast((array.shape, array.dtype.str) if comm.Get_rank() == root else None, root=root)
    buf = np.ascontiguousarray(array) if comm.Get_rank() == root else np.empty(meta[0], dtype=np.dtype(meta[1]))
    flat = buf.reshape(-1)
    for lo in range(0, max(flat.size, 1), MAX_MSG_ELEMENTS):
        comm.Bcast(flat[lo:lo + MAX_MSG_ELEMENTS], root=root)
    return buf


def agree(value, comm=None, root: int = 0):
    """Root decides, everybody gets its (picklable) ``value``.  Collective over comm."""
    comm = get_comm(comm)
    return value if comm.Get_size() == 1 else comm.bcast(value, root=root)


def allgather_array(array, comm=None) -> np.ndarray:
    """``(ranks, *shape)`` float64: every rank's array of the same shape.  Collective over comm."""
    comm = get_comm(comm)
    send = _as_f64(array)
    if comm.Get_size() == 1:
        return send[None].copy()
    out = np.empty((comm.Get_size(),) + send.shape)
    comm.Allgather(send, out)
    return out


def gather_rows(block, rows_per_rank: Sequence[int], comm=None, root: int = 0) -> np.ndarray | None:
    """Stack every rank's ``(rows_r, m)`` float64 block in rank order on ``root`` (None elsewhere).

    ``rows_per_rank`` (the same list on every rank) gives ``rows_r``; one Gatherv, no pickling.
    Collective over comm.
    """
    comm = get_comm(comm)
    send = _as_f64(block)
    if comm.Get_size() == 1:
        return send.copy()
    width = send.shape[1] if send.ndim == 2 else 0
    counts = np.asarray(rows_per_rank, dtype=np.int64) * width
    out = np.empty((int(np.sum(rows_per_rank)), width)) if comm.Get_rank() == root else None
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
    comm.Gatherv(send.reshape(-1), [out, counts, displs, mpi().DOUBLE] if out is not None else None, root=root)
    return out


def any_rank(flag: bool, comm=None) -> bool:
    """True if ``flag`` is true on any rank.  Collective over comm."""
    return bool(get_comm(comm).allreduce(bool(flag), op=mpi().LOR))


def raise_if_any(exc: BaseException | None, comm=None) -> None:
    """Re-raise a local exception on *every* rank, so all ranks leave a collective section together.

    Each rank passes the exception it caught (or None).  If any rank has one, the first one (by
    rank) is raised everywhere, keeping its type when it is picklable.  Collective over comm.
    """
    comm = get_comm(comm)
    if comm.Get_size() == 1:
        if exc is not None:
            raise exc
        return
    gathered = comm.allgather(None if exc is None else (type(exc), str(exc)))
    for item in gathered:
        if item is not None:
            exc_type, text = item
            if exc is not None and type(exc) is exc_type and str(exc) == text:
                raise exc
            try:
                raise exc_type(text)
            except TypeError:
                raise RuntimeError(text) from None


# ---------------------------------------------------------------------------------------------
# rank-0 output
# ---------------------------------------------------------------------------------------------
class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int, size: int):
        super().__init__("%(asctime)s %(rankinfo)s%(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        self.rankinfo = f"[{rank}/{size}] " if size > 1 else ""

    def format(self, record):
        record.rankinfo = self.rankinfo
        return super().format(record)


def setup_logging(comm=None, level: str = "INFO") -> logging.Logger:
    """Configure the ``cubefit_mpi`` logger: rank prefix; only rank 0 logs below WARNING.  Local."""
    comm = get_comm(comm)
    rank, size = comm.Get_rank(), comm.Get_size()
    logger = logging.getLogger("cubefit_mpi")
    for handler in list(logger.handlers):
        if getattr(handler, "_cubefit", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._cubefit = True  # type: ignore[attr-defined]
    handler.setFormatter(_RankFormatter(rank, size))
    logger.addHandler(handler)
    logger.setLevel(getattr(logging, level) if rank == 0 else logging.WARNING)
    logger.propagate = False
    return logger


class Progress:
    """Rank-0 progress from reduced counts: a bar on a TTY, a percentage line in a batch log.

    ``update(done_here)`` is collective over comm (it reduces the count); only rank 0 prints.
    """

    def __init__(self, total: int, label: str, comm=None, stream=None, min_interval: float = 2.0):
        self.comm = get_comm(comm)
        self.total = max(int(total), 0)
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = min_interval
        self._last = 0.0
        self._start = time.perf_counter()
        self._last_pct = -1
        self.done = 0

    def update(self, done_here: int) -> int:
        """Add this rank's newly finished items; returns the global count.  Collective over comm."""
        self.done += self.comm.allreduce(int(done_here), op=mpi().SUM)
        if self.comm.Get_rank() == 0 and self.total:
            now = time.perf_counter()
            pct = int(100 * self.done / self.total)
            finished = self.done >= self.total
            if finished or now - self._last >= self.min_interval:
                self._last = now
                elapsed = now - self._start
                if self.tty:
                    width = 30
                    fill = int(width * self.done / self.total)
                    self.stream.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] "
                                      f"{self.done}/{self.total} {elapsed:6.1f}s")
                    if finished:
                        self.stream.write("\n")
                elif pct != self._last_pct:
                    _LOG.info("%s: %d/%d (%d%%) %.1fs", self.label, self.done, self.total, pct, elapsed)
                self._last_pct = pct
                self.stream.flush()
        return self.done


class PhaseTimer:
    """Wall time per named phase (``compute``, ``io``, ``comm``) on this rank.  Local.

    ``with timer.phase("io"): ...`` adds the block's wall time to that phase; :meth:`by_rank`
    gathers every rank's totals (collective).
    """

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def by_rank(self, comm=None) -> list[dict[str, float]]:
        """Every rank's phase totals, on every rank.  Collective over comm."""
        return get_comm(comm).allgather(dict(self.seconds))
