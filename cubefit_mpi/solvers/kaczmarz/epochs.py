"""The epochs of the Kaczmarz solve: rounds over the S-tiles, the epoch guard (:mod:`.guard`) and the
final objective pass.  Stage helper of :mod:`cubefit_mpi.solvers.kaczmarz.solver` (collective over
the solver's communicator).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from . import steps as ks
from .guard import BACK, EpochGuard, GramObjective, Pending

_LOG = logging.getLogger("cubefit_mpi.solve")


@dataclass
class Outcome:
    """What :func:`run_epochs` hands back.

    Attributes
    ----------
    x : (N,) float64, the returned iterate (the best one with the guard)
    objective : float, its ½χ² by the final float64 pass
    returned_epoch : int, the epoch that produced it (0 = the start)
    epochs_run : int, epochs made
    f_ref : float or None, ½χ² of the exact solution by the final pass
    epoch_seconds : list of float, wall time of each epoch (its tracking included)
    tracking_seconds : list of float, of which the guard's own work after the rounds (the Gram
        formula, the reduction of the probe sums, copies); the probe rows inside the tile products
        are measured by ``benchmarks/kaczmarz_guard.py``
    damping : list of float, ω of each epoch
    """

    x: np.ndarray
    objective: float
    returned_epoch: int
    epochs_run: int
    f_ref: float | None
    epoch_seconds: list = field(default_factory=list)
    tracking_seconds: list = field(default_factory=list)
    damping: list = field(default_factory=list)


def run_epochs(run, x, x_ref, order: list, epochs: int, polish_enabled: bool, history: dict, tracker, *,
               guard: EpochGuard, gram: GramObjective | None, f_zero: float) -> Outcome:
    """The epochs, guarded, then the objective of the result (and of ``x_ref``).  Collective over comm.

    Parameters
    ----------
    run : the solver's ``_Run``; x : (N,) float64 start; x_ref : (N,) float64 exact solution or None
    order : tile order; epochs : int; polish_enabled : bool
    history : dict of per-tile-step lists, appended to; tracker : rank-0 tracker or None
    guard : EpochGuard (same state on every rank); gram : the Gram objective or None (probe rows)
    f_zero : float, ½χ² of x = 0
    """
    rank0 = run.grid.comm.Get_rank() == 0
    out = Outcome(x, np.nan, 0, 0, None)
    f_ref, pending = _judge_start(guard, gram, x, x_ref, f_zero)
    step = 0
    for epoch in range(1, epochs + 1):
        t_epoch = time.perf_counter()
        rows = [] if pending is None else [pending.x]
        measure_ref = guard.enabled and gram is None and x_ref is not None and f_ref is None
        if measure_ref:
            rows.append(x_ref)
        probes = np.vstack(rows) if rows else None
        run.probe_sums = np.zeros(len(rows))
        produced, epoch_rmse, step = _one_epoch(run, x, order, epoch, polish_enabled, guard.omega, probes, history,
                                                tracker, step)
        t_track = time.perf_counter()
        out.damping.append(guard.omega)
        restart, measured = False, None
        if probes is not None:
            values = run.probe_values()
            if measure_ref:
                f_ref = float(values[-1])
            if pending is not None:
                measured = pending.epoch
                restart = guard.judge(pending.epoch, pending.x, float(values[0]), pending.chain) == BACK
        if not guard.enabled:
            x, pending = produced, None
        elif gram is not None:
            measured = epoch
            restart = guard.judge(epoch, produced, float(gram(produced[None, :])[0])) == BACK
            x, pending = (guard.best_x.copy() if restart else produced), None
        elif restart:                  # the start of this epoch was worse: its result is measured next epoch
            x, pending = guard.best_x.copy(), Pending(epoch, produced.copy(), chain=False)
        else:
            x, pending = produced, Pending(epoch, produced.copy())
        out.tracking_seconds.append(time.perf_counter() - t_track)
        out.epoch_seconds.append(time.perf_counter() - t_epoch)
        out.epochs_run = epoch
        if rank0:
            if tracker is not None:
                tracker.snapshot(produced, epoch, epoch_rmse)
            _log_epoch(run, guard, epoch, epochs, epoch_rmse, measured, restart, f_zero, f_ref, out.epoch_seconds[-1])
        if guard.stalled:              # CUBEFIT_EPOCH_DAMP=0 after an undone epoch: no later epoch can move x
            if rank0:
                _LOG.info("kaczmarz: relaxation 0 after an undone epoch (CUBEFIT_EPOCH_DAMP=0): stopping after "
                          "epoch %d/%d", epoch, epochs)
            break
    candidates = _candidates(guard, pending, x, out.epochs_run)
    xs = np.vstack([c[1] for c in candidates] + ([] if x_ref is None else [x_ref]))
    values = run.objective(xs, order)
    for (epoch, _), value in zip(candidates, values):
        if np.isnan(guard.values[epoch]):
            guard.values[epoch] = value
    pick = int(np.argmin(values[:len(candidates)])) if guard.enabled else len(candidates) - 1
    out.returned_epoch, out.x = candidates[pick]
    out.objective = float(values[pick])
    out.f_ref = None if x_ref is None else float(values[-1])
    return out


def _judge_start(guard: EpochGuard, gram, x, x_ref, f_zero: float):
    """Judge the start when its objective is known now; ``(f_ref or None, Pending or None)``.  Collective."""
    if not guard.enabled:
        return None, None
    if gram is not None:
        values = gram(x[None, :] if x_ref is None else np.vstack([x, x_ref]))
        guard.judge(0, x, float(values[0]))
        return (None if x_ref is None else float(values[1])), None
    if not np.any(x):
        guard.judge(0, x, f_zero)
        return None, None
    return None, Pending(0, x.copy())


def _one_epoch(run, x, order, epoch, polish_enabled, omega, probes, history, tracker, step):
    """Every round of one epoch from ``x``; ``(x after it, tile RMSE, step)``.  Collective over comm."""
    G = run.grid.n_groups
    rank0 = run.grid.comm.Get_rank() == 0
    r2_sum = sw_sum = 0.0
    for r in range(-(-len(order) // G)):
        tiles = [order[r * G + grp] if r * G + grp < len(order) else None for grp in range(G)]
        x, records = run.round(x, tiles, polish_enabled, omega, probes)
        for grp, tile, before, after, r2n, sw in records:
            for key, val in zip(history, (epoch, r, tile, grp, before, after, sw)):
                history[key].append(val)
            r2_sum, sw_sum = r2_sum + r2n, sw_sum + sw
            step += 1
            if rank0 and tracker is not None and grp == 0:
                tracker.log_rmse(step, epoch, after)
        if rank0 and tracker is not None:
            tracker.progress(epoch, min((r + 1) * G, len(order)), len(order))
    return x, ks.weighted_rmse(r2_sum, sw_sum), step


def _candidates(guard: EpochGuard, pending, x, epochs_run: int) -> list:
    """``[(epoch, x)]`` the final pass evaluates: the best and the unmeasured last iterate (guard on),
    else the last iterate.  Local."""
    if not guard.enabled:
        return [(epochs_run, x)]
    out = [] if guard.best_x is None else [(guard.best_epoch, guard.best_x)]
    if pending is not None:
        out.append((pending.epoch, pending.x))
    return out


def _log_epoch(run, guard, epoch, epochs, epoch_rmse, measured, restart, f_zero, f_ref, seconds) -> None:
    """One INFO line per epoch (rank 0).  Local."""
    text = ""
    if measured is not None:
        value = guard.values[measured]
        which = "" if measured == epoch else f" of epoch {measured}'s iterate"
        gap = "" if f_ref is None else f" (gap {guard.gaps(f_zero, f_ref)[measured]:.3g})"
        text = (f", 1/2 chi2{which} {value:.10g}{gap}, best {guard.best_f:.10g} (epoch {guard.best_epoch})")
        if restart:
            text += f"; it rose: back to epoch {guard.best_epoch}, relaxation now {guard.omega:g}"
    _LOG.info("kaczmarz epoch %d/%d: %d tiles, tile RMSE (after steps) %.6g, polish %d/%d accepted so far%s%s, "
              "%.2fs", epoch, epochs, len(run.inp.s_tiles), epoch_rmse, run.counts["polish_accepts"], run.counts["polish_calls"],
              " in S-group 0" if run.grid.n_groups > 1 else "", text, seconds)
