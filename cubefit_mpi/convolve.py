"""Convolution of spectra with LOSVD kernels on the template grid (pure numerics).

Two independent paths that must agree:

* :func:`convolve_direct` -- shift-and-add in float64, the reference (used by the mock's data
  path and by tests);
* :class:`FFTConvolver` -- the builder's path: template FFTs computed once, kernels transformed
  per (s, c), inverse FFTs batched over populations with one pyFFTW plan.

Both compute ``out[..., i] = Σ_k K[k] T[..., i − shift_k]`` (positive shift = redward), the
linear convolution cropped to the template length with zero outside the template range.

Local (no MPI, no I/O).
"""
from __future__ import annotations

import numpy as np


def convolve_direct(spectra: np.ndarray, kernels: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Shift-and-add convolution ``out[..., i] = Σ_k K[..., k] spectra[..., i − shift_k]``.  Local.

    The reference (non-FFT) convolution cropped to the template length, with zero outside the
    template range.  Used by the mock's independent data path and by tests.

    Parameters
    ----------
    spectra : (..., T) float64
    kernels : (..., K) float64, broadcastable against ``spectra``'s leading axes
    shifts : (K,) int

    Returns
    -------
    (..., T) float64
    """
    spectra = np.asarray(spectra, dtype=np.float64)
    n = spectra.shape[-1]
    lead = np.broadcast_shapes(spectra.shape[:-1], kernels.shape[:-1])
    out = np.zeros(lead + (n,))
    for j, k in enumerate(np.asarray(shifts, dtype=int)):
        if abs(k) >= n:
            continue
        weight = kernels[..., j:j + 1]
        if k >= 0:
            out[..., k:] += weight * spectra[..., :n - k]
        else:
            out[..., :n + k] += weight * spectra[..., -k:]
    return out
