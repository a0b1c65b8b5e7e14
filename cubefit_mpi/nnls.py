"""Non-negative least squares on the normal equations (local: no MPI, pure NumPy/SciPy).

:func:`nnls_gram` minimises ``0.5 x^T G x - b^T x`` subject to ``x >= 0`` for
already formed ``G = A^T W A``, ``b = A^T W y``: Lawson--Hanson run on the Gram
matrix (Bro & de Jong's "fast NNLS") with Jacobi column scaling, an updated
Cholesky factor of the passive block and a guard against dependent columns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.optimize

__all__ = ["NNLSResult", "KKTCertificate", "nnls_gram", "kkt_certificate", "nnls_dense"]

logger = logging.getLogger(__name__)

_EPS = np.finfo(np.float64).eps
_TINY = np.finfo(np.float64).tiny
_ZERO_DIAG_RTOL = _EPS**2  # G_jj <= this * max(G_kk): zero column
_PIVOT_RTOL = 1e-13  # squared pivot (unit-diagonal metric) below this: dependent column
_GRAD_NOISE = 16.0 * _EPS  # relative rounding noise allowed on the scaled gradient
_MATVEC_CHUNK_ELEMENTS = 1 << 23  # row chunk (elements) of the passive-rows matvec
_GIVENS_MIN_SIZE = 256  # smaller passive sets refactor on removal (cheaper than Python loops)
_DENSE_METHODS = ("nnls", "lsq", "mu", "fista")


@dataclass(frozen=True)
class NNLSResult:
    """Outcome of :func:`nnls_gram`.

    Attributes
    ----------
    x : (N,) float64
        Solution in the original (unscaled) variables, ``x >= 0``.
    iterations : int
        Number of outer active-set iterations (candidate selections).
    converged : bool
        True when the KKT conditions hold to the requested tolerance.
    passive_size : int
        Number of strictly positive entries of ``x``.
    message : str
        Human-readable termination reason.
    """

    x: np.ndarray
    iterations: int
    converged: bool
    passive_size: int
    message: str


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


def _as_gram_system(gram, rhs):
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


def _zero_column_mask(diag):
    """(N,) bool mask of zero columns: ``G_jj <= 0`` or ``G_jj <= eps**2 * max(G_kk)``."""
    positive = diag > 0
    if not positive.any():
        return np.ones(diag.shape, dtype=bool)
    return ~positive | (diag <= _ZERO_DIAG_RTOL * diag[positive].max())


def _gram_rows_matvec(gram, rows, coeff):
    """``gram[:, rows] @ coeff`` as ``coeff @ gram[rows, :]`` (symmetric gram), shape (N,)."""
    n = gram.shape[0]
    if rows.size == 0:
        return np.zeros(n)
    if 4 * rows.size >= n:
        full = np.zeros(n)
        full[rows] = coeff
        return gram @ full
    chunk = max(1, _MATVEC_CHUNK_ELEMENTS // n)
    product = np.zeros(n)
    for start in range(0, rows.size, chunk):
        product += coeff[start : start + chunk] @ gram[rows[start : start + chunk], :]
    return product


class _PassiveCholesky:
    """Upper Cholesky factor ``R`` with ``R.T @ R = Ghat[P, P]`` for an ordered passive set ``P``.

    ``Ghat = D^-1 G D^-1`` is the Jacobi-scaled Gram matrix; it is never formed,
    entries are taken from ``gram`` and divided by ``scale`` on the fly.  The
    forward-substitution vector ``u = R^-T bhat[P]`` is kept alongside, so a
    passive solve is one back-substitution.  Appending a column costs one
    triangular solve (O(k^2)); removing columns re-triangularises with Givens
    rotations or, for small factors / many removals, refactors.  If the factor
    ever becomes unusable, solves fall back to ``scipy.linalg.lstsq``.
    """

    def __init__(self, gram, scale, rhs_scaled):
        self._gram, self._scale, self._rhs = gram, scale, rhs_scaled
        self.indices: list[int] = []
        self._factor = np.zeros((0, 0), order="F")
        self._forward = np.zeros(0)
        self._valid = True

    @property
    def size(self) -> int:
        return len(self.indices)

    def index_array(self):
        return np.asarray(self.indices, dtype=np.intp)

    def scaled_block(self, rows, cols):
        """Return ``Ghat[rows][:, cols]``, shape (len(rows), len(cols))."""
        return self._gram[np.ix_(rows, cols)] / np.outer(self._scale[rows], self._scale[cols])

    def try_append(self, j, pivot_rtol=_PIVOT_RTOL) -> bool:
        """Append column ``j``; return False (nothing changed) if it is numerically dependent."""
        k = self.size
        diag_jj = self._gram[j, j] / (self._scale[j] * self._scale[j])
        cross = np.empty(0)
        if k == 0:
            pivot_sq = diag_jj
        else:
            rows = self.index_array()
            column = self._gram[rows, j] / (self._scale[rows] * self._scale[j])
            if self._valid:
                cross = scipy.linalg.solve_triangular(self._factor, column, trans="T", check_finite=False)
                pivot_sq = diag_jj - cross @ cross
            else:
                block = self.scaled_block(rows, rows)
                coef = scipy.linalg.lstsq(block, column, check_finite=False)[0]
                pivot_sq = diag_jj - column @ coef
        if not np.isfinite(pivot_sq) or pivot_sq <= pivot_rtol * diag_jj:
            return False
        self.indices.append(int(j))
        if not self._valid or not np.all(np.isfinite(cross)):
            self._rebuild()
            return True
        pivot = np.sqrt(pivot_sq)
        grown = np.zeros((k + 1, k + 1), order="F")
        grown[:k, :k] = self._factor
        grown[:k, k] = cross
        grown[k, k] = pivot
        self._factor = grown
        self._forward = np.append(self._forward, (self._rhs[j] - cross @ self._forward) / pivot)
        return True

    def pop_last(self):
        """Remove the most recently appended column (exact: drop the last row and column)."""
        self.indices.pop()
        if self._valid:
            self._factor = np.asfortranarray(self._factor[:-1, :-1])
            self._forward = self._forward[:-1].copy()

    def remove_positions(self, positions, method=None):
        """Remove the columns at the given positions of the passive ordering.

        Parameters
        ----------
        positions : sequence of int
            Positions in ``self.indices`` (not column indices).
        method : {None, "givens", "rebuild"}
            None chooses by cost; the others force a strategy (used in tests).
        """
        positions = sorted({int(p) for p in positions}, reverse=True)
        if not positions:
            return
        k = self.size
        if method is None:
            use_givens = k >= _GIVENS_MIN_SIZE and len(positions) <= max(1, k // 128)
        else:
            use_givens = method == "givens"
        if not self._valid or not use_givens:
            for p in positions:
                del self.indices[p]
            self._rebuild()
            return
        # Work on a C-ordered copy so that the rotated rows of R are contiguous.
        upper, forward = np.ascontiguousarray(self._factor), self._forward
        for p in positions:
            k = self.size
            # Drop column p: columns p..k-2 become upper Hessenberg (one sub-diagonal).
            upper[:k, p : k - 1] = upper[:k, p + 1 : k].copy()
            for i in range(p, k - 1):
                top, below = upper[i, i], upper[i + 1, i]
                if below == 0.0:
                    continue
                radius = np.hypot(top, below)
                cos, sin = top / radius, below / radius
                row_top = upper[i, i : k - 1].copy()
                row_below = upper[i + 1, i : k - 1]
                upper[i, i : k - 1] = cos * row_top + sin * row_below
                upper[i + 1, i : k - 1] = cos * row_below - sin * row_top
                upper[i + 1, i] = 0.0
                u_top, u_below = forward[i], forward[i + 1]
                forward[i] = cos * u_top + sin * u_below
                forward[i + 1] = cos * u_below - sin * u_top
            upper[k - 1, :k] = 0.0
            upper[:k, k - 1] = 0.0
            forward = forward[: k - 1]
            del self.indices[p]
        k = self.size
        self._factor = np.asfortranarray(upper[:k, :k])
        self._forward = forward.copy()

    def _rebuild(self):
        k = self.size
        self._valid = True
        self._factor = np.zeros((0, 0), order="F")
        self._forward = np.zeros(0)
        if k == 0:
            return
        rows = self.index_array()
        try:
            upper = scipy.linalg.cholesky(self.scaled_block(rows, rows), lower=False, check_finite=False)
            forward = scipy.linalg.solve_triangular(
                upper, self._rhs[rows], trans="T", lower=False, check_finite=False
            )
        except np.linalg.LinAlgError:
            upper = None
        if upper is None or not (np.all(np.isfinite(upper)) and np.all(np.isfinite(forward))):
            logger.debug("passive Cholesky rebuild failed (k=%d); using lstsq", k)
            self._valid = False
            return
        self._factor = np.asfortranarray(upper)
        self._forward = forward

    def solve(self, refine=False):
        """Solve ``Ghat[P, P] z = bhat[P]``; shape (k,).

        ``refine`` adds one step of iterative refinement against the gathered block.
        """
        k = self.size
        if k == 0:
            return np.empty(0)
        solution, rows = None, self.index_array()
        if self._valid:
            try:
                solution = scipy.linalg.solve_triangular(self._factor, self._forward, check_finite=False)
                if refine:
                    residual = self._rhs[rows] - self.scaled_block(rows, rows) @ solution
                    solution += scipy.linalg.cho_solve((self._factor, False), residual, check_finite=False)
            except (np.linalg.LinAlgError, ValueError):
                solution = None
            if solution is None or not np.all(np.isfinite(solution)):
                logger.debug("passive Cholesky solve failed (k=%d); using lstsq", k)
                self._valid = False
                solution = None
        if solution is None:
            solution = scipy.linalg.lstsq(self.scaled_block(rows, rows), self._rhs[rows], check_finite=False)[0]
        return solution


def _restore_feasibility(chol, x_scaled, passive, solution):
    """Lawson--Hanson inner loop: step from feasible ``x_scaled`` towards ``solution``.

    Variables reaching zero leave ``chol``/``passive`` (both and ``x_scaled``
    are updated in place) until the passive solution is strictly positive.
    """
    while True:
        rows = chol.index_array()
        if rows.size == 0:
            return
        current = x_scaled[rows]
        blocked = solution <= 0.0
        if not blocked.any():
            x_scaled[rows] = solution
            return
        denom = current[blocked] - solution[blocked]
        ratio = np.where(denom > 0.0, current[blocked] / np.where(denom > 0.0, denom, 1.0), 0.0)
        first = int(np.argmin(ratio))
        alpha = float(np.clip(ratio[first], 0.0, 1.0))
        stepped = np.maximum(current + alpha * (solution - current), 0.0)
        hit = blocked & (stepped <= 0.0)
        hit[np.flatnonzero(blocked)[first]] = True
        stepped[hit] = 0.0
        x_scaled[rows] = stepped
        passive[rows[hit]] = False
        chol.remove_positions(np.flatnonzero(hit))
        solution = chol.solve()


def nnls_gram(gram, rhs, *, tol=1e-10, max_iter=None, x0=None) -> NNLSResult:
    """Active-set NNLS on the normal equations.

    Local.  Minimises ``0.5 * x @ gram @ x - rhs @ x`` subject to ``x >= 0``
    with Lawson--Hanson's active-set method run directly on ``(gram, rhs)``
    (the Bro & de Jong "fast NNLS" formulation).  Columns are Jacobi-scaled
    (``d_j = sqrt(G_jj)``); zero columns are pinned at ``x_j = 0``.  The passive
    subproblem is solved with a Cholesky factor updated in O(k^2) when a column
    enters and re-triangularised (Givens) or refactored when columns leave;
    numerically dependent candidates (tiny pivot) are skipped for the round.

    Parameters
    ----------
    gram : (N, N) float64
        Symmetric positive semi-definite matrix ``A.T W A``.
    rhs : (N,) float64
        Right-hand side ``A.T W y``.
    tol : float, optional
        Relative tolerance on the scaled gradient ``(b - G x)_j / sqrt(G_jj)``,
        relative to ``max_j |b_j| / sqrt(G_jj)``.
    max_iter : int or None, optional
        Cap on outer iterations; default ``3 * N + 100``.
    x0 : (N,) float64 or None, optional
        Non-negative warm start; its support is the initial passive set.

    Returns
    -------
    NNLSResult
        Solution in the original variables and diagnostics.
    """
    gram, rhs = _as_gram_system(gram, rhs)
    n = rhs.size
    if max_iter is None:
        max_iter = 3 * n + 100
    diag = gram.diagonal().copy()
    free = ~_zero_column_mask(diag)
    scale = np.sqrt(np.where(free, diag, 1.0))
    rhs_scaled = np.where(free, rhs / scale, 0.0)
    rhs_level = float(np.max(np.abs(rhs_scaled)))

    if rhs_level == 0.0:
        return NNLSResult(np.zeros(n), 0, True, 0, "trivial problem: rhs is zero on all non-zero columns")
    threshold = tol * rhs_level
    x_scaled, passive = np.zeros(n), np.zeros(n, dtype=bool)
    chol = _PassiveCholesky(gram, scale, rhs_scaled)

    if x0 is not None:
        start = np.asarray(x0, dtype=np.float64)
        if start.shape != (n,) or not np.all(np.isfinite(start)):
            raise ValueError(f"x0 must be a finite array of shape ({n},)")
        if np.any(start < 0):
            raise ValueError("x0 must be non-negative")
        start_scaled = np.where(free, start * scale, 0.0)
        for j in np.argsort(-start_scaled, kind="stable"):
            if start_scaled[j] <= 0.0:
                break
            if chol.try_append(j):
                passive[j] = True
                x_scaled[j] = start_scaled[j]
        if chol.size:
            _restore_feasibility(chol, x_scaled, passive, chol.solve())

    iterations = 0
    excluded = np.zeros(n, dtype=bool)
    converged = False
    while True:
        rows = chol.index_array()
        gradient = (rhs - _gram_rows_matvec(gram, rows, x_scaled[rows] / scale[rows])) / scale
        noise_floor = _GRAD_NOISE * (rhs_level + float(np.sum(x_scaled[rows])))
        candidates = free & ~passive & ~excluded & (gradient > max(threshold, noise_floor))
        if not candidates.any():
            converged = True
            break
        if iterations >= max_iter:
            break
        iterations += 1
        entering = int(np.argmax(np.where(candidates, gradient, -np.inf)))
        if not chol.try_append(entering):
            excluded[entering] = True
            continue
        solution = chol.solve()
        if solution[-1] <= 0.0:
            # Numerically the entering variable cannot move (LH safeguard).
            chol.pop_last()
            excluded[entering] = True
            continue
        passive[entering] = True
        _restore_feasibility(chol, x_scaled, passive, solution)
        excluded[:] = False

    if converged and chol.size:
        # Final polish: one step of iterative refinement on the final passive set.
        polished = chol.solve(refine=True)
        if np.all(polished > 0.0):
            x_scaled[chol.index_array()] = polished

    x = np.zeros(n)
    x[free] = np.maximum(x_scaled[free] / scale[free], 0.0)
    passive_size = int(np.count_nonzero(x > 0))
    message = (
        f"converged after {iterations} iterations"
        if converged
        else f"max_iter={max_iter} reached before the KKT conditions were met"
    )
    logger.debug("nnls_gram: N=%d passive=%d iterations=%d converged=%s", n, passive_size, iterations, converged)
    return NNLSResult(x, iterations, converged, passive_size, message)


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
    gram, rhs = _as_gram_system(gram, rhs)
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
    free = ~_zero_column_mask(diag)
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
    if method not in _DENSE_METHODS:
        raise ValueError(f"unknown method {method!r}; accepted methods are {', '.join(map(repr, _DENSE_METHODS))}")
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
