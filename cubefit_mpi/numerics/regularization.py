"""Quadratic terms added to the normal equations (pure numerics).

All optional terms of the exact solve are quadratic in x, so they enter ``G`` and ``b`` only:

* ridge ``½ρ‖x‖²``                     -> ``ρ I``
* smoothness (pPXF-style) ``½λ Σ_c ‖D x_c‖²`` with D the first or second differences along
  each axis of the population grid (``pop_shape``, e.g. age × metallicity) -> ``λ DᵀD`` per
  component block;
* orbit weights ``½μ Σ_c (Σ_p x_cp − t_c Σ x)²`` with t the (C,) target fractions
  -> ``μ MᵀM``, ``M = E − t 1ᵀ`` where E sums each component's block.

The sparse part (ridge + smoothness) is kept sparse and the orbit part as the low-rank factor
``U = √μ M (C, N)``, so the working-set solver can form any columns cheaply.

Local (no MPI, no I/O).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


def difference_operator(pop_shape: tuple[int, ...], order: int) -> sp.csr_matrix:
    """Stacked finite differences of ``order`` (1 or 2) along every axis of ``pop_shape``.  Local.

    Returns a sparse ``(n_rows, prod(pop_shape))`` matrix acting on the row-major flattened grid.
    Axes shorter than ``order + 1`` contribute nothing.
    """
    if order not in (1, 2):
        raise ValueError(f"regularisation order {order}: expected 1 or 2")
    pop_shape = tuple(int(n) for n in pop_shape)
    blocks = []
    for axis, n in enumerate(pop_shape):
        if n <= order:
            continue
        diff_1d = sp.diags([-1.0, 1.0], [0, 1], shape=(n - 1, n)) if order == 1 else \
            sp.diags([1.0, -2.0, 1.0], [0, 1, 2], shape=(n - 2, n))
        factors = [sp.identity(m) for m in pop_shape]
        factors[axis] = diff_1d
        op = factors[0]
        for f in factors[1:]:
            op = sp.kron(op, f)
        blocks.append(op)
    size = int(np.prod(pop_shape))
    if not blocks:
        return sp.csr_matrix((0, size))
    return sp.vstack(blocks).tocsr()


def orbit_factor(n_comp: int, n_pop: int, targets: np.ndarray, strength: float) -> np.ndarray:
    """``U = √μ (E − t 1ᵀ)`` of shape ``(C, C·P)`` with t normalised to sum 1.  Local."""
    t = np.asarray(targets, dtype=np.float64)
    t = t / t.sum()
    block_sum = np.kron(np.eye(n_comp), np.ones((1, n_pop)))
    return np.sqrt(strength) * (block_sum - t[:, None] * np.ones((1, n_comp * n_pop)))


@dataclass
class Regularization:
    """``R = sparse + Uᵀ U`` added to G (b is unchanged).

    Attributes
    ----------
    sparse : (N, N) scipy.sparse.csr_matrix  -- ridge and smoothness
    low_rank : (C, N) float64 or None        -- orbit-weight factor
    """

    sparse: sp.csr_matrix
    low_rank: np.ndarray | None = None

    @classmethod
    def build(cls, n_comp: int, n_pop: int, *, ridge: float = 0.0, regul: float = 0.0, regul_order: int = 2,
              pop_shape: tuple[int, ...] | None = None, orbit_targets=None, orbit_strength: float = 0.0
              ) -> "Regularization":
        """Assemble the terms for x of shape (C·P,) row-major over (C, P).  Local."""
        n = n_comp * n_pop
        sparse = ridge * sp.identity(n, format="csr")
        if regul > 0:
            d = difference_operator(pop_shape or (n_pop,), regul_order)
            sparse = sparse + regul * sp.kron(sp.identity(n_comp), (d.T @ d)).tocsr()
        low = None
        if orbit_targets is not None and orbit_strength > 0:
            low = orbit_factor(n_comp, n_pop, orbit_targets, orbit_strength)
        return cls(sp.csr_matrix(sparse), low)

    @property
    def active(self) -> bool:
        return self.sparse.nnz > 0 or self.low_rank is not None

    def dense(self) -> np.ndarray:
        """The full ``(N, N)`` matrix R.  Local."""
        out = self.sparse.toarray()
        if self.low_rank is not None:
            out += self.low_rank.T @ self.low_rank
        return out

    def columns(self, cols: np.ndarray) -> np.ndarray:
        """``R[:, cols]`` as a dense ``(N, len(cols))`` array.  Local."""
        out = self.sparse[:, cols].toarray()
        if self.low_rank is not None:
            out += self.low_rank.T @ self.low_rank[:, cols]
        return out

    def diagonal(self) -> np.ndarray:
        """``diag(R)``.  Local."""
        out = self.sparse.diagonal().copy()
        if self.low_rank is not None:
            out += (self.low_rank ** 2).sum(axis=0)
        return out

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """``R x`` without forming R, ``(N,)`` float64.  Local."""
        out = self.sparse @ x
        if self.low_rank is not None:
            out = out + self.low_rank.T @ (self.low_rank @ x)
        return out

    def penalty(self, x: np.ndarray) -> float:
        """``½ xᵀ R x``.  Local."""
        value = float(x @ (self.sparse @ x))
        if self.low_rank is not None:
            value += float(np.sum((self.low_rank @ x) ** 2))
        return 0.5 * value
