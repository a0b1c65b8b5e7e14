"""Collectives: float64 reductions in messages far below 2**31 elements, broadcasts, gathers, and
one verdict for all ranks (:func:`raise_if_any`, :func:`check_all_ranks`).  Collective over comm
unless noted.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from ..config.errors import InputError
from .comm import get_comm, mpi

MAX_MSG_ELEMENTS = 2**27          # keep every single MPI message far below 2**31 elements


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


def wait_for_root(comm=None, root: int = 0, max_sleep: float = 0.005) -> float:
    """Return on every rank once ``root`` has called this too; the others sleep meanwhile.  Collective over comm.

    For a stretch where ``root`` works alone (rank 0's NNLS): MPICH busy-polls inside a blocking
    collective such as ``MPI_Bcast``, so the waiting ranks would take the cores the root's BLAS
    threads need.  Here every rank posts an ``Ibarrier``; the waiting ranks test it between
    sleeps of 0.1 ms doubling up to ``max_sleep`` seconds.  Returns the seconds waited.
    """
    comm = get_comm(comm)
    t0 = time.perf_counter()
    if comm.Get_size() == 1:
        return 0.0
    request = comm.Ibarrier()
    if comm.Get_rank() == root:
        request.Wait()
        return time.perf_counter() - t0
    pause = 1e-4
    while not request.Test():
        time.sleep(pause)
        pause = min(2.0 * pause, max_sleep)
    return time.perf_counter() - t0


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


def check_all_ranks(fn, *args, comm=None, **kwargs):
    """Run ``fn`` on every rank and raise its first error on all of them.  Collective over comm."""
    comm = get_comm(comm)
    error, result = None, None
    try:
        result = fn(*args, **kwargs)
    except InputError as exc:
        error = exc
    raise_if_any(error, comm)
    return result


def upper_row_blocks(n: int) -> list[tuple[int, int]]:
    """Row blocks ``[(i0, i1), ...]`` of an ``n × n`` upper triangle, each message of
    ``(i1 - i0) × (n - i0)`` elements at most about ``MAX_MSG_ELEMENTS``.  Local."""
    rows = max(1, MAX_MSG_ELEMENTS // max(int(n), 1))
    return [(i0, min(int(n), i0 + rows)) for i0 in range(0, int(n), rows)]


def reduce_upper_to_root(matrix: np.ndarray, comm=None) -> np.ndarray | None:
    """Sum the upper triangles of every rank's symmetric ``matrix (n, n)`` on rank 0, symmetrised
    (None elsewhere), in row blocks (:func:`upper_row_blocks`).  Collective over comm."""
    comm = get_comm(comm)
    n = matrix.shape[0]
    out = np.zeros((n, n)) if comm.Get_rank() == 0 else None
    blocks = upper_row_blocks(n)
    for i0, i1 in blocks:
        part = reduce_sum(np.ascontiguousarray(matrix[i0:i1, i0:]), comm)
        if out is not None:
            out[i0:i1, i0:] = part
    if out is not None:
        symmetrise_from_upper(out, blocks)
    return out


def symmetrise_from_upper(matrix: np.ndarray, blocks: list[tuple[int, int]] | None = None) -> None:
    """Copy the upper triangle of the square ``matrix`` onto its lower one, in place, a row
    block at a time (no full-size temporary).  Local."""
    n = matrix.shape[0]
    for i0, i1 in blocks or upper_row_blocks(n):
        diag = matrix[i0:i1, i0:i1]
        upper = np.triu(diag)
        matrix[i0:i1, i0:i1] = upper + np.triu(upper, 1).T
        matrix[i0:i1, :i0] = matrix[:i0, i0:i1].T
