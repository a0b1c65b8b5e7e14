"""HDF5 I/O: opening files (MPI-IO when more than one rank), collective block reads/writes, and
the ``H5Manager`` that creates and populates the spec's backbone.

Rules this module enforces (see ``docs/CubeFit.md`` and the h5py/MPI recipes):

* with more than one rank a file is opened with the ``mpio`` driver on ``comm``; with one rank,
  serially.  File, dataset and attribute creation are collective: every rank makes the same call
  with the same values;
* :func:`write_block` / :func:`read_block` make every rank call ``H5Dwrite``/``H5Dread``
  collectively, with an empty selection on ranks that have nothing (the high-level h5py API
  hangs there, h5py #965);
* the main file is opened with the default (earliest) file format, so a file left open by a
  killed job can be reopened without ``h5clear``.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from . import layout as lay
from .errors import InputError, WriteFailure
from .knobs import get_knobs
from .layout import H5Dims
from .parallel import get_comm, raise_if_any, block_range
from .rebin import REBIN_MODES, rebin_operator

if TYPE_CHECKING:
    import h5py

_LOG = logging.getLogger("cubefit_mpi.io")
_ABANDONED: list = []                 # files left open on purpose after a WriteFailure
_PARALLEL_BY_FILENO: dict = {}      # H5Fget_fileno -> opened with mpio (files open through open_h5)
_LOCK_WORDS = ("unable to lock file", "resource temporarily unavailable", "file is already open",
               "errno = 11")


def _h5py():
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
    h5py = _h5py()
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
    try:
        yield handle
    except WriteFailure:
        _ABANDONED.append(handle)      # never close a file whose writes failed (HDF5 may crash)
        raise
    except BaseException:
        _PARALLEL_BY_FILENO.pop(fileno, None)
        handle.close()
        raise
    _PARALLEL_BY_FILENO.pop(fileno, None)
    handle.close()


def open_uncached(f, name: str):
    """Open dataset ``name`` of ``f`` with no raw chunk cache.  Local (no collective call).

    For writes of whole chunks: they go straight to the file instead of filling the file-level
    cache (``CUBEFIT_RDCC_NBYTES``, 4 GiB by default), which would otherwise hold every chunk of
    a build in memory.
    """
    h5py = _h5py()
    dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    dapl.set_chunk_cache(0, 0, 1.0)
    return h5py.Dataset(h5py.h5d.open(f.id, name.encode(), dapl=dapl))


def mpiio_info(hints: str):
    """``MPI.Info`` from ``"key=value,key=value"`` (``CUBEFIT_MPIIO_HINTS``).  Local.

    The default disables ROMIO's collective buffering: every rank writes and reads large
    contiguous blocks of its own, which two-phase I/O through aggregators only slows down
    (measured 2-3x on the builder's writes).  HDF5 still issues collective calls.
    """
    from .parallel import mpi

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


# ---------------------------------------------------------------------------------------------
# collective block I/O
# ---------------------------------------------------------------------------------------------
def _xfer(collective: bool):
    h5py = _h5py()
    dxpl = h5py.h5p.create(h5py.h5p.DATASET_XFER)
    if collective:
        dxpl.set_dxpl_mpio(h5py.h5fd.MPIO_COLLECTIVE)
    return dxpl


def write_block(dset, offset: Sequence[int] | None, block: np.ndarray | None) -> None:
    """Write ``block`` at ``offset`` of ``dset``; ``block=None`` writes nothing.

    Collective over the file's communicator when the file is parallel: every rank must call it
    the same number of times (a rank with nothing passes ``None``).  Local for serial files.
    """
    h5py = _h5py()
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
    h5py = _h5py()
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
    longest = comm.allreduce(-(-(stop - start) // step) if stop > start else 0, op=_max())
    for r in range(longest):
        lo = start + r * step
        hi = min(lo + step, stop)
        write_block(dset, (lo,) + (0,) * (len(dset.shape) - 1), rows[lo:hi] if hi > lo else None)


def _max():
    from .parallel import mpi

    return mpi().MAX


# ---------------------------------------------------------------------------------------------
# the manager
# ---------------------------------------------------------------------------------------------
class H5Manager:
    """Create and populate the spec's HDF5 backbone.  Every method is collective over ``comm``.

    Parameters
    ----------
    path : str
        The cube file (created by :meth:`init_base` when missing).
    tem_pix : (T,) float64, optional
        ln λ of the template grid (uniform), written by :meth:`init_base`.
    obs_pix : (L,) float64, optional
        ln λ of the observed grid, written by :meth:`init_base`.
    comm : MPI communicator, default ``MPI.COMM_WORLD``
    """

    def __init__(self, path, tem_pix=None, obs_pix=None, comm=None):
        self.path = os.fspath(path)
        self.comm = get_comm(comm)
        self.tem_pix = None if tem_pix is None else np.asarray(tem_pix, dtype=np.float64)
        self.obs_pix = None if obs_pix is None else np.asarray(obs_pix, dtype=np.float64)
        self.dims: H5Dims | None = None

    # -----------------------------------------------------------------------------------------
    def init_base(self, dims: H5Dims, *, overwrite: bool = False) -> None:
        """Create the core datasets with the shapes of ``dims``.  Collective over comm.

        An existing file keeps datasets whose shape matches; a mismatch is an
        :class:`InputError` unless ``overwrite`` (then the file is recreated).
        """
        from .validation import check_grid

        if self.tem_pix is not None:
            check_grid(self.tem_pix, lay.TEM_PIX, uniform=True)
            if self.tem_pix.size != dims.T:
                raise InputError(f"tem_pix: expected {dims.T} values (nTSpec), got {self.tem_pix.size}")
        if self.obs_pix is not None:
            check_grid(self.obs_pix, lay.OBS_PIX)
            if self.obs_pix.size != dims.L:
                raise InputError(f"obs_pix: expected {dims.L} values (nLSpec), got {self.obs_pix.size}")
        mode = "w" if overwrite or not os.path.exists(self.path) else "a"
        with open_h5(self.path, mode, self.comm) as f:
            shapes = dims.shapes()
            for name in (lay.TEMPLATES, lay.TEM_PIX, lay.OBS_PIX, lay.LOSVD, lay.VEL_PIX, lay.DATACUBE):
                if name in f:
                    if f[name].shape != shapes[name]:
                        raise InputError(f"{name}: existing shape {f[name].shape} does not match dims "
                                         f"{shapes[name]}; pass overwrite=True to recreate {self.path}")
                else:
                    f.create_dataset(name, shape=shapes[name], dtype="f8")
            f.attrs["dims"] = [dims.S, dims.L, dims.T, dims.V, dims.C, dims.P]
            f.attrs["dims_names"] = "nSpat,nLSpec,nTSpec,nVel,nComp,nPop"
            if self.tem_pix is not None:
                write_owned_rows(f[lay.TEM_PIX], self.tem_pix, self.comm)
            if self.obs_pix is not None:
                write_owned_rows(f[lay.OBS_PIX], self.obs_pix, self.comm)
        self.dims = dims

    def _dims(self, f) -> H5Dims:
        if self.dims is None:
            if "dims" not in f.attrs:
                raise InputError(f"{self.path}: no 'dims' attribute; call init_base() first")
            self.dims = H5Dims(*[int(v) for v in f.attrs["dims"]])
        return self.dims

    def populate_from_arrays(self, losvd=None, datacube=None, templates=None, vel_pix=None,
                             mask=None, *, pop_shape=None) -> None:
        """Write the given arrays after checking them.  Collective over comm.

        Every rank passes the same arrays; each writes its balanced share of spaxels.

        Parameters
        ----------
        losvd : (S, V, C) float64, LOSVD histograms, >= 0
        datacube : (S, L) float64, observed spectra (NaN allowed only where ``mask`` is False)
        templates : (P, T) float64
        vel_pix : (V,) float64, km/s, strictly increasing
        mask : (L,) bool, True = pixel used
        pop_shape : tuple of int, optional, the population grid (e.g. (n_age, n_met)); stored as
            the ``pop_shape`` attribute of ``/Templates``
        """
        from . import validation as val

        with open_h5(self.path, "r", self.comm) as f:   # validate before touching the file
            dims = self._dims(f)
            stored_mask = np.asarray(f[lay.MASK][...], dtype=bool) if lay.MASK in f else None
        shapes = dims.shapes()
        arrays = {lay.LOSVD: losvd, lay.DATACUBE: datacube, lay.TEMPLATES: templates,
                  lay.VEL_PIX: vel_pix, lay.MASK: mask}
        for name, arr in arrays.items():
            if arr is not None and np.shape(arr) != shapes[name]:
                raise InputError(f"{name}: expected shape {shapes[name]}, got {np.shape(arr)}")
        if templates is not None:
            val.check_finite(np.asarray(templates), lay.TEMPLATES)
        if vel_pix is not None:
            val.check_grid(np.asarray(vel_pix, dtype=np.float64), lay.VEL_PIX)
        if losvd is not None:
            val.check_losvd_values(np.asarray(losvd), lay.LOSVD)
        mask_arr = stored_mask if mask is None else val.check_mask(np.asarray(mask), lay.MASK)
        if datacube is not None:
            val.check_data_values(np.asarray(datacube), mask_arr, lay.DATACUBE)
        if pop_shape is not None and int(np.prod(pop_shape)) != dims.P:
            raise InputError(f"pop_shape={tuple(pop_shape)}: product must equal nPop={dims.P}")
        with open_h5(self.path, "r+", self.comm) as f:
            for name, arr in arrays.items():
                if arr is None:
                    continue
                if name == lay.MASK:
                    arr = mask_arr
                if name not in f:
                    f.create_dataset(name, shape=shapes[name], dtype=bool if name == lay.MASK else "f8")
                write_owned_rows(f[name], np.asarray(arr), self.comm)
            if pop_shape is not None:
                f[lay.TEMPLATES].attrs["pop_shape"] = np.asarray(pop_shape, dtype=np.int64)

    def ensure_rebin_and_resample(self, mode: str = "overlap", force: bool = False) -> None:
        """Write ``/R_T (T, L)`` from ``/TemPix`` and ``/ObsPix`` and validate the grids.  Collective.

        ``mode="overlap"`` is the exact-overlap, flux-conserving operator; ``"interp"`` the
        two-tap interpolation of the predecessor.  An existing ``/R_T`` of the same mode is kept
        unless ``force``.
        """
        from .validation import check_grids

        if mode not in REBIN_MODES:
            raise InputError(f"rebin mode {mode!r}: expected one of {', '.join(REBIN_MODES)}")
        with open_h5(self.path, "r+", self.comm) as f:
            tem = np.asarray(f[lay.TEM_PIX][...])
            obs = np.asarray(f[lay.OBS_PIX][...])
            vel = np.asarray(f[lay.VEL_PIX][...]) if lay.VEL_PIX in f else None
            check_grids(tem, obs, vel)
            if lay.R_T in f and not force and f[lay.R_T].attrs.get("rebin.mode") == mode \
                    and f[lay.R_T].shape == (tem.size, obs.size):
                return
            dense = rebin_operator(tem, obs, mode).toarray()
            if lay.R_T in f:
                del f[lay.R_T]
            dset = f.create_dataset(lay.R_T, shape=dense.shape, dtype="f8")
            write_owned_rows(dset, dense, self.comm)
            dset.attrs["rebin.mode"] = mode
            dset.attrs["orientation"] = "(T, L): observed = templates @ R_T"


def read_small(f, name: str, dtype=None) -> np.ndarray:
    """Read a whole (small) dataset on every rank, with a clear error if it is missing.  Collective.

    Raises :class:`InputError` naming the dataset when it does not exist.
    """
    if name not in f:
        raise InputError(f"{name}: dataset missing from {f.filename}")
    data = f[name][...]
    return np.asarray(data, dtype=dtype) if dtype is not None else np.asarray(data)


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
