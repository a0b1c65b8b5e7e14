"""Bootstrap replicates of a fit's data and the statistics of their solutions (pure numerics).

A replicate changes only the data: ``y* = ŷ + e*`` with ``ŷ = A x̂`` the fit's model and ``e*``
drawn from the fit's residuals ``r = y − ŷ`` (or from the data variance), so with the normal
equations cached each replicate is ``b* = G x̂ + Aᵀ W e*`` and one NNLS.  Methods:

* ``wild`` (default; pPXF's population bootstrap): ``e* = r · ε`` with Rademacher signs ``ε = ±1``,
  one per spectrum (``block="spaxel"``: keeps the residuals' correlation along λ) or one per
  pixel (``block="pixel"``);
* ``residual``: ``e*_s`` is ``r_s`` resampled with replacement over the spectrum's used pixels
  (assumes residuals exchangeable along λ; ``block`` does not apply);
* ``parametric``: ``e* = √var · z`` with ``z ~ N(0, 1)`` per pixel, from ``/DataVar``.

Every draw comes from a generator keyed by ``(seed, replicate, spaxel)``, so a replicate's data
do not depend on how spaxels are dealt to ranks or tiles.  Local (no MPI, no I/O).
"""
from __future__ import annotations

import numpy as np

METHODS = ("wild", "residual", "parametric")
BLOCKS = ("spaxel", "pixel")
PERCENTILES = (16.0, 50.0, 84.0)


def draw_errors(method: str, residual: np.ndarray, used: np.ndarray, *, seed: int, replicate: int, first: int,
                block: str = "spaxel", variance: np.ndarray | None = None) -> np.ndarray:
    """``e* (n, L)`` of one replicate for spectra ``first .. first + n − 1``; zero at unused pixels.  Local.

    Parameters
    ----------
    method : {"wild", "residual", "parametric"}
    residual : (n, L) float64, ``y − ŷ`` of the fit (ignored by ``parametric``)
    used : (L,) bool, the pixels the fit used (mask, finite data)
    seed, replicate, first : the generator of spectrum ``s`` is keyed by ``(seed, replicate, s)``
    block : {"spaxel", "pixel"}, the wild bootstrap's sign per spectrum or per pixel
    variance : (n, L) float64, ``/DataVar`` rows (``parametric`` only)
    """
    n, L = residual.shape
    out = np.zeros((n, L))
    idx = np.flatnonzero(used)
    if method == "wild" and block == "spaxel":
        out[:, idx] = residual[:, idx] * wild_signs(seed, [replicate], first, n)[0][:, None]
        return out
    for i in range(n):
        rng = np.random.default_rng([int(seed), int(replicate), int(first + i)])
        if method == "wild":
            signs = 2.0 * rng.integers(0, 2, size=idx.size) - 1.0
            out[i, idx] = residual[i, idx] * signs
        elif method == "residual":
            out[i, idx] = residual[i, idx[rng.integers(0, idx.size, size=idx.size)]]
        elif method == "parametric":
            out[i, idx] = np.sqrt(np.maximum(variance[i, idx], 0.0)) * rng.standard_normal(idx.size)
        else:
            raise ValueError(f"bootstrap method {method!r}: expected one of {', '.join(METHODS)}")
    return out


def wild_signs(seed: int, replicates, first: int, n: int) -> np.ndarray:
    """``(R, n)`` Rademacher signs of the wild bootstrap with one sign per spectrum, for the
    replicates ``replicates`` and spectra ``first .. first + n − 1``; spectrum s of replicate r
    from the generator keyed by ``(seed, r, s)`` (the signs :func:`draw_errors` applies).  Local."""
    out = np.empty((len(replicates), n))
    for j, r in enumerate(replicates):
        for i in range(n):
            out[j, i] = 2.0 * np.random.default_rng([int(seed), int(r), int(first + i)]).integers(0, 2, size=1)[0] - 1.0
    return out


def weight_statistics(replicates: np.ndarray) -> dict:
    """``{"mean", "std", "p16", "p50", "p84"}`` over the replicates ``(R, M)`` of M quantities.  Local."""
    reps = np.asarray(replicates, dtype=np.float64)
    pct = np.percentile(reps, PERCENTILES, axis=0)
    return {"mean": reps.mean(axis=0), "std": reps.std(axis=0, ddof=1) if reps.shape[0] > 1 else np.zeros(reps.shape[1]),
            "p16": pct[0], "p50": pct[1], "p84": pct[2]}


def component_totals(replicates: np.ndarray, n_comp: int) -> np.ndarray:
    """``(R, C)`` totals ``Σ_p x_cp`` of each replicate ``(R, C·P)``.  Local."""
    reps = np.asarray(replicates, dtype=np.float64)
    return reps.reshape(reps.shape[0], int(n_comp), -1).sum(axis=2)


def weighted_means(replicates: np.ndarray, n_comp: int, values: np.ndarray) -> np.ndarray:
    """``(R, C)`` weight-averaged ``values (P,)`` per component (e.g. the light-weighted mean log
    age when x are light weights); NaN where a component has no weight.  Local."""
    reps = np.asarray(replicates, dtype=np.float64).reshape(replicates.shape[0], int(n_comp), -1)
    total = reps.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (reps @ np.asarray(values, dtype=np.float64)) / total, np.nan)


def interval_covers(replicates: np.ndarray, truth: np.ndarray, lo: float = 16.0, hi: float = 84.0) -> np.ndarray:
    """``(M,) bool``: the truth lies in the replicates' ``[lo, hi]`` percentile interval.  Local."""
    a, b = np.percentile(np.asarray(replicates, dtype=np.float64), (lo, hi), axis=0)
    return (np.asarray(truth) >= a) & (np.asarray(truth) <= b)
