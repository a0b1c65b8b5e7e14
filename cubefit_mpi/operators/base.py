"""The interface every representation of the design matrix A offers to the solvers and stages.

``A[s, c, p, λ]`` with S spaxels, C components, P populations, L pixels; the columns of the fit
are ``(c, p)`` row-major, N = C·P.  An operator gives, over its S-tiles:

* the weighted normal equations ``G = AᵀWA`` (on rank 0), ``b = AᵀWy``, ``yᵀWy``, ``diag(G)``;
  ``diag(G)`` alone; chosen columns of G; χ² of an x by an independent residual pass;
* the model spectra ``A·x`` of a tile (recon, plots) and tiles ``A[s-range, c-range]``
  (Kaczmarz, the builder).

``W`` is the λ-weights times the mask (:class:`Weighting`).  Reductions are float64; every
pass is collective over the communicator and every rank makes the same collective calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OPERATOR_CHOICES = ("auto", "factored", "hypercube")


@dataclass(frozen=True)
class Weighting:
    """The pixel weighting of a fit: ``mask (L,) bool`` (True = used) and λ-weights ``(L,)`` or None."""

    mask: np.ndarray
    weights: np.ndarray | None

    @property
    def used(self) -> np.ndarray:
        """Indices of the used pixels, ``(L_used,)``."""
        return np.flatnonzero(self.mask)

    @property
    def sqrt_w(self) -> np.ndarray:
        """√w on the used pixels, ``(L_used,)``."""
        w = np.ones(self.mask.size) if self.weights is None else self.weights
        return np.sqrt(w[self.mask])


class Operator:
    """Base of the operators.  Attributes: ``kind``, ``path``, ``S, C, P, L``, ``s_tiles``
    (``[(s0, s1), ...]``, the tiles passes visit), ``step_tiles`` (the tiles of an iterative
    solver's steps: the hypercube's S-chunks, or what they would be), ``norm_mode``, ``amp_mode``."""

    kind = "abstract"

    def __init__(self, path: str, S: int, C: int, P: int, L: int, s_tiles: list, norm_mode: str, amp_mode: str):
        self.path, self.S, self.C, self.P, self.L = path, S, C, P, L
        self.s_tiles, self.norm_mode, self.amp_mode = s_tiles, norm_mode, amp_mode
        self.step_tiles = s_tiles

    @property
    def n_params(self) -> int:
        return self.C * self.P

    def my_tiles(self, comm) -> list:
        """This rank's S-tiles: a balanced contiguous block.  Local."""
        from ..parallel.decomposition import block_range

        lo, hi = block_range(len(self.s_tiles), comm.Get_size(), comm.Get_rank())
        return self.s_tiles[lo:hi]

    def provenance(self) -> dict:
        """What the models are, for the keys of caches made from them (strings).  Local."""
        raise NotImplementedError

    # --- the passes of the exact solver (collective) -------------------------------------------
    def normal_equations(self, weighting: Weighting, comm) -> dict:
        """``{"gram": G (rank 0) or None, "rhs", "yy", "diag", "pass_seconds", "reduce_seconds",
        "phases", "phases_by_rank"}``.  Collective over comm."""
        raise NotImplementedError

    def diagonal_pass(self, weighting: Weighting, comm) -> dict:
        """``{"rhs", "diag", "yy"}`` on every rank (memory O(N)).  Collective over comm."""
        raise NotImplementedError

    def gram_columns(self, weighting: Weighting, cols: np.ndarray, comm) -> np.ndarray | None:
        """``G[:, cols]`` (N, k) on rank 0, None elsewhere.  Collective over comm."""
        raise NotImplementedError

    def residual_chi2(self, weighting: Weighting, x: np.ndarray, comm) -> float:
        """``Σ_{s, λ∈mask} w (y − A x)²`` by a pass of its own.  Collective over comm."""
        raise NotImplementedError

    def adjoint(self, f, tile, weighting: Weighting, v_w: np.ndarray | None) -> np.ndarray | None:
        """``Aᵀ √W v`` of the spaxels ``tile = (s0, s1)`` for ``v_w (n, L_used, R)`` (√w-weighted
        vectors on the used pixels), as ``(R, N)``; None for ``tile=None``.  Collective over the
        file's communicator in rounds, as :meth:`spectra`."""
        raise NotImplementedError

    # --- models ----------------------------------------------------------------------------------
    def read_blocks(self, x_cp: np.ndarray) -> list:
        """The (c, p) blocks of a stored A that ``A·x`` needs (none when A is not stored).  Local."""
        return []

    def spectra(self, f, tile, x_cp: np.ndarray, blocks: list | None = None) -> np.ndarray | None:
        """``A·x`` of the spaxels ``tile = (s0, s1)``, ``(n, L)`` float64, or None for ``tile=None``.

        Collective over the file's communicator: every rank calls it once per round, a rank
        without a tile passes None (its reads are empty selections).  ``blocks``: the (c, p)
        blocks to read when A is stored (:meth:`read_blocks`; ignored otherwise).
        """
        raise NotImplementedError
