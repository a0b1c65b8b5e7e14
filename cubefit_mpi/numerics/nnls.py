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

from .certificate import as_gram_system, zero_column_mask

logger = logging.getLogger(__name__)

_EPS = np.finfo(np.float64).eps
PIVOT_RTOL = 1e-13  # squared pivot (unit-diagonal metric) below this: dependent column
_PIVOT_RTOL = PIVOT_RTOL
_GRAD_NOISE = 16.0 * _EPS  # relative rounding noise allowed on the scaled gradient
_MATVEC_CHUNK_ELEMENTS = 1 << 23  # row chunk (elements) of the passive-rows matvec
_GIVENS_MIN_SIZE = 256  # smaller passive sets refactor on removal (cheaper than Python loops)


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
    gram, rhs = as_gram_system(gram, rhs)
    n = rhs.size
    if max_iter is None:
        max_iter = 3 * n + 100
    diag = gram.diagonal().copy()
    free = ~zero_column_mask(diag)
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


