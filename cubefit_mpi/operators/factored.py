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
from ..numerics import polynomials as pl
from ..numerics.kernels import unit_kernels
from ..numerics.support import support_map
from ..parallel.collectives import allreduce_sum, reduce_sum, reduce_upper_to_root
from ..parallel.decomposition import block_range, padded_schedule, tile_bounds
from ..parallel.timers import PhaseTimer
from .base import Operator, Weighting, weigh_spectrum

TILE_BYTES = 64 * 2**20          # per-tile temporaries of a pass (κ, projections, spectra)
BLOCK_BYTES = 128 * 2**20        # temporaries of one (p-block, p'-block) contraction
MULT_ROUTE = "auto"              # per-spectrum weights: "auto" (fewer operations), "factored" or "spaxel"


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
        self._used_basis = None                          # (key, B[..., used]) of :meth:`products`
        self._weighted_basis = None                      # (key, B_w) of the last weighting
        self.support = support_map(inputs.scale)         # (S, C): dark (s, c) have κ = 0 and are skipped
        self._provenance = {"operator": self.kind, "models.version": "",
                            "models.fingerprint": inputs.fingerprint, "norm.mode": inputs.norm_mode,
                            "amp.mode": inputs.amp_mode,
                            "data_flux.digest": array_digest(inputs.data_flux) if inputs.norm_mode == "data" else ""}

    def provenance(self) -> dict:
        return dict(self._provenance)

    def spectra_tiles(self, comm) -> list:
        """This rank's tiles of a pass over the spectra: a balanced contiguous block of spaxels, in
        tiles of at most the operator's tile (every rank has spaxels, also when all fit one tile).  Local."""
        lo, hi = block_range(self.S, comm.Get_size(), comm.Get_rank())
        step = self.s_tiles[0][1] - self.s_tiles[0][0]
        return [(lo + a, lo + b) for a, b in tile_bounds(hi - lo, step)]

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
    def weighted_basis(self, weighting: Weighting, project: bool = True) -> np.ndarray:
        """``B_w (K, P, L_used)``, with the additive span projected off when ``project`` (the same
        for every spectrum when there are no multiplicative polynomials).  The last one is kept
        (read only: callers must not write into it).  Local."""
        key = (weighting.mask.tobytes(), None if weighting.weights is None else weighting.weights.tobytes(),
               weighting.add_degree if project else -1)
        if self._weighted_basis is None or self._weighted_basis[0] != key:      # the last one is kept
            basis_w = fa.weighted_basis(self.basis, weighting.sqrt_w, weighting.used)
            self._weighted_basis = (key, weighting.project(basis_w) if project else basis_w)
        return self._weighted_basis[1]

    def _data_pass(self, weighting: Weighting, comm, timer: PhaseTimer) -> tuple[np.ndarray, float]:
        """One pass: M (kept), b (N,) and yᵀWy, summed over ranks.  Collective over comm."""
        basis_w = self.weighted_basis(weighting)
        m = np.zeros((self.C * self.K,) * 2)
        rhs = np.zeros((self.C, self.P))
        yy = 0.0
        for tile, kappa, y in self._pass(comm, need_data=True, timer=timer):
            if tile is None:
                continue
            with timer.phase("compute"):
                y_w = weighting.project(y[:, weighting.used] * weighting.sqrt_w)
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

    def mult_route(self, weighting: Weighting) -> str:
        """How normal equations with per-spectrum weights are made: ``"factored"`` (Φ's of the
        squared multiplicative polynomials' terms) or ``"spaxel"`` (every spaxel's design from the
        factors), the one with fewer operations unless :data:`MULT_ROUTE` says.  Local (sizes only:
        the same on every rank)."""
        if MULT_ROUTE != "auto":
            return MULT_ROUTE
        n_basis = (weighting.add_degree + 1) + (weighting.mult_degree if weighting.tangent is not None else 0)
        factored, spaxel = fa.mult_route_costs(self.S, self.C, self.K, self.P, weighting.used.size,
                                               2 * weighting.mult_degree + 1, n_basis)
        return "factored" if factored <= spaxel else "spaxel"

    def normal_equations(self, weighting: Weighting, comm) -> dict:
        if weighting.per_spectrum and self.mult_route(weighting) == "spaxel":
            return super().normal_equations(weighting, comm)
        t0 = time.perf_counter()
        timer = PhaseTimer()
        C, P = self.C, self.P
        correction = None
        if weighting.per_spectrum:
            correction = np.zeros((C * P, C * P))                      # − Σ_s Y_s Y_sᵀ of the tangent's bases
            rhs, yy, m_terms = self._mult_data_pass(weighting, comm, timer, correction)
            basis_w = self.weighted_basis(weighting, project=False)
            pixel_weights = pl.legendre_basis(self.L, 2 * weighting.mult_degree)[weighting.used].T
            m_terms = np.stack([fa.m_for_contraction(m, C, self.K) for m in m_terms])
        else:
            rhs, yy = self._data_pass(weighting, comm, timer)
            basis_w = self.weighted_basis(weighting)
            m_terms, pixel_weights = fa.m_for_contraction(self.m_total, C, self.K)[None], None
        with timer.phase("compute"):
            blocks = fa.population_blocks(P, self.population_block())
            pairs = [(a, b) for i, a in enumerate(blocks) for b in blocks[i:]]
            if pixel_weights is None:
                def block_of(pa, pb):
                    return fa.gram_block(m_terms[0], basis_w, pa, pb)
            else:
                def block_of(pa, pb):
                    return fa.weighted_gram_block(m_terms, basis_w, pixel_weights, pa, pb)
            gram = self._assemble(pairs, block_of, comm, timer)
        t_pass = time.perf_counter() - t0
        if correction is not None:
            with timer.phase("comm"):
                correction = reduce_upper_to_root(correction, comm)
            if gram is not None:
                gram += correction
            del correction
            diag = comm.bcast(None if gram is None else gram.diagonal().copy(), root=0)
        else:
            diag = fa.gram_diagonal(self.m_total, basis_w).reshape(-1)
        return {"gram": gram, "rhs": rhs, "yy": yy, "diag": diag, "pass_seconds": t_pass,
                "reduce_seconds": time.perf_counter() - t0 - t_pass, "phases": dict(timer.seconds),
                "phases_by_rank": timer.by_rank(comm), "population_block": int(blocks[0][1] - blocks[0][0])}

    def _mult_data_pass(self, weighting: Weighting, comm, timer: PhaseTimer, correction: np.ndarray):
        """The pass of the factored normal equations with multiplicative polynomials.  Collective over comm.

        Returns b (N,), yᵀWy and ``M_j = Σ_s h_sj κ_s κ_sᵀ`` (J, C·K, C·K) for the Legendre
        terms of ``g_s²`` (summed over ranks); subtracts this rank's spectra's projections
        ``Σ_s Y_s Y_sᵀ`` (``Y_s = A_wsᵀ diag(g_s) V_s``, :meth:`Weighting.bases`) from ``correction``.
        """
        used, sqrt_w = weighting.used, weighting.sqrt_w
        basis_w = self.weighted_basis(weighting, project=False)
        CK, N = self.C * self.K, self.n_params
        m = np.zeros((2 * weighting.mult_degree + 1, CK, CK))
        rhs = np.zeros((self.C, self.P))
        yy = 0.0
        for tile, kappa, y in self._pass(comm, need_data=True, timer=timer):
            if tile is None:
                continue
            s0, s1 = tile
            with timer.phase("compute"):
                flat = kappa.reshape(s1 - s0, CK)
                for j, h in enumerate(pl.square_coefficients(weighting.mult[s0:s1]).T):
                    m[j] += (flat * h[:, None]).T @ flat
                g, bases = weighting.factors(s0, s1), weighting.bases(s0, s1)
                y_w = y[:, used] * sqrt_w
                if bases is not None:
                    y_w = y_w - np.einsum("nlk,nk->nl", bases, np.einsum("nlk,nl->nk", bases, y_w))
                rhs += fa.rhs_contribution(kappa, fa.projections(basis_w, g * y_w))
                yy += float(np.sum(y_w * y_w))
                if bases is None or not bases.shape[2]:
                    continue
                step = int(max(1, TILE_BYTES // (8 * max(self.K * self.P, N) * bases.shape[2])))
                for a in range(0, s1 - s0, step):
                    b = min(a + step, s1 - s0)
                    y_s = fa.spectrum_products(kappa[a:b], basis_w, g[a:b, :, None] * bases[a:b])
                    flat_y = y_s.transpose(1, 0, 2).reshape(N, -1)
                    correction -= flat_y @ flat_y.T
        with timer.phase("comm"):
            m = allreduce_sum(m, comm)
            rhs = allreduce_sum(rhs.reshape(-1), comm)
            yy = float(allreduce_sum(np.array([yy]), comm)[0])
        return rhs, yy, m

    def design_blocks(self, weighting: Weighting, comm, *, need_data: bool = True, timer: PhaseTimer | None = None):
        """This rank's weighted design blocks, one per spaxel (:meth:`.base.Operator.design_blocks`),
        each made from κ and the basis (a GEMM per group of spaxels).  Collective over comm."""
        used, sqrt_w = weighting.used, weighting.sqrt_w
        basis_w = self.weighted_basis(weighting, project=False).reshape(self.K, -1)
        N, L_used = self.n_params, used.size
        step = int(max(1, TILE_BYTES // (8 * N * L_used)))
        cols = np.arange(N)                                      # every column (dark κ rows are zero)
        for tile, kappa, y in self._pass(comm, need_data=need_data, timer=timer):
            if tile is None:
                continue
            s0, s1 = tile
            factors, bases = weighting.factors(s0, s1), weighting.bases(s0, s1)
            for a in range(0, s1 - s0, step):
                b = min(a + step, s1 - s0)
                designs = (kappa[a:b].reshape(-1, self.K) @ basis_w).reshape(b - a, N, L_used)
                for i in range(a, b):
                    target = y[i, used] * sqrt_w if need_data else None
                    target = weigh_spectrum(designs[i - a], target, None if factors is None else factors[i],
                                            None if bases is None else bases[i])
                    yield cols, designs[i - a], target

    def _assemble(self, pairs: list, block_of, comm, timer: PhaseTimer):
        """G (N, N) on rank 0 (None elsewhere) from its upper block pairs, dealt round-robin: a rank
        computes its pairs (``block_of(pa, pb) -> (C, |pa|, C, |pb|)``) and sends each block to
        rank 0, which places it and its mirror.  Only rank 0 holds an N×N array.  Collective over comm."""
        C, P = self.C, self.P
        rank, size = comm.Get_rank(), comm.Get_size()
        gram4 = np.zeros((C, P, C, P)) if rank == 0 else None
        pending = []
        for i, (pa, pb) in enumerate(pairs):
            owner = i % size
            if owner == rank:
                block = np.ascontiguousarray(block_of(pa, pb))
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
        if weighting.per_spectrum:
            return super().diagonal_pass(weighting, comm)
        rhs, yy = self._data_pass(weighting, comm, PhaseTimer())
        basis_w = self.weighted_basis(weighting)
        return {"rhs": rhs, "diag": fa.gram_diagonal(self.m_total, basis_w).reshape(-1), "yy": yy}

    def gram_columns(self, weighting: Weighting, cols: np.ndarray, comm) -> np.ndarray | None:
        if weighting.per_spectrum:
            return super().gram_columns(weighting, cols, comm)
        m = self._kappa_gram(comm)
        basis_w = self.weighted_basis(weighting)
        cols = np.asarray(cols, dtype=int)
        lo, hi = block_range(cols.size, comm.Get_size(), comm.Get_rank())
        block = np.zeros((self.n_params, cols.size))
        if hi > lo:
            block[:, lo:hi] = fa.gram_columns(m, basis_w, cols[lo:hi])
        return reduce_sum(block, comm)

    def residual_chi2(self, weighting: Weighting, x: np.ndarray, comm) -> float:
        if weighting.per_spectrum:
            return super().residual_chi2(weighting, x, comm)
        basis_w = self.weighted_basis(weighting)
        x_cp = np.asarray(x, dtype=np.float64).reshape(self.C, self.P)
        chi2 = 0.0
        for tile, kappa, y in self._pass(comm, need_data=True):
            if tile is not None:
                resid = weighting.project(y[:, weighting.used] * weighting.sqrt_w) - fa.model_spectra(kappa, basis_w, x_cp)
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

    def products(self, f, tile, used: np.ndarray, vectors: np.ndarray | None) -> np.ndarray | None:
        kappa = self.read_kappa(f, tile)
        if tile is None:
            return None
        key = used.tobytes()
        if self._used_basis is None or self._used_basis[0] != key:
            self._used_basis = (key, np.ascontiguousarray(self.basis[:, :, used]))
        basis_u = self._used_basis[1]
        step = int(max(1, TILE_BYTES // (8 * max(self.K * self.P, self.n_params) * vectors.shape[2])))
        out = np.empty((tile[1] - tile[0], self.n_params, vectors.shape[2]))
        for a in range(0, out.shape[0], step):
            out[a:a + step] = fa.spectrum_products(kappa[a:a + step], basis_u, vectors[a:a + step])
        return out

    def adjoint(self, f, tile, weighting: Weighting, v_w: np.ndarray | None) -> np.ndarray | None:
        kappa = self.read_kappa(f, tile)
        if tile is None:
            return None
        basis_w = self.weighted_basis(weighting, project=False)
        K, P, lu = basis_w.shape
        n, R = v_w.shape[0], v_w.shape[2]
        z = np.einsum("ql,slr->sqr", basis_w.reshape(K * P, lu), v_w).reshape(n * K, P * R)   # (n·K, P·R)
        rhs = kappa.transpose(1, 0, 2).reshape(self.C, n * K) @ z                                    # (C, P·R)
        return rhs.reshape(self.C, P, R).transpose(2, 0, 1).reshape(R, self.n_params)

    def tile_models(self, kappa: np.ndarray, c0: int, c1: int, dtype=np.float32) -> np.ndarray:
        """``A[s-tile, c0:c1]`` ``(n, c1 - c0, P, L)`` from the tile's ``κ``, clipped as the builder;
        the (s, c) rows without light (κ = 0) are zero without a product.  Local."""
        return fa.lit_model_tile(kappa[:, c0:c1], self.basis, dtype)


