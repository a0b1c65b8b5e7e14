"""Global velocity offset between the data and the mean model, by cross-correlation (pure numerics).

A redshift that is slightly wrong shifts every model against the data and biases every weight.
The offset is measured before a build, without a hypercube:

* **mean model** of spaxel s on the template grid: ``m0_s = Σ_c amp_sc (K_sc ∗ T_c)`` with the
  unit-area LOSVD kernels ``K_sc`` and amplitudes of :mod:`.kernels`, the linear convolution of
  :func:`.convolve.convolve_direct`, and ``T_c`` the mixture ``Σ_p x_cp T_p`` of a solution, or
  one template for every component: the plain mean of the library, or (the default before a
  solve) the **optimal template** ``Σ_p w_p T_p`` of :func:`optimal_template`, whose
  non-negative weights fit the galaxy's integrated spectrum.  A template whose line ratios
  differ from the galaxy's shifts the correlation peak (template mismatch: up to ~10 km/s on
  the mocks with the plain mean); the optimal template removes most of it;
* **trial shifts**: ``m_v = m0`` moved by ``δ = ln(1 + v/c) / Δlnλ_T`` template pixels (linear
  interpolation, positive v redward), rebinned to the observed grid with ``/R_T``, for v on a
  grid ``−R … R``; shifting the model by v is what adding v to ``/VelPix`` does;
* **continuum**: a polynomial of low degree (Legendre, over the pixels used) is projected out of
  data and model alike, so only the line pattern correlates;
* **correlation** ``C(v) = Σ_s d̃_s·m̃_s(v) / √(Σ_s |d̃_s|² · Σ_s |m̃_s(v)|²)`` over the spaxels and
  the pixels that are used and valid at every trial shift (no template edge within reach);
  the offset is the vertex of the parabola through the highest grid point and its neighbours;
* **uncertainty**: the standard deviation of the offset over Poisson bootstrap replicates of
  the spaxels (each spaxel enters replicate b with weight ``w_bs ~ Poisson(1)`` drawn from
  ``(seed, s)`` alone, so the replicates do not depend on how spaxels are split over ranks:
  Hanley & MacGibbon 2006, Comput. Methods Programs Biomed. 83, 57).

All sums are over spaxels, so ranks add their partial sums (:func:`correlation_sums`) and one
reduction gives the global correlation.  Local (no MPI, no I/O).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .convolve import convolve_direct
from .kernels import velocity_to_shift


def trial_velocities(v_range: float, step: float) -> np.ndarray:
    """``(nv,)`` trial offsets ``−R, −R + step, …, R`` in km/s (symmetric, 0 included).  Local."""
    if not (np.isfinite(v_range) and np.isfinite(step)) or step <= 0 or v_range < 2 * step:
        raise ValueError(f"expected a step > 0 and a range >= 2 steps, got range {v_range} and step {step}")
    n = int(np.floor(v_range / step + 1e-9))
    return step * np.arange(-n, n + 1, dtype=np.float64)


def mean_model(templates_c: np.ndarray, kernels: np.ndarray, amp: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Mean model spectra on the template grid, ``Σ_c amp_sc (K_sc ∗ T_c)``.  Local.

    Parameters
    ----------
    templates_c : (C, T) or (1, T) float64
        One template per component, or one for all (then the kernels are combined first and
        each spaxel costs one convolution).
    kernels : (n, C, K) float64, unit-area kernels (:func:`.kernels.unit_kernels`)
    amp : (n, C) float64, LOSVD amplitudes
    shifts : (K,) int, pixel shift of each tap

    Returns
    -------
    (n, T) float64
    """
    templates_c = np.asarray(templates_c, dtype=np.float64)
    weighted = kernels * amp[:, :, None]                                   # (n, C, K)
    if templates_c.shape[0] == 1:
        return convolve_direct(templates_c[0], weighted.sum(axis=1), shifts)
    out = np.zeros((kernels.shape[0], templates_c.shape[1]))
    for c in range(templates_c.shape[0]):
        out += convolve_direct(templates_c[c], weighted[:, c], shifts)
    return out


def optimal_template(templates: np.ndarray, data_sum: np.ndarray, kernel_sum: np.ndarray, shifts: np.ndarray,
                     rebin_lt: sp.spmatrix, deltas: np.ndarray, pixels: np.ndarray,
                     basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative template weights that best fit the integrated spectrum, and the fit per shift.  Local.

    The integrated model of population p is ``R (K_tot ∗ T_p)`` with ``K_tot = Σ_s Σ_c amp_sc K_sc``
    (convolution is linear, so the sum over spaxels needs one convolution per population).  At
    each trial shift the continuum-free integrated data are fitted by NNLS over the shifted
    population models; the weights at the best shift are returned.

    Parameters
    ----------
    templates : (P, T) float64
    data_sum : (L,) float64, ``Σ_s`` of the observed spectra (any value on unused pixels)
    kernel_sum : (K,) float64, ``Σ_s Σ_c amp_sc K_sc``
    shifts, rebin_lt, deltas, pixels, basis : as in :func:`correlation_sums`

    Returns
    -------
    weights : (P,) float64, >= 0
    r2 : (nv,) float64, fraction of the integrated spectrum's line power explained per shift
    """
    from scipy.optimize import nnls

    models0 = convolve_direct(templates, kernel_sum, shifts)                 # (P, T)
    target = _residual(np.asarray(data_sum, dtype=np.float64)[pixels], basis)
    power = float(target @ target)
    r2, fits = np.zeros(len(deltas)), []
    for j, delta in enumerate(deltas):
        design = _residual(np.asarray(rebin_lt @ shift_spectra(models0, float(delta)).T).T[:, pixels], basis)
        weights, norm = nnls(design.T, target)
        r2[j] = 1.0 - norm * norm / power if power > 0 else 0.0
        fits.append(weights)
    return fits[int(np.argmax(r2))], r2


def _split_shift(delta: float) -> tuple[int, float]:
    k0 = int(np.floor(delta))
    return k0, float(delta - k0)


def shift_spectra(spectra: np.ndarray, delta: float) -> np.ndarray:
    """Move spectra ``(..., T)`` by ``delta`` pixels (positive: to larger index), linearly.  Local.

    ``out[i] = (1 − f) s[i − k0] + f s[i − k0 − 1]`` with ``delta = k0 + f``, zero where an input
    index falls outside the grid.
    """
    spectra = np.asarray(spectra, dtype=np.float64)
    n = spectra.shape[-1]
    k0, frac = _split_shift(delta)
    out = np.zeros_like(spectra)
    for k, w in ((k0, 1.0 - frac), (k0 + 1, frac)):
        if w == 0.0 or abs(k) >= n:
            continue
        if k >= 0:
            out[..., k:] += w * spectra[..., :n - k]
        else:
            out[..., :n + k] += w * spectra[..., -k:]
    return out


def valid_pixels(rebin_lt: sp.spmatrix, n_tem: int, shifts: np.ndarray, deltas: np.ndarray,
                 used: np.ndarray | None) -> np.ndarray:
    """``(L,) bool``: used observed pixels whose model is free of template edges at every shift.  Local.

    ``m0[i]`` is exact for ``shifts[-1] <= i <= T − 1 + shifts[0]`` (every kernel tap finds a
    template pixel); a shifted model is exact where both interpolation taps are; an observed
    pixel is valid when every template pixel ``/R_T`` gives it is exact for every trial shift.
    """
    idx = np.arange(n_tem)
    exact0 = (idx >= int(shifts[-1])) & (idx <= n_tem - 1 + int(shifts[0]))
    good = np.ones(n_tem, dtype=bool)
    for delta in np.asarray(deltas, dtype=np.float64):
        k0, frac = _split_shift(delta)
        for k, w in ((k0, 1.0), (k0 + 1, frac)):
            if w == 0.0:
                continue
            src = idx - k
            good &= (src >= 0) & (src < n_tem) & exact0[np.clip(src, 0, n_tem - 1)]
    touched_bad = np.asarray(abs(sp.csr_matrix(rebin_lt)) @ (~good).astype(np.float64)).ravel() > 0
    out = ~touched_bad
    if used is not None:
        out &= np.asarray(used, dtype=bool)
    return out


def continuum_basis(n_pix: int, pixels: np.ndarray, degree: int) -> np.ndarray:
    """Orthonormal ``(n_used, degree + 1)`` Legendre basis over the used ``pixels`` (indices).  Local."""
    if degree < 0:
        return np.zeros((pixels.size, 0))
    x = 2.0 * pixels / max(n_pix - 1, 1) - 1.0
    q, _ = np.linalg.qr(np.polynomial.legendre.legvander(x, int(degree)))
    return q


def _residual(values: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """``values (..., n_used)`` minus their projection on ``basis`` (the continuum)."""
    return values - (values @ basis) @ basis.T


def bootstrap_weights(spaxels: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``(1 + n_boot, n)`` float64: row 0 ones, then Poisson(1) weights from ``(seed, s)``.  Local."""
    spaxels = np.asarray(spaxels, dtype=np.int64)
    out = np.ones((1 + int(n_boot), spaxels.size))
    for j, s in enumerate(spaxels):
        out[1:, j] = np.random.default_rng([int(seed), 29, int(s)]).poisson(1.0, int(n_boot))
    return out


def correlation_sums(data: np.ndarray, model0: np.ndarray, rebin_lt: sp.spmatrix, deltas: np.ndarray,
                     pixels: np.ndarray, basis: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Partial sums of the correlation over a block of spaxels.  Local.

    Parameters
    ----------
    data : (n, L) float64, observed spectra
    model0 : (n, T) float64, mean models on the template grid (:func:`mean_model`)
    rebin_lt : (L, T) sparse, ``/R_T`` as ``observed = rebin_lt @ template_grid``
    deltas : (nv,) float64, trial shifts in template pixels
    pixels : (n_used,) int, observed pixels that enter (:func:`valid_pixels`)
    basis : (n_used, k) float64, continuum basis (:func:`continuum_basis`)
    weights : (B, n) float64, bootstrap weights per spaxel (:func:`bootstrap_weights`)

    Returns
    -------
    (B, 2 nv + 1) float64: ``Σ w d̃·m̃(v)`` (nv), ``Σ w |m̃(v)|²`` (nv), ``Σ w |d̃|²`` (1).
    """
    d = _residual(np.asarray(data, dtype=np.float64)[:, pixels], basis)
    n_v = len(deltas)
    cross = np.empty((d.shape[0], n_v))
    power = np.empty((d.shape[0], n_v))
    for j, delta in enumerate(deltas):
        shifted = shift_spectra(model0, float(delta))
        m = _residual(np.asarray(rebin_lt @ shifted.T).T[:, pixels], basis)
        cross[:, j] = np.einsum("sl,sl->s", d, m)
        power[:, j] = np.einsum("sl,sl->s", m, m)
    per_spaxel = np.hstack((cross, power, np.einsum("sl,sl->s", d, d)[:, None]))
    return weights @ per_spaxel


def correlation(sums: np.ndarray) -> np.ndarray:
    """``(B, nv)`` normalised correlation from reduced :func:`correlation_sums`.  Local."""
    n_v = (sums.shape[-1] - 1) // 2
    cross, power, data = sums[..., :n_v], sums[..., n_v:2 * n_v], sums[..., -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return cross / np.sqrt(power * data)


def peak_offset(velocities: np.ndarray, corr: np.ndarray) -> tuple[float, bool]:
    """Vertex of the parabola through the highest point of ``corr`` and its neighbours.  Local.

    Returns ``(v_peak, at_edge)``; ``at_edge`` when the highest point is the first or last of the
    grid (then ``v_peak`` is that grid point) or the correlation is not finite (NaN).
    """
    corr = np.asarray(corr, dtype=np.float64)
    if not np.all(np.isfinite(corr)):
        return float("nan"), True
    i = int(np.argmax(corr))
    if i == 0 or i == corr.size - 1:
        return float(velocities[i]), True
    y0, y1, y2 = corr[i - 1:i + 2]
    curvature = y0 - 2.0 * y1 + y2
    step = float(velocities[i + 1] - velocities[i])
    offset = 0.5 * (y0 - y2) / curvature if curvature < 0 else 0.0
    return float(velocities[i] + offset * step), False


def pixel_deltas(velocities: np.ndarray, dlnlam_tem: float) -> np.ndarray:
    """Trial velocities (km/s) as template-pixel shifts.  Local."""
    return velocity_to_shift(velocities, dlnlam_tem)
