"""Opening HDF5 files: MPI-IO when more than one rank, serial otherwise, with lock retries, the
raw chunk cache and MPI-IO hints from the knobs.

Rules (see ``docs/CubeFit.md`` and the h5py/MPI recipes):

* with more than one rank a file is opened with the ``mpio`` driver on ``comm``; with one rank,
  serially.  File, dataset and attribute creation are collective: every rank makes the same call
  with the same values;
* the main file is opened with the default (earliest) file format, so a file left open by a
  killed job can be reopened without ``h5clear``;
* a file opened for writing is flushed at the end of the block after its space was reserved
  (:func:`~cubefit_mpi.io.space.reserved_flush`); a failed write (a full disk, a quota, an I/O
  error) becomes a :class:`WriteFailure` and the file is abandoned, never closed: it stays as it
  was at the last flush;
* any other exception inside a parallel file waits up to ``CUBEFIT_FAIL_GRACE_SEC`` for every
  rank to raise too (then the file is closed together); a rank that fails alone aborts the job
  with its traceback (:mod:`cubefit_mpi.parallel.failure`) instead of closing the file alone,
  which would hang the others.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from ..config.errors import InputError, WriteFailure
from ..config.knobs import get_knobs
from ..parallel.comm import get_comm, mpi
from ..parallel.failure import FailureAgreement

if TYPE_CHECKING:
    import h5py

_LOG = logging.getLogger("cubefit_mpi.io")
_ABANDONED: list = []                 # files left open on purpose after a WriteFailure
_PARALLEL_BY_FILENO: dict = {}      # H5Fget_fileno -> opened with mpio (files open through open_h5)
_LOCK_WORDS = ("unable to lock file", "resource temporarily unavailable", "file is already open",
               "errno = 11")


def h5py_module():
    """h5py, imported with ``HDF5_USE_FILE_LOCKING`` set from the knobs first.  Local."""
    os.environ.setdefault("HDF5_USE_FILE_LOCKING",
                          "TRUE" if get_knobs().hdf5_use_file_locking else "FALSE")
    import h5py

    return h5py


@contextmanager
def open_h5(path: str | os.PathLike, mode: str = "r", comm=None, *, retries: int = 4,
            backoff: float = 0.25, swmr: bool = False) -> Iterator["h5py.File"]:
    """Open an HDF5 file, MPI-IO when ``comm`` has more than one rank.  Collective over comm.

    Parameters
    ----------
    path : str
    mode : {"r", "r+", "w", "w-", "a"}
    comm : MPI communicator, default ``MPI.COMM_WORLD``
    retries, backoff : lock errors are retried with exponential back-off (seconds)
    swmr : open for single-writer/multiple-reader (serial files only: SWMR does not mix with MPI-IO)

    The raw chunk cache comes from ``CUBEFIT_RDCC_NBYTES/NSLOTS/W0``.  A missing file opened for
    reading is an :class:`InputError` naming the path.
    """
    h5py = h5py_module()
    comm = get_comm(comm)
    knobs = get_knobs()
    path = os.fspath(path)
    if mode in ("r", "r+") and not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    kwargs = dict(rdcc_nbytes=knobs.rdcc_nbytes, rdcc_nslots=knobs.rdcc_nslots, rdcc_w0=knobs.rdcc_w0)
    if comm.Get_size() > 1:
        if swmr:
            raise ValueError("SWMR does not mix with MPI-IO: open SWMR files on one rank")
        kwargs.update(driver="mpio", comm=comm, info=mpiio_info(knobs.mpiio_hints))
    elif swmr:
        kwargs.update(libver="latest", swmr=(mode == "r"))
    attempt = 0
    while True:
        error = None
        handle = None
        try:
            handle = h5py.File(path, mode, **kwargs)
        except OSError as exc:
            error = exc
        # every rank must agree: retry or fail together
        failed = comm.allreduce(error is not None) if comm.Get_size() > 1 else error is not None
        if not failed:
            break
        if handle is not None:
            handle.close()
        text = str(error).lower() if error is not None else ""
        attempt += 1
        lock_error = any(w in text for w in _LOCK_WORDS)
        lock_error = comm.allreduce(lock_error) if comm.Get_size() > 1 else lock_error
        if not lock_error or attempt > retries:
            reason = str(error).splitlines()[0] if error is not None else "failed on another rank"
            if lock_error:
                raise InputError(f"{path}: cannot open with mode {mode!r}, it is locked or open for "
                                 f"writing elsewhere ({reason})")
            raise InputError(f"{path}: cannot open as HDF5 with mode {mode!r} ({reason})")
        time.sleep(backoff * 2 ** (attempt - 1))
    fileno = handle.id.fileno
    _PARALLEL_BY_FILENO[fileno] = comm.Get_size() > 1
    agreement = FailureAgreement(comm)
    if mode != "r":                    # a failed write shows as a WriteFailure below; the tracebacks h5py
        quiet_write_errors()           # prints while freeing that write's objects say nothing more
    try:
        yield handle
        if mode != "r":                # room for what the flush writes first: a full disk shows here, not in
            from .space import reserved_flush      # a close that HDF5 may not survive

            reserved_flush(handle, "this command's last changes", comm)
    except WriteFailure:
        _ABANDONED.append(handle)      # never close a file whose writes failed (HDF5 may crash)
        quiet_write_errors()
        raise
    except BaseException as exc:
        if mode != "r" and is_write_error(exc):
            _ABANDONED.append(handle)
            quiet_write_errors()
            raise WriteFailure(f"{path}: writing failed ({write_reason(exc)}); is the disk full or the quota "
                               f"exceeded? What this command had not finished is discarded, earlier results "
                               f"are intact: free some space and rerun") from exc
        agreement.settle(exc, f"inside the parallel file {path}")    # aborts unless every rank failed
        _PARALLEL_BY_FILENO.pop(fileno, None)
        handle.close()
        raise
    agreement.free()
    _PARALLEL_BY_FILENO.pop(fileno, None)
    handle.close()


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS}
_WRITE_WORDS = ("file write failed", "no space left", "disk quota exceeded", "write failed")


def is_write_error(exc: BaseException) -> bool:
    """True for an exception of a failed write (no space, quota, I/O error).  Local."""
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        return True
    if isinstance(exc, (OSError, RuntimeError, ValueError)):      # h5py: ValueError from a create that wrote
        text = str(exc).lower()
        return any(word in text for word in _WRITE_WORDS)
    return False


def quiet_write_errors() -> None:
    """From now on, drop the tracebacks h5py prints when it frees objects of a file whose writes
    failed (dozens on a full disk, through ``sys.excepthook`` and ``sys.unraisablehook``); other
    errors are printed as before.  Local (the process is about to end, or to go on without the file)."""
    import sys

    if getattr(sys.excepthook, "_cubefit_quiet", False):
        return
    previous_hook, previous_unraisable = sys.excepthook, sys.unraisablehook

    def excepthook(exc_type, exc, tb):
        if not is_write_error(exc):
            previous_hook(exc_type, exc, tb)

    def unraisablehook(unraisable):
        if not is_write_error(unraisable.exc_value):
            previous_unraisable(unraisable)

    excepthook._cubefit_quiet = True
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def write_reason(exc: BaseException) -> str:
    """``No space left on device`` (from the errno) or the first line of the message.  Local."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    if "no space left on device" in str(exc).lower():      # HDF5's message carries the system's words
        return os.strerror(errno.ENOSPC)
    return first_line(exc).split(" (file write failed")[0]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (HDF5's run over several).  Local."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def open_uncached(f, name: str):
    """Open dataset ``name`` of ``f`` with no raw chunk cache.  Local (no collective call).

    For writes of whole chunks: they go straight to the file instead of filling the file-level
    cache (``CUBEFIT_RDCC_NBYTES``, 4 GiB by default), which would otherwise hold every chunk of
    a build in memory.
    """
    h5py = h5py_module()
    dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    dapl.set_chunk_cache(0, 0, 1.0)
    return h5py.Dataset(h5py.h5d.open(f.id, name.encode(), dapl=dapl))


def mpiio_info(hints: str):
    """``MPI.Info`` from ``"key=value,key=value"`` (``CUBEFIT_MPIIO_HINTS``).  Local.

    The default disables ROMIO's collective buffering: every rank writes and reads large
    contiguous blocks of its own, which two-phase I/O through aggregators only slows down
    (measured 2-3x on the builder's writes).  HDF5 still issues collective calls.
    """
    info = mpi().Info.Create()
    if hints and hints.strip().lower() != "none":
        for item in hints.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise InputError(f"CUBEFIT_MPIIO_HINTS={hints!r}: expected key=value[,key=value...]")
            info.Set(key.strip(), value.strip())
    return info


def is_parallel(f) -> bool:
    """True if ``f`` was opened with the mpio driver.  Local for files opened by :func:`open_h5`.

    Asking HDF5 (``f.driver``) copies the file access list, which duplicates the MPI
    communicator of an mpio file: a *collective* call that hangs when one rank makes it alone
    (an independent read).  Files opened by :func:`open_h5` are known by their file number.
    """
    known = _PARALLEL_BY_FILENO.get(f.id.fileno)
    return f.driver == "mpio" if known is None else known

