"""A read from ``/HyperCube/models (S, C, P, L) float32``: for files whose hypercube was built here
or by any tool that follows the spec.

Passes read this rank's S-tiles (collective, chunk-aligned), drop masked pixels, scale rows by
√w, cast to float64 and accumulate with BLAS (SYRK for G, GEMM for columns); partial sums are
reduced to rank 0 in float64 (G as row blocks of its upper triangle).  Components that carry
no light on a whole tile (``/HyperCube/norm/losvd_amp`` zero there: their models are zero) are
skipped: only the lit components' columns are formed and accumulated.
"""
from __future__ import annotations

import numpy as np

from ..io import layout as lay
from ..io.blocks import read_block
from ..io.h5file import open_h5, open_uncached
from ..numerics.reconstruction import active_blocks, contract_block
from ..numerics.support import lit_columns, tile_support
from ..parallel.decomposition import padded_schedule, tile_bounds
from ..parallel.timers import PhaseTimer
from .base import Operator, Weighting, weigh_spectrum


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
        """This rank's weighted design blocks ``(cols, B (n_cols, L_used), z (L_used,))``, one per
        spaxel (:meth:`.base.Operator.design_blocks`), from the tiles as stored (each read once):
        ``cols`` are the columns of the components lit on the spaxel's tile (all N when every
        component is).  Collective over comm."""
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
                factors, bases = weighting.factors(s0, s1), weighting.bases(s0, s1)
                for i in range(s1 - s0):
                    a_s = a_tile[i].reshape(n, self.L)
                    if cols.size < n:
                        a_s = a_s[cols]
                    np.multiply(a_s if all_used else a_s[:, used], sqrt_w, out=design)
                    target = y_tile[i, used] * sqrt_w if need_data else None
                    target = weigh_spectrum(design, target, None if factors is None else factors[i],
                                            None if bases is None else bases[i])
                    yield cols, design, target

    def _read_tile(self, f, tile):
        """The stored models of the spaxels ``tile`` ``(n, C, P, L)`` float32, or None for ``tile=None``
        (the rank still joins the collective read).  Collective over the file's communicator."""
        models = f[lay.MODELS]
        if tile is None:
            read_block(models, None, None)
            return None
        return read_block(models, (tile[0], 0, 0, 0), (tile[1] - tile[0], self.C, self.P, self.L))

    def products(self, f, tile, used: np.ndarray, vectors: np.ndarray | None) -> np.ndarray | None:
        a_tile = self._read_tile(f, tile)
        if a_tile is None:
            return None
        s0, s1 = tile
        out = np.empty((s1 - s0, self.n_params, vectors.shape[2]))
        for i in range(s1 - s0):
            out[i] = a_tile[i].reshape(self.n_params, self.L)[:, used].astype(np.float64) @ vectors[i]
        return out

    def adjoint(self, f, tile, weighting: Weighting, v_w: np.ndarray | None) -> np.ndarray | None:
        a_tile = self._read_tile(f, tile)
        if a_tile is None:
            return None
        s0, s1 = tile
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
