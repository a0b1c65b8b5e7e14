"""Small dense NNLS back-ends of the Kaczmarz polish: scipy's ``nnls`` and ``lsq_linear``,
multiplicative updates, FISTA.  Local (no MPI, no I/O)."""
from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.optimize

DENSE_METHODS = ("nnls", "lsq", "mu", "fista")


def _dense_start(x0, size, fill):
    """Warm start clipped to >= 0, or the constant vector ``fill``; shape (size,)."""
    if x0 is None:
        return np.full(size, fill)
    start = np.asarray(x0, dtype=np.float64)
    if start.shape != (size,) or not np.all(np.isfinite(start)):
        raise ValueError(f"x0 must be a finite array of shape ({size},)")
    return np.maximum(start, 0.0)


def _multiplicative_updates(gram, moment, start, max_iter, tol):
    """Multiplicative updates for ``min 0.5 x^T G x - q^T x, x >= 0``.

    For a non-negative ``G`` and ``q`` this is exactly Lee & Seung's
    ``x <- x * q / (G x)``; for general signs it is the Sha--Saul--Lee form
    ``x <- x * (q + sqrt(q^2 + 4 (G+ x)(G- x))) / (2 G+ x)``.
    """
    gram_pos, gram_neg = np.maximum(gram, 0.0), np.maximum(-gram, 0.0)
    x = start.copy()
    for _ in range(max_iter):
        pos_term, neg_term = gram_pos @ x, gram_neg @ x
        factor = moment + np.sqrt(moment * moment + 4.0 * pos_term * neg_term)
        updated = np.divide(x * factor, 2.0 * pos_term, out=x.copy(), where=pos_term > 0)
        change = np.linalg.norm(updated - x)
        x = updated
        if change <= tol * np.linalg.norm(x):
            break
    return x


def _fista(gram, moment, start, max_iter, tol):
    """Projected accelerated gradient (FISTA, step 1/L) with gradient-based restart.

    Returns the best iterate seen (including ``start``), so the objective never increases.
    """
    size = gram.shape[0]
    lipschitz = float(scipy.linalg.eigvalsh(gram, subset_by_index=[size - 1, size - 1])[0])
    x = start.copy()
    if lipschitz <= 0.0:
        return x

    def objective(vec):
        return 0.5 * vec @ (gram @ vec) - moment @ vec

    best_x, best_value = x.copy(), objective(x)
    momentum_point = x.copy()
    t_current = 1.0
    for _ in range(max_iter):
        step_point = np.maximum(momentum_point - (gram @ momentum_point - moment) / lipschitz, 0.0)
        if (momentum_point - step_point) @ (step_point - x) > 0.0:
            t_current = 1.0  # restart the momentum
        t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t_current * t_current))
        change = np.linalg.norm(step_point - x)
        momentum_point = step_point + ((t_current - 1.0) / t_next) * (step_point - x)
        x, t_current = step_point, t_next
        value = objective(x)
        if value < best_value:
            best_x, best_value = x.copy(), value
        if change <= tol * np.linalg.norm(x):
            break
    return best_x


def nnls_dense(design, target, *, method="nnls", max_iter=50, tol=1e-10, x0=None) -> np.ndarray:
    """Small dense NNLS back-ends for ``min ||design @ x - target||_2, x >= 0``.

    Local.

    Parameters
    ----------
    design : (M, K) float64
        Design matrix.
    target : (M,) float64
        Data vector.
    method : {"nnls", "lsq", "mu", "fista"}, optional
        ``"nnls"``: :func:`scipy.optimize.nnls` (``max_iter``, ``tol``, ``x0`` unused);
        ``"lsq"``: :func:`scipy.optimize.lsq_linear`, bounds ``(0, inf)``,
        method ``"trf"`` (``x0`` unused);
        ``"mu"``: Lee--Seung multiplicative updates (for a non-negative design;
        a sign-general Sha--Saul--Lee form otherwise), ``max_iter`` iterations,
        from ``x0`` or a positive constant vector (zero entries of ``x0`` stay zero);
        ``"fista"``: projected accelerated gradient with step ``1/L``,
        ``L = lambda_max(design.T @ design)``, ``max_iter`` iterations, from
        ``x0`` or zero; returns the best iterate.
    max_iter : int, optional
        Iteration cap of the iterative methods.
    tol : float, optional
        Tolerance (``lsq``) or relative step-size stopping criterion (``mu``, ``fista``).
    x0 : (K,) float64 or None, optional
        Warm start (clipped to ``>= 0``) for ``mu`` and ``fista``.

    Returns
    -------
    x : (K,) float64
        Non-negative solution.
    """
    if method not in DENSE_METHODS:
        raise ValueError(f"unknown method {method!r}; accepted methods are {', '.join(map(repr, DENSE_METHODS))}")
    design = np.asarray(design, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if design.ndim != 2 or target.shape != (design.shape[0],):
        raise ValueError(f"design must be (M, K) and target (M,); got {design.shape} and {target.shape}")
    size = design.shape[1]
    if method == "nnls":
        solution, _ = scipy.optimize.nnls(design, target)
        return np.maximum(solution, 0.0)
    if method == "lsq":
        result = scipy.optimize.lsq_linear(design, target, (0.0, np.inf), "trf", tol=tol, max_iter=max_iter)
        return np.maximum(result.x, 0.0)
    gram, moment = design.T @ design, design.T @ target
    if method == "mu":
        total_curvature, total_moment = float(np.sum(gram)), float(np.sum(moment))
        fill = abs(total_moment) / total_curvature if total_curvature > 0 and total_moment != 0 else 1.0
        return _multiplicative_updates(gram, moment, _dense_start(x0, size, fill), max_iter, tol)
    return _fista(gram, moment, _dense_start(x0, size, 0.0), max_iter, tol)
