"""The interface every representation of the design matrix A offers to the solvers and stages.

``A[s, c, p, λ]`` with S spaxels, C components, P populations, L pixels; the columns of the fit
are ``(c, p)`` row-major, N = C·P.  An operator gives, over its S-tiles:

* the weighted normal equations ``G = AᵀWA`` (on rank 0), ``b = AᵀWy``, ``yᵀWy``, ``diag(G)``;
  ``diag(G)`` alone; chosen columns of G; χ² of an x by an independent residual pass;
* the model spectra ``A·x`` of a tile (recon, plots) and tiles ``A[s-range, c-range]``
  (Kaczmarz, the builder).

``W`` is the λ-weights times the mask, with the fit's polynomials (:class:`Weighting`).  Reductions are float64; every
pass is collective over the communicator and every rank makes the same collective calls.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..numerics import polynomials as pl
from ..parallel.collectives import allreduce_sum, reduce_sum, reduce_upper_to_root
from ..parallel.timers import PhaseTimer

OPERATOR_CHOICES = ("auto", "factored", "hypercube")


@dataclass(frozen=True, eq=False)
class Weighting:
    """The weighting of a fit's pixels, shared by every operator.

    ``mask (L,) bool`` (True = used) and λ-weights ``(L,)`` or None make ``W``; optionally

    * ``add_degree`` >= 0: additive Legendre terms up to that degree per spectrum, eliminated
      exactly (:class:`~cubefit_mpi.numerics.polynomials.AdditiveBasis`): every weighted row
      of A and of the data is projected off ``span(√W Q)``;
    * ``mult (S, D_m)``: the multiplicative polynomials ``g_s = 1 + Σ_j mult[s, j] P_j`` that
      scale each spectrum's weighted rows of A (the data are not scaled);
    * ``tangent (S, L_used)``: weighted models ``√W A_s x`` (rows of the spaxels this rank
      visits): their polynomial directions are projected off too (the Gauss–Newton x-step of
      :mod:`cubefit_mpi.solvers.polynomials`).
    """

    mask: np.ndarray
    weights: np.ndarray | None
    add_degree: int = -1
    mult: np.ndarray | None = None
    tangent: np.ndarray | None = None

    @property
    def used(self) -> np.ndarray:
        """Indices of the used pixels, ``(L_used,)``."""
        return np.flatnonzero(self.mask)

    @property
    def sqrt_w(self) -> np.ndarray:
        """√w on the used pixels, ``(L_used,)``."""
        w = np.ones(self.mask.size) if self.weights is None else self.weights
        return np.sqrt(w[self.mask])

    @cached_property
    def additive(self) -> pl.AdditiveBasis | None:
        """The additive basis, or None without additive terms.  Raises ValueError (too few pixels)."""
        if self.add_degree < 0:
            return None
        return pl.AdditiveBasis.make(self.mask.size, self.add_degree, self.used, self.sqrt_w)

    @property
    def mult_degree(self) -> int:
        return 0 if self.mult is None else int(self.mult.shape[1])

    @cached_property
    def mult_basis(self) -> np.ndarray | None:
        """``P_1 … P_{D_m}`` on the used pixels ``(L_used, D_m)``, or None."""
        if self.mult is None:
            return None
        return pl.legendre_basis(self.mask.size, self.mult_degree, first=1)[self.used]

    @property
    def per_spectrum(self) -> bool:
        """True when spectra are weighted differently (multiplicative polynomials)."""
        return self.mult is not None

    def project(self, v: np.ndarray) -> np.ndarray:
        """Weighted vectors ``(..., L_used)`` with the additive span removed (``v`` itself without).  Local."""
        return v if self.additive is None else self.additive.project(v)

    def factors(self, s0: int, s1: int) -> np.ndarray | None:
        """``g_s`` on the used pixels of spaxels ``s0:s1``, ``(n, L_used)``, or None.  Local."""
        return None if self.mult is None else pl.mult_factor(self.mult[s0:s1], self.mult_basis)

    def bases(self, s0: int, s1: int) -> np.ndarray | None:
        """Per spectrum, the orthonormal basis ``(n, L_used, k)`` its weighted rows are projected off,
        or None when nothing is.  Local."""
        if self.tangent is not None:
            return pl.spectrum_bases(self.tangent[s0:s1], self.mult_basis, self.additive)
        if self.additive is None:
            return None
        return np.broadcast_to(self.additive.u, (s1 - s0,) + self.additive.u.shape)

    def provenance(self) -> dict:
        """What keys a cache of normal equations made with this weighting (beyond mask and weights).  Local."""
        if self.per_spectrum:
            raise ValueError("normal equations of multiplicative polynomials are not cached")
        return {"add.degree": str(int(self.add_degree))}


def syrk_update(gram: np.ndarray, design: np.ndarray) -> None:
    """``gram[upper] += design @ design.T`` in place (gram Fortran-ordered).  Local."""
    from scipy.linalg.blas import dsyrk

    dsyrk(1.0, design.T, beta=1.0, c=gram, trans=1, lower=0, overwrite_c=1)


def weigh_spectrum(design: np.ndarray, target: np.ndarray | None, g: np.ndarray | None,
                   basis: np.ndarray | None) -> np.ndarray | None:
    """One spectrum's weighted rows ``design (N, L_used)`` (in place) and data ``target (L_used,)``
    scaled by ``g (L_used,)`` (the rows only) and projected off ``basis (L_used, k)``; returns the
    data.  Local."""
    if g is not None:
        design *= g
    if basis is not None and basis.shape[1]:
        design -= (design @ basis) @ basis.T
        if target is not None:
            target = target - basis @ (basis.T @ target)
    return target


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

    def spectra_tiles(self, comm) -> list:
        """This rank's tiles of a pass that needs only ``A·x`` and products per spectrum (the
        polynomial fit): :meth:`my_tiles` unless the operator balances better.  Local."""
        return self.my_tiles(comm)

    def provenance(self) -> dict:
        """What the models are, for the keys of caches made from them (strings).  Local."""
        raise NotImplementedError

    # --- the passes of the exact solver (collective) -------------------------------------------
    # The defaults below visit this rank's weighted design blocks one spaxel at a time
    # (:meth:`design_blocks`): any weighting, multiplicative polynomials included.
    def design_blocks(self, weighting: Weighting, comm, *, need_data: bool = True, timer: PhaseTimer | None = None):
        """Yield this rank's weighted design blocks ``(cols, B (n_cols, L_used), z (L_used,))``, one per spaxel.

        ``cols (n_cols,) int``: the columns the rows are (all N, or the components lit on the
        spaxel's tile; the same array object for every spaxel of a tile).
        ``B[j, λ] = √w_λ g_s(λ) A[s, cols[j], λ]`` over the unmasked pixels, projected as the
        weighting says (:func:`weigh_spectrum`), float64, C-contiguous (possibly a view into a
        buffer reused for the next spaxel); ``z = √w y_s``, projected alike.  Collective over
        comm: iterate the generator to the end on every rank.  ``timer`` gets the reads as ``io``.
        """
        raise NotImplementedError

    def normal_equations(self, weighting: Weighting, comm) -> dict:
        """``{"gram": G (rank 0) or None, "rhs", "yy", "diag", "pass_seconds", "reduce_seconds",
        "phases", "phases_by_rank"}``; a tile's dark components' columns are skipped (the lit
        ones' block accumulated apart).  Collective over comm."""
        t0 = time.perf_counter()
        n = self.n_params
        gram = np.zeros((n, n), order="F")
        rhs = np.zeros(n)
        yy = 0.0
        timer = PhaseTimer()
        blocks = self.design_blocks(weighting, comm, timer=timer)
        sub, sub_cols = None, None
        while True:
            with timer.phase("compute"):            # includes the masking/scaling copy in the generator
                item = next(blocks, None)
                if item is None or (sub_cols is not None and item[0] is not sub_cols):
                    if sub is not None:             # a tile with dark components ends: add its block
                        gram[np.ix_(sub_cols, sub_cols)] += sub
                    sub, sub_cols = None, None
                if item is None:
                    break
                cols, design, target = item
                if cols.size == n:
                    syrk_update(gram, design)
                else:
                    if sub is None:
                        sub, sub_cols = np.zeros((cols.size, cols.size), order="F"), cols
                    syrk_update(sub, design)
                rhs[cols] += design @ target
                yy += float(target @ target)
        timer.seconds["compute"] -= timer.seconds["io"]
        t_pass = time.perf_counter() - t0
        with timer.phase("comm"):
            rhs = allreduce_sum(rhs, comm)
            yy = float(allreduce_sum(np.array([yy]), comm)[0])
            gram = reduce_upper_to_root(gram, comm)
            diag = comm.bcast(None if gram is None else gram.diagonal().copy(), root=0)
        return {"gram": gram, "rhs": rhs, "yy": yy, "diag": diag, "pass_seconds": t_pass,
                "reduce_seconds": time.perf_counter() - t0 - t_pass, "phases": dict(timer.seconds),
                "phases_by_rank": timer.by_rank(comm)}

    def diagonal_pass(self, weighting: Weighting, comm) -> dict:
        """``{"rhs", "diag", "yy"}`` on every rank (memory O(N)).  Collective over comm."""
        n = self.n_params
        rhs, diag, yy = np.zeros(n), np.zeros(n), 0.0
        for cols, design, target in self.design_blocks(weighting, comm):
            rhs[cols] += design @ target
            diag[cols] += np.einsum("ij,ij->i", design, design)
            yy += float(target @ target)
        return {"rhs": allreduce_sum(rhs, comm), "diag": allreduce_sum(diag, comm),
                "yy": float(allreduce_sum(np.array([yy]), comm)[0])}

    def gram_columns(self, weighting: Weighting, cols: np.ndarray, comm) -> np.ndarray | None:
        """``G[:, cols]`` (N, k) on rank 0, None elsewhere.  Collective over comm."""
        wanted = np.asarray(cols, dtype=int)
        block = np.zeros((self.n_params, wanted.size))
        position = np.full(self.n_params, -1)
        for lit, design, _ in self.design_blocks(weighting, comm, need_data=False):
            position[:] = -1
            position[lit] = np.arange(lit.size)
            here = np.flatnonzero(position[wanted] >= 0)      # requested columns lit on this tile
            if here.size:
                block[np.ix_(lit, here)] += design @ design[position[wanted[here]]].T
        return reduce_sum(block, comm)

    def residual_chi2(self, weighting: Weighting, x: np.ndarray, comm) -> float:
        """``Σ_{s, λ∈mask} w (y − A x)²`` (as weighted and projected) by a pass of its own.  Collective over comm."""
        chi2 = 0.0
        for cols, design, target in self.design_blocks(weighting, comm):
            resid = target - x[cols] @ design
            chi2 += float(resid @ resid)
        return float(allreduce_sum(np.array([chi2]), comm)[0])

    def adjoint(self, f, tile, weighting: Weighting, v_w: np.ndarray | None) -> np.ndarray | None:
        """``Aᵀ √W v`` of the spaxels ``tile = (s0, s1)`` for ``v_w (n, L_used, R)`` (√w-weighted
        vectors on the used pixels), as ``(R, N)``; None for ``tile=None``.  Collective over the
        file's communicator in rounds, as :meth:`spectra`."""
        raise NotImplementedError

    # --- models ----------------------------------------------------------------------------------
    def read_blocks(self, x_cp: np.ndarray) -> list:
        """The (c, p) blocks of a stored A that ``A·x`` needs (none when A is not stored).  Local."""
        return []

    def products(self, f, tile, used: np.ndarray, vectors: np.ndarray | None) -> np.ndarray | None:
        """``Y[i] = A[s0 + i][:, used] @ vectors[i]`` ``(n, N, k)`` float64 for ``vectors (n, L_used, k)``
        of the spaxels ``tile = (s0, s1)`` (None for ``tile=None``).

        Collective over the file's communicator, like :meth:`spectra` (a rank without a tile
        passes None).  The gradients and Gauss–Newton terms of the polynomial fit.
        """
        raise NotImplementedError

    def spectra(self, f, tile, x_cp: np.ndarray, blocks: list | None = None) -> np.ndarray | None:
        """``A·x`` of the spaxels ``tile = (s0, s1)``, ``(n, L)`` float64, or None for ``tile=None``.

        Collective over the file's communicator: every rank calls it once per round, a rank
        without a tile passes None (its reads are empty selections).  ``blocks``: the (c, p)
        blocks to read when A is stored (:meth:`read_blocks`; ignored otherwise).
        """
        raise NotImplementedError
