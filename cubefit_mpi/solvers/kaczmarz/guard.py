"""The epoch guard of the Kaczmarz solver: the global objective of every epoch's iterate, the best
iterate kept, and the relaxation ω halved after an epoch that raised the objective.

Why it is needed: every tile step is guarded *on its own tile* (band, tile and round backtracking),
but a step that helps its tile can hurt the others.  On noisy data with collinear templates the
NNLS polish (an exact fit of a few columns to one tile) makes large such moves, and the global
objective ½χ² can rise by orders of magnitude over later epochs (see ``docs/kaczmarz.md``,
"Never worse").

The rule (``CUBEFIT_EPOCH_GUARD=1``, the default):

* every epoch's iterate ``x_e`` (and the start ``x_0``) is given its global objective
  ``f(x_e) = ½ Σ w (y − A x_e)²``;
* an iterate with ``f(x_e) ≤`` the best so far becomes the best;
* one with ``f(x_e) >`` the best is *rejected*: the solver goes on from the best iterate and the
  relaxation ``ω`` (the factor on every tile's committed update, polish included) is multiplied
  by ``CUBEFIT_EPOCH_DAMP`` (default ½) for every later epoch;
* the best iterate is returned.

Where the objective comes from (:class:`GramObjective` or the solver's probe rows): with a current
Gram cache under ``/Solve`` that fits the Gram budget, ``f = ½yᵀWy − bᵀx + ½xᵀGx`` at the end of
each epoch (O(N²) on rank 0).  Without one, the residuals of the *next* epoch's own reads: every
tile already computes ``√w (y − A x)`` for the current x, and the same product carries a second
row for the iterate being measured (one more row of a memory-bound product, no extra read).  The
objective of ``x_e`` is then known at the end of epoch ``e + 1``, of the last iterate by the final
objective pass; an iterate rejected that late has already served as the start of one epoch, whose
result is measured in turn (it may become the best) while the solver goes on from the best.

Local except :meth:`GramObjective.load` and :meth:`GramObjective.__call__` (collective over comm).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...parallel.collectives import bcast_array

__all__ = ["EpochGuard", "Pending", "GramObjective", "BEST", "KEEP", "BACK"]
BEST, KEEP, BACK = "best", "keep", "back"


@dataclass
class Pending:
    """An iterate whose objective is not known yet.

    Attributes
    ----------
    epoch : int, the epoch that produced it (0 = the start)
    x : (N,) float64, a copy
    chain : bool, False when it descends from an iterate already rejected (then its own rejection
        does not damp ω again)
    """

    epoch: int
    x: np.ndarray
    chain: bool = True


@dataclass
class EpochGuard:
    """The best iterate so far, the objective of every epoch, and the relaxation ω.  Local.

    Every rank makes the same calls with the same values, so every rank holds the same state.

    Parameters
    ----------
    epochs : int, epochs of the run (``values`` has one entry per epoch and one for the start)
    enabled : bool, ``CUBEFIT_EPOCH_GUARD`` (False: objectives are not tracked, the last iterate
        is returned)
    damp : float in [0, 1], ``CUBEFIT_EPOCH_DAMP``: ω is multiplied by it after a rejection
    """

    epochs: int
    enabled: bool = True
    damp: float = 0.5
    omega: float = 1.0
    best_x: np.ndarray | None = None
    best_f: float = np.inf
    best_epoch: int = -1
    values: np.ndarray = field(default=None)
    rejected: list = field(default_factory=list)

    def __post_init__(self):
        if self.values is None:
            self.values = np.full(int(self.epochs) + 1, np.nan)

    def judge(self, epoch: int, x: np.ndarray, f: float, chain: bool = True) -> str:
        """Record ``f(x)`` of epoch ``epoch``'s iterate and say what to do.  Local.

        Returns
        -------
        ``BEST``: it is the new best; ``KEEP``: worse, but ``chain`` is False (it descends from an
        iterate already rejected, the solver has gone on from the best): nothing to do; ``BACK``:
        worse (or not finite): go back to the best, ω is damped.
        """
        self.values[epoch] = f
        if np.isfinite(f) and f <= self.best_f:
            self.best_x, self.best_f, self.best_epoch = np.array(x, dtype=np.float64, copy=True), float(f), int(epoch)
            return BEST
        if not chain:
            return KEEP
        self.rejected.append(int(epoch))
        self.omega *= self.damp
        return BACK

    @property
    def stalled(self) -> bool:
        """ω is 0: no later epoch can move x."""
        return self.omega == 0.0

    def gaps(self, f_zero: float, f_ref: float | None) -> np.ndarray | None:
        """``(f_e − f*) / (f(0) − f*)`` of every recorded epoch (NaN where unknown), or None.  Local."""
        if f_ref is None:
            return None
        span = f_zero - f_ref
        return (self.values - f_ref) / span if span > 0 else np.zeros_like(self.values)


@dataclass
class GramObjective:
    """``f(x) = ½yᵀWy − bᵀx + ½xᵀGx`` from a cached Gram matrix (G on rank 0 only)."""

    gram: np.ndarray | None
    rhs: np.ndarray
    yy: float
    comm: object

    @classmethod
    def load(cls, inputs, comm, budget: int) -> "GramObjective | None":
        """From ``/Solve`` when it holds a current cache whose N×N matrix fits ``budget`` bytes.  Collective."""
        from ..exact import cached_gram

        if 8 * inputs.n_params ** 2 > budget:
            return None
        system = cached_gram(inputs, comm)
        return None if system is None else cls(system["gram"], system["rhs"], system["yy"], comm)

    def __call__(self, xs: np.ndarray) -> np.ndarray:
        """The objective of each row of ``xs (k, N)``: (k,) float64, the same on every rank.  Collective."""
        xs = np.atleast_2d(xs)
        values = None
        if self.gram is not None:
            curvature = np.einsum("ij,ij->i", xs @ self.gram, xs)
            values = 0.5 * self.yy - xs @ self.rhs + 0.5 * curvature
        return bcast_array(values, self.comm)
