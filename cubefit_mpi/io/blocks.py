"""Collective block I/O on datasets of files opened by :func:`~.h5file.open_h5`.

:func:`write_block` / :func:`read_block` make every rank call ``H5Dwrite``/``H5Dread``
collectively, with an empty selection on ranks that have nothing (the high-level h5py API
hangs there, h5py #965); on serial files they are plain slicing.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..config.errors import InputError
from ..parallel.comm import get_comm, mpi
from ..parallel.decomposition import block_range
from .h5file import h5py_module, is_parallel


def _xfer(collective: bool):
    h5py = h5py_module()
    dxpl = h5py.h5p.create(h5py.h5p.DATASET_XFER)
    if collective:
        dxpl.set_dxpl_mpio(h5py.h5fd.MPIO_COLLECTIVE)
    return dxpl


def write_block(dset, offset: Sequence[int] | None, block: np.ndarray | None) -> None:
    """Write ``block`` at ``offset`` of ``dset``; ``block=None`` writes nothing.

    Collective over the file's communicator when the file is parallel: every rank must call it
    the same number of times (a rank with nothing passes ``None``).  Local for serial files.
    """
    h5py = h5py_module()
    if not is_parallel(dset.file):
        if block is not None and block.size:
            dset[tuple(slice(o, o + n) for o, n in zip(offset, block.shape))] = block
        return
    fspace = dset.id.get_space()
    if block is None or block.size == 0:
        fspace.select_none()
        mshape = (1,) * max(len(dset.shape), 1)
        mspace = h5py.h5s.create_simple(mshape)
        mspace.select_none()
        buf = np.zeros(mshape, dtype=dset.dtype)
    else:
        buf = np.ascontiguousarray(block, dtype=dset.dtype)
        fspace.select_hyperslab(tuple(int(o) for o in offset), buf.shape)
        mspace = h5py.h5s.create_simple(buf.shape)
    dset.id.write(mspace, fspace, buf, dxpl=_xfer(True))


def read_block(dset, offset: Sequence[int] | None, shape: Sequence[int] | None,
               dtype=None, collective: bool = True, out: np.ndarray | None = None) -> np.ndarray | None:
    """Read the block ``[offset, offset + shape)``; ``shape=None`` reads nothing and returns None.

    Collective over the file's communicator when the file is parallel and ``collective`` (same
    rules as :func:`write_block`).  Local for serial files, and with ``collective=False``
    (independent MPI-IO: for reads that do not need the ranks in step).  ``out``: a C-contiguous
    array of at least ``shape[0]`` rows to read into (reused buffers avoid fresh pages per read);
    its leading rows are returned.
    """
    h5py = h5py_module()
    dtype = np.dtype(dtype or dset.dtype)
    empty = shape is None or int(np.prod(shape)) == 0
    if not empty and any(o < 0 or o + n > size for o, n, size in zip(offset, shape, dset.shape)):
        raise ValueError(f"read_block: [{tuple(offset)} + {tuple(shape)}) is outside {dset.name} {dset.shape}")
    if out is not None and shape is not None:
        out = out[:shape[0]]
        if out.shape != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError(f"read_block: out {out.shape} {out.dtype} does not hold {tuple(shape)} {dtype}")
    if not is_parallel(dset.file):
        if shape is None:
            return None
        sel = tuple(slice(o, o + n) for o, n in zip(offset, shape))
        if out is None:
            return np.asarray(dset[sel], dtype=dtype)
        if not empty:
            dset.read_direct(out, sel)
        return out
    if empty and not collective:
        return None if shape is None else np.zeros(shape, dtype=dtype)
    fspace = dset.id.get_space()
    if empty:
        fspace.select_none()
        mshape = (1,) * max(len(dset.shape), 1)
        mspace = h5py.h5s.create_simple(mshape)
        mspace.select_none()
        dset.id.read(mspace, fspace, np.zeros(mshape, dtype=dtype), dxpl=_xfer(True))
        return None if shape is None else np.zeros(shape, dtype=dtype)
    out = np.empty(tuple(shape), dtype=dtype) if out is None else out
    fspace.select_hyperslab(tuple(int(o) for o in offset), out.shape)
    mspace = h5py.h5s.create_simple(out.shape)
    dset.id.read(mspace, fspace, out, dxpl=_xfer(collective))
    return out


def write_owned_rows(dset, rows: np.ndarray | None, comm=None, *, row_tile: int = 0) -> None:
    """Write a full array along axis 0, each rank its balanced share.  Collective over comm.

    ``rows`` is the whole array (the same on every rank, e.g. from a user's script) or None on
    ranks that do not hold it, in which case only rank 0 writes (small arrays).
    ``row_tile`` > 0 writes in rounds of at most that many rows per rank.
    """
    comm = get_comm(comm)
    n = dset.shape[0] if dset.shape else 0
    if not dset.shape:
        write_scalar = rows is not None and comm.Get_rank() == 0
        if not is_parallel(dset.file) or write_scalar:
            dset[()] = rows
        return
    held = comm.allgather(rows is not None)
    if all(held):
        start, stop = block_range(n, comm.Get_size(), comm.Get_rank())
    else:
        start, stop = (0, n) if comm.Get_rank() == held.index(True) else (0, 0)
    step = row_tile if row_tile > 0 else max(stop - start, 1)
    longest = comm.allreduce(-(-(stop - start) // step) if stop > start else 0, op=mpi().MAX)
    for r in range(longest):
        lo = start + r * step
        hi = min(lo + step, stop)
        write_block(dset, (lo,) + (0,) * (len(dset.shape) - 1), rows[lo:hi] if hi > lo else None)


def read_small(f, name: str, dtype=None) -> np.ndarray:
    """Read a whole (small) dataset on every rank, with a clear error if it is missing.  Collective.

    Raises :class:`InputError` naming the dataset when it does not exist.
    """
    if name not in f:
        raise InputError(f"{name}: dataset missing from {f.filename}")
    data = f[name][...]
    return np.asarray(data, dtype=dtype) if dtype is not None else np.asarray(data)
