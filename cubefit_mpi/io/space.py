"""Disk space: refuse a write that will not fit before it starts, and reserve the space of new
datasets before their data are written.

A full disk in the middle of an HDF5 write is what breaks whole files: the library then fails
while writing its own metadata (``addr overflow`` on the next open).  Two lines of defence keep
that from happening:

1. :func:`require_free_space` -- before a writing stage starts (and again before each staged
   write) rank 0 compares the free space of the file's folder (``shutil.disk_usage``) with what
   will be written plus ``CUBEFIT_SPACE_MARGIN_MB`` for HDF5 metadata, and every rank refuses
   with one :class:`~cubefit_mpi.config.errors.InputError` (exit 2) naming both sizes;
2. :func:`reserved_flush` -- before each flush of a write (the one after new datasets are
   created, allocated early; those of the final swap; the last one of every writable open),
   rank 0 reserves every byte HDF5 has allocated and a slack for the metadata the flush adds
   (``posix_fallocate``): when the disk filled up meanwhile, or a quota the free space does not
   show is reached, this fails before HDF5 writes a byte, and the file on disk is still the one
   of the last flush.  Writing the data of new datasets needs no new space at all.

Collective over comm where noted; ``CUBEFIT_SPACE_CHECK=0`` turns the first check off.
"""
from __future__ import annotations

import errno
import os
import shutil

import numpy as np

from ..config.errors import InputError, WriteFailure
from ..config.knobs import get_knobs
from ..parallel.collectives import agree

MIB = 2**20


def human(nbytes: float) -> str:
    """``12.3 MiB`` / ``1.20 GiB`` / ``512 B``.  Local."""
    nbytes = float(nbytes)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{int(nbytes)} B"


def dataset_bytes(shape, dtype) -> int:
    """Bytes of an uncompressed dataset of this shape and dtype.  Local."""
    return int(np.prod([int(n) for n in shape], dtype=np.int64)) * np.dtype(dtype).itemsize


def folder_of(path) -> str:
    """The existing folder that will hold ``path``.  Local."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return folder or os.sep


def free_bytes(path) -> int:
    """Free bytes for an unprivileged writer in the folder of ``path``.  Local."""
    return int(shutil.disk_usage(folder_of(path)).free)


def space_shortfall(path, nbytes: int) -> str | None:
    """The refusal message when ``nbytes`` (+ margin) do not fit next to ``path``, else None.  Local."""
    knobs = get_knobs()
    if not knobs.space_check or nbytes <= 0:
        return None
    margin = int(knobs.space_margin_mb * MIB)
    free = free_bytes(path)
    if nbytes + margin <= free:
        return None
    return (f"needs {human(nbytes + margin)} of free space ({human(nbytes)} of data + {human(margin)} "
            f"CUBEFIT_SPACE_MARGIN_MB for HDF5 metadata) but {folder_of(path)} has {human(free)} free; "
            f"free some space (or move the file) and rerun: nothing was written")


def require_free_space(path, nbytes: int, what: str, comm) -> None:
    """Refuse (InputError, exit 2) when ``nbytes`` plus the margin do not fit.  Collective over comm.

    Rank 0 decides (one ``statvfs``), every rank raises the same one-line error naming ``what``
    (e.g. ``"recon of /ReconCube"``), the sizes and the folder.
    """
    message = agree(space_shortfall(path, int(nbytes)) if comm.Get_rank() == 0 else None, comm)
    if message is not None:
        raise InputError(f"{os.fspath(path)}: {what} {message}")


def file_size(path) -> int:
    """``st_size`` of ``path`` (0 when missing).  Local."""
    try:
        return os.stat(os.fspath(path)).st_size
    except FileNotFoundError:
        return 0


def allocated_end(f, datasets=()) -> tuple[int, bool]:
    """HDF5's end of allocation of ``f`` and whether it is exact: ``H5Fget_filesize``, or (where the
    MPI-IO driver does not answer it, after parallel writes) the end of the furthest of
    ``datasets``' contiguous storage, which misses new metadata.  Local."""
    try:
        return int(f.id.get_filesize()), True
    except RuntimeError:
        ends = [0]
        for dset in datasets:
            offset = dset.id.get_offset()
            if offset is not None:
                ends.append(int(offset) + int(dset.id.get_storage_size()))
        return max(ends), False


METADATA_SLACK = 256 * 2**10       # bytes reserved past the end of allocation before a flush, when it is not known
EXACT_SLACK = 16 * 2**10           # and when it is


def reserved_flush(f, what: str, comm, start: int | None = None, datasets=()) -> None:
    """Reserve the disk space the next flush can write into, then flush.  Collective over comm.

    Rank 0 reserves from ``start`` (default: the file's current size) to HDF5's end of
    allocation (:func:`allocated_end`; ``datasets``: just created) plus a slack for what a flush
    may add (:data:`EXACT_SLACK`, or :data:`METADATA_SLACK` where the end of allocation is not
    known), with ``posix_fallocate`` (or, where a file system lacks it, zeros: nothing of the
    file lives beyond its current size before the flush); nothing when HDF5 allocated nothing
    beyond the file.  Only then is the file flushed, so the flush never meets a full disk.  No
    room (or the quota reached) is a :class:`WriteFailure` on every rank (exit 1) raised before
    HDF5 has written a byte: abandoned, the file on disk is that of the previous flush.
    """
    failure = None
    if comm.Get_rank() == 0:
        size = file_size(f.filename)
        first = size if start is None else min(int(start), size)
        end, exact = allocated_end(f, datasets)
        if not exact:                             # chunked datasets have no offset: count their storage
            end = max(end, first + sum(int(d.id.get_storage_size()) for d in datasets))
        stop = max(end, size) + (EXACT_SLACK if exact else METADATA_SLACK)
        if exact and start is None and end <= size:
            stop = first                              # nothing new: the flush rewrites what is on disk
        try:
            if stop > first:
                _reserve(f.filename, first, stop)
        except OSError as exc:
            failure = (f"{f.filename}: no room for the {human(stop - first)} of {what} ({exc.strerror or exc}); "
                       f"the file holds what it held before: free some space and rerun")
    failure = agree(failure, comm)
    if failure is not None:
        raise WriteFailure(failure, everywhere=True)
    f.flush()


def _reserve(path: str, start: int, stop: int) -> None:
    """``posix_fallocate(path, start, stop - start)``, or zeros written there without it.  Local."""
    fd = os.open(os.fspath(path), os.O_WRONLY)
    try:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, start, stop - start)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        block = bytes(min(stop - start, 4 * MIB))
        pos = start
        while pos < stop:
            pos += os.pwrite(fd, block[:stop - pos], pos)
        os.fsync(fd)
    finally:
        os.close(fd)


def require_writable_folder(folder, option: str) -> None:
    """Create ``folder`` if needed and prove a file can be written in it; InputError naming ``option``.  Local.

    A probe file is created and removed (permission bits alone do not tell: root ignores them, a
    read-only mount does not).
    """
    import tempfile

    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".cubefit-probe-"):
            pass
    except OSError as exc:
        raise InputError(f"{option} {folder}: cannot write there ({exc.strerror or exc})") from None
