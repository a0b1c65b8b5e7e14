"""Block principal pivoting NNLS on the normal equations (local: no MPI, pure NumPy/SciPy).

:func:`nnls_pivot` minimises ``0.5 x^T G x - b^T x`` subject to ``x >= 0`` by block principal
pivoting (Kim & Park 2011, SIAM J. Sci. Comput. 33, 3261; the safeguard is Júdice & Pires
1994): each iteration solves the unconstrained problem on a guessed passive set F, computes
the dual ``g = G x − b`` with one matrix-vector product, and moves *every* variable that
violates ``x_F ≥ 0`` or ``g_A ≥ 0`` to the other set at once.

Linear algebra (:class:`PassiveSolver`): one blocked Cholesky factorization (LAPACK
``dpotrf``) of ``G[F0, F0]`` for a reference set F0; while the current set F differs from F0
by few columns, F's system is solved through F0's factor and a small Schur complement (the
added columns, and one multiplier per removed column pinning it at 0) -- the late iterations,
which exchange a handful of variables, then cost O(k²) per changed column instead of k³/3.
Every solve is refined against G itself.

Semi-definite G (template libraries: condition ≈ 4e16): a factor whose squared pivot, in the
unit-diagonal metric, falls below :data:`~cubefit_mpi.numerics.nnls.PIVOT_RTOL` (the
Lawson–Hanson rule) is redone with pivoted Cholesky (``dpstrf``); the columns it leaves out
depend on the others, stay at 0 and do not enter while their Schur pivot stays that small.

Memory: G (read only) plus one work array of N² doubles (the factor, and the Schur columns
behind it) and O(N) vectors; temporaries of the Schur update stay below 0.15 k × k.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.blas as blas
import scipy.linalg.lapack as lapack

from .certificate import as_gram_system, zero_column_mask
from .nnls import PIVOT_RTOL, NNLSResult

logger = logging.getLogger(__name__)

FULL_EXCHANGES = 3          # Kim & Park's p̄: full exchanges allowed without fewer violations
SINGLE_EXCHANGES = 32       # safeguard="stop": single exchanges without a new low of the violations, then stop
SCHUR_FRACTION = 0.15       # refactor once the columns changed since the factor exceed this × k
_GATHER_ELEMENTS = 1 << 22  # elements of G's rows copied at a time when gathering G[F, F]
_REFINE_STEPS = 3
POTRF_MAX_N = 8192          # larger factors are blocked by hand (see cholesky_in_place)


@dataclass(frozen=True)
class BlockNNLSResult(NNLSResult):
    """:class:`~cubefit_mpi.numerics.nnls.NNLSResult` plus what the block solvers count.

    Attributes
    ----------
    factorizations : int
        Blocked Cholesky factorizations (pivoted ones included).
    work_bytes : int
        Largest work memory held besides G (factor and Schur columns), bytes.
    stalled : bool
        The full exchanges stopped reducing the violations (only with ``safeguard="stop"``).
    """

    factorizations: int = 0
    work_bytes: int = 0
    stalled: bool = False


def cholesky_in_place(matrix, block=2048, rows=1024) -> int:
    """Cholesky factor of the symmetric positive-definite ``matrix`` (k, k), C order, in place.  Local.

    On return the upper triangle holds U with ``UᵀU = matrix`` -- in the Fortran view
    ``matrix.T`` that is the lower factor L of LAPACK's ``dpotrf(lower=1)``.  Returns LAPACK's
    ``info`` (0, or the 1-based column where a pivot was not positive).  Up to
    :data:`POTRF_MAX_N` it is one ``dpotrf`` call; beyond, a right-looking blocked loop
    (``dpotrf`` on ``block``-wide diagonal blocks, triangular solves, GEMM updates of the
    trailing upper triangle in ``rows``-row slabs): multithreaded OpenBLAS 0.3.30/0.3.31
    ``dpotrf`` crashed (SIGSEGV) from k ≈ 16,000 on this project's machine.
    """
    k = matrix.shape[0]
    if k <= POTRF_MAX_N:
        return int(lapack.dpotrf(matrix.T, lower=1, clean=0, overwrite_a=1)[1])
    for j in range(0, k, block):
        e = min(k, j + block)
        upper, info = lapack.dpotrf(np.array(matrix[j:e, j:e], order="F"), lower=0, clean=1)
        if info:
            return j + int(info)
        matrix[j:e, j:e] = upper
        if e == k:
            break
        panel = scipy.linalg.solve_triangular(upper, matrix[j:e, e:], trans="T", lower=False,
                                              check_finite=False)
        matrix[j:e, e:] = panel
        for r0 in range(e, k, rows):
            r1 = min(k, r0 + rows)
            left = panel[:, r0 - e:r1 - e].T
            matrix[r0:r1, r0:r1] -= left @ panel[:, r0 - e:r1 - e]
            if r1 < k:
                matrix[r0:r1, r1:] -= left @ panel[:, r1 - e:]
    return 0


def symmetric_matvec(gram, x):
    """``G x`` for symmetric G reading one triangle (BLAS ``dsymv``: half the bytes of ``G @ x``).  Local."""
    if gram.flags.f_contiguous:
        return blas.dsymv(1.0, gram, x, lower=1)
    if gram.flags.c_contiguous:
        return blas.dsymv(1.0, gram.T, x, lower=1)
    return gram @ x


class ScaledSystem:
    """``(G, b)``, the Jacobi scale ``d = √diag G`` and the solvers' threshold.  Local.

    Tests are made in the unit-diagonal metric: ``x̂ = d x``, ``ĝ = g / d``; ``threshold`` is
    ``tol × max_j |b_j| / d_j`` (the rule of :func:`~cubefit_mpi.numerics.nnls.nnls_gram`).
    """

    def __init__(self, gram, rhs, tol):
        self.gram, self.rhs = as_gram_system(gram, rhs)
        self.n = self.rhs.size
        self.diag = self.gram.diagonal().copy()
        self.free = ~zero_column_mask(self.diag)
        self.scale = np.sqrt(np.where(self.free, self.diag, 1.0))
        self.level = float(np.max(np.abs(np.where(self.free, self.rhs / self.scale, 0.0))))
        self.threshold = tol * self.level

    def scaled_gradient(self, x):
        """``ĝ = (G x − b) / d`` (0 on zero columns), shape (N,)."""
        nz = np.flatnonzero(x)
        if nz.size == 0:
            grad = -self.rhs.copy()
        elif 4 * nz.size >= self.n:
            grad = symmetric_matvec(self.gram, x) - self.rhs
        else:
            grad = x[nz] @ self.gram[nz] - self.rhs       # G symmetric: rows instead of columns
        return np.where(self.free, grad / self.scale, 0.0)

    def start_set(self, x0):
        """Initial passive set: the support of ``x0``, else the columns with ``b_j / d_j > threshold``."""
        if x0 is None:
            return self.free & (self.rhs > self.threshold * self.scale)
        start = np.asarray(x0, dtype=np.float64)
        if start.shape != (self.n,) or not np.all(np.isfinite(start)):
            raise ValueError(f"x0 must be a finite array of shape ({self.n},)")
        if np.any(start < 0):
            raise ValueError("x0 must be non-negative")
        return self.free & (start > 0)

    def violations(self, x, grad, passive, excluded):
        """Masks of the variables violating ``x_F ≥ 0`` and ``ĝ_A ≥ −threshold``.

        Negative passive values whose scaled total is below a tenth of the threshold are
        rounding noise (clipping them moves no scaled gradient by more than that) and do not count.
        """
        negative = passive & (x < 0)
        if float(np.sum(-x[negative] * self.scale[negative])) <= 0.1 * self.threshold:
            negative[:] = False
        return negative, ~passive & self.free & ~excluded & (grad < -self.threshold)


def gather(gram, rows, cols, out, scale=None):
    """``G[rows][:, cols]`` (divided by ``scale[rows] scale[cols]ᵀ`` if given) into ``out``.  Local."""
    step = max(1, _GATHER_ELEMENTS // max(cols.size, 1))
    for r0 in range(0, rows.size, step):
        part = out[r0:r0 + step]
        part[...] = gram[np.ix_(rows[r0:r0 + step], cols)]
        if scale is not None:
            part /= scale[rows[r0:r0 + step], None]
            part /= scale[None, cols]
    return out


class PassiveSolver:
    """Solves ``G[F, F] x_F = r_F`` for the passive sets of :func:`nnls_pivot`.  Local.

    Holds one Cholesky factor ``L Lᵀ = G[F0, F0]`` (lower, Fortran order) of a reference set F0
    and the columns ``W = L⁻¹ [G[F0, E], I[F0, R]]`` of the variables added (E) and removed (R)
    since; F's solution comes from the Schur complement ``S = [[G_EE, 0], [0, 0]] − WᵀW``, the
    removed variables pinned at 0 by one multiplier each.  Factor and W share one work array
    of N² doubles (allocated at the first factorization, kept): W lives behind the k² factor.
    """

    def __init__(self, system: ScaledSystem):
        self.sys = system
        self.factorizations = 0
        self.work_bytes = 0
        self._buffer = np.empty(0)
        self._ref = np.zeros(0, dtype=np.intp)            # F0 (in factor order)
        self._pos = np.full(system.n, -1, dtype=np.intp)  # position in F0, -1 outside
        self._members = np.zeros(0, dtype=np.intp)        # E and R, as W's columns
        self._is_added = np.zeros(0, dtype=bool)          # True: in E, False: in R
        self._wtw = np.zeros((0, 0))                      # WᵀW, kept across updates
        self._schur = None

    # -- the work array --------------------------------------------------------------------------
    def _array(self):
        if self._buffer.size == 0:
            self._buffer = np.empty(self.sys.n * self.sys.n)
            self.work_bytes = int(self._buffer.nbytes)
        return self._buffer

    def _lower(self):
        k = self._ref.size
        return self._buffer[: k * k].reshape(k, k).T      # Fortran-ordered view holding L

    def _w(self, m=None):
        """W (k, m), Fortran order, in the buffer behind the factor."""
        k = self._ref.size
        m = self._members.size if m is None else m
        return self._buffer[k * k: k * k + k * m].reshape(m, k).T

    def _room(self):
        k = self._ref.size
        return (self._buffer.size - k * k) // max(k, 1)

    def _reset(self):
        self._pos[self._ref] = -1
        self._ref = np.zeros(0, dtype=np.intp)
        self._members = np.zeros(0, dtype=np.intp)
        self._is_added = np.zeros(0, dtype=bool)
        self._wtw = np.zeros((0, 0))
        self._schur = None

    # -- factor ----------------------------------------------------------------------------------
    def refactor(self, idx):
        """Factor ``G[idx, idx]``; returns the positions of ``idx`` kept (the others are dependent)."""
        self._reset()
        k = idx.size
        if k == 0:
            return np.arange(0)
        flat = self._array()
        matrix = gather(self.sys.gram, idx, idx, flat[: k * k].reshape(k, k))
        self.factorizations += 1
        info = cholesky_in_place(matrix)
        pivots = np.diagonal(matrix) ** 2 / self.sys.diag[idx]
        if info == 0 and float(np.min(pivots)) > PIVOT_RTOL:
            self._ref = idx.copy()
            self._pos[idx] = np.arange(k)
            return np.arange(k)
        # dependent columns: pivoted Cholesky (unit-diagonal metric) picks an independent subset,
        # in its pivot order; its leading factor, unscaled, is the factor of that subset
        matrix = gather(self.sys.gram, idx, idx, matrix, scale=self.sys.scale)
        self.factorizations += 1
        _, piv, rank, _ = lapack.dpstrf(matrix.T, tol=PIVOT_RTOL, lower=1, overwrite_a=1)
        order = piv[:rank] - 1
        logger.debug("passive factor: %d of %d columns dependent", k - rank, k)
        for j in range(rank):                              # compact the leading rank x rank block
            flat[j * rank:(j + 1) * rank] = flat[j * k:j * k + rank]
        lower = flat[: rank * rank].reshape(rank, rank).T
        lower *= self.sys.scale[idx[order]][:, None]
        self._ref = idx[order].copy()
        self._pos[self._ref] = np.arange(rank)
        return order

    # -- Schur complement of the changes since the factor ----------------------------------------
    def _update_members(self, added, removed):
        """Bring W to the columns of ``added`` (E) and ``removed`` (R); returns E's dependent ones."""
        lower, k = self._lower(), self._ref.size
        wanted = np.concatenate([added, removed])
        live = np.flatnonzero(np.isin(self._members, wanted))
        w_old = self._w()
        for j, col in enumerate(live):                     # compact in place (j <= col)
            if j != col:
                w_old[:, j] = w_old[:, col]
        members, is_added = self._members[live], self._is_added[live]
        wtw = self._wtw[np.ix_(live, live)]
        new_e = np.setdiff1d(added, members)
        new_r = np.setdiff1d(removed, members)
        dependent = np.zeros(0, dtype=np.intp)
        cols_e = np.zeros((k, 0))
        if new_e.size:
            block = gather(self.sys.gram, new_e, self._ref, np.empty((new_e.size, k)))
            cols_e = scipy.linalg.solve_triangular(lower, block.T, lower=True, check_finite=False)
            pivots = (self.sys.diag[new_e] - np.einsum("ij,ij->j", cols_e, cols_e)) / self.sys.diag[new_e]
            bad = pivots <= PIVOT_RTOL
            dependent, new_e, cols_e = new_e[bad], new_e[~bad], cols_e[:, ~bad]
        m = live.size + new_e.size + new_r.size
        if m > self._room():
            raise ValueError("no room for the Schur columns")
        w = self._w(m)
        w[:, live.size:live.size + new_e.size] = cols_e
        if new_r.size:
            unit = np.zeros((k, new_r.size))
            unit[self._pos[new_r], np.arange(new_r.size)] = 1.0
            w[:, live.size + new_e.size:] = scipy.linalg.solve_triangular(lower, unit, lower=True,
                                                                          check_finite=False)
        self._members = np.concatenate([members, new_e, new_r]).astype(np.intp)
        self._is_added = np.concatenate([is_added, np.ones(new_e.size, bool), np.zeros(new_r.size, bool)])
        fresh_cols = w[:, live.size:]                      # WᵀW grows by the new columns only
        cross = w[:, :live.size].T @ fresh_cols
        self._wtw = np.block([[wtw, cross], [cross.T, fresh_cols.T @ fresh_cols]])
        schur = -self._wtw
        e_pos = np.flatnonzero(self._is_added)
        e = self._members[e_pos]
        schur[np.ix_(e_pos, e_pos)] += self.sys.gram[np.ix_(e, e)]
        self._schur = None
        if m:
            with warnings.catch_warnings():
                warnings.simplefilter("error", scipy.linalg.LinAlgWarning)   # singular: refactor instead
                self._schur = scipy.linalg.lu_factor(schur, check_finite=False)
        return dependent

    def _apply(self, r):
        """``x`` with ``x_F = G[F, F]⁻¹ r_F`` for the current F (0 elsewhere); r (N,) or (N, m)."""
        x = np.zeros(r.shape)
        if self._ref.size == 0:
            return x
        lower = self._lower()
        r0 = r[self._ref].copy()
        removed = self._members[~self._is_added]
        added = self._members[self._is_added]
        r0[self._pos[removed]] = 0.0
        z0 = scipy.linalg.solve_triangular(lower, r0, lower=True, check_finite=False)
        if self._members.size:
            w = self._w()
            c = np.zeros((self._members.size,) + r.shape[1:])
            c[self._is_added] = r[added]
            v = scipy.linalg.lu_solve(self._schur, c - w.T @ z0, check_finite=False)
            z0 -= w @ v
            x[added] = v[self._is_added]
        x[self._ref] = scipy.linalg.solve_triangular(lower, z0, lower=True, trans="T", check_finite=False)
        x[removed] = 0.0
        return x

    # -- what the iteration calls ---------------------------------------------------------------
    def solve(self, passive):
        """Solution on ``passive`` (bool (N,), updated in place: dependent columns leave it).

        Returns ``(x, grad, dependent)``: x (0 outside F), its scaled gradient, the mask of the
        columns found dependent.
        """
        n = self.sys.n
        dependent = np.zeros(n, dtype=bool)
        in_ref = self._pos >= 0
        added, removed = np.flatnonzero(passive & ~in_ref), np.flatnonzero(in_ref & ~passive)
        k = self._ref.size
        fresh = k == 0 or added.size + removed.size > min(SCHUR_FRACTION * k, self._room())
        if not fresh:
            try:
                dependent[self._update_members(added, removed)] = True
            except (np.linalg.LinAlgError, scipy.linalg.LinAlgWarning, ValueError):
                fresh = True
        if fresh:
            idx = np.flatnonzero(passive)
            keep = self.refactor(idx)
            dependent[np.setdiff1d(idx, idx[keep])] = True
        passive &= ~dependent
        x, grad = self._refined(passive)
        if not fresh and not self._accurate(grad, passive):
            logger.debug("Schur solve inaccurate; refactoring %d columns", int(passive.sum()))
            self._reset()
            return self.solve(passive)
        return x, grad, dependent

    def pivots(self, cols):
        """Squared Schur pivots ``(G_jj − G[F, j]ᵀ G[F, F]⁻¹ G[F, j]) / G_jj`` of ``cols`` against the
        last solved F: how far each column is from depending on F (unit-diagonal metric)."""
        block = np.ascontiguousarray(self.sys.gram[cols].T)                   # (N, m): G symmetric
        solved = self._apply(block)
        return (self.sys.diag[cols] - np.einsum("ij,ij->j", block, solved)) / self.sys.diag[cols]

    def _accurate(self, grad, passive):
        return not passive.any() or float(np.max(np.abs(grad[passive]))) <= self.sys.threshold

    def _refined(self, passive):
        x = self._apply(np.where(passive, self.sys.rhs, 0.0))
        grad = self.sys.scaled_gradient(x)
        for _ in range(_REFINE_STEPS):
            if self._accurate(100.0 * grad, passive):
                break
            x -= self._apply(np.where(passive, grad * self.sys.scale, 0.0))
            grad = self.sys.scaled_gradient(x)
        return x, grad


def nnls_pivot(gram, rhs, *, tol=1e-10, max_iter=None, x0=None, safeguard="murty") -> BlockNNLSResult:
    """Block principal pivoting NNLS on the normal equations.  Local.

    Minimises ``0.5 * x @ gram @ x - rhs @ x`` subject to ``x >= 0``.  Starting from the
    passive set ``{j : b_j > 0}`` (or the support of ``x0``), each iteration solves
    ``G[F, F] x_F = b_F`` (see :class:`PassiveSolver`), then moves every infeasible variable
    (``x_j < 0`` in F, scaled gradient below ``−threshold`` outside) to the other set.  If that
    full exchange does not reduce the number of violations for :data:`FULL_EXCHANGES`
    iterations in a row, single exchanges of the last violating index follow (Murty's rule,
    finite for positive-definite G; through the Schur complement each costs O(k²)) until it
    does.  ``safeguard="stop"`` gives up after :data:`SINGLE_EXCHANGES` of them without a new
    low of the violation count (``stalled=True``, for semi-definite G, where the rule may cycle;
    each new low restarts the count, at most N times) so that the caller can switch methods;
    ``"murty"`` does not.

    Parameters
    ----------
    gram : (N, N) float64
        Symmetric positive semi-definite; read only.
    rhs : (N,) float64
    tol : float, optional
        Relative tolerance on the scaled gradient ``(G x − b)_j / √G_jj``, relative to
        ``max_j |b_j| / √G_jj`` (as :func:`~cubefit_mpi.numerics.nnls.nnls_gram`).
    max_iter : int or None, optional
        Cap on iterations; default ``2 N + 50``.
    x0 : (N,) float64 or None, optional
        Non-negative warm start; only its support is used (the initial passive set).
    safeguard : {"murty", "stop"}

    Returns
    -------
    BlockNNLSResult
    """
    if safeguard not in ("murty", "stop"):
        raise ValueError(f"safeguard {safeguard!r}: expected 'murty' or 'stop'")
    system = ScaledSystem(gram, rhs, tol)
    n = system.n
    solver = PassiveSolver(system)
    if system.level == 0.0:
        return BlockNNLSResult(np.zeros(n), 0, True, 0, "trivial problem: rhs is zero on all non-zero columns")
    max_iter = 2 * n + 50 if max_iter is None else int(max_iter)
    passive = system.start_set(x0)
    excluded = np.zeros(n, dtype=bool)
    best, budget, single, single_low = n + 1, FULL_EXCHANGES, 0, n + 1
    iterations, converged, stalled = 0, False, False
    x = np.zeros(n)
    while iterations < max_iter:
        iterations += 1
        x, grad, dependent = solver.solve(passive)
        excluded = (excluded & ~passive) | dependent
        recheck = np.flatnonzero(excluded & ~dependent & (grad < -system.threshold))
        if recheck.size:                      # F changed since they were found dependent
            excluded[recheck[solver.pivots(recheck) > PIVOT_RTOL]] = False
        leave, enter = system.violations(x, grad, passive, excluded)
        count = int(np.count_nonzero(leave) + np.count_nonzero(enter))
        logger.debug("bpp %d: |F|=%d, %d leave, %d enter, %d dependent, %d factorizations", iterations,
                     int(passive.sum()), int(leave.sum()), int(enter.sum()), int(excluded.sum()),
                     solver.factorizations)
        if count == 0:
            converged = True
            break
        if count < best:
            best, budget, single, single_low = count, FULL_EXCHANGES, 0, n + 1
            flip = leave | enter
        elif budget > 0:
            budget -= 1
            flip = leave | enter
        else:
            if count < single_low:            # the single exchanges still lower the violations: count afresh
                single_low, single = count, 0
            if safeguard == "stop" and single >= SINGLE_EXCHANGES:
                stalled = True
                break
            single += 1
            flip = np.zeros(n, dtype=bool)
            flip[int(np.flatnonzero(leave | enter)[-1])] = True
        passive ^= flip
    x = np.maximum(np.where(passive, x, 0.0), 0.0)
    if converged:
        message = f"converged after {iterations} iterations ({solver.factorizations} factorizations)"
    elif stalled:
        message = f"stalled after {iterations} iterations: full exchanges no longer reduce the violations"
    else:
        message = f"max_iter={max_iter} reached before the KKT conditions were met"
    return BlockNNLSResult(x, iterations, converged, int(np.count_nonzero(x > 0)), message,
                           solver.factorizations, solver.work_bytes, stalled)
