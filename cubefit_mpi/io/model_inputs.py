"""What the models ``A[s, c, p, :] = scale[s, c] · max(0, R_Tᵀ (T_p ⊛ K[s, c]))`` are made of, read
from a cube file once: templates, the rebin operator, the kernel-tap interpolation, LOSVD
amplitudes, per-(s, c) scales, and the fingerprint of everything the models depend on.

The builder fills ``/HyperCube/models`` from these; a reader of the hypercube compares its
stored fingerprint with :func:`current_fingerprint` to know whether it is still the product of
the file's inputs.  Collective over comm where noted.
"""
from __future__ import annotations

import numpy as np

from ..config.errors import InputError
from ..numerics.convolve import needed_template_range
from ..numerics.digest import array_digest, rows_digest
from ..numerics.kernels import AMP_MODES, interpolation_matrix, losvd_amplitude, unit_kernels
from ..numerics.normalization import NORM_MODES, masked_mean_flux, spaxel_scale
from ..numerics.rebin import rebin_sparse
from ..parallel.collectives import allreduce_sum, raise_if_any
from ..parallel.comm import mpi
from ..parallel.decomposition import block_range, tile_bounds
from . import layout as lay
from .validation import validate_inputs

LOSVD_SLAB_ROWS = 2048


def models_fingerprint(templates, rebin_dense, tem_pix, obs_pix, vel_pix, losvd_digest: int) -> str:
    """The fingerprint of everything the models depend on except the normalisation.  Local.

    ``losvd_digest`` is the XOR of :func:`~cubefit_mpi.numerics.digest.rows_digest` over all
    LOSVD rows (independent of how they were split over ranks).  The mask and the data are not
    part of it: they change the fit, not the models.
    """
    return array_digest(templates, rebin_dense, tem_pix, obs_pix, vel_pix) + "-" + format(int(losvd_digest), "x")


def check_modes(norm_mode: str, amp_mode: str) -> None:
    """``norm_mode`` and ``amp_mode`` are known (InputError naming the option otherwise).  Local."""
    if norm_mode not in NORM_MODES:
        raise InputError(f"--norm {norm_mode}: expected one of {', '.join(NORM_MODES)}")
    if amp_mode not in AMP_MODES:
        raise InputError(f"--amp {amp_mode}: expected one of {', '.join(AMP_MODES)}")


def read_rebin(f, n_tem: int, n_obs: int):
    """``(R_LT sparse (L, T), R_T dense as stored, rebin mode)``.  Local.

    Raises InputError naming ``/R_T`` and the command that creates it when it is missing.
    """
    if lay.R_T not in f:
        raise InputError(f"{lay.R_T}: dataset missing from {f.filename}; create it with "
                         f"`cubefit_mpi rebin {f.filename}` (or let `cubefit_mpi build` do it)")
    dense = np.asarray(f[lay.R_T][...], dtype=np.float64)
    try:
        sparse = rebin_sparse(dense, n_tem, n_obs)
    except ValueError as exc:
        raise InputError(f"{lay.R_T}: {exc}") from None
    return sparse, dense, str(f[lay.R_T].attrs.get("rebin.mode", "external"))


class ModelInputs:
    """Everything every rank needs to make models: small arrays plus all amplitudes and scales.

    Built collectively by :meth:`read`.  Attributes: ``dims`` (H5Dims), ``mask`` (L,) bool or
    None, ``templates`` (P, T') float64 and ``rebin_lt`` sparse (L, T') cropped to the ``T'``
    template pixels the models need (``template_range``, ``crop_note``), ``rebin_mode``, ``vel_pix``
    (V,), ``interp`` and ``shifts`` (the kernel-tap interpolation, K taps), ``amp`` (S, C)
    LOSVD amplitudes, ``data_flux`` (S,) or None, ``flux_computed`` (data flux made from
    ``/DataCube`` here), ``scale`` (S, C), ``norm_mode``, ``amp_mode``, ``fingerprint``.
    """

    @classmethod
    def read(cls, f, norm_mode: str, amp_mode: str, comm) -> "ModelInputs":
        """Validate and read the inputs of ``f`` for this normalisation.  Collective over comm."""
        check_modes(norm_mode, amp_mode)
        self = cls()
        info = validate_inputs(f, check_data=(norm_mode == "data"), comm=comm)
        self.norm_mode, self.amp_mode = norm_mode, amp_mode
        self.dims, self.mask = info["dims"], info["mask"]
        S, L, T = self.dims.S, self.dims.L, self.dims.T
        self.templates = np.asarray(f[lay.TEMPLATES][...], dtype=np.float64)
        self.rebin_lt, rebin_dense, self.rebin_mode = read_rebin(f, T, L)
        self.vel_pix = info["vel_pix"]
        self.interp, self.shifts = interpolation_matrix(self.vel_pix, float(info["tem_pix"][1] - info["tem_pix"][0]))
        amp, flux, digest = self._read_losvd(f, amp_mode, need_flux=norm_mode == "data" and lay.DATA_FLUX not in f,
                                             comm=comm)
        self.amp = amp
        self.fingerprint = models_fingerprint(self.templates, rebin_dense, info["tem_pix"], info["obs_pix"],
                                              self.vel_pix, digest)
        self._crop(np.exp(info["tem_pix"]))
        self.data_flux, self.flux_computed = None, False
        if norm_mode == "data":
            if lay.DATA_FLUX in f:
                self.data_flux = np.asarray(f[lay.DATA_FLUX][...], dtype=np.float64)
                if self.data_flux.shape != (S,):
                    raise InputError(f"{lay.DATA_FLUX}: expected shape ({S},), got {self.data_flux.shape}")
            else:
                self.data_flux, self.flux_computed = flux, True
            bad = ~np.isfinite(self.data_flux) | ((self.data_flux <= 0) & (self.amp.sum(axis=1) > 0))
            if bad.any():
                raise InputError(f"{lay.DATA_FLUX}: {int(bad.sum())} spaxel(s) (first {int(np.argmax(bad))}) have a "
                                 f"non-positive or non-finite masked mean flux; norm='data' needs flux > 0")
        self.scale = spaxel_scale(self.amp, norm_mode, self.data_flux)
        return self

    def _crop(self, lam: np.ndarray) -> None:
        """Keep only the template pixels the observed grid and the velocity guard need
        (:func:`~cubefit_mpi.numerics.convolve.needed_template_range`): the models are the same, the
        convolution and the template basis are cheaper.  ``template_range`` and ``crop_note`` say
        what was kept.  Local."""
        T = self.templates.shape[1]
        self.template_range = needed_template_range(self.rebin_lt, self.shifts, T)
        lo, hi = self.template_range
        self.crop_note = None
        if (lo, hi) != (0, T):
            self.templates = np.ascontiguousarray(self.templates[:, lo:hi])
            self.rebin_lt = self.rebin_lt[:, lo:hi].tocsr()
            self.crop_note = (f"templates cropped to pixels {lo}:{hi} of {T} ({lam[lo]:.2f}-{lam[hi - 1]:.2f} A of "
                              f"{lam[0]:.2f}-{lam[-1]:.2f} A): all the observed grid and the "
                              f"{float(np.max(np.abs(self.vel_pix))):g} km/s velocity guard need")

    def _read_losvd(self, f, amp_mode: str, *, need_flux: bool, comm):
        """Amplitudes (S, C), data flux (S,) or None and the LOSVD digest, by rank slabs.  Collective."""
        S, C = self.dims.S, self.dims.C
        amp = np.zeros((S, C))
        flux = np.zeros(S) if need_flux else None
        start, stop = block_range(S, comm.Get_size(), comm.Get_rank())
        error, digest = None, 0
        try:
            for lo, hi in tile_bounds(stop - start, LOSVD_SLAB_ROWS):
                lo, hi = lo + start, hi + start
                losvd = np.asarray(f[lay.LOSVD][lo:hi], dtype=np.float64)
                digest ^= rows_digest(losvd, lo)
                amp[lo:hi] = losvd_amplitude(losvd, self.vel_pix, amp_mode)
                _, empty = unit_kernels(losvd, self.interp)
                bad = empty & (amp[lo:hi] != 0)
                if bad.any():
                    s, c = np.argwhere(bad)[0]
                    raise InputError(f"{lay.LOSVD}: row [{lo + s}, :, {c}] gives an all-zero kernel on the template "
                                     f"grid but its amplitude is {amp[lo + s, c]:.3g}; expected a LOSVD resolved by "
                                     f"{lay.VEL_PIX} (or an all-zero row)")
                if flux is not None:
                    flux[lo:hi] = masked_mean_flux(np.asarray(f[lay.DATACUBE][lo:hi]), self.mask)
        except InputError as exc:
            error = exc
        raise_if_any(error, comm)
        digest = comm.allreduce(digest, op=mpi().BXOR)
        return allreduce_sum(amp, comm), None if flux is None else allreduce_sum(flux, comm), digest


def current_fingerprint(f, comm) -> str:
    """:func:`models_fingerprint` of the file's inputs as they are now.  Collective over comm.

    Reads the small inputs on every rank and the LOSVD rows in rank slabs.  Raises InputError
    when an input the models need is missing.
    """
    for name in (lay.TEMPLATES, lay.TEM_PIX, lay.OBS_PIX, lay.VEL_PIX, lay.LOSVD):
        if name not in f:
            raise InputError(f"{name}: dataset missing from {f.filename}")
    tem = np.asarray(f[lay.TEM_PIX][...], dtype=np.float64)
    obs = np.asarray(f[lay.OBS_PIX][...], dtype=np.float64)
    _, rebin_dense, _ = read_rebin(f, tem.size, obs.size)
    S = f[lay.LOSVD].shape[0]
    start, stop = block_range(S, comm.Get_size(), comm.Get_rank())
    digest = 0
    for lo, hi in tile_bounds(stop - start, LOSVD_SLAB_ROWS):
        digest ^= rows_digest(np.asarray(f[lay.LOSVD][start + lo:start + hi], dtype=np.float64), start + lo)
    digest = comm.allreduce(digest, op=mpi().BXOR)
    return models_fingerprint(np.asarray(f[lay.TEMPLATES][...], dtype=np.float64), rebin_dense, tem, obs,
                              np.asarray(f[lay.VEL_PIX][...], dtype=np.float64), digest)
