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


class FFTConvolver:
    """Convolve a fixed set of spectra with one kernel at a time, by FFT (pyFFTW).

    The spectra's FFTs are computed once; each :meth:`convolve` transforms the kernel, multiplies
    and runs ONE batched inverse FFT over all spectra with a plan made once (spectra as rows:
    FFTW is about twice as fast on contiguous rows as on strided columns).  Plans use ``FFTW_ESTIMATE`` so every process picks
    the same algorithm: for the same kernel the output bytes do not depend on the process, the
    rank count or the call order.

    Parameters
    ----------
    spectra : (P, T) float64
        Template spectra (time domain).
    shifts : (K,) int
        Pixel shift of each kernel tap (ascending, consecutive), from
        :func:`cubefit_mpi.numerics.kernels.kernel_shifts`.
    threads : int
        FFTW threads.

    Local (no MPI).
    """

    def __init__(self, spectra: np.ndarray, shifts: np.ndarray, threads: int = 1):
        import pyfftw

        spectra = np.asarray(spectra, dtype=np.float64)
        self.n_spec, self.n_pix = spectra.shape
        shifts = np.asarray(shifts, dtype=int)
        # the kernel array starts at min(shift, 0) and ends at max(shift, 0): crop offset >= 0
        self.lead = int(max(0, -shifts[0]))
        self.tap_offset = int(shifts[0] + self.lead)          # where tap 0 sits in the kernel array
        self.nfft = self.fft_length(self.n_pix, shifts)
        n_freq = self.nfft // 2 + 1
        flags = ("FFTW_ESTIMATE",)
        padded = pyfftw.empty_aligned((self.n_spec, self.nfft), dtype="float64")
        padded[:, :self.n_pix] = spectra
        padded[:, self.n_pix:] = 0.0
        self.spec_fft = pyfftw.empty_aligned((self.n_spec, n_freq), dtype="complex128")
        pyfftw.FFTW(padded, self.spec_fft, axes=(-1,), flags=flags, threads=threads).execute()
        self._kernel = pyfftw.empty_aligned(self.nfft, dtype="float64")
        self._kernel_fft = pyfftw.empty_aligned(n_freq, dtype="complex128")
        self._forward = pyfftw.FFTW(self._kernel, self._kernel_fft, flags=flags, threads=1)
        self._product = pyfftw.empty_aligned((self.n_spec, n_freq), dtype="complex128")
        self._out = pyfftw.empty_aligned((self.n_spec, self.nfft), dtype="float64")
        self._inverse = pyfftw.FFTW(self._product, self._out, axes=(-1,), direction="FFTW_BACKWARD",
                                    flags=flags + ("FFTW_DESTROY_INPUT",), threads=threads)

    @staticmethod
    def fft_length(n_pix: int, shifts: np.ndarray) -> int:
        """FFT length for spectra of ``n_pix`` pixels and kernels with these ``shifts``.  Local."""
        import pyfftw

        shifts = np.asarray(shifts, dtype=int)
        span = int(max(shifts[-1], 0) + max(0, -shifts[0]) + 1)
        return int(pyfftw.next_fast_len(int(n_pix) + span - 1))

    def convolve(self, kernel: np.ndarray) -> np.ndarray:
        """``out[p, i] = Σ_k kernel[k] spectra[p, i − shift_k]`` for all p.  Local.

        Parameters
        ----------
        kernel : (K,) float64, the taps for the ``shifts`` given at construction

        Returns
        -------
        (P, T) float64, a view into an internal buffer, valid until the next call.
        """
        k = np.asarray(kernel, dtype=np.float64)
        self._kernel[:] = 0.0
        self._kernel[self.tap_offset:self.tap_offset + k.size] = k * (1.0 / self.nfft)
        self._forward.execute()
        np.multiply(self.spec_fft, self._kernel_fft[None, :], out=self._product)
        self._inverse.execute()
        return self._out[:, self.lead:self.lead + self.n_pix]


def needed_template_range(rebin_lt, shifts: np.ndarray, n_pix: int) -> tuple[int, int]:
    """Template pixels ``[lo, hi)`` the rebinned convolution reads.  Local.

    The observed grid uses the template pixels ``[t0, t1]`` where the rebin operator
    ``rebin_lt (L, T)`` has a non-zero weight; the convolution value at pixel i reads the
    template at ``i − shift_k`` for every tap, so ``[t0 − max(shift), t1 − min(shift)]`` (clipped to
    the grid) is all that is read.  Convolving the templates cropped to that range gives the same
    values at ``[t0, t1]`` (zero outside the template range either way).

    Parameters
    ----------
    rebin_lt : (L, T) scipy.sparse matrix, ``observed = rebin_lt @ template_grid``
    shifts : (K,) int, ascending kernel shifts
    n_pix : int, T

    Returns
    -------
    (lo, hi) : int, ``0 <= lo < hi <= T``
    """
    import scipy.sparse as sp

    used = np.flatnonzero(np.asarray(abs(sp.csc_matrix(rebin_lt)).sum(axis=0)).ravel() > 0)
    if used.size == 0:
        return 0, int(n_pix)
    shifts = np.asarray(shifts, dtype=int)
    lo = max(0, int(used[0]) - int(max(shifts[-1], 0)))
    hi = min(int(n_pix), int(used[-1]) - int(min(shifts[0], 0)) + 1)
    return lo, hi
