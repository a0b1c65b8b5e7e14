"""Where the Kaczmarz solver's tiles come from: this rank's band designs of an S-tile, with the
√w-weighted data and the column energies of each (tile, band) kept between epochs.

* :class:`HypercubeTiles` reads them from ``/HyperCube/models`` (independent reads, the next tile
  read ahead in a background thread, see ``CUBEFIT_READ_AHEAD``);
* :class:`FactoredTiles` makes them by one GEMM per tile from the factors (κ of the group's
  tiles, computed once from ``/LOSVD``, times the template basis): an epoch costs arithmetic,
  not I/O.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ...io import layout as lay
from ...io.h5file import open_uncached
from ...io.read_ahead import ReadAhead
from ...parallel.comm import ranks_on_node
from . import steps as ks
from .band_design import BandDesign
from .grid import Grid

ENERGY_CACHE_BYTES = 256 * 2**20     # per rank: the column energies of every (tile, band) it holds


@dataclass
class Tile:
    """What a group holds of one S-tile: this rank's band designs and the weighted data.

    Rows are ``(spaxel, λ)`` over all ``L`` pixels; masked pixels have ``√w = 0`` so that
    their rows of ``y_w`` and of every design product are zero.
    """

    index: int
    n_spaxels: int
    designs: dict          # band -> BandDesign
    y_w: np.ndarray        # (n_spaxels * L,) float64
    sum_w: float           # n_spaxels * Σ_used w


class _TileSource:
    """This rank's band designs of the S-tiles in a planned order (the checks and caches common to
    every source; a source provides :meth:`_start` and :meth:`_next_block`).  Local.

    ``counts["sanitised_A"]`` (the solver's counters) adds the non-finite design values zeroed
    (on tiles whose first read found some; they are sanitised on every read).
    """

    threaded = False

    def __init__(self, inputs, grid: Grid, cfg: ks.StepConfig, data_w: np.ndarray, counts: dict):
        self.planned, self.n_read = [], 0
        self.inp, self.grid, self.cfg = inputs, grid, cfg
        self.P = inputs.P
        self.sqrt_w_full = np.zeros(inputs.L)
        self.sqrt_w_full[inputs.mask] = inputs.sqrt_w
        self.used = np.flatnonzero(inputs.mask)
        self.data_w = data_w                              # (S, L) √w-weighted, zero on masked pixels
        self.counts = counts
        # column energies per (tile, band) do not change between epochs: kept up to a budget
        n_mine = sum((grid.bands[b][1] - grid.bands[b][0]) * self.P for b in grid.my_bands)
        self.energy_cache: dict = {} if n_mine * len(inputs.s_tiles) * 8 <= ENERGY_CACHE_BYTES else None
        self.checked: set = set()                           # (tile, band) read at least once
        self.dirty: set = set()                             # (tile, band) with non-finite values

    def plan(self, order: list, epochs: int) -> None:
        """Plan this group's tiles: every epoch, then the objective pass.  Local."""
        g = self.grid
        G = g.n_groups
        mine = [order[i] if i < len(order) else None for i in range(g.group, -(-len(order) // G) * G, G)]
        self.planned = mine * int(epochs) + mine
        self._start([t for t in dict.fromkeys(mine) if t is not None])

    def close(self) -> None:
        """Stop whatever works ahead.  Local."""

    def _start(self, tiles: list) -> None:
        raise NotImplementedError

    def _next_block(self, tile) -> np.ndarray | None:
        """``A[tile, c_lo:c_hi]`` ``(ns, c_hi - c_lo, P, L)`` float32 of the next planned tile (None: none)."""
        raise NotImplementedError

    def read(self, tile, count: bool = True) -> Tile | None:
        """This rank's band designs of ``tile`` and its weighted data (None: nothing).  Local.

        ``tile`` must be the next one :meth:`plan` planned.  A band's design is the block
        as read (float32), sanitised in place when its column energy shows non-finite values;
        ``count`` adds what was sanitised to the stats.  The block stays valid until the next
        call but one.
        """
        g, inp = self.grid, self.inp
        if self.n_read >= len(self.planned) or self.planned[self.n_read] != tile:
            raise RuntimeError(f"kaczmarz: tile {tile} read out of the planned order")
        self.n_read += 1
        a = self._next_block(tile)
        if tile is None:
            return None
        s0, s1 = inp.s_tiles[tile]
        ns = s1 - s0
        designs = {}
        for b in g.my_bands:
            c0, c1 = g.bands[b]
            design = BandDesign(a[:, c0 - g.c_lo:c1 - g.c_lo].reshape(ns, (c1 - c0) * self.P, inp.L),
                                self.sqrt_w_full)
            key = (tile, b)
            if key not in self.checked:                    # first read: the energy finds non-finite values
                self.checked.add(key)
                energy = design.energy()
                if not np.all(np.isfinite(energy)):
                    self.dirty.add(key)
                elif self.energy_cache is not None:
                    self.energy_cache[key] = self._with_frozen(energy)
            if key in self.dirty:                          # sanitised on every read
                bad = design.sanitize(self.used)
                self.counts["sanitised_A"] += bad if count else 0
            designs[b] = design
        return Tile(tile, ns, designs, self.data_w[s0:s1].reshape(-1), ns * float(np.sum(self.sqrt_w_full ** 2)))

    def energy(self, tile: Tile, band: int) -> tuple[np.ndarray, np.ndarray]:
        """Column energy ``Σ (√w A_j)²`` of ``band`` on ``tile`` and its frozen columns (cached between epochs).  Local."""
        key = (tile.index, band)
        cached = None if self.energy_cache is None else self.energy_cache.get(key)
        if cached is None:
            cached = self._with_frozen(tile.designs[band].energy())
            if self.energy_cache is not None:
                self.energy_cache[key] = cached
        return cached

    def _with_frozen(self, energy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return energy, ks.freeze_mask(energy, self.cfg.zero_col_rel, self.cfg.zero_col_abs)


class HypercubeTiles(_TileSource):
    """The band designs read from ``/HyperCube/models``: independent reads, each made in a
    background thread while the previous tile is worked on (``CUBEFIT_READ_AHEAD``).  Local."""

    def __init__(self, f, inputs, grid: Grid, knobs, cfg: ks.StepConfig, data_w: np.ndarray, counts: dict):
        super().__init__(inputs, grid, cfg, data_w, counts)
        self.models = open_uncached(f, lay.MODELS)      # each tile is read once per epoch
        self.reader = None
        # a reader thread needs a core of its own: with every core running a rank it made an epoch
        # 10-20 % slower here (2 ranks on 2 cores); with a spare core it hides the reads (1 rank:
        # 0.30 -> 0.20 s per epoch, S=500 C=3 P=100 L=1500)
        spare_core = ranks_on_node(grid.comm) < (os.cpu_count() or 1)
        self.read_ahead = knobs.read_ahead == "1" or (knobs.read_ahead == "auto" and spare_core)

    @property
    def threaded(self) -> bool:
        return bool(self.reader is not None and self.reader.threaded)

    def _start(self, tiles: list) -> None:
        g, inp = self.grid, self.inp
        requests = [None if t is None or not g.my_bands else
                    ((inp.s_tiles[t][0], g.c_lo, 0, 0), (inp.s_tiles[t][1] - inp.s_tiles[t][0], g.c_hi - g.c_lo,
                                                         self.P, inp.L)) for t in self.planned]
        self.reader = ReadAhead(self.models, requests, enabled=self.read_ahead)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()

    def _next_block(self, tile) -> np.ndarray | None:
        return self.reader.next()


class FactoredTiles(_TileSource):
    """The band designs made from the factors: κ of the group's tiles (this rank's components)
    computed once from ``/LOSVD`` (independent reads), each tile one GEMM ``κ @ B`` in float32,
    clipped as the builder clips.  Local."""

    def __init__(self, f, inputs, grid: Grid, cfg: ks.StepConfig, data_w: np.ndarray, counts: dict):
        super().__init__(inputs, grid, cfg, data_w, counts)
        self.f, self.operator = f, inputs.operator
        self.kappa: dict = {}

    def _start(self, tiles: list) -> None:
        g = self.grid
        for t in tiles if g.my_bands else []:
            kappa = self.operator.read_kappa(self.f, self.inp.s_tiles[t], collective=False)
            self.kappa[t] = np.ascontiguousarray(kappa[:, g.c_lo:g.c_hi])

    def _next_block(self, tile) -> np.ndarray | None:
        if tile is None or not self.grid.my_bands:
            return None
        kappa = self.kappa[tile]
        return self.operator.tile_models(kappa, 0, kappa.shape[1])
