"""The rebin operator from the template grid to the observed grid (pure numerics).

Conventions (``docs/CubeFit.md``):

* grids are natural-log wavelength pixel *centres*; pixel edges lie half-way between centres,
  the outer edges half a spacing beyond the first/last centre;
* ``mode="overlap"`` (default, flux conserving): the observed value is the overlap-weighted
  mean of the template density over the observed pixel,
  ``obs[l] = sum_t f[t] * |bin_t ∩ bin_l| / |bin_l|``.  A flat template stays flat, and
  ``sum_l obs[l] |bin_l| = sum_t f[t] |bin_t ∩ covered range|`` (∫ f dlnλ is preserved);
* ``mode="interp"``: two-tap linear interpolation at the observed centres (what the
  predecessor actually built; not flux conserving when the grids differ in spacing).

The operator is returned as ``R`` with shape ``(T, L)`` (the spec's ``/R_T`` orientation), so
``obs = spectra @ R`` for spectra ``(..., T)``.  It is sparse (banded); :func:`rebin_operator`
returns a ``scipy.sparse.csr_matrix``; use ``.toarray()`` to store it dense.

Local (no MPI, no I/O).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

REBIN_MODES = ("overlap", "interp")


def pixel_edges(centres: np.ndarray) -> np.ndarray:
    """Edges ``(N+1,)`` of pixels with the given increasing ``centres (N,)``.  Local."""
    c = np.asarray(centres, dtype=np.float64)
    if c.ndim != 1 or c.size < 2:
        raise ValueError("pixel_edges: need a 1-D grid of at least 2 centres")
    mid = 0.5 * (c[1:] + c[:-1])
    return np.concatenate(([c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]))


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
        rows, cols, vals = _overlap_triplets(tem, obs)
    elif mode == "interp":
        rows, cols, vals = _interp_triplets(tem, obs)
    else:
        raise ValueError(f"rebin mode {mode!r}: expected one of {', '.join(REBIN_MODES)}")
    op = sp.coo_matrix((vals, (rows, cols)), shape=(tem.size, obs.size)).tocsr()
    op.sum_duplicates()
    op.eliminate_zeros()
    return op


def _overlap_triplets(tem: np.ndarray, obs: np.ndarray):
    t_edges, o_edges = pixel_edges(tem), pixel_edges(obs)
    o_width = np.diff(o_edges)
    # template pixels touching observed pixel l: t with t_edges[t] < o_hi and t_edges[t+1] > o_lo
    first = np.searchsorted(t_edges, o_edges[:-1], side="right") - 1
    last = np.searchsorted(t_edges, o_edges[1:], side="left") - 1
    first = np.clip(first, 0, tem.size - 1)
    last = np.clip(last, 0, tem.size - 1)
    counts = np.maximum(last - first + 1, 0)
    cols = np.repeat(np.arange(obs.size), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    rows = np.repeat(first, counts) + offsets
    lo = np.maximum(t_edges[rows], o_edges[cols])
    hi = np.minimum(t_edges[rows + 1], o_edges[cols + 1])
    vals = np.clip(hi - lo, 0.0, None) / o_width[cols]
    return rows, cols, vals


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

