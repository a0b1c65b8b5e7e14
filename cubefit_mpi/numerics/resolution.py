"""Matching the spectral resolution of templates to the data (pure numerics).

A template library has a line-spread function (LSF) of full width at half maximum ``FWHM_tem``
(MILES: 2.51 Å), the instrument another, ``FWHM_data(λ)``.  When the data are coarser, the
templates are broadened by a Gaussian of ::

    σ²(λ) = (FWHM_data(λ)² − FWHM_tem(λ)²) / (8 ln 2)          (Å²)

on their own wavelength grid, before any log-rebinning.  Where the data are finer than the
templates (``FWHM_data < FWHM_tem``) no convolution can help: :func:`sigma_difference` refuses.

The convolution (:func:`broadening_operator`) is written in *scatter* form: the flux of input
pixel ``j`` (``f_j Δλ_j``) is spread over the pixels ``i`` around it with weights ``w_ij`` that
sum to 1 over ``i``, with the width ``σ_j`` of the LSF *at the source wavelength* ::

    out_i Δλ_i = Σ_j f_j Δλ_j w_ij,        Σ_i w_ij = 1,

so ``Σ_i out_i Δλ_i = Σ_j f_j Δλ_j`` exactly (flux conserved, also where σ changes with λ and
at the ends of the grid).  The weights are a Gaussian sampled at the pixel centres and cut at
``h_j = TRUNCATE · max(σ_j, Δλ_j)``, lowered by its value at the cut so that it reaches 0 there
(a tap entering the band as σ grows then starts from weight 0, and a flat spectrum stays flat
to better than 1e-6 where σ changes with λ) ::

    w_ij ∝ (exp(−d²/(2 s_j²)) − exp(−h_j²/(2 s_j²)))₊ Δλ_i,     d = λ_i − λ_j;

its width ``s_j`` is solved for (bisection) so that the kernel's second moment about the source
pixel is ``σ_j²`` *exactly*.  For σ above about one pixel ``s_j = σ_j`` to rounding; for
narrower kernels (σ_diff of a fraction of a pixel, common when a library's resolution is close
to the instrument's) a plainly sampled Gaussian would broaden too little.  Second moments of
line profiles add under convolution, so a Gaussian line of ``FWHM_0`` comes out at
``sqrt(FWHM_0² + 8 ln 2 σ²)``.

Pixels near the ends of the grid receive the flux of kernels cut by the end:
:func:`complete_range` is the range where the result is exact.

Local (no MPI, no I/O).
"""
from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from .wavelength_grids import edges_from_centres

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))     # 2.3548...
TRUNCATE = 5.0                 # kernel half-width, in units of max(σ, pixel width)
FWHM_RTOL = 1e-6               # data FWHM this much below the templates' still counts as equal
_BISECT_STEPS = 60


def fwhm_on_grid(lam: np.ndarray, fwhm) -> np.ndarray:
    """FWHM (Å) at the wavelengths ``lam (n,)`` Å.  Local.

    Parameters
    ----------
    lam : (n,) float64
        Wavelengths in Å.
    fwhm : float or (table_lam (m,), table_fwhm (m,))
        A constant, or a table interpolated linearly in λ and held constant beyond its ends.

    Returns
    -------
    (n,) float64
    """
    lam = np.asarray(lam, dtype=np.float64)
    if isinstance(fwhm, tuple):
        table_lam, table_fwhm = (np.asarray(a, dtype=np.float64) for a in fwhm)
        return np.interp(lam, table_lam, table_fwhm)
    return np.full(lam.shape, float(fwhm))


def sigma_difference(lam: np.ndarray, fwhm_data: np.ndarray, fwhm_tem: np.ndarray,
                     check: np.ndarray | None = None) -> np.ndarray:
    """σ (Å) of the Gaussian that brings the templates to the data's resolution.  Local.

    Parameters
    ----------
    lam : (n,) float64
        Wavelengths (Å) of the template pixels.
    fwhm_data, fwhm_tem : (n,) float64
        FWHM (Å) of the data and of the templates at ``lam``.
    check : (n,) bool, optional
        Where the data must not be finer than the templates (default: everywhere); elsewhere
        σ is 0 when they are.

    Returns
    -------
    (n,) float64
        ``sqrt(max(FWHM_data² − FWHM_tem², 0)) / (2 sqrt(2 ln 2))``.

    Raises
    ------
    ValueError
        At the first wavelength inside ``check`` where ``FWHM_data < FWHM_tem (1 − 1e-6)``,
        naming the wavelength and both FWHM.
    """
    lam = np.asarray(lam, dtype=np.float64)
    fd = np.asarray(fwhm_data, dtype=np.float64)
    ft = np.asarray(fwhm_tem, dtype=np.float64)
    finer = fd < ft * (1.0 - FWHM_RTOL)
    if check is not None:
        finer &= np.asarray(check, dtype=bool)
    if np.any(finer):
        i = int(np.flatnonzero(finer)[0])
        raise ValueError(f"the data (FWHM {fd[i]:.4g} A) are finer than the templates (FWHM {ft[i]:.4g} A) "
                         f"at {lam[i]:.1f} A; templates coarser than the data cannot be matched")
    return np.sqrt(np.clip(fd * fd - ft * ft, 0.0, None)) / FWHM_PER_SIGMA


def pixel_widths(lam: np.ndarray) -> np.ndarray:
    """Widths Δλ (Å) ``(n,)`` of the pixels centred on ``lam (n,)`` (edges half-way).  Local."""
    edges, _ = edges_from_centres(lam)
    return np.diff(np.exp(edges))


def _bands(lam: np.ndarray, half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tap indices ``(n, K)`` (padded with the source) and validity of the band of each source."""
    first = np.searchsorted(lam, lam - half, side="left")
    last = np.searchsorted(lam, lam + half, side="right") - 1
    width = int(np.max(last - first)) + 1
    idx = first[:, None] + np.arange(width)[None, :]
    valid = idx <= last[:, None]
    return np.where(valid, idx, np.arange(lam.size)[:, None]), valid


def _weights(d2: np.ndarray, base: np.ndarray, h2: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Unnormalised taps ``base · (exp(−d²/(2s²)) − exp(−h²/(2s²)))₊`` ``(n, K)``, per row ``s``."""
    inv = (0.5 / (s * s))[:, None]
    return base * np.clip(np.exp(-d2 * inv) - np.exp(-h2[:, None] * inv), 0.0, None)


def _moment(d2: np.ndarray, base: np.ndarray, h2: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Second moment ``Σ u d² / Σ u`` of the taps :func:`_weights`, per row."""
    u = _weights(d2, base, h2, s)
    return (u * d2).sum(axis=1) / u.sum(axis=1)


def broadening_operator(lam: np.ndarray, sigma: np.ndarray) -> sp.csr_matrix:
    """The flux-conserving Gaussian broadening ``B (n, n)`` with ``out = flux @ B``.  Local.

    Parameters
    ----------
    lam : (n,) float64
        Pixel-centre wavelengths in Å, strictly increasing (any sampling).
    sigma : (n,) float64
        Gaussian σ in Å at each (source) pixel, >= 0; 0 leaves that pixel's flux in place.

    Returns
    -------
    scipy.sparse.csr_matrix, (n, n) float64
        ``B[j, i] = w_ij Δλ_j / Δλ_i`` (see the module notes): values per Å in, per Å out.
    """
    lam = np.asarray(lam, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.shape != lam.shape or not np.all(np.isfinite(sigma)) or np.any(sigma < 0):
        raise ValueError(f"sigma: expected {lam.shape} finite values >= 0")
    n = lam.size
    dlam = pixel_widths(lam)
    active = sigma > 0
    half = np.where(active, TRUNCATE * np.maximum(sigma, dlam), 0.0)
    idx, valid = _bands(lam, half)
    d2 = (lam[idx] - lam[:, None]) ** 2
    base = np.where(valid, dlam[idx], 0.0)
    h2 = np.where(active, half, 1.0) ** 2
    target = np.where(active, sigma, 1.0) ** 2
    # the kernel's second moment grows monotonically with s: bisect for moment = σ²
    lo = 1e-6 * np.where(active, sigma, 1.0)
    hi = 2.0 * np.maximum(np.where(active, sigma, 1.0), dlam)
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        low = _moment(d2, base, h2, mid) < target
        lo, hi = np.where(low, mid, lo), np.where(low, hi, mid)
    w = _weights(d2, base, h2, 0.5 * (lo + hi))
    w /= w.sum(axis=1, keepdims=True)
    w[~active] = 0.0
    w[~active, 0] = 1.0                     # sigma = 0: idx[j, 0] is j itself (half-width 0)
    rows = np.repeat(np.arange(n), idx.shape[1])
    vals = (w * dlam[:, None] / dlam[idx]).ravel()
    op = sp.coo_matrix((vals, (rows, idx.ravel())), shape=(n, n)).tocsr()
    op.sum_duplicates()
    op.eliminate_zeros()
    return op


def broaden(lam: np.ndarray, flux: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """``flux (..., n)`` per Å broadened by the Gaussian ``sigma (n,)`` Å; float64.  Local."""
    flux = np.asarray(flux, dtype=np.float64)
    op = broadening_operator(lam, sigma)
    flat = flux.reshape(-1, flux.shape[-1])
    return np.asarray(op.T @ flat.T).T.reshape(flux.shape)


def complete_range(lam: np.ndarray, sigma: np.ndarray) -> tuple[float, float]:
    """``(lo, hi)`` Å: where :func:`broadening_operator`'s result is not touched by cut kernels.  Local.

    A kernel is cut within its half-width ``h`` of an end and reaches ``h`` further, so the
    result is exact at least ``2 max h`` inside the ends (the whole grid when σ = 0).
    """
    lam = np.asarray(lam, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    half = np.where(sigma > 0, TRUNCATE * np.maximum(sigma, pixel_widths(lam)), 0.0)
    margin = 2.0 * float(half.max()) if half.size else 0.0
    return float(lam[0] + margin), float(lam[-1] - margin)
