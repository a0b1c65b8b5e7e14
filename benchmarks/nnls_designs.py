"""The design that lost: primal–dual interior-point NNLS on the normal equations, with a
crossover to exact complementarity (benchmarks/nnls.py compares it; not part of the package).

:func:`nnls_interior` solves ``min 0.5 x^T G x - b^T x, x >= 0`` by Mehrotra's
predictor–corrector method on the KKT system ``G x − b = z, x ∘ z = μ, x, z > 0``: each
iteration factors ``G + diag(z / x)`` once (blocked Cholesky, all N columns) and solves it
twice.  When μ is small enough to tell the passive variables (``x_j > z_j``) from the active
ones, block principal pivoting (:func:`~cubefit_mpi.numerics.nnls_pivot.nnls_pivot`) starts
from that set and ends at exact complementarity.

Measured against block principal pivoting (``docs/performance.md``): its iteration count does
not depend on how the active set evolves, but every iteration factors all N columns, and on the
unregularised MILES systems its factor breaks down as μ → 0.
"""
from __future__ import annotations

import logging

import numpy as np
import scipy.linalg.lapack as lapack

from cubefit_mpi.numerics.nnls_pivot import BlockNNLSResult, ScaledSystem, cholesky_in_place, gather, nnls_pivot

logger = logging.getLogger(__name__)

_STEP = 0.995          # fraction of the step to the boundary
_DELTA = 1e-12         # primal regularisation in the unit-diagonal metric (keeps the factor PD)
_CROSSOVER_MU = 1e-9   # μ relative to its start at which the active set is taken


def _step_to_boundary(v, dv):
    neg = dv < 0
    return min(1.0, float(np.min(-v[neg] / dv[neg]))) if neg.any() else 1.0


def nnls_interior(gram, rhs, *, tol=1e-10, max_iter=80, x0=None, crossover=True) -> BlockNNLSResult:
    """Interior-point NNLS with a block-pivoting crossover.  Local.

    Parameters
    ----------
    gram : (N, N) float64
        Symmetric positive semi-definite; read only.
    rhs : (N,) float64
    tol : float, optional
        As :func:`~cubefit_mpi.numerics.nnls.nnls_gram` (passed to the crossover).
    max_iter : int, optional
        Cap on interior-point iterations.
    x0 : ignored
        Interior-point methods do not warm start well; accepted for a common signature.
    crossover : bool, optional
        False returns the interior iterate (not exactly complementary).  The crossover is block
        pivoting from ``{x_j > z_j}``, given up when it stalls (then not converged).

    Returns
    -------
    BlockNNLSResult
        ``iterations`` and ``factorizations`` include the crossover's.
    """
    del x0
    system = ScaledSystem(gram, rhs, tol)
    n, d = system.n, system.scale
    if system.level == 0.0:
        return BlockNNLSResult(np.zeros(n), 0, True, 0, "trivial problem: rhs is zero on all non-zero columns")
    free = system.free
    ones = np.where(free, 1.0, 0.0)
    curvature = float(ones / d @ (system.gram @ (ones / d)))
    t = max(float(ones / d @ system.rhs) / curvature, 0.0) if curvature > 0 else 0.0
    xs = np.where(free, max(t, 1e-3 * system.level), 1.0)              # scaled x̂ = d x
    zs = np.where(free, np.maximum(system.scaled_gradient(xs / d), 0.0) + 0.1 * system.level, 1.0)
    mu0 = float(xs @ zs) / n
    work = np.empty(n * n)
    matrix = work.reshape(n, n)
    all_idx = np.arange(n)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        grad = system.scaled_gradient(np.where(free, xs / d, 0.0))      # Ĝ x̂ − b̂
        rd = np.where(free, grad - zs, 0.0)
        mu = float(xs @ zs) / n
        if mu <= _CROSSOVER_MU * mu0 and float(np.max(np.abs(rd))) <= 1e-6 * system.level:
            break
        gather(system.gram, all_idx, all_idx, matrix, scale=d)
        matrix.flat[:: n + 1] += zs / xs + _DELTA
        info = cholesky_in_place(matrix)
        if info != 0:
            logger.debug("interior point: factor failed at iteration %d (info=%d)", iterations, info)
            break

        def solve(r):
            out, _ = lapack.dpotrs(matrix.T, r, lower=1)
            return out

        dx = solve(-rd - zs)
        dz = -zs - zs / xs * dx
        alpha = min(_step_to_boundary(xs, dx), _step_to_boundary(zs, dz))
        mu_aff = float((xs + alpha * dx) @ (zs + alpha * dz)) / n
        sigma = (mu_aff / mu) ** 3
        comp = -dx * dz + sigma * mu
        dx = solve(-rd - zs + comp / xs)
        dz = (-xs * zs + comp - zs * dx) / xs
        alpha = _STEP * min(_step_to_boundary(xs, dx), _step_to_boundary(zs, dz))
        xs = np.where(free, xs + alpha * dx, 1.0)
        zs = np.where(free, zs + alpha * dz, 1.0)
        logger.debug("ipm %d: mu=%.3g |rd|=%.3g alpha=%.3f", iterations, mu, float(np.max(np.abs(rd))), alpha)
    del matrix, work
    x = np.where(free, xs / d, 0.0)
    if not crossover:
        return BlockNNLSResult(x, iterations, False, int(np.count_nonzero(x > 0)),
                               f"interior point stopped after {iterations} iterations", iterations, 8 * n * n)
    start = np.where(free & (xs > zs), 1.0, 0.0)
    result = nnls_pivot(system.gram, system.rhs, tol=tol, x0=start, safeguard="stop")
    return BlockNNLSResult(result.x, iterations + result.iterations, result.converged, result.passive_size,
                           f"interior point: {iterations} iterations; crossover {result.message}",
                           iterations + result.factorizations, max(8 * n * n, result.work_bytes), result.stalled)
