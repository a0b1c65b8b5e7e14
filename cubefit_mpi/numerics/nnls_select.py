"""Which exact NNLS runs on ``(G, b)``, and the quadratic terms added to G in place (local: no
MPI, pure NumPy).

Methods (``CUBEFIT_NNLS_GRAM_METHOD``):

* ``lawson-hanson`` -- :func:`~cubefit_mpi.numerics.nnls.nnls_gram`: one variable per
  iteration, Cholesky up/down-dates; its cost grows like k² N (k: non-zero weights), so it
  is the fastest for sparse solutions and for small N;
* ``block-pivoting`` -- :func:`~cubefit_mpi.numerics.nnls_pivot.nnls_pivot`: a few dozen
  blocked factorizations whatever k; the fastest for dense (regularised) solutions.  Where it
  stalls (rank-deficient or numerically singular passive sets, on which block pivoting can
  cycle) Lawson–Hanson finishes, warm-started from its iterate;
* ``auto`` (default) -- :func:`solve_gram` picks by N and the expected density.

The rule of ``auto``, from the measurements in ``docs/performance.md`` (MILES templates,
N = 848–19,928, one core): Lawson–Hanson took 0.01–0.17 s on the unregularised fits (k/N ≈
3–6 %), where block pivoting cycles on the numerically singular blocks (condition ≈ 4e16) and
the interior-point alternative did not certify; on the regularised ones (k/N ≈ 60–80 %) block
pivoting was 4–5× (N = 848) and 25–40× (N = 3,392) faster, and certified N = 19,928 in 3 min.
Lawson–Hanson costs ≈ 2e-9 s · k² N on one core, block pivoting ≈ (N³ + 5 k³) / (3 F) plus
≈ 30 passes over G: they break even near k ≈ 0.07 N.  So:

1. N < :data:`AUTO_MIN_N`: Lawson–Hanson (both take milliseconds; it is the reference).
2. A dense solution expected (the caller knows: a smoothness term makes most weights
   non-zero) or a warm start whose support exceeds :data:`AUTO_DENSE_FRACTION` N: block
   pivoting.
3. Otherwise Lawson–Hanson for up to ``max(AUTO_MIN_N, N / 8)`` iterations (unregularised fits
   end well before: 106 of 848 and 189 of 3,392 iterations measured); if it is still adding
   variables, the solution is dense and block pivoting continues from its support.
4. Block pivoting that stalls hands over to Lawson–Hanson (as above), which always ends.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..config.knobs import NNLS_GRAM_METHODS
from .nnls import NNLSResult, nnls_gram
from .nnls_pivot import nnls_pivot

logger = logging.getLogger(__name__)

GRAM_METHODS = NNLS_GRAM_METHODS
AUTO_MIN_N = 256
AUTO_DENSE_FRACTION = 0.07
AUTO_LH_FRACTION = 0.125
_ADD_ROWS = 1 << 22        # elements of G updated at a time by the low-rank term


@dataclass
class GramSolution:
    """The result of :func:`solve_gram` and how it was reached.

    Attributes
    ----------
    result : NNLSResult (x (N,) float64, iterations, converged, passive_size, message)
    method : str, the method that produced x ("lawson-hanson", "block-pivoting", or both joined by "+")
    factorizations : int, blocked factorizations of block pivoting (0 for Lawson–Hanson alone)
    work_bytes : int, the work array held besides G (bytes; block pivoting: N² · 8; Lawson–Hanson: ≈ 16 k²)
    phases : list of (method, seconds, iterations)
    """

    result: NNLSResult
    method: str
    factorizations: int = 0
    work_bytes: int = 0
    phases: list = field(default_factory=list)


def factor_bytes(n: int) -> int:
    """Bytes of the one N×N work array an exact NNLS may hold besides G (both methods).  Local."""
    return 8 * int(n) * int(n)


def _lh_bytes(result) -> int:
    """Lawson–Hanson's factor, about: its k × k Cholesky factor and the grown copy of an append."""
    return 16 * result.passive_size ** 2


def _run(phases, name, fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    phases.append((name, time.perf_counter() - t0, result.iterations))
    return result


def solve_gram(gram, rhs, *, method: str = "auto", tol: float = 1e-10, x0=None,
               expect_dense: bool = False) -> GramSolution:
    """Exact NNLS ``min 0.5 xᵀGx − bᵀx, x ≥ 0`` by the chosen method (rule in the module notes).  Local.

    Parameters
    ----------
    gram : (N, N) float64, symmetric positive semi-definite (regularisation included); read only
    rhs : (N,) float64
    method : {"auto", "lawson-hanson", "block-pivoting"}
    tol : float, relative tolerance on the scaled gradient (as :func:`nnls_gram`)
    x0 : (N,) float64 or None, non-negative warm start
    expect_dense : bool, the caller expects most weights non-zero (``auto`` only)

    Returns
    -------
    GramSolution
    """
    if method not in GRAM_METHODS:
        raise ValueError(f"NNLS method {method!r}: expected one of {', '.join(GRAM_METHODS)}")
    n = int(np.asarray(rhs).size)
    phases: list = []
    if method == "lawson-hanson" or (method == "auto" and n < AUTO_MIN_N):
        result = _run(phases, "lawson-hanson", nnls_gram, gram, rhs, tol=tol, x0=x0)
        return GramSolution(result, "lawson-hanson", 0, _lh_bytes(result), phases)
    used, start = [], x0
    if method == "auto" and not expect_dense and not (
            x0 is not None and np.count_nonzero(np.asarray(x0) > 0) > AUTO_DENSE_FRACTION * n):
        budget = max(AUTO_MIN_N, math.ceil(AUTO_LH_FRACTION * n))
        first = _run(phases, "lawson-hanson", nnls_gram, gram, rhs, tol=tol, x0=x0, max_iter=budget)
        used.append("lawson-hanson")
        if first.converged:
            return GramSolution(first, "lawson-hanson", 0, _lh_bytes(first), phases)
        logger.debug("auto NNLS: Lawson-Hanson still adding after %d iterations; block pivoting", budget)
        start = first.x
    pivot = _run(phases, "block-pivoting", nnls_pivot, gram, rhs, tol=tol, x0=start, safeguard="stop")
    used.append("block-pivoting")
    if not pivot.stalled:
        return GramSolution(pivot, "+".join(used), pivot.factorizations, pivot.work_bytes, phases)
    logger.info("NNLS: block pivoting stalled (%s); Lawson-Hanson finishes from its iterate", pivot.message)
    finish = _run(phases, "lawson-hanson", nnls_gram, gram, rhs, tol=tol, x0=pivot.x)
    used.append("lawson-hanson")
    result = NNLSResult(finish.x, sum(p[2] for p in phases), finish.converged, finish.passive_size,
                        f"block pivoting stalled; Lawson-Hanson {finish.message}")
    return GramSolution(result, "+".join(used), pivot.factorizations, pivot.work_bytes, phases)


def expects_dense(reg) -> bool:
    """True when ``reg`` (a Regularization) couples neighbouring weights (a smoothness term): such
    fits have most weights non-zero (60–80 % measured, ``docs/performance.md``).  Local."""
    coo = reg.sparse.tocoo()
    return bool(np.any(coo.row != coo.col))


def add_quadratic_terms(gram, reg, sign: float = 1.0):
    """``gram += sign · R`` in place, R = ``reg.sparse + reg.low_rankᵀ reg.low_rank``.  Local.

    No N×N temporary: the sparse part is scattered, the low-rank part added in row blocks.
    ``sign=-1`` takes it off again (equal to the original to rounding).

    Parameters
    ----------
    gram : (N, N) float64, C-contiguous
    reg : a :class:`~cubefit_mpi.numerics.regularization.Regularization`
    """
    coo = reg.sparse.tocoo()
    if coo.nnz:
        np.add.at(gram, (coo.row, coo.col), sign * coo.data)
    low = reg.low_rank
    if low is not None:
        n = gram.shape[0]
        step = max(1, _ADD_ROWS // max(n, 1))
        for r0 in range(0, n, step):
            gram[r0:r0 + step] += sign * (low[:, r0:r0 + step].T @ low)
    return gram
