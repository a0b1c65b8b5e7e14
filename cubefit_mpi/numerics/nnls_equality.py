"""Non-negative least squares with linear equality constraints (local: no MPI, pure NumPy/SciPy).

:func:`nnls_equality` solves::

    min ½ xᵀ G x − bᵀ x   subject to   x ≥ 0,   M x = d

in two phases.

1. **Method of multipliers** (augmented Lagrangian) around an NNLS solver given as a callable
   (default :func:`~.nnls.nnls_gram`; any ``solver(gram, rhs, *, tol, x0) -> result with .x``
   plugs in): each outer step solves the NNLS of
   ``½ xᵀ(G + ρ MᵀM)x − (b − Mᵀλ + ρ Mᵀd)ᵀx`` warm-started from the previous x, then
   ``λ ← λ + ρ (M x − d)``; ρ grows tenfold when the violation does not fall fourfold.
   This finds the active set (which x are zero).
2. **Exact finish** (Lawson–Hanson with equality constraints): on the passive set F the
   equality-constrained system ``G_FF x_F + M_Fᵀ λ = b_F, M_F x_F = d`` is solved by the
   null-space method (x_F = x_p + Z w with M_F Z = 0, so M x = d holds to rounding whatever the
   conditioning of G), entries that come out ≤ 0 leave F (a step from the current x, as in
   Lawson–Hanson), and the zero set's dual feasibility ``(G x − b + Mᵀλ)_j ≥ 0`` is checked;
   the most violated j enters F.  Multiplier directions that F leaves undetermined (rows of
   M_F that are dependent) are chosen by a small LP to make the zero set dual feasible.

Everything runs in Jacobi-scaled variables (unit diagonal of G, unit rows of M); zero columns
of G are pinned at 0.  Dependent rows of M (e.g. the C ratio constraints Σ_p x_cp = t_c Σ x,
which sum to 0) are reduced first; the multipliers returned are the minimum-norm ones for M
as given.  At the solution ``x`` solves the plain NNLS of ``(G, b − Mᵀλ)``, so the package's
KKT certificate (:func:`~.certificate.certify`) applies to it unchanged.

Raises :class:`InfeasibleConstraints` (a ValueError) when no x ≥ 0 on the live columns meets
M x = d.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.optimize

from .certificate import as_gram_system, zero_column_mask

logger = logging.getLogger(__name__)

_EPS = np.finfo(np.float64).eps
_RANK_RTOL = 1e-12        # singular values of M below this × the largest: dependent rows
_RHO0 = 10.0              # first penalty (G has unit diagonal, M unit rows after scaling)
_RHO_MAX = 1e8
CONSTRAINT_RTOL = 1e-10   # ‖Mx − d‖ ≤ this × max(‖d‖, ‖|M||x|‖)


class InfeasibleConstraints(ValueError):
    """No x ≥ 0 (on the columns G does not pin at zero) satisfies M x = d."""


@dataclass(frozen=True)
class EqualityResult:
    """Outcome of :func:`nnls_equality`.

    Attributes
    ----------
    x : (N,) float64, ``x ≥ 0``
    multipliers : (m,) float64, minimum-norm λ of the rows of M (stationarity ``Gx − b + Mᵀλ ≥ 0``)
    outer_iterations : int, augmented-Lagrangian steps
    finish_iterations : int, set changes of the exact finish
    passive_size : int, entries of x > 0
    constraint_residual : float, ``‖Mx − d‖ / max(‖d‖, ‖|M||x|‖)``
    converged : bool, the exact finish met dual feasibility
    message : str
    """

    x: np.ndarray
    multipliers: np.ndarray
    outer_iterations: int
    finish_iterations: int
    passive_size: int
    constraint_residual: float
    converged: bool
    message: str


def constraint_residual(M, d, x) -> float:
    """``‖Mx − d‖ / max(‖d‖, ‖|M||x|‖)`` (0 for x = 0 and d = 0).  Local."""
    M, d, x = np.asarray(M, float), np.asarray(d, float), np.asarray(x, float)
    scale = max(float(np.linalg.norm(d)), float(np.linalg.norm(np.abs(M) @ np.abs(x))))
    value = float(np.linalg.norm(M @ x - d))
    return value / scale if scale > 0 else value


def _row_reduction(M_live, d):
    """``K (r, m)`` with ``K M`` of full row rank r and orthonormal rows; raises when d is inconsistent."""
    m = M_live.shape[0]
    if m == 0 or M_live.shape[1] == 0:
        if np.any(d != 0):
            raise InfeasibleConstraints("the constraints M x = d involve no live column but d is not 0")
        return np.zeros((0, m))
    u, s, _ = np.linalg.svd(M_live, full_matrices=False)
    rank = int(np.sum(s > _RANK_RTOL * s[0])) if s.size and s[0] > 0 else 0
    u_r = u[:, :rank]
    outside = d - u_r @ (u_r.T @ d)
    if np.linalg.norm(outside) > 1e-12 * max(float(np.linalg.norm(d)), 1.0):
        raise InfeasibleConstraints("the equality constraints are inconsistent on the live columns "
                                    "(a row of M without live columns has d != 0)")
    return (u_r / s[:rank]).T


def _check_feasible(M, d):
    """A phase-1 LP: some x ≥ 0 with M x = d (only needed when d ≠ 0)."""
    if not np.any(d != 0):
        return
    res = scipy.optimize.linprog(np.zeros(M.shape[1]), A_eq=M, b_eq=d, bounds=(0, None), method="highs")
    if res.status == 2:
        raise InfeasibleConstraints("no x >= 0 satisfies the equality constraints M x = d")


class _Scaled:
    """The problem in Jacobi-scaled variables z = D x on the live columns."""

    def __init__(self, gram, rhs, M, d):
        diag = gram.diagonal().copy()
        self.n = rhs.size
        self.live = np.flatnonzero(~zero_column_mask(diag))
        D = np.sqrt(diag[self.live])
        self.D = D
        self.G = gram[np.ix_(self.live, self.live)] / np.outer(D, D)
        self.b = rhs[self.live] / D
        M_live = M[:, self.live]
        _check_feasible(M_live, d)
        K = _row_reduction(M_live, d)
        Ms = (K @ M_live) / D
        norms = np.linalg.norm(Ms, axis=1)
        norms[norms == 0] = 1.0
        self.K = K / norms[:, None]              # λ = Kᵀ μ for the multipliers μ of the scaled rows
        self.M = Ms / norms[:, None]
        self.d = (K @ d) / norms

    def multipliers(self, mu):
        return self.K.T @ mu

    def unscale(self, z):
        x = np.zeros(self.n)
        x[self.live] = np.maximum(z, 0.0) / self.D
        return x


def _augmented_lagrangian(p: _Scaled, solver, tol, z, mu, max_outer):
    """Outer multiplier steps until the support is stable and the violation small.  Returns z, μ, steps."""
    MtM = p.M.T @ p.M
    Mtd = p.M.T @ p.d
    rho, last_violation, last_support = _RHO0, np.inf, None
    steps = 0
    for steps in range(1, max_outer + 1):
        total = p.G + rho * MtM
        z = np.asarray(solver(total, p.b - p.M.T @ mu + rho * Mtd, tol=tol, x0=z).x, dtype=np.float64)
        r = p.M @ z - p.d
        mu = mu + rho * r
        scale = max(float(np.linalg.norm(p.d)), float(np.linalg.norm(np.abs(p.M) @ z)), _EPS)
        violation = float(np.linalg.norm(r)) / scale
        support = z > 0
        stable = last_support is not None and np.array_equal(support, last_support)
        logger.debug("augmented Lagrangian step %d: rho=%.3g violation=%.3g support=%d", steps, rho, violation,
                     int(support.sum()))
        if violation <= 1e-12 or (stable and violation <= 1e-6):
            break
        if violation > 0.25 * last_violation:
            rho = min(10.0 * rho, _RHO_MAX)
        last_violation, last_support = violation, support
    return z, mu, steps


def _passive_solve(p: _Scaled, F):
    """``z_F`` and ``μ`` of the equality-constrained system on F (null-space method), or None when
    the rows of M_F cannot be met (d outside their range)."""
    G_FF, b_F, M_F = p.G[np.ix_(F, F)], p.b[F], p.M[:, F]
    r = M_F.shape[0]
    if r == 0:
        z_F = scipy.linalg.lstsq(G_FF, b_F, check_finite=False)[0] if F.size else np.zeros(0)
        return z_F, np.zeros(0)
    u, s, vt = np.linalg.svd(M_F, full_matrices=True)
    q = int(np.sum(s > _RANK_RTOL * max(s[0], 1.0))) if s.size else 0
    coeff = u[:, :q].T @ p.d
    if np.linalg.norm(p.d - u[:, :q] @ coeff) > 1e-12 * max(float(np.linalg.norm(p.d)), 1.0):
        return None
    z_p = vt[:q].T @ (coeff / s[:q])
    Z = vt[q:].T
    if Z.shape[1]:
        w = scipy.linalg.lstsq(Z.T @ G_FF @ Z, Z.T @ (b_F - G_FF @ z_p), check_finite=False)[0]
        z_F = z_p + Z @ w
        z_F = z_F + Z @ scipy.linalg.lstsq(Z.T @ G_FF @ Z, Z.T @ (b_F - G_FF @ z_F), check_finite=False)[0]
    else:
        z_F = z_p
    mu = scipy.linalg.lstsq(M_F.T, b_F - G_FF @ z_F, check_finite=False)[0]
    return z_F, mu


def _fix_free_multipliers(p: _Scaled, F, mu, zero_grad, thr):
    """Choose μ in the directions M_Fᵀ leaves free so that the zero set is dual feasible (an LP)."""
    r = p.M.shape[0]
    if F.size:
        u, s, _ = np.linalg.svd(p.M[:, F], full_matrices=True)
        q = int(np.sum(s > _RANK_RTOL * max(s[0], 1.0))) if s.size else 0
        free = u[:, q:]                                         # (r, k) basis of null(M_Fᵀ)
    else:
        free = np.eye(r)
    if free.shape[1] == 0:
        return mu
    zero = np.setdiff1d(np.arange(p.G.shape[0]), F)
    A = p.M[:, zero].T @ free                                   # ν_Z = zero_grad + A θ
    k = free.shape[1]
    # maximise s subject to zero_grad + A θ >= s, s <= 0
    res = scipy.optimize.linprog(np.r_[np.zeros(k), -1.0], A_ub=np.c_[-A, np.ones(zero.size)], b_ub=zero_grad,
                                 bounds=[(None, None)] * k + [(None, 0.0)], method="highs")
    if res.status == 0 and -res.fun >= -thr:
        return mu + free @ res.x[:k]
    return mu


def _finish(p: _Scaled, z, mu, tol, max_iter):
    """Lawson–Hanson with equality constraints from (z ≥ 0, μ).  Returns z, μ, iterations, converged."""
    n = z.size
    passive = z > 0
    excluded = np.zeros(n, dtype=bool)
    iterations = 0
    while True:
        F = np.flatnonzero(passive)
        solved = _passive_solve(p, F)
        if solved is None:
            return z, mu, iterations, False
        z_F, mu_new = solved
        while F.size and np.any(z_F <= 0):                     # step back to feasibility
            blocked = z_F <= 0
            cur = z[F]
            denom = cur[blocked] - z_F[blocked]
            ratio = np.where(denom > 0, cur[blocked] / np.where(denom > 0, denom, 1.0), 0.0)
            first = int(np.argmin(ratio))
            alpha = float(np.clip(ratio[first], 0.0, 1.0))
            stepped = np.maximum(cur + alpha * (z_F - cur), 0.0)
            hit = blocked & (stepped <= 0)
            hit[np.flatnonzero(blocked)[first]] = True
            z[F] = np.where(hit, 0.0, stepped)
            passive[F[hit]] = False
            F = np.flatnonzero(passive)
            solved = _passive_solve(p, F)
            if solved is None:
                return z, mu, iterations, False
            z_F, mu_new = solved
        z = np.zeros(n)
        z[F] = z_F
        mu = mu_new
        grad = p.G @ z - p.b + p.M.T @ mu
        level = float(np.max(np.abs(p.b - p.M.T @ mu), initial=0.0))
        thr = tol * max(level, _EPS) + 16 * _EPS * (level + float(np.sum(z)))
        zero = ~passive
        if np.any(grad[zero] < -thr):
            mu = _fix_free_multipliers(p, F, mu, grad[zero], thr)
            grad = p.G @ z - p.b + p.M.T @ mu
        candidates = zero & ~excluded & (grad < -thr)
        if not candidates.any():
            return z, mu, iterations, not np.any(grad[zero] < -thr)
        if iterations >= max_iter:
            return z, mu, iterations, False
        iterations += 1
        entering = int(np.argmin(np.where(candidates, grad, np.inf)))
        passive[entering] = True
        trial = _passive_solve(p, np.flatnonzero(passive))
        if trial is None or trial[0][np.searchsorted(np.flatnonzero(passive), entering)] <= 0:
            passive[entering] = False                          # it cannot move: skip it this round
            excluded[entering] = True
            continue
        excluded[:] = False


def nnls_equality(gram, rhs, M, d, *, solver=None, tol: float = 1e-10, max_outer: int = 30, max_rounds: int = 6,
                  x0=None) -> EqualityResult:
    """Minimise ``½ xᵀGx − bᵀx`` subject to ``x ≥ 0`` and ``M x = d``.  Local.

    Parameters
    ----------
    gram : (N, N) float64, symmetric positive semi-definite
    rhs : (N,) float64
    M : (m, N) float64; d : (m,) float64, the equality constraints
    solver : callable ``solver(gram, rhs, *, tol, x0)`` returning an object with ``.x`` (an
        NNLS of the normal equations); default :func:`~.nnls.nnls_gram`
    tol : float, relative tolerance of the inner NNLS and of the finish's dual test
    max_outer : int, augmented-Lagrangian steps of the first round
    max_rounds : int, rounds of (multiplier steps, exact finish) before giving up
    x0 : (N,) float64 ≥ 0, optional warm start

    Returns
    -------
    EqualityResult

    Raises
    ------
    InfeasibleConstraints
        No x ≥ 0 on the live columns of G satisfies M x = d.
    """
    gram, rhs = as_gram_system(gram, rhs)
    M = np.atleast_2d(np.asarray(M, dtype=np.float64))
    d = np.asarray(d, dtype=np.float64).ravel()
    n = rhs.size
    if M.shape != (d.size, n):
        raise ValueError(f"M must have shape ({d.size}, {n}), got {M.shape}")
    if solver is None:
        from .nnls import nnls_gram as solver
    p = _Scaled(gram, rhs, M, d)
    z = np.zeros(p.live.size) if x0 is None else np.maximum(np.asarray(x0, float)[p.live], 0.0) * p.D
    mu = np.zeros(p.M.shape[0])
    outer = finish_total = 0
    converged = False
    steps_this_round = max_outer
    for _ in range(max_rounds):
        z, mu, steps = _augmented_lagrangian(p, solver, tol, z, mu, steps_this_round)
        outer += steps
        z, mu, its, converged = _finish(p, z.copy(), mu, tol, 3 * p.live.size + 100)
        finish_total += its
        if converged:
            break
        steps_this_round = 3
    x = p.unscale(z)
    lam = p.multipliers(mu)
    residual = constraint_residual(M, d, x)
    message = (f"equality-constrained NNLS: {outer} multiplier steps, {finish_total} set changes in the exact "
               f"finish; constraint residual {residual:.2g}")
    if not converged:
        message += "; the exact finish did not meet dual feasibility"
    logger.debug(message)
    return EqualityResult(x, lam, outer, finish_total, int(np.count_nonzero(x > 0)), residual, bool(converged),
                          message)
