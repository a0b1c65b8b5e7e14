"""``H5Manager``: create and populate the spec's HDF5 backbone and its rebin operator ``/R_T``."""
from __future__ import annotations

import logging
import os

import numpy as np

from ..config.errors import InputError
from ..numerics.rebin import REBIN_MODES, rebin_operator
from ..parallel.comm import get_comm
from . import layout as lay
from .blocks import write_owned_rows
from .datasets import staged_dataset
from .h5file import open_h5
from .layout import H5Dims

_LOG = logging.getLogger("cubefit_mpi.io")


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

    def ensure_rebin_and_resample(self, mode: str = "overlap", force: bool = False, *,
                                  create_only: bool = False) -> bool:
        """Write ``/R_T (T, L)`` from ``/TemPix`` and ``/ObsPix`` and validate the grids.  Collective.

        ``mode="overlap"`` is the exact-overlap, flux-conserving operator; ``"interp"`` the
        two-tap interpolation of the predecessor.  An existing ``/R_T`` of the same mode is kept
        unless ``force``; with ``create_only`` any existing ``/R_T`` is kept (also one made by
        another tool).  Returns True when ``/R_T`` was written.
        """
        from .validation import check_grids

        if mode not in REBIN_MODES:
            raise InputError(f"rebin mode {mode!r}: expected one of {', '.join(REBIN_MODES)}")
        with open_h5(self.path, "r", self.comm) as f:
            if lay.R_T in f and create_only:
                return False
            for name in (lay.TEM_PIX, lay.OBS_PIX):
                if name not in f:
                    raise InputError(f"{name}: dataset missing from {self.path}; needed to make {lay.R_T}")
            tem = np.asarray(f[lay.TEM_PIX][...])
            obs = np.asarray(f[lay.OBS_PIX][...])
            if lay.R_T in f and not force and f[lay.R_T].attrs.get("rebin.mode") == mode \
                    and f[lay.R_T].shape == (tem.size, obs.size):
                return False
            vel = np.asarray(f[lay.VEL_PIX][...]) if lay.VEL_PIX in f else None
        check_grids(tem, obs, vel)
        dense = rebin_operator(tem, obs, mode).toarray()
        with open_h5(self.path, "r+", self.comm) as f, \
                staged_dataset(f, lay.R_T, dense.shape, "f8", self.comm) as dset:   # the old one valid until done
            write_owned_rows(dset, dense, self.comm)
            dset.attrs["rebin.mode"] = mode
            dset.attrs["orientation"] = "(T, L): observed = templates @ R_T"
        _LOG.info("%s: wrote %s (%d x %d, %s rebinning)", self.path, lay.R_T, dense.shape[0], dense.shape[1], mode)
        return True
