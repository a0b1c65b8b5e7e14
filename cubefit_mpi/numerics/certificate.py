"""The KKT certificate of a non-negative quadratic problem, independent of any solver.

For ``min ½ xᵀGx − bᵀx, x ≥ 0`` with ``g = Gx − b`` and ``s_j = g_j / √G_jj`` (0 for zero
columns) the conditions are ``x ≥ 0``, ``s ≥ −tol``, ``|s_j| ≤ tol`` where ``x_j > 0``, and a
small complementarity ratio ``|xᵀg| / max(xᵀGx, |bᵀx|)``.  :func:`certify` makes the
tolerances scale-free; every exact solver's result goes through it.  Local (no MPI, no I/O).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

_EPS = np.finfo(np.float64).eps
_TINY = np.finfo(np.float64).tiny


@dataclass(frozen=True)
class KKTCertificate:
    """Optimality certificate of a candidate NNLS solution (see :func:`kkt_certificate`).

    Attributes
    ----------
    primal_min : float
        ``min_j x_j`` (must be ``>= 0``).
    dual_min : float
        ``min_j s_j`` with ``g = G x - b`` and ``s_j = g_j / sqrt(G_jj)`` (0 for zero columns).
    passive_stationarity : float
        ``max |s_j|`` over ``x_j > 0`` (0 when ``x == 0``).
    complementarity : float
        ``|x . g| / max(chi2_scale, tiny)``.
    objective : float
        ``0.5 x^T G x - b^T x``.
    tol : float
        Tolerance used for ``ok``.
    ok : bool
        ``primal_min >= 0 and dual_min >= -tol and passive_stationarity <= tol
        and complementarity <= tol``.
    """

    primal_min: float
    dual_min: float
    passive_stationarity: float
    complementarity: float
    objective: float
    tol: float
    ok: bool


def kkt_certificate(gram, rhs, x, *, tol=1e-8, chi2_scale=None) -> KKTCertificate:
    """KKT optimality certificate of ``x`` for ``min 0.5 x^T G x - b^T x, x >= 0``.

    Local.  Computed independently of any solver, from ``(gram, rhs, x)`` only.
    With ``g = G x - b`` and ``s_j = g_j / sqrt(G_jj)`` (0 for zero columns),
    the conditions are ``x >= 0``, ``s >= -tol``, ``|s_j| <= tol`` where
    ``x_j > 0``, and ``|x . g| / chi2_scale <= tol``.  ``tol`` is absolute in
    the units of ``s`` (a weighted residual norm, since ``|s_j| <= sqrt(chi2)``).

    Parameters
    ----------
    gram : (N, N) float64
        Symmetric PSD matrix ``A.T W A``.
    rhs : (N,) float64
        ``A.T W y``.
    x : (N,) float64
        Candidate solution.
    tol : float, optional
        Tolerance of the certificate.
    chi2_scale : float or None, optional
        Scale for the complementarity ratio; default ``max(x^T G x, |b^T x|)``.

    Returns
    -------
    KKTCertificate
    """
    gram, rhs = as_gram_system(gram, rhs)
    x = np.asarray(x, dtype=np.float64)
    if x.shape != rhs.shape:
        raise ValueError(f"x must have shape {rhs.shape}, got {x.shape}")
    return kkt_from_gradient(gram @ x - rhs, gram.diagonal(), x, rhs, tol=tol, chi2_scale=chi2_scale)


def kkt_from_gradient(gradient, diag, x, rhs, *, tol=1e-8, chi2_scale=None) -> KKTCertificate:
    """The certificate of :func:`kkt_certificate` from ``g = Gx - b`` and ``diag(G)``.  Local.

    For callers that hold only some columns of G (the working-set solver): ``x^T G x`` is
    ``x . (g + b)``.

    Parameters
    ----------
    gradient : (N,) float64, ``G x - b``
    diag : (N,) float64, ``diag(G)``
    x, rhs : (N,) float64
    """
    gradient = np.asarray(gradient, dtype=np.float64)
    diag = np.asarray(diag, dtype=np.float64)
    free = ~zero_column_mask(diag)
    scaled = np.zeros_like(gradient)
    scaled[free] = gradient[free] / np.sqrt(diag[free])
    primal_min = float(np.min(x))
    dual_min = float(np.min(scaled))
    positive = x > 0
    passive_stationarity = float(np.max(np.abs(scaled[positive]))) if positive.any() else 0.0
    linear = float(rhs @ x)
    curvature = float(x @ gradient) + linear
    if chi2_scale is None:
        chi2_scale = max(curvature, abs(linear))
    complementarity = abs(float(x @ gradient)) / max(float(chi2_scale), _TINY)
    objective = 0.5 * curvature - linear
    ok = primal_min >= 0.0 and dual_min >= -tol and passive_stationarity <= tol and complementarity <= tol
    return KKTCertificate(
        primal_min, dual_min, passive_stationarity, complementarity, objective, float(tol), bool(ok)
    )


KKT_TOL = 1e-8


def certify(gram: np.ndarray, rhs: np.ndarray, x: np.ndarray, tol: float = KKT_TOL, *, gradient=None):
    """KKT certificate, scale-free: the gradient tests use ``tol × max_j |b_j| / √G_jj``, the
    complementarity ratio ``|xᵀg| / max(xᵀGx, |bᵀx|)`` uses ``tol``.  Local.

    ``gradient`` (= Gx − b) may be given with ``gram`` as the diagonal only (working-set solver).
    """
    diag = gram if gram.ndim == 1 else gram.diagonal()
    live = diag > 0
    scale = float(np.max(np.abs(rhs[live]) / np.sqrt(diag[live]), initial=0.0))
    if gradient is None:
        cert = kkt_certificate(gram, rhs, x, tol=tol * max(scale, 1e-300))
    else:
        cert = kkt_from_gradient(gradient, diag, x, rhs, tol=tol * max(scale, 1e-300))
    ok = (cert.primal_min >= 0.0 and cert.dual_min >= -cert.tol and cert.passive_stationarity <= cert.tol
          and cert.complementarity <= tol)
    return dataclasses.replace(cert, ok=bool(ok))


def certificate_dict(cert) -> dict:
    """``{"kkt.ok": ..., "kkt.tol": ...}`` for stats and HDF5 attributes.  Local."""
    return {"kkt.ok": cert.ok, "kkt.primal_min": cert.primal_min, "kkt.dual_min": cert.dual_min,
            "kkt.passive_stationarity": cert.passive_stationarity, "kkt.complementarity": cert.complementarity,
            "kkt.tol": cert.tol}


_ZERO_DIAG_RTOL = _EPS**2  # G_jj <= this * max(G_kk): zero column  # G_jj <= this * max(G_kk): zero column


def as_gram_system(gram, rhs):
    """Validate and convert ``(gram, rhs)`` to float64 arrays of shapes (N, N), (N,)."""
    gram = np.asarray(gram, dtype=np.float64)
    rhs = np.asarray(rhs, dtype=np.float64)
    if rhs.ndim != 1 or rhs.size == 0:
        raise ValueError(f"rhs must be a non-empty 1-D array, got shape {rhs.shape}")
    n = rhs.size
    if gram.shape != (n, n):
        raise ValueError(f"gram must have shape ({n}, {n}), got {gram.shape}")
    if not (_is_finite(gram) and _is_finite(rhs)):
        raise ValueError("gram and rhs must be finite")
    return gram, rhs


def _is_finite(array):
    """True if all entries are finite (a finite sum proves it without an (N, N) temporary)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.sum(array)):
            return True
    rows = array.reshape(array.shape[0], -1)
    return all(np.isfinite(rows[i : i + 256]).all() for i in range(0, rows.shape[0], 256))


def zero_column_mask(diag):
    """(N,) bool mask of zero columns: ``G_jj <= 0`` or ``G_jj <= eps**2 * max(G_kk)``."""
    positive = diag > 0
    if not positive.any():
        return np.ones(diag.shape, dtype=bool)
    return ~positive | (diag <= _ZERO_DIAG_RTOL * diag[positive].max())
