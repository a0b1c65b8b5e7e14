"""A as the product of its two factors: ``A[s,c,p,λ] = Σ_k κ[s,c,k] B[k,p,λ]`` (see
:mod:`cubefit_mpi.numerics.factored`), with no hypercube at all.

Every rank holds the template basis ``B (K, P, L)`` (made once from ``/Templates`` and
``/R_T``) and makes ``κ`` of its own S-tiles from ``/LOSVD`` as it needs them.  The normal
equations:

1. one pass over this rank's S-tiles (LOSVD rows and spectra, collective reads) accumulates
   ``M = Σ_s κ_s κ_sᵀ``, ``b`` and ``yᵀWy``; all three are summed over ranks (float64);
2. G is contracted block by block over population pairs ``(p-block, p'-block)``, the upper
   blocks dealt to ranks round-robin (one GEMM for Φ's block, one with M for G's), so Φ is
   never held whole; each block goes to rank 0, which places it and its mirror: only rank 0
   holds an N×N array.

Exact whenever the builder's ``max(0, ·)`` cannot act (non-negative templates and ``/R_T``);
:func:`~cubefit_mpi.operators.select.open_operator` checks that before it makes one.
"""
from __future__ import annotations

import time

import numpy as np

from ..io import layout as lay
from ..io.blocks import read_block
from ..io.datasets import default_chunks
from ..io.h5file import open_h5
from ..io.model_inputs import ModelInputs
from ..numerics import factored as fa
from ..numerics.digest import array_digest
from ..numerics.kernels import unit_kernels
from ..numerics.support import support_map
from ..parallel.collectives import allreduce_sum, reduce_sum
from ..parallel.decomposition import block_range, padded_schedule, tile_bounds
from ..parallel.timers import PhaseTimer
from .base import Operator, Weighting

TILE_BYTES = 64 * 2**20          # per-tile temporaries of a pass (κ, projections, spectra)
BLOCK_BYTES = 128 * 2**20        # temporaries of one (p-block, p'-block) contraction


class FactoredOperator(Operator):
    """A from ``κ`` and ``B``.  Collective methods as in :class:`~.base.Operator`."""

    kind = "factored"

    def __init__(self, path: str, inputs: ModelInputs):
        d = inputs.dims
        self.inputs = inputs
        self.basis = fa.template_basis(inputs.templates, inputs.shifts, inputs.rebin_lt)     # (K, P, L)
        self.K = self.basis.shape[0]
        per_spaxel = 8 * max(d.C * self.K, self.K * d.P, d.L, d.V * d.C)
        s_tile = int(max(1, min(d.S, TILE_BYTES // per_spaxel)))
        super().__init__(path, d.S, d.C, d.P, d.L, tile_bounds(d.S, s_tile), inputs.norm_mode, inputs.amp_mode)
        self.step_tiles = tile_bounds(d.S, default_chunks(d.S, d.C, d.P, d.L)[0])    # as the builder's S-chunks
        self.m_total: np.ndarray | None = None          # Σ_s κκᵀ (C·K, C·K), once a pass made it
        self.support = support_map(inputs.scale)         # (S, C): dark (s, c) have κ = 0 and are skipped
        self._provenance = {"operator": self.kind, "models.version": "",
                            "models.fingerprint": inputs.fingerprint, "norm.mode": inputs.norm_mode,
                            "amp.mode": inputs.amp_mode,
                            "data_flux.digest": array_digest(inputs.data_flux) if inputs.norm_mode == "data" else ""}

    def provenance(self) -> dict:
        return dict(self._provenance)

    # --- κ ---------------------------------------------------------------------------------------
    def kappa(self, losvd: np.ndarray, s0: int) -> np.ndarray:
        """``κ (n, C, K)`` of spaxels ``s0 : s0 + n`` from their LOSVD rows ``(n, V, C)``.  Local."""
        kernels, _ = unit_kernels(losvd, self.inputs.interp)
        return fa.kernel_weights(kernels, self.inputs.scale[s0:s0 + losvd.shape[0]])

    def read_kappa(self, f, tile, collective: bool = True) -> np.ndarray | None:
        """``κ`` of ``tile = (s0, s1)`` read from ``/LOSVD`` (None for ``tile=None``).

        Collective over the file's communicator unless ``collective=False`` (an independent read).
        """
        V = self.inputs.dims.V
        if tile is None:
            if collective:
                read_block(f[lay.LOSVD], None, None)
            return None
        s0, s1 = tile
        losvd = read_block(f[lay.LOSVD], (s0, 0, 0), (s1 - s0, V, self.C), np.float64, collective=collective)
        return self.kappa(losvd, s0)

    def _pass(self, comm, *, need_data: bool, timer: PhaseTimer | None = None):
        """Yield ``(tile, κ, y)`` for this rank's S-tiles in collective rounds (``(None, None,
        None)`` when it has none left); iterate to the end on every rank."""
        timer = timer or PhaseTimer()
        with open_h5(self.path, "r", comm) as f:
            for tile in padded_schedule(self.my_tiles(comm), comm):
                with timer.phase("io"):
                    kappa = self.read_kappa(f, tile)
                    y = None
                    if need_data:
                        y = read_block(f[lay.DATACUBE], None if tile is None else (tile[0], 0),
                                       None if tile is None else (tile[1] - tile[0], self.L), np.float64)
                yield tile, kappa, y

    def _kappa_gram(self, comm) -> np.ndarray:
        """``M = Σ_s κκᵀ`` over all spaxels (every rank), made by a pass when not known yet.  Collective."""
        if self.m_total is None:
            m = np.zeros((self.C * self.K,) * 2)
            for tile, kappa, _ in self._pass(comm, need_data=False):
                if tile is not None:
                    m += fa.kappa_gram(kappa)
            self.m_total = allreduce_sum(m, comm)
        return self.m_total

    # --- the passes ----------------------------------------------------------------------------
    def _data_pass(self, weighting: Weighting, comm, timer: PhaseTimer) -> tuple[np.ndarray, float]:
        """One pass: M (kept), b (N,) and yᵀWy, summed over ranks.  Collective over comm."""
        basis_w = fa.weighted_basis(self.basis, weighting.sqrt_w, weighting.used)
        m = np.zeros((self.C * self.K,) * 2)
        rhs = np.zeros((self.C, self.P))
        yy = 0.0
        for tile, kappa, y in self._pass(comm, need_data=True, timer=timer):
            if tile is None:
                continue
            with timer.phase("compute"):
                y_w = y[:, weighting.used] * weighting.sqrt_w
                lit = np.flatnonzero(self.support[tile[0]:tile[1]].any(axis=0))   # components with light here
                k_lit = np.ascontiguousarray(kappa[:, lit])
                idx = (lit[:, None] * self.K + np.arange(self.K)[None, :]).reshape(-1)
                m[np.ix_(idx, idx)] += fa.kappa_gram(k_lit)
                rhs[lit] += fa.rhs_contribution(k_lit, fa.projections(basis_w, y_w))
                yy += float(np.sum(y_w * y_w))
        with timer.phase("comm"):
            self.m_total = allreduce_sum(m, comm)
            rhs = allreduce_sum(rhs.reshape(-1), comm)
            yy = float(allreduce_sum(np.array([yy]), comm)[0])
        return rhs, yy

    def population_block(self) -> int:
        """Populations per block of the G contraction, from :data:`BLOCK_BYTES`.  Local."""
        per_pair = 8 * 3 * (self.K * self.K + self.C * self.C)
        return int(max(1, min(self.P, np.sqrt(BLOCK_BYTES / per_pair))))

    def normal_equations(self, weighting: Weighting, comm) -> dict:
        t0 = time.perf_counter()
        timer = PhaseTimer()
        rhs, yy = self._data_pass(weighting, comm, timer)
        basis_w = fa.weighted_basis(self.basis, weighting.sqrt_w, weighting.used)
        C, P = self.C, self.P
        with timer.phase("compute"):
            m_cc = fa.m_for_contraction(self.m_total, C, self.K)
            blocks = fa.population_blocks(P, self.population_block())
            pairs = [(a, b) for i, a in enumerate(blocks) for b in blocks[i:]]
            gram = self._assemble(pairs, m_cc, basis_w, comm, timer)
        t_pass = time.perf_counter() - t0
        diag = fa.gram_diagonal(self.m_total, basis_w).reshape(-1)
        return {"gram": gram, "rhs": rhs, "yy": yy, "diag": diag, "pass_seconds": t_pass,
                "reduce_seconds": 0.0, "phases": dict(timer.seconds),
                "phases_by_rank": timer.by_rank(comm), "population_block": int(blocks[0][1] - blocks[0][0])}

    def _assemble(self, pairs: list, m_cc: np.ndarray, basis_w: np.ndarray, comm, timer: PhaseTimer):
        """G (N, N) on rank 0 (None elsewhere) from its upper block pairs, dealt round-robin: a rank
        computes its pairs and sends each block to rank 0, which places it and its mirror.  Only
        rank 0 holds an N×N array.  Collective over comm."""
        C, P = self.C, self.P
        rank, size = comm.Get_rank(), comm.Get_size()
        gram4 = np.zeros((C, P, C, P)) if rank == 0 else None
        pending = []
        for i, (pa, pb) in enumerate(pairs):
            owner = i % size
            if owner == rank:
                block = np.ascontiguousarray(fa.gram_block(m_cc, basis_w, pa, pb))
                if rank != 0:
                    with timer.phase("comm"):
                        pending.append((comm.Isend(block, dest=0, tag=i), block))
                        if len(pending) > 2:                  # at most two blocks in flight
                            pending.pop(0)[0].Wait()
                    continue
            elif rank == 0:
                block = np.empty((C, pa[1] - pa[0], C, pb[1] - pb[0]))
                with timer.phase("comm"):
                    comm.Recv(block, source=owner, tag=i)
            else:
                continue
            gram4[:, pa[0]:pa[1], :, pb[0]:pb[1]] = block
            if pa != pb:
                gram4[:, pb[0]:pb[1], :, pa[0]:pa[1]] = block.transpose(2, 3, 0, 1)
        for request, _ in pending:
            request.Wait()
        return None if gram4 is None else gram4.reshape(C * P, C * P)

    def diagonal_pass(self, weighting: Weighting, comm) -> dict:
        rhs, yy = self._data_pass(weighting, comm, PhaseTimer())
        basis_w = fa.weighted_basis(self.basis, weighting.sqrt_w, weighting.used)
        return {"rhs": rhs, "diag": fa.gram_diagonal(self.m_total, basis_w).reshape(-1), "yy": yy}

    def gram_columns(self, weighting: Weighting, cols: np.ndarray, comm) -> np.ndarray | None:
        m = self._kappa_gram(comm)
        basis_w = fa.weighted_basis(self.basis, weighting.sqrt_w, weighting.used)
        cols = np.asarray(cols, dtype=int)
        lo, hi = block_range(cols.size, comm.Get_size(), comm.Get_rank())
        block = np.zeros((self.n_params, cols.size))
        if hi > lo:
            block[:, lo:hi] = fa.gram_columns(m, basis_w, cols[lo:hi])
        return reduce_sum(block, comm)

    def residual_chi2(self, weighting: Weighting, x: np.ndarray, comm) -> float:
        basis_w = fa.weighted_basis(self.basis, weighting.sqrt_w, weighting.used)
        x_cp = np.asarray(x, dtype=np.float64).reshape(self.C, self.P)
        chi2 = 0.0
        for tile, kappa, y in self._pass(comm, need_data=True):
            if tile is not None:
                resid = y[:, weighting.used] * weighting.sqrt_w - fa.model_spectra(kappa, basis_w, x_cp)
                chi2 += float(np.sum(resid * resid))
        return float(allreduce_sum(np.array([chi2]), comm)[0])

    def column_energy(self, mask: np.ndarray, comm) -> np.ndarray:
        """``E[c, p] = Σ_{s, λ∈mask} A²`` (the builder's ``col_energy``) from the factors.  Collective."""
        m = self._kappa_gram(comm)
        used = np.flatnonzero(mask)
        return fa.gram_diagonal(m, fa.weighted_basis(self.basis, np.ones(used.size), used))

    # --- models ----------------------------------------------------------------------------------
    def spectra(self, f, tile, x_cp: np.ndarray, blocks: list | None = None) -> np.ndarray | None:
        kappa = self.read_kappa(f, tile)
        return None if tile is None else fa.model_spectra(kappa, self.basis, x_cp)

    def adjoint(self, f, tile, weighting: Weighting, v_w: np.ndarray | None) -> np.ndarray | None:
        kappa = self.read_kappa(f, tile)
        if tile is None:
            return None
        key = (weighting.mask.tobytes(), None if weighting.weights is None else weighting.weights.tobytes())
        if getattr(self, "_basis_w_key", None) != key:
            self._basis_w = fa.weighted_basis(self.basis, weighting.sqrt_w, weighting.used)
            self._basis_w_key = key
        K, P, lu = self._basis_w.shape
        n, R = v_w.shape[0], v_w.shape[2]
        z = np.einsum("ql,slr->sqr", self._basis_w.reshape(K * P, lu), v_w).reshape(n * K, P * R)   # (n·K, P·R)
        rhs = kappa.transpose(1, 0, 2).reshape(self.C, n * K) @ z                                    # (C, P·R)
        return rhs.reshape(self.C, P, R).transpose(2, 0, 1).reshape(R, self.n_params)

    def tile_models(self, kappa: np.ndarray, c0: int, c1: int, dtype=np.float32) -> np.ndarray:
        """``A[s-tile, c0:c1]`` ``(n, c1 - c0, P, L)`` from the tile's ``κ``, clipped as the builder;
        the (s, c) rows without light (κ = 0) are zero without a product.  Local."""
        return fa.lit_model_tile(kappa[:, c0:c1], self.basis, dtype)


