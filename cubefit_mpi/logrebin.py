"""Flux-conserving rebinning onto a uniform ln λ grid by exact bin overlap (pure numerics).

Pixels are given by their **edges** in natural-log wavelength (λ in Å), ``edges (N+1,)``
strictly increasing.  A pixel value is the mean flux density over the pixel, and the density is
taken as constant inside each input pixel.  The variable in which it is constant is the
*measure* of the overlap:

* ``measure="lambda"`` (the default; values are per Å, f_λ, e.g. 1e-20 erg/s/cm²/Å): overlaps
  are lengths in λ, and ::

      out[j] = Σ_i f[i] · |λ-pixel_i ∩ λ-pixel_j| / Δλ_j

  is the mean of f_λ over output pixel j, still per Å.  ∫ f dλ is preserved on the covered
  range: ``Σ_j out[j] Δλ_j = Σ_i f[i] |λ-pixel_i ∩ covered range|``.  A flat f_λ stays flat.
  This is how a cube or library sampled linearly in λ is log-rebinned (pPXF's ``flux=False``).
* ``measure="lnlambda"`` (values per unit ln λ): overlaps are lengths in ln λ; ∫ g dlnλ is
  preserved.  This is the convention of ``/R_T`` (:mod:`cubefit_mpi.rebin`, ``overlap`` mode).

:func:`per_lnlambda_factor` converts per-Å output values to flux per unit ln λ,
``out[j] · Δλ_j / Δlnλ_j = ∫_{pixel j} f dλ / Δlnλ_j`` (≈ λ_j f_λ), the quantity a Doppler
shift in ln λ conserves exactly.

Variances of independent input pixels propagate as ``var_out[j] = Σ_i w_ij² var[i]`` (the
covariance this creates between neighbouring output pixels is not kept).

The operator is *banded*: each output pixel has at most ``K`` input taps, stored as
``index (n_out, K)`` and ``weight (n_out, K)``.  :meth:`BandedRebin.apply` sums the taps in a
fixed order, element by element, so a spectrum's result does not depend on which other
spectra are processed with it (the same bytes on any number of ranks).  Non-finite input
values propagate to every output pixel they touch.

Local (no MPI, no I/O).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .layout import SPEED_OF_LIGHT_KMS

MEASURES = ("lambda", "lnlambda")
UNIFORM_RTOL = 1e-6


@dataclass(frozen=True)
class BandedRebin:
    """A banded linear operator ``out = values @ R`` from ``n_in`` to ``n_out`` pixels.

    Attributes
    ----------
    index : (n_out, K) int64
        Input pixel of each tap (padding taps repeat the first tap with weight 0).
    weight : (n_out, K) float64
        Tap weights; the first tap's weight is > 0.
    n_in : int
    """

    index: np.ndarray
    weight: np.ndarray
    n_in: int

    @property
    def n_out(self) -> int:
        return int(self.index.shape[0])

    def apply(self, values: np.ndarray, *, variance: bool = False) -> np.ndarray:
        """Rebin ``values (..., n_in)`` to ``(..., n_out)`` float64.  Local.

        With ``variance=True`` the squared weights are used (``Σ_i w_ij² var[i]``).
        """
        values = np.asarray(values, dtype=np.float64)
        if values.shape[-1] != self.n_in:
            raise ValueError(f"BandedRebin: expected {self.n_in} input pixels, got {values.shape[-1]}")
        weight = self.weight * self.weight if variance else self.weight
        out = weight[:, 0] * values[..., self.index[:, 0]]
        for k in range(1, self.index.shape[1]):
            out += weight[:, k] * values[..., self.index[:, k]]
        return out

    def scaled(self, factor: np.ndarray) -> "BandedRebin":
        """The operator followed by a per-output-pixel factor ``(n_out,)``.  Local."""
        return BandedRebin(self.index, self.weight * np.asarray(factor, dtype=np.float64)[:, None], self.n_in)

    def to_sparse(self) -> sp.csr_matrix:
        """The same operator as ``scipy.sparse.csr_matrix (n_in, n_out)``.  Local."""
        cols = np.repeat(np.arange(self.n_out), self.index.shape[1])
        op = sp.coo_matrix((self.weight.ravel(), (self.index.ravel(), cols)), shape=(self.n_in, self.n_out))
        op = op.tocsr()
        op.sum_duplicates()
        op.eliminate_zeros()
        return op


def overlap_rebin(in_edges: np.ndarray, out_edges: np.ndarray, *, measure: str = "lambda") -> BandedRebin:
    """Exact-overlap rebin operator from input to output pixels.  Local.

    Parameters
    ----------
    in_edges : (n_in + 1,) float64
        ln λ of the input pixel edges, strictly increasing.
    out_edges : (n_out + 1,) float64
        ln λ of the output pixel edges, strictly increasing, inside ``[in_edges[0], in_edges[-1]]``.
    measure : {"lambda", "lnlambda"}
        Variable in which the input density is constant inside a pixel (see the module notes).

    Returns
    -------
    BandedRebin
        ``out[j] = Σ_i values[i] · overlap(i, j) / width(j)`` in the chosen measure.
    """
    if measure not in MEASURES:
        raise ValueError(f"measure {measure!r}: expected one of {', '.join(MEASURES)}")
    a = np.asarray(in_edges, dtype=np.float64)
    b = np.asarray(out_edges, dtype=np.float64)
    for name, e in (("in_edges", a), ("out_edges", b)):
        if e.ndim != 1 or e.size < 2 or np.any(np.diff(e) <= 0):
            raise ValueError(f"{name}: expected at least 2 strictly increasing edges")
    tol = 1e-12 * max(1.0, abs(a[0]), abs(a[-1]))
    if b[0] < a[0] - tol or b[-1] > a[-1] + tol:
        raise ValueError(f"out_edges [{b[0]:.9g}, {b[-1]:.9g}] reach outside in_edges [{a[0]:.9g}, {a[-1]:.9g}]")
    xa, xb = (np.exp(a), np.exp(b)) if measure == "lambda" else (a, b)
    # input pixels touching output pixel j: i with a[i] < b[j+1] and a[i+1] > b[j]
    first = np.clip(np.searchsorted(a, b[:-1], side="right") - 1, 0, a.size - 2)
    last = np.clip(np.searchsorted(a, b[1:], side="left") - 1, 0, a.size - 2)
    n_taps = int(np.max(last - first)) + 1
    idx = first[:, None] + np.arange(n_taps)[None, :]
    valid = idx <= last[:, None]
    idx = np.where(valid, idx, first[:, None])
    lo = np.maximum(xa[idx], xb[:-1, None])
    hi = np.minimum(xa[idx + 1], xb[1:, None])
    weight = np.where(valid, np.clip(hi - lo, 0.0, None), 0.0) / np.diff(xb)[:, None]
    # drop taps with zero overlap (touching edges), keeping each row's order; pad with tap 0
    order = np.argsort(weight <= 0.0, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    weight = np.take_along_axis(weight, order, axis=1)
    n_keep = max(1, int(np.max((weight > 0).sum(axis=1))))
    idx, weight = idx[:, :n_keep], weight[:, :n_keep]
    idx = np.where(weight > 0, idx, idx[:, :1])
    return BandedRebin(idx.astype(np.int64), weight, int(a.size - 1))


def per_lnlambda_factor(edges: np.ndarray) -> np.ndarray:
    """``Δλ_j / Δlnλ_j (n,)`` turning per-Å pixel means into flux per unit ln λ.  Local."""
    e = np.asarray(edges, dtype=np.float64)
    return np.diff(np.exp(e)) / np.diff(e)


# ---------------------------------------------------------------------------------------------
# grids
# ---------------------------------------------------------------------------------------------
def is_uniform(x: np.ndarray, rtol: float = UNIFORM_RTOL) -> bool:
    """True if the steps of ``x (N,)`` are equal to within ``rtol`` of their mean.  Local."""
    step = np.diff(np.asarray(x, dtype=np.float64))
    return bool(step.size > 0 and np.all(step > 0) and np.max(np.abs(step - step.mean())) <= rtol * step.mean())


def edges_from_centres(lam: np.ndarray) -> tuple[np.ndarray, str]:
    """ln λ pixel edges ``(N+1,)`` of pixels with centres ``lam (N,)`` (Å), and the grid kind.  Local.

    ``"linear"`` (uniform in λ): edges half-way between centres in λ; ``"log"`` (uniform in
    ln λ): half-way in ln λ; ``"irregular"``: half-way in λ.
    """
    lam = np.asarray(lam, dtype=np.float64)
    if lam.ndim != 1 or lam.size < 2 or not np.all(np.isfinite(lam)) or np.any(np.diff(lam) <= 0) or lam[0] <= 0:
        raise ValueError("wavelengths: expected at least 2 positive, finite, strictly increasing values")
    if is_uniform(lam):
        kind, centres = "linear", lam
    elif is_uniform(np.log(lam)):
        return _mid_edges(np.log(lam)), "log"
    else:
        kind, centres = "irregular", lam
    edges = _mid_edges(centres)
    if edges[0] <= 0:
        raise ValueError("wavelengths: the first pixel reaches λ <= 0")
    return np.log(edges), kind


def _mid_edges(c: np.ndarray) -> np.ndarray:
    mid = 0.5 * (c[1:] + c[:-1])
    return np.concatenate(([c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]))


def uniform_log_edges(lo: float, hi: float, dlnlam: float) -> np.ndarray:
    """Edges ``lo + k·dlnlam`` of the complete pixels inside ``[lo, hi]`` (ln λ).  Local."""
    n = int(math.floor((hi - lo) / dlnlam + 1e-9))
    if n < 2:
        raise ValueError(f"the range [{math.exp(lo):.2f}, {math.exp(hi):.2f}] A holds fewer than 2 pixels "
                         f"of {dlnlam * SPEED_OF_LIGHT_KMS:.4g} km/s")
    return lo + dlnlam * np.arange(n + 1)


def guard_pixels(vmax_kms: float, dlnlam_tem: float, oversample: int) -> int:
    """Template pixels added on each side of the observed range for LOSVD velocities up to ``vmax``.  Local.

    ``ceil(|ln(1 − vmax/c)| / Δlnλ_T) + oversample + 2`` -- the blue-side shift of the largest
    velocity, plus a margin of one observed pixel and two template pixels.
    """
    shift = -math.log1p(-min(abs(vmax_kms), 0.999 * SPEED_OF_LIGHT_KMS) / SPEED_OF_LIGHT_KMS)
    return int(math.ceil(shift / dlnlam_tem - 1e-9)) + int(oversample) + 2


def template_edges(obs_edges: np.ndarray, oversample: int, vmax_kms: float) -> np.ndarray:
    """ln λ edges of the template grid for an observed grid uniform in ln λ.  Local.

    Spacing ``Δlnλ_L / oversample``, edges aligned with the observed edges (every observed
    pixel is exactly ``oversample`` template pixels), extended by :func:`guard_pixels` on each
    side.
    """
    obs_edges = np.asarray(obs_edges, dtype=np.float64)
    n_obs = obs_edges.size - 1
    dln = (obs_edges[-1] - obs_edges[0]) / n_obs / int(oversample)
    guard = guard_pixels(vmax_kms, dln, oversample)
    k = np.arange(-guard, n_obs * int(oversample) + guard + 1)
    return obs_edges[0] + dln * k


def centres(edges: np.ndarray) -> np.ndarray:
    """Pixel centres half-way between ``edges (N+1,)``.  Local."""
    e = np.asarray(edges, dtype=np.float64)
    return 0.5 * (e[1:] + e[:-1])


def range_mask(edges: np.ndarray, ranges_aa) -> np.ndarray:
    """``(N,) bool``: True where the pixel (ln λ ``edges``) overlaps any ``(lo, hi)`` range in Å.  Local."""
    lam = np.exp(np.asarray(edges, dtype=np.float64))
    hit = np.zeros(lam.size - 1, dtype=bool)
    for lo, hi in ranges_aa:
        hit |= (lam[1:] > lo) & (lam[:-1] < hi)
    return hit
