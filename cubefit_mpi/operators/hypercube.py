"""A read from ``/HyperCube/models (S, C, P, L) float32``: for files whose hypercube was built here
or by any tool that follows the spec.

Passes read this rank's S-tiles (collective, chunk-aligned), drop masked pixels, scale rows by
√w, cast to float64 and accumulate with BLAS (SYRK for G, GEMM for columns); partial sums are
reduced to rank 0 in float64 (G as row blocks of its upper triangle).
"""
from __future__ import annotations

import numpy as np

from ..io import layout as lay
from ..io.blocks import read_block
from ..io.h5file import open_h5, open_uncached
from ..numerics.reconstruction import active_blocks, contract_block
from ..parallel.decomposition import padded_schedule, tile_bounds
from ..parallel.timers import PhaseTimer
from .base import Operator, Weighting, weigh_spectrum


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
        """This rank's weighted design blocks, one per spaxel (:meth:`.base.Operator.design_blocks`),
        from the tiles as stored (each read once).  Collective over comm."""
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
                factors, bases = weighting.factors(s0, s1), weighting.bases(s0, s1)
                for i in range(s1 - s0):
                    a_s = a_tile[i].reshape(n, self.L)
                    np.multiply(a_s if all_used else a_s[:, used], sqrt_w, out=buf)
                    target = y_tile[i, used] * sqrt_w if need_data else None
                    target = weigh_spectrum(buf, target, None if factors is None else factors[i],
                                            None if bases is None else bases[i])
                    yield buf, target

    def products(self, f, tile, used: np.ndarray, vectors: np.ndarray | None) -> np.ndarray | None:
        models = f[lay.MODELS]
        if tile is None:
            read_block(models, None, None)
            return None
        s0, s1 = tile
        a_tile = read_block(models, (s0, 0, 0, 0), (s1 - s0, self.C, self.P, self.L))
        out = np.empty((s1 - s0, self.n_params, vectors.shape[2]))
        for i in range(s1 - s0):
            out[i] = a_tile[i].reshape(self.n_params, self.L)[:, used].astype(np.float64) @ vectors[i]
        return out

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
