"""A read from ``/HyperCube/models (S, C, P, L) float32``: for files whose hypercube was built here
or by any tool that follows the spec.

Passes read this rank's S-tiles (collective, chunk-aligned), drop masked pixels, scale rows by
√w, cast to float64 and accumulate with BLAS (SYRK for G, GEMM for columns); partial sums are
reduced to rank 0 in float64 (G as row blocks of its upper triangle).
"""
from __future__ import annotations

import time

import numpy as np

from ..io import layout as lay
from ..io.blocks import read_block
from ..io.h5file import open_h5, open_uncached
from ..numerics.reconstruction import active_blocks, contract_block
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

    def __init__(self, path: str, models, attrs):
        S, C, P, L = models.shape
        s_chunk = (models.chunks or (max(1, min(S, 64)),))[0]
        super().__init__(path, S, C, P, L, tile_bounds(S, s_chunk), str(attrs.get("norm.mode", "")),
                         str(attrs.get("amp.mode", "")))
        self.chunks = models.chunks[:3] if models.chunks is not None else None
        self._provenance = {"operator": self.kind, "models.version": str(attrs.get("models.version", "")),
                            "models.fingerprint": str(attrs.get("inputs.fingerprint", "")),
                            "norm.mode": self.norm_mode}

    def provenance(self) -> dict:
        return dict(self._provenance)

    def design_blocks(self, weighting: Weighting, comm, *, need_data: bool = True, timer: PhaseTimer | None = None):
        """Yield this rank's weighted design blocks ``(B (N, L_used), z (L_used,))``, one per spaxel.

        ``B[(c, p), λ] = √w_λ A[s, c, p, λ]`` over the unmasked pixels, float64, C-contiguous (a
        view into a buffer reused for the next spaxel); ``z = √w y_s``.  Collective over comm:
        every rank makes the same number of collective reads, so iterate the generator to the end
        on every rank.  ``timer`` (optional) gets the reads as phase ``io``.
        """
        timer = timer or PhaseTimer()
        sqrt_w, used = weighting.sqrt_w, weighting.used
        all_used = used.size == self.L
        n = self.n_params
        buf = np.empty((n, used.size))
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
                for i in range(s1 - s0):
                    a_s = a_tile[i].reshape(n, self.L)
                    np.multiply(a_s if all_used else a_s[:, used], sqrt_w, out=buf)
                    yield buf, (y_tile[i, used] * sqrt_w if need_data else None)

    def normal_equations(self, weighting: Weighting, comm) -> dict:
        t0 = time.perf_counter()
        n = self.n_params
        gram = np.zeros((n, n), order="F")
        rhs = np.zeros(n)
        yy = 0.0
        timer = PhaseTimer()
        blocks = self.design_blocks(weighting, comm, timer=timer)
        while True:
            with timer.phase("compute"):            # includes the masking/scaling copy in the generator
                item = next(blocks, None)
                if item is None:
                    break
                design, target = item
                _syrk_update(gram, design)
                rhs += design @ target
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
        for design, target in self.design_blocks(weighting, comm):
            rhs += design @ target
            diag += np.einsum("ij,ij->i", design, design)
            yy += float(target @ target)
        return {"rhs": allreduce_sum(rhs, comm), "diag": allreduce_sum(diag, comm),
                "yy": float(allreduce_sum(np.array([yy]), comm)[0])}

    def gram_columns(self, weighting: Weighting, cols: np.ndarray, comm) -> np.ndarray | None:
        block = np.zeros((self.n_params, len(cols)))
        for design, _ in self.design_blocks(weighting, comm, need_data=False):
            block += design @ design[cols].T
        return reduce_sum(block, comm)

    def residual_chi2(self, weighting: Weighting, x: np.ndarray, comm) -> float:
        chi2 = 0.0
        for design, target in self.design_blocks(weighting, comm):
            resid = target - x @ design
            chi2 += float(resid @ resid)
        return float(allreduce_sum(np.array([chi2]), comm)[0])

    def read_blocks(self, x_cp: np.ndarray) -> list:
        """The (c, p) blocks of A a model ``A·x`` needs: non-zero weights only, chunk-aligned.  Local."""
        c_chunk, p_chunk = (self.chunks[1], self.chunks[2]) if self.chunks is not None else (1, self.P)
        return active_blocks(x_cp, c_chunk, p_chunk)

    def spectra(self, f, tile, x_cp: np.ndarray, blocks: list | None = None) -> np.ndarray | None:
        blocks = self.read_blocks(x_cp) if blocks is None else blocks
        models = f[lay.MODELS]
        s0, s1 = tile if tile is not None else (0, 0)
        acc = np.zeros((s1 - s0, self.L)) if tile is not None else None
        for c0, c1, p0, p1 in blocks:
            block = read_block(models, (s0, c0, p0, 0) if tile is not None else None,
                               (s1 - s0, c1 - c0, p1 - p0, self.L) if tile is not None else None, dtype=np.float64)
            if tile is not None:
                acc += contract_block(block, x_cp[c0:c1, p0:p1])
        return acc
