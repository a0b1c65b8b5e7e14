"""Rebinning between wavelength grids (pure numerics): one exact-overlap kernel,
:func:`overlap_rebin`, for ``/R_T`` and for the log-rebinning of ingest.

Pixels are given by their **edges** in natural-log wavelength (λ in Å), ``edges (N+1,)``
strictly increasing (:mod:`.wavelength_grids` makes edges from centres: half-way between
centres, the outer edges half a spacing beyond the first and last centre).  A pixel value is
the mean flux density over the pixel, and the density is taken as constant inside each input
pixel.  The variable in which it is constant is the *measure* of the overlap:

* ``measure="lambda"`` (values per Å, f_λ, e.g. 1e-20 erg/s/cm²/Å): overlaps are lengths in
  λ, and ::

      out[j] = Σ_i f[i] · |λ-pixel_i ∩ λ-pixel_j| / Δλ_j

  is the mean of f_λ over output pixel j, still per Å.  ∫ f dλ is preserved on the covered
  range: ``Σ_j out[j] Δλ_j = Σ_i f[i] |λ-pixel_i ∩ covered range|``.  A flat f_λ stays flat.
  This is how a cube or library sampled linearly in λ is log-rebinned (pPXF's ``flux=False``).
* ``measure="lnlambda"`` (values per unit ln λ): overlaps are lengths in ln λ; ∫ g dlnλ is
  preserved.  This is ``/R_T`` (:func:`rebin_operator`, ``mode="overlap"``): the observed value
  is the overlap-weighted mean of the template density over the observed pixel.

:func:`per_lnlambda_factor` converts per-Å output values to flux per unit ln λ,
``out[j] · Δλ_j / Δlnλ_j = ∫_{pixel j} f dλ / Δlnλ_j`` (≈ λ_j f_λ), the quantity a Doppler
shift in ln λ conserves exactly.  Variances of independent input pixels propagate as
``var_out[j] = Σ_i w_ij² var[i]`` (the covariance this creates between neighbouring output
pixels is not kept).

The operator is *banded*: each output pixel has at most ``K`` input taps, stored as
``index (n_out, K)`` and ``weight (n_out, K)``.  :meth:`BandedRebin.apply` sums the taps in a
fixed order, element by element, so a spectrum's result does not depend on which other
spectra are processed with it (the same bytes on any number of ranks).  Non-finite input
values propagate to every output pixel they touch.

``/R_T`` is returned as a ``scipy.sparse.csr_matrix`` ``R (T, L)`` (the spec's orientation), so
``obs = spectra @ R`` for spectra ``(..., T)``; ``mode="interp"`` is the predecessor's two-tap
linear interpolation at the observed centres (not flux conserving when the spacings differ).

Local (no MPI, no I/O).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .wavelength_grids import pixel_edges

REBIN_MODES = ("overlap", "interp")


def rebin_operator(tem_pix: np.ndarray, obs_pix: np.ndarray, mode: str = "overlap") -> sp.csr_matrix:
    """Sparse rebin operator ``R (T, L)`` with ``obs = spectra @ R``.  Local.

    Parameters
    ----------
    tem_pix : (T,) float64
        ln λ of the template pixel centres, strictly increasing.
    obs_pix : (L,) float64
        ln λ of the observed pixel centres, strictly increasing.
    mode : {"overlap", "interp"}
        Exact bin overlap (flux conserving) or two-tap linear interpolation.

    Returns
    -------
    scipy.sparse.csr_matrix, (T, L) float64
    """
    tem = np.asarray(tem_pix, dtype=np.float64)
    obs = np.asarray(obs_pix, dtype=np.float64)
    if mode == "overlap":
        return overlap_rebin(pixel_edges(tem), pixel_edges(obs), measure="lnlambda").to_sparse()
    if mode == "interp":
        rows, cols, vals = _interp_triplets(tem, obs)
    else:
        raise ValueError(f"rebin mode {mode!r}: expected one of {', '.join(REBIN_MODES)}")
    op = sp.coo_matrix((vals, (rows, cols)), shape=(tem.size, obs.size)).tocsr()
    op.sum_duplicates()
    op.eliminate_zeros()
    return op


def _interp_triplets(tem: np.ndarray, obs: np.ndarray):
    idx = np.searchsorted(tem, obs, side="right") - 1
    inside = (obs >= tem[0]) & (obs <= tem[-1])
    idx = np.clip(idx, 0, tem.size - 2)
    frac = (obs - tem[idx]) / (tem[idx + 1] - tem[idx])
    cols = np.arange(obs.size)[inside]
    idx, frac = idx[inside], frac[inside]
    rows = np.concatenate((idx, idx + 1))
    vals = np.concatenate((1.0 - frac, frac))
    return rows, np.concatenate((cols, cols)), vals


def rebin_sparse(rebin_dense: np.ndarray, n_tem: int, n_obs: int) -> sp.csr_matrix:
    """``/R_T`` as a sparse ``(L, T)`` matrix applied as ``R_LT @ spectra.T``.  Local."""
    if rebin_dense.shape == (n_tem, n_obs):
        return sp.csr_matrix(rebin_dense.T)
    if rebin_dense.shape == (n_obs, n_tem):
        return sp.csr_matrix(rebin_dense)
    raise ValueError(f"expected shape ({n_tem}, {n_obs}) or ({n_obs}, {n_tem}), got {rebin_dense.shape}")


MEASURES = ("lambda", "lnlambda")


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
