"""A read from ``/HyperCube/models (S, C, P, L) float32``: for files whose hypercube was built here
or by any tool that follows the spec.

Passes read this rank's S-tiles (collective, chunk-aligned), drop masked pixels, scale rows by
√w, cast to float64 and accumulate with BLAS (SYRK for G, GEMM for columns); partial sums are
reduced to rank 0 in float64 (G as row blocks of its upper triangle).  Components that carry
no light on a whole tile (``/HyperCube/norm/losvd_amp`` zero there: their models are zero) are
skipped: only the lit components' columns are formed and accumulated.
"""
from __future__ import annotations

import time

import numpy as np

from ..io import layout as lay
from ..io.blocks import read_block
from ..io.h5file import open_h5, open_uncached
from ..numerics.reconstruction import active_blocks, contract_block
from ..numerics.support import lit_columns, tile_support
from ..parallel.collectives import allreduce_sum, reduce_sum, reduce_upper_to_root
from ..parallel.decomposition import padded_schedule, tile_bounds
from ..parallel.timers import PhaseTimer
from .base import Operator, Weighting


def _syrk_update(gram: np.ndarray, design: np.ndarray) -> None:
    """``gram[upper] += design @ design.T`` in place (gram Fortran-ordered)."""
    from scipy.linalg.blas import dsyrk

    dsyrk(1.0, design.T, beta=1.0, c=gram, trans=1, lower=0, overwrite_c=1)


class HypercubeOperator(Operator):
    """A as stored.  Built by :func:`~cubefit_mpi.operators.select.open_operator` once the
    hypercube passed :func:`~cubefit_mpi.io.hypercube_state.require_usable_models`."""

    kind = "hypercube"

    def __init__(self, path: str, models, attrs, support: np.ndarray | None = None):
        S, C, P, L = models.shape
        s_chunk = (models.chunks or (max(1, min(S, 64)),))[0]
        super().__init__(path, S, C, P, L, tile_bounds(S, s_chunk), str(attrs.get("norm.mode", "")),
                         str(attrs.get("amp.mode", "")))
        self.chunks = models.chunks[:3] if models.chunks is not None else None
        self.tile_support = (np.ones((len(self.s_tiles), C), dtype=bool) if support is None
                             else tile_support(support, self.s_tiles))
        self._provenance = {"operator": self.kind, "models.version": str(attrs.get("models.version", "")),
                            "models.fingerprint": str(attrs.get("inputs.fingerprint", "")),
                            "norm.mode": self.norm_mode}

    def provenance(self) -> dict:
        return dict(self._provenance)

    def design_blocks(self, weighting: Weighting, comm, *, need_data: bool = True, timer: PhaseTimer | None = None):
        """Yield this rank's weighted design blocks ``(cols, B (n_cols, L_used), z (L_used,))``, one
        per spaxel.

        ``cols`` are the columns of the components lit on the spaxel's tile (all N when every
        component is; the same array object for every spaxel of a tile), ``B[j, λ] = √w_λ
        A[s, cols[j], λ]`` over the unmasked pixels, float64, C-contiguous (a view into a buffer
        reused for the next spaxel); ``z = √w y_s``.  Collective over comm: every rank makes the
        same number of collective reads, so iterate the generator to the end on every rank.
        ``timer`` (optional) gets the reads as phase ``io``.
        """
        timer = timer or PhaseTimer()
        sqrt_w, used = weighting.sqrt_w, weighting.used
        all_used = used.size == self.L
        n = self.n_params
        buf = np.empty((n, used.size))
        index = {tile: i for i, tile in enumerate(self.s_tiles)}
        with open_h5(self.path, "r", comm) as f:
            models, data = open_uncached(f, lay.MODELS), f[lay.DATACUBE]   # each tile is read once
            for tile in padded_schedule(self.my_tiles(comm), comm):
                if tile is None:
                    with timer.phase("io"):
                        read_block(models, None, None)
                        if need_data:
                            read_block(data, None, None)
                    continue
                s0, s1 = tile
                with timer.phase("io"):
                    a_tile = read_block(models, (s0, 0, 0, 0), (s1 - s0, self.C, self.P, self.L))
                    y_tile = read_block(data, (s0, 0), (s1 - s0, self.L)) if need_data else None
                cols = lit_columns(self.tile_support[index[tile]], self.P)
                design = buf[:cols.size]
                for i in range(s1 - s0):
                    a_s = a_tile[i].reshape(n, self.L)
                    if cols.size < n:
                        a_s = a_s[cols]
                    np.multiply(a_s if all_used else a_s[:, used], sqrt_w, out=design)
                    yield cols, design, (y_tile[i, used] * sqrt_w if need_data else None)

    def normal_equations(self, weighting: Weighting, comm) -> dict:
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
                    _syrk_update(gram, design)
                else:
                    if sub is None:
                        sub, sub_cols = np.zeros((cols.size, cols.size), order="F"), cols
                    _syrk_update(sub, design)
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
        n = self.n_params
        rhs, diag, yy = np.zeros(n), np.zeros(n), 0.0
        for cols, design, target in self.design_blocks(weighting, comm):
            rhs[cols] += design @ target
            diag[cols] += np.einsum("ij,ij->i", design, design)
            yy += float(target @ target)
        return {"rhs": allreduce_sum(rhs, comm), "diag": allreduce_sum(diag, comm),
                "yy": float(allreduce_sum(np.array([yy]), comm)[0])}

    def gram_columns(self, weighting: Weighting, cols: np.ndarray, comm) -> np.ndarray | None:
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
        chi2 = 0.0
        for cols, design, target in self.design_blocks(weighting, comm):
            resid = target - x[cols] @ design
            chi2 += float(resid @ resid)
        return float(allreduce_sum(np.array([chi2]), comm)[0])

    def adjoint(self, f, tile, weighting: Weighting, v_w: np.ndarray | None) -> np.ndarray | None:
        models = f[lay.MODELS]
        if tile is None:
            read_block(models, None, None)
            return None
        s0, s1 = tile
        a_tile = read_block(models, (s0, 0, 0, 0), (s1 - s0, self.C, self.P, self.L))
        used, sqrt_w = weighting.used, weighting.sqrt_w
        cols = lit_columns(self._lit_on(tile), self.P)
        out = np.zeros((v_w.shape[2], self.n_params))
        for i in range(s1 - s0):
            design = a_tile[i].reshape(self.n_params, self.L)[cols][:, used] * sqrt_w    # (n_cols, L_used)
            out[:, cols] += (design @ v_w[i]).T
        return out

    def read_blocks(self, x_cp: np.ndarray) -> list:
        """The (c, p) blocks of A a model ``A·x`` needs: non-zero weights only, chunk-aligned.  Local."""
        c_chunk, p_chunk = (self.chunks[1], self.chunks[2]) if self.chunks is not None else (1, self.P)
        return active_blocks(x_cp, c_chunk, p_chunk)

    def spectra(self, f, tile, x_cp: np.ndarray, blocks: list | None = None) -> np.ndarray | None:
        """See :meth:`Operator.spectra`; blocks of components dark on the whole tile are not read
        (the rank still makes the collective call, with an empty selection)."""
        blocks = self.read_blocks(x_cp) if blocks is None else blocks
        models = f[lay.MODELS]
        s0, s1 = tile if tile is not None else (0, 0)
        acc = np.zeros((s1 - s0, self.L)) if tile is not None else None
        lit = self._lit_on(tile)
        for c0, c1, p0, p1 in blocks:
            read = tile is not None and bool(lit[c0:c1].any())
            block = read_block(models, (s0, c0, p0, 0) if read else None,
                               (s1 - s0, c1 - c0, p1 - p0, self.L) if read else None, dtype=np.float64)
            if read:
                acc += contract_block(block, x_cp[c0:c1, p0:p1])
        return acc

    def _lit_on(self, tile) -> np.ndarray:
        """``(C,) bool`` components lit on the spaxels of ``tile`` (all for an unknown range).  Local."""
        if tile is None:
            return np.zeros(self.C, dtype=bool)
        try:
            return self.tile_support[self.s_tiles.index(tuple(tile))]
        except ValueError:                              # a range that is not one tile (recon's --s-tile)
            s0, s1 = tile
            rows = [i for i, (a, b) in enumerate(self.s_tiles) if a < s1 and b > s0]
            return self.tile_support[rows].any(axis=0)
