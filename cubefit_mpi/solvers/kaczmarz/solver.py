"""Stage: the spec's batched Kaczmarz solver on MPI (``solve --method kaczmarz``).

Ranks form a grid of *S-groups* × *c-bands*.  The C axis is cut into ``c_bands`` logical bands
(default ``min(ranks, C)``); each S-group has up to ``c_bands`` ranks and each of its ranks owns
a contiguous block of the logical bands.  ``x`` is replicated on every rank.

An epoch visits every S-tile (chunk-aligned spaxel blocks, hardest first = largest weighted
data norm, ties by index) once, in *rounds*: in round ``r`` S-group ``g`` takes tile
``order[r·G + g]``.  For its tile a group

1. reads (:mod:`.tiles`) ``/HyperCube/models`` for each rank's c-range (independent reads, the next tile read
   ahead in a background thread while this one is worked on, see ``CUBEFIT_READ_AHEAD``; the
   √w-weighted ``/DataCube`` is held in memory) and forms ``R_w = √w (y − A x)`` (Allreduce over
   the group).  The band's products are float32 BLAS passes over the blocks as read
   (:class:`~.band_design.BandDesign`); column energies are computed on the first visit and kept;
2. runs :func:`~.steps.band_step` on every logical band (preconditioning, freezing,
   projection, trust region, band backtracking, polish candidates);
3. sums the bands' ΔR (Allreduce over the group), applies the global step cap
   ``√(Σ dx² E) ≤ GLOBAL_TAU·‖Y‖`` and tile-level backtracking: one α per tile;
4. every ``NNLS_EVERY`` tiles, the group's rank 0 runs the weighted NNLS polish on the best
   candidates (design rows gathered from the band ranks, λ-subsampled); it is kept only when
   the tile's weighted RMSE ratio is below ``NNLS_MIN_IMPROVE``;
5. commits ``x ← max(0, x + dx)`` and, with orbit weights, the ratio step (penalty mode) or
   the exact rescaling of every component block to its target (strict mode,
   :func:`~.steps.strict_totals`; the start is rescaled too).

Several S-groups: each round's group updates ``dx_g`` are combined as
``x ← x + β Σ_g dx_g`` with ``β = 1/G_active`` backtracked (``TILE_BT_*``) until the weighted
residual summed over the round's tiles decreases (β = 0 if it never does).  The sums are done in
group order on every rank, so the result is deterministic; it depends on the number of groups
(not on the number of bands' ranks).  With one group, β = 1 and the result is the same for any
number of ranks holding the same ``c_bands`` (to rounding).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict

import numpy as np

from ...config.errors import InputError
from ...config.knobs import get_knobs
from ...config.options import keyword_checked
from ...io import layout as lay
from ...io.h5file import open_h5
from ...io.hypercube_state import ENERGY_STALE
from ...io.space import require_free_space
from ...parallel.collectives import allgather_array, allreduce_sum, bcast_array, gather_rows
from ...parallel.comm import get_comm, mpi
from ...parallel.threads import matvec_blas_threads
from . import steps as ks
from .epochs import run_epochs
from .grid import Grid
from .guard import EpochGuard, GramObjective
from .tiles import FactoredTiles, HypercubeTiles, Tile
from ..orbit import DEFAULT_ORBIT_MODE, DEFAULT_ORBIT_TOTALS, orbit_spec
from .inputs import check_options, initial_x, load_data, read_x_global, solution_bytes, write_solution

_LOG = logging.getLogger("cubefit_mpi.solve")
DEFAULT_ORBIT_STRENGTH = 0.1
COUNTERS = ("tiles", "band_steps", "band_rejected", "band_bt_shrinks", "trust_clipped", "frozen_columns",
            "tile_rejected", "tile_bt_shrinks", "global_capped", "polish_calls", "polish_accepts",
            "polish_skipped", "sanitised_A", "sanitised_R", "round_bt_shrinks", "rounds_rejected")


# ---------------------------------------------------------------------------------------------
# the solver state and one round
# ---------------------------------------------------------------------------------------------
class _Run:
    """Everything one solve needs while the file is open.  Methods are collective as noted."""

    def __init__(self, f, inputs, grid: Grid, knobs, cfg: ks.StepConfig, col_energy, data_w, y_norm,
                 targets, eta, orbit):
        self.inp, self.grid, self.knobs, self.cfg = inputs, grid, knobs, cfg
        self.P = inputs.P
        self.col_energy = col_energy.reshape(-1)
        w = inputs.weights
        self.w_mean = 1.0 if w is None else float(np.mean(w[inputs.mask]))
        self.used = np.flatnonzero(inputs.mask)
        self.n_used = int(self.used.size)
        self.y_norm, self.targets, self.eta, self.orbit = y_norm, targets, eta, orbit
        self.counts: dict[str, float] = defaultdict(float)   # summed over ranks at the end
        self.maxima: dict[str, float] = defaultdict(float)
        self.group_tiles = 0
        self.probe_sums = np.zeros(0)          # see residual()
        self.tiles = (FactoredTiles(f, inputs, grid, cfg, data_w, self.counts) if inputs.operator.kind == "factored"
                      else HypercubeTiles(f, inputs, grid, knobs, cfg, data_w, self.counts))

    def cols(self, band: int) -> slice:
        c0, c1 = self.grid.bands[band]
        return slice(c0 * self.P, c1 * self.P)

    def apply(self, tile: Tile, xs: np.ndarray, precise: bool = False) -> np.ndarray:
        """Weighted model ``√w A x (k, rows)`` of the tile for each row of ``xs (k, N)``.  Collective over the group."""
        out = np.zeros((xs.shape[0], tile.y_w.size))
        for b, design in tile.designs.items():
            out += design.matmat(xs[:, self.cols(b)], precise=precise)
        return allreduce_sum(out, self.grid.group_comm)

    def residual(self, tile: Tile, x, probes: np.ndarray | None = None) -> np.ndarray:
        """``R_w = √w (y − A x)`` of the tile, sanitised.  Collective over the group.

        ``probes (k, N)``: iterates whose objective is being measured (:mod:`.guard`); the same
        product gives their residuals on this tile, and the group's rank 0 adds ``½‖·‖²`` of each
        to ``probe_sums (k,)``.
        """
        xs = x[None, :] if probes is None else np.vstack([x[None, :], probes])
        model = self.apply(tile, xs)
        r_w = tile.y_w - model[0]
        bad = ks.sanitize(r_w)
        if self.grid.leader:
            self.counts["sanitised_R"] += bad
            if probes is not None:
                resid = tile.y_w[None, :] - model[1:]
                ks.sanitize(resid)
                self.probe_sums += 0.5 * np.einsum("ij,ij->i", resid, resid)
        return r_w

    def probe_values(self) -> np.ndarray:
        """The objectives ``(k,)`` accumulated by :meth:`residual` over every group's tiles, the
        same on every rank, then reset.  Collective over comm."""
        g = self.grid
        total = allreduce_sum(self.probe_sums if g.leader else np.zeros_like(self.probe_sums), g.comm)
        self.probe_sums = np.zeros(0)
        return bcast_array(total, g.comm)

    # --- one tile of one group ----------------------------------------------------------------
    def group_step(self, tile: Tile, r_w, x, polish_now: bool, omega: float = 1.0):
        """The committed update ``dx (N,)`` of this group's tile and its ``ΔR_w``.  Collective over the group.

        ``omega`` scales the learning rate and the accepted polish move (the tile's residual is
        convex along it, so its decrease is kept for any ω in (0, 1]).
        """
        g, knobs, counts = self.grid, self.knobs, self.counts
        cfg = self.cfg if omega == 1.0 else dataclasses.replace(self.cfg, lr=self.cfg.lr * omega)
        share = tile.n_spaxels / self.inp.S * self.w_mean
        steps = {}
        dr = np.zeros_like(r_w)
        energy_step = 0.0
        for b, design in tile.designs.items():
            cols = self.cols(b)
            energy, frozen = self.tiles.energy(tile, b)
            st = ks.band_step(design, r_w, x[cols], self.col_energy[cols] * share, cfg, energy=energy, frozen=frozen)
            steps[b] = st
            dr += st.dr_w
            energy_step += float(np.sum(st.dx ** 2 * self.col_energy[cols]))
            counts["band_steps"] += 1
            counts["band_rejected"] += st.rejected
            counts["band_bt_shrinks"] += st.shrinks
            counts["trust_clipped"] += st.trust_clipped
            counts["frozen_columns"] += st.n_frozen
            self.maxima["trust_ratio_max"] = max(self.maxima["trust_ratio_max"], st.trust_ratio)
            self.maxima["frozen_max"] = max(self.maxima["frozen_max"], st.n_frozen)
        dr = allreduce_sum(dr, g.group_comm)
        energy_step = float(allreduce_sum(np.array([energy_step]), g.group_comm)[0])
        scale = ks.cap_scale(energy_step, self.y_norm, knobs.global_tau)
        p, q = float(r_w @ dr) * scale, float(dr @ dr) * scale * scale
        alpha, shrinks = ks.backtrack(p, q, steps=knobs.tile_bt_steps, factor=knobs.tile_bt_factor)
        factor = scale * alpha
        if g.leader:
            counts["tiles"] += 1
            counts["global_capped"] += scale < 1.0
            counts["tile_rejected"] += alpha == 0.0
            counts["tile_bt_shrinks"] += shrinks
            if self.y_norm > 0:
                ratio = factor * np.sqrt(max(energy_step, 0.0)) / self.y_norm
                self.maxima["cap_ratio_max"] = max(self.maxima["cap_ratio_max"], ratio)
        dx = np.zeros_like(x)
        for b, st in steps.items():
            dx[self.cols(b)] = st.dx * factor
        dx = allreduce_sum(dx, g.group_comm)              # one contributor per column: exact
        r_new = r_w - factor * dr
        if polish_now:
            polished = self.polish(tile, r_new, x + dx, steps)
            if polished is not None:
                cols, delta, dr_polish = polished
                dx[cols] += omega * delta
                r_new = r_new - omega * dr_polish
        return dx, r_new

    # --- the polish ---------------------------------------------------------------------------
    def polish(self, tile: Tile, r_w, x_k, steps):
        """Weighted NNLS on the best candidates, by the group's rank 0.  Collective over the group.

        Returns ``(cols (k,), delta (k,), ΔR_w (rows,))`` when accepted, else None.
        """
        g, knobs, counts = self.grid, self.knobs, self.counts
        proposal = np.full((2, self.cfg.n_candidates * g.max_bands_per_rank), -1.0)   # (index, score), -1 = none
        mine = [(np.arange(self.cols(b).start, self.cols(b).stop)[st.candidates], st.scores) for b, st in steps.items()]
        if mine:
            idx, score = np.concatenate([m[0] for m in mine]), np.concatenate([m[1] for m in mine])
            proposal[0, :idx.size], proposal[1, :idx.size] = idx, score
        proposed = allgather_array(proposal, g.group_comm)
        real = proposed[:, 0, :] >= 0
        cand = ks.merge_candidates(proposed[:, 0, :][real].astype(np.int64), proposed[:, 1, :][real], knobs.nnls_max_cols)
        r_norm = float(np.linalg.norm(r_w))
        pixels = self.used[ks.pixel_subsample(self.n_used, knobs.nnls_sub_l)]
        rows = (np.arange(tile.n_spaxels)[:, None] * self.inp.L + pixels[None, :]).reshape(-1)
        width = ks.polish_width(cand.size, rows.size, knobs.nnls_max_cols, knobs.nnls_max_bytes)
        if width == 0 or r_norm == 0.0:
            if g.leader:
                counts["polish_skipped"] += 1
            return None
        cand = cand[:width]
        owner = np.searchsorted(g.column_splits(self.P), cand, side="right") - 1    # group rank of each column
        here = np.flatnonzero(owner == g.group_rank)                                # ascending column order
        full = np.empty((here.size, r_w.size))                  # this rank's candidates, all rows (weighted)
        for b in tile.designs:
            cols = self.cols(b)
            inside = (cand[here] >= cols.start) & (cand[here] < cols.stop)
            if inside.any():
                full[inside] = tile.designs[b].take(cand[here][inside] - cols.start)
        stacked = gather_rows(full[:, rows], np.bincount(owner, minlength=g.group_comm.Get_size()), g.group_comm)
        delta = None
        if g.leader:
            sub_design = np.empty((width, rows.size))
            sub_design[np.argsort(owner, kind="stable")] = stacked     # rank order -> candidate order
            z = ks.polish_solve(sub_design, r_w[rows], x_k[cand], method=knobs.nnls_solver,
                                max_iter=knobs.nnls_max_iter)
            delta = z - x_k[cand]
            counts["polish_calls"] += 1
            self.maxima["polish_cols_max"] = max(self.maxima["polish_cols_max"], width)
            self.maxima["polish_rows_max"] = max(self.maxima["polish_rows_max"], rows.size)
        delta = bcast_array(delta, g.group_comm)
        dr = allreduce_sum(delta[here] @ full, g.group_comm)
        ratio = float(np.linalg.norm(r_w - dr)) / r_norm
        accepted = ratio < min(knobs.nnls_min_improve, 1.0)     # never let the tile's RMSE rise
        if g.leader:
            counts["polish_accepts"] += accepted
        return (cand, delta, dr) if accepted else None

    # --- one round of all groups --------------------------------------------------------------
    def round(self, x: np.ndarray, tiles: list, polish_enabled: bool, omega: float = 1.0,
              probes: np.ndarray | None = None) -> tuple[np.ndarray, list]:
        """One round: every group steps on its tile, updates combine.  Collective over comm.

        Parameters
        ----------
        x : (N,) float64; tiles : (G,) tile index per group, None where a group has none
        omega : float, relaxation ω of the epoch guard: the learning rate and the polish's move are
            scaled by it (before the trust region, the cap and the backtracking, which then bind less)
        probes : (k, N) float64 or None, iterates whose objective is measured (:meth:`residual`)

        Returns
        -------
        x_new : (N,) float64; records : list of (group, tile, rmse_before, rmse_after, r2_after, sum_w)
        """
        g = self.grid
        tile = tiles[g.group]
        watched = ("sanitised_A", "sanitised_R", "frozen_columns")
        before = [self.counts[k] for k in watched]
        held = self.tiles.read(tile)
        dx_g, local = np.zeros_like(x), None
        if held is not None:
            r_w = self.residual(held, x, probes)
            self.group_tiles += 1
            polish_now = polish_enabled and self.group_tiles % self.knobs.nnls_every == 0
            dx_g, r_new = self.group_step(held, r_w, x, polish_now, omega)
            local = (held, r_w, r_new)
            if self.knobs.debug_safe:
                found = allreduce_sum(np.array([self.counts[k] for k in watched]) - before, g.group_comm)
                if g.leader:
                    _LOG.info("debug-safe tile %d: sanitised %d A values and %d residuals, %d frozen columns",
                              tile, *(int(v) for v in found))
        if g.n_groups == 1:
            held, r_w, r_new = local
            r2, r2_new = float(r_w @ r_w), float(r_new @ r_new)
            x_new = x + dx_g
            records = [(0, tiles[0], r2, r2_new, held.sum_w)]
        else:
            x_new, records = self._combine(x, dx_g, local, tiles)
        if self.cfg.project_nonneg:
            np.maximum(x_new, 0.0, out=x_new)
        if self.orbit.strict:
            x_new = ks.strict_totals(x_new.reshape(-1, self.P), self.orbit.targets, self.orbit.totals).reshape(-1)
        elif self.targets is not None and self.eta > 0:
            x_new = ks.ratio_step(x_new.reshape(-1, self.P), self.targets, self.eta).reshape(-1)
        out = [(grp, t, ks.weighted_rmse(r2, sw), ks.weighted_rmse(r2n, sw), r2n, sw)
               for grp, t, r2, r2n, sw in records]
        return x_new, out

    def _combine(self, x, dx_g, local, tiles):
        """β-averaged sum of the groups' updates with round-level backtracking.  Collective over comm."""
        g, G = self.grid, self.grid.n_groups
        slots = np.zeros((G, x.size))
        if g.leader and local is not None:
            slots[g.group] = dx_g
        slots = allreduce_sum(slots, g.comm)               # one contributor per row: exact
        dx_round = np.zeros_like(x)
        for row in slots:                                  # group order: the same on every rank
            dx_round += row
        vals = np.zeros((G, 4))
        if local is not None:
            held, r_w, _ = local
            dr = self.apply(held, dx_round[None, :])[0]
            if g.leader:
                vals[g.group] = (float(r_w @ r_w), float(r_w @ dr), float(dr @ dr), held.sum_w)
        vals = allreduce_sum(vals, g.comm)
        p, q = float(np.sum(vals[:, 1])), float(np.sum(vals[:, 2]))
        beta, shrinks = ks.backtrack(p, q, steps=self.knobs.tile_bt_steps, factor=self.knobs.tile_bt_factor,
                                     alpha0=1.0 / sum(t is not None for t in tiles))
        if g.comm.Get_rank() == 0:
            self.counts["round_bt_shrinks"] += shrinks
            self.counts["rounds_rejected"] += beta == 0.0
        records = [(grp, tiles[grp], r2, r2 - 2 * beta * pp + beta * beta * qq, sw)
                   for grp, (r2, pp, qq, sw) in enumerate(vals) if tiles[grp] is not None]
        return x + beta * dx_round, records

    # --- objective pass -----------------------------------------------------------------------
    def objective(self, xs: np.ndarray, order: list) -> np.ndarray:
        """``½ Σ w r²`` over the whole cube for each row of ``xs (k, N)``, in float64.  Collective over comm."""
        g = self.grid
        total = np.zeros(xs.shape[0])
        for r in range(-(-len(order) // g.n_groups)):
            i = r * g.n_groups + g.group
            held = self.tiles.read(order[i] if i < len(order) else None, count=False)
            if held is None:
                continue
            resid = held.y_w[None, :] - self.apply(held, xs, precise=True)
            if g.leader:
                total += 0.5 * np.einsum("ij,ij->i", resid, resid)
        return allreduce_sum(total if g.leader else np.zeros_like(total), g.comm)


# ---------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------
@keyword_checked
def solve_kaczmarz(path, *, epochs: int = 6, lr: float = 0.6, project_nonneg: bool = True,
                   orbit_weights=None, orbit_strength: float | None = None, orbit_mode: str = DEFAULT_ORBIT_MODE,
                   orbit_totals: str = DEFAULT_ORBIT_TOTALS, warm_start: str = "zeros",
                   x0=None, tracker=None, comm=None, knobs=None, c_bands: int | None = None,
                   decorrelate: float = 0.0, use_weights: bool = True, operator: str = "auto",
                   norm_mode: str | None = None, amp_mode: str | None = None) -> tuple[np.ndarray, dict]:
    """The spec's batched Kaczmarz solve of ``path``; writes ``/X_global``.  Collective over comm.

    Parameters
    ----------
    path : str, a cube file with a complete ``/HyperCube/models`` and ``/DataCube``
    epochs : int, passes over all S-tiles
    lr : float, base learning rate of the preconditioned step
    project_nonneg : bool, keep x ≥ 0 (False also disables the NNLS polish)
    orbit_weights : (C,) array, dataset "/...", .npy/.txt file or "a,b,c"; component-total targets
    orbit_strength : float in [0, 1], penalty mode: fraction of the way to the targets per tile
        (default 0.1)
    orbit_mode : "auto" | "strict" | "penalty"; strict rescales every component block to its
        target after every tile (exact); auto: penalty when ``orbit_strength`` is given, else strict
    orbit_totals : "fractions" | "absolute", strict targets as fractions of Σx or as totals
    warm_start : "zeros" | "exact" | "resume" | "jacobi" | (N,) array
    x0 : (N,) array, optional; overrides ``warm_start``
    tracker : object with ``log_rmse``, ``progress``, ``snapshot`` (rank 0 calls it), or None
    comm : MPI communicator, default ``MPI.COMM_WORLD``
    knobs : :class:`~cubefit_mpi.config.knobs.Knobs`, default :func:`~cubefit_mpi.config.knobs.get_knobs`
    c_bands : int, logical c-bands (default ``min(ranks, C)``)
    decorrelate : float in [0, 1], η of the de-correlation nudge (0 = off)
    use_weights : bool, use the λ-weights (also off when ``CUBEFIT_LAMBDA_WEIGHTS_ENABLE=0``)
    operator : "auto" | "factored" | "hypercube", where the tiles come from (factored: made by
        GEMM from the factors, no hypercube needed; auto reads a usable stored hypercube, else
        uses the factors; see :mod:`cubefit_mpi.operators.select`)
    norm_mode, amp_mode : the normalisation of factored models of a file without a hypercube

    Returns
    -------
    x : (C·P,) float64, row-major over (C, P)
    stats : dict (see ``docs/kaczmarz.md``)
    """
    from ..exact import gram_budget_bytes
    from ..gram import load_solve_inputs

    comm = get_comm(comm)
    t0 = time.perf_counter()
    knobs = get_knobs() if knobs is None else knobs
    rank0 = comm.Get_rank() == 0
    inputs = load_solve_inputs(path, use_weights=use_weights and knobs.lambda_weights_enable, operator=operator,
                               norm_mode=norm_mode, amp_mode=amp_mode, prefer_stored=True, comm=comm)
    inputs.s_tiles = inputs.operator.step_tiles
    C, P, n = inputs.C, inputs.P, inputs.n_params
    check_options(epochs, lr, c_bands, C, orbit_strength, decorrelate)
    if not inputs.mask.any():
        raise InputError(f"{lay.MASK}: every pixel is masked; nothing to fit")
    orbit = orbit_spec(orbit_weights, C, path, mode=orbit_mode, totals=orbit_totals, strength=orbit_strength)
    targets = orbit.targets if orbit.mode == "penalty" else None
    require_free_space(path, solution_bytes(n), "kaczmarz (/X_global and its fit-tracker sidecar)", comm)
    eta = 0.0 if targets is None else (DEFAULT_ORBIT_STRENGTH if orbit_strength is None else float(orbit_strength))
    if targets is not None and eta == 0.0 and rank0:
        _LOG.warning("orbit weights given with orbit_strength=0: no ratio step is made")
    if inputs.weights is not None and rank0:
        from ...numerics.lambda_weights import weights_banner

        _LOG.info(weights_banner(inputs.weights, inputs.mask))
    x, start = initial_x(path, inputs, warm_start, x0, comm, knobs.eps)
    if project_nonneg:
        x = np.maximum(x, 0.0)
    if orbit.strict:
        x = ks.strict_totals(x.reshape(C, P), orbit.targets, orbit.totals).reshape(-1)
    x_ref = read_x_global(path, n, comm, require_exact=False, provenance=inputs.provenance)
    gram = GramObjective.load(inputs, comm, gram_budget_bytes(comm)) if knobs.epoch_guard else None
    guard = EpochGuard(int(epochs), enabled=knobs.epoch_guard, damp=knobs.epoch_damp)
    cfg = ks.StepConfig.from_knobs(knobs, lr=lr, decorrelate=decorrelate, project_nonneg=project_nonneg, block=P)
    grid = Grid.make(comm, C, c_bands)
    polish_enabled = knobs.nnls_enable and project_nonneg and knobs.nnls_prop_per_band > 0
    history = {k: [] for k in ("epoch", "round", "tile", "group", "rmse_before", "rmse", "sum_w")}
    try:
        col_energy = _column_energy(path, inputs, comm)
        with open_h5(path, "r", comm) as f, matvec_blas_threads(knobs.blas_threads):
            data_w, weighted_norms, y_norm = load_data(f, inputs, comm)
            order = sorted(range(len(inputs.s_tiles)), key=lambda t: (-weighted_norms[t], t))
            run = _Run(f, inputs, grid, knobs, cfg, col_energy, data_w, y_norm, targets, eta, orbit)
            if rank0:
                _LOG.info("kaczmarz: N=%d (C=%d, P=%d), %d S-tiles, %d S-group(s) x %d c-band(s) on %d rank(s), "
                          "%d epoch(s), lr=%g, start=%s, knobs %s", n, C, P, len(order), grid.n_groups,
                          len(grid.bands), comm.Get_size(), epochs, lr, start, knobs.differing_from_defaults())
            run.tiles.plan(order, int(epochs))
            try:
                out = run_epochs(run, x, x_ref, order, int(epochs), polish_enabled, history, tracker, guard=guard,
                                 gram=gram, f_zero=0.5 * float(np.sum(weighted_norms)))
            finally:
                run.tiles.close()
    finally:
        grid.free()
    x = out.x
    stats = _finish_stats(run, comm, history, out, guard, weighted_norms, x_ref, C, P)
    stats.update(method="kaczmarz", operator=inputs.operator.kind, epochs=int(epochs), lr=float(lr), n_params=n,
                 c_bands=len(grid.bands), s_groups=grid.n_groups, n_ranks=comm.Get_size(), warm_start=start,
                 orbit_strength=eta, orbit_mode=orbit.mode, orbit_totals=orbit.totals,
                 decorrelate=float(decorrelate), seconds=time.perf_counter() - t0,
                 objective_source="off" if not guard.enabled else ("gram" if gram is not None else "probe"),
                 read_ahead=run.tiles.threaded)
    write_solution(path, x, stats, knobs, comm, provenance=inputs.provenance)
    if rank0:
        _LOG.info("kaczmarz done: objective %.10g (1/2 chi2) of %s, %d tile steps, polish %d/%d accepted%s, %.1fs",
                  stats["objective"], _returned(stats), stats["tiles"], stats["polish_accepts"], stats["polish_calls"],
                  "" if "gap_rel" not in stats else f", gap to the exact optimum {stats['gap_rel']:.3g} "
                  f"(relative to the decrease from x=0)", stats["seconds"])
    return x, stats


def _returned(stats: dict) -> str:
    """Which iterate was returned, in words.  Local."""
    if stats["objective_source"] == "off":
        return "the last iterate (epoch guard off)"
    which = "the start" if stats["returned_epoch"] == 0 else f"epoch {stats['returned_epoch']}"
    source = {"gram": "the Gram cache", "probe": "the next epoch's reads"}[stats["objective_source"]]
    return (f"{which} (the best of {stats['epochs_run']} epoch(s); {stats['epochs_rejected']} raised 1/2 chi2 and "
            f"were undone; objectives from {source})")


def _column_energy(path, inputs, comm) -> np.ndarray:
    """``E[c, p] = Σ_{s, λ∈mask} A²``: ``/HyperCube/col_energy`` for the hypercube, from the factors
    otherwise.  Collective over comm."""
    C, P = inputs.C, inputs.P
    if inputs.operator.kind == "factored":
        return inputs.operator.column_energy(inputs.mask, comm)
    with open_h5(path, "r", comm) as f:
        if lay.COL_ENERGY not in f or f[lay.COL_ENERGY].shape != (C, P):
            raise InputError(f"{lay.COL_ENERGY}: expected a ({C}, {P}) dataset; rebuild it with "
                             f"`cubefit_mpi energy {path}`")
        if bool(f[lay.COL_ENERGY].attrs.get(ENERGY_STALE, False)):
            raise InputError(f"{lay.COL_ENERGY}: stale (the models changed since it was computed); "
                             f"recompute it with `cubefit_mpi energy {path}`")
        return np.nan_to_num(np.asarray(f[lay.COL_ENERGY][...], dtype=np.float64))


def _finish_stats(run: _Run, comm, history, out, guard, weighted_norms, x_ref, C, P) -> dict:
    """Reduce the counters and assemble the stats dict.  Collective over comm."""
    x = out.x
    totals = allreduce_sum(np.array([run.counts.get(k, 0.0) for k in COUNTERS]), comm)
    stats = {k: int(v) for k, v in zip(COUNTERS, totals)}
    for key in ("trust_ratio_max", "cap_ratio_max", "frozen_max", "polish_cols_max", "polish_rows_max"):
        stats[key] = comm.allreduce(float(run.maxima.get(key, 0.0)), op=mpi().MAX)
    stats["accepted_steps"] = stats["tiles"] - stats["tile_rejected"]
    stats["rejected_steps"] = stats["tile_rejected"]
    for key, values in history.items():          # one entry per tile step, in order
        name = {"rmse": "rmse_history", "rmse_before": "rmse_before", "sum_w": "history_sum_w"}.get(
            key, f"history_{key}s")
        stats[name] = np.asarray(values, dtype=np.float64 if key.startswith(("rmse", "sum")) else np.int64)
    stats["objective"] = out.objective
    stats["chi2"] = 2.0 * out.objective
    stats["objective_zero"] = 0.5 * float(np.sum(weighted_norms))
    stats["component_totals"] = x.reshape(C, P).sum(axis=1)
    stats.update(epoch_objective=guard.values[:out.epochs_run + 1].copy(), returned_epoch=out.returned_epoch,
                 epochs_run=out.epochs_run, epochs_rejected=len(guard.rejected),
                 rejected_epochs=np.asarray(guard.rejected, dtype=np.int64), epoch_damping=np.asarray(out.damping),
                 epoch_seconds=np.asarray(out.epoch_seconds), tracking_seconds=np.asarray(out.tracking_seconds))
    if x_ref is not None:
        f_ref, f0 = out.f_ref, stats["objective_zero"]
        stats["epoch_gap_rel"] = guard.gaps(f0, f_ref)[:out.epochs_run + 1]
        stats["exact_objective"] = f_ref
        stats["gap_abs"] = stats["objective"] - f_ref
        stats["gap_rel"] = stats["gap_abs"] / (f0 - f_ref) if f0 > f_ref else 0.0
        stats["x_distance_rel"] = float(np.linalg.norm(x - x_ref) / max(np.linalg.norm(x_ref), 1e-300))
    return stats
