"""Read-ahead of hypercube blocks: the next block is read in a background thread while the
caller works on the current one (double buffering).

I/O layer.  The reads are *independent* HDF5 reads (no collective call, so a rank's reads need
not be in step with the other ranks'), into two reused buffers.  h5py releases the GIL while
HDF5 copies the data, so the read overlaps NumPy/BLAS work of the caller (measured: a pass of
reads next to float32 matrix-vector products took the time of the longer of the two).  With a
parallel file the thread makes MPI-IO calls while the main thread makes other MPI calls, which
needs ``MPI_THREAD_MULTIPLE``; without it (or with ``enabled=False``) every read is made in the
caller's thread, in the same order, with the same result.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from .blocks import read_block
from .h5file import is_parallel

__all__ = ["ReadAhead", "threads_allowed"]


def threads_allowed(dset) -> bool:
    """Whether a second thread may read ``dset`` while this one makes MPI calls.  Local."""
    if not is_parallel(dset.file):
        return True
    from ..parallel.comm import mpi

    return mpi().Query_thread() >= mpi().THREAD_MULTIPLE


class ReadAhead:
    """Blocks ``dset[offset : offset + shape]`` for a planned list of requests, in order.

    Parameters
    ----------
    dset : h5py.Dataset
    requests : list of ``(offset, shape)`` or None (None: nothing to read; :meth:`next` gives None).
        Every shape has the same trailing dimensions; the leading one may vary.
    enabled : read the next request in a background thread (falls back to the caller's thread
        when :func:`threads_allowed` says no)

    The array returned by :meth:`next` is valid until the call after the next one (two buffers):
    the caller must be done with request ``i`` when it asks for request ``i + 1``.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, dset, requests: Sequence, *, enabled: bool = True):
        self.dset = dset
        self.requests = list(requests)
        shapes = [tuple(req[1]) for req in self.requests if req is not None]
        self._buffers = []
        if shapes:
            tail = shapes[0][1:]
            if any(shape[1:] != tail for shape in shapes):
                raise ValueError("ReadAhead: requests differ in their trailing dimensions")
            rows = max(shape[0] for shape in shapes)
            self._buffers = [np.empty((rows,) + tail, dtype=dset.dtype) for _ in range(2)]
        self._pool = ThreadPoolExecutor(max_workers=1) if enabled and shapes and threads_allowed(dset) else None
        self.threaded = self._pool is not None
        self._position = 0
        self._pending = None

    def _read(self, index: int):
        request = self.requests[index]
        if request is None:
            return None
        offset, shape = request
        return read_block(self.dset, offset, shape, collective=False, out=self._buffers[index % 2])

    def next(self) -> np.ndarray | None:
        """The block of the next request (None for a None request).  Local."""
        index = self._position
        if index >= len(self.requests):
            raise IndexError("ReadAhead: every planned request has been read")
        block = self._pending.result() if self._pending is not None else self._read(index)
        self._pending = None
        self._position += 1
        if self._pool is not None and self._position < len(self.requests):
            self._pending = self._pool.submit(self._read, self._position)
        return block

    def close(self) -> None:
        """Wait for a read in flight and stop the thread.  Local."""
        if self._pending is not None:
            try:
                self._pending.result()
            except Exception:      # the caller is already leaving; the error is not theirs to see
                pass
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
