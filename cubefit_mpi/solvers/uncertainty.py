"""Bootstrap uncertainties of the exact fit (``cubefit_mpi uncertainty``, ``solve --bootstrap N``).

A replicate changes only the data (:mod:`cubefit_mpi.numerics.bootstrap`): ``b* = G x̂ + Aᵀ W e*``.
So the fit's normal equations (from the ``/Solve`` cache, or one pass) and its quadratic terms
are reused; every rank gets the regularised G once (broadcast).  Replicates go in batches:

1. one collective pass over the S-tiles computes ``Aᵀ W e*`` of every replicate of the batch
   (the operator's adjoint: a GEMM per tile; ``e*`` drawn by each rank for its own spaxels);
2. the batch's replicates are dealt to the ranks (replicate ``r`` to rank ``r mod size``), each
   one NNLS warm-started from x̂ on rank-local data;
3. their rows of ``/Uncertainty/replicates (R, N) float32`` and their done flags are written
   (rows, flush, then flags): a killed run keeps every finished batch and continues.

Draws are keyed by ``(seed, replicate, spaxel)``: the replicates do not depend on the number
of ranks.  The summary (per-weight mean, std, 16/50/84 percentiles; component totals and, when
the population grid is known, the light-weighted mean log age and [M/H] per component, each
with its spread) is written under ``/Uncertainty`` at the end.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ..config.errors import ConsistencyError, InputError
from ..config.options import check_number, keyword_checked
from ..io import layout as lay
from ..io.blocks import read_block, write_block
from ..io.datasets import allocated_now, staged_datasets
from ..io.h5file import open_h5
from ..io.space import dataset_bytes, file_size, require_free_space, reserved_flush
from ..numerics import bootstrap as bs
from ..numerics.digest import array_digest
from ..numerics.regularization import Regularization
from ..parallel.collectives import agree, allreduce_sum, bcast_array, raise_if_any
from ..parallel.comm import get_comm
from ..parallel.decomposition import padded_schedule
from .exact import ORBIT_MASSES, ORBIT_WEIGHTS, gram_system, population_shape
from .orbit import OrbitSpec, strict_nnls
from .gram import load_solve_inputs
from .polynomials import check_degrees
from .root_nnls import check_nnls_memory, exact_nnls

_LOG = logging.getLogger("cubefit_mpi.uncertainty")
GROUP, REPLICATES, DONE = lay.UNCERTAINTY, lay.UNCERTAINTY_REPLICATES, lay.UNCERTAINTY_DONE
STAT_NAMES = ("mean", "std", "p16", "p50", "p84")
BATCH = 32
DONE_CHUNK = 1024


@keyword_checked
def bootstrap_uncertainty(path: str, *, replicates: int = 100, method: str = "wild", seed: int = 0,
                          block: str = "spaxel", batch: int = BATCH, comm=None) -> dict:
    """Bootstrap replicates of the exact fit in ``path``; writes ``/Uncertainty``.  Collective over comm.

    Parameters
    ----------
    path : str, a file with an exact ``/X_global`` (``cubefit_mpi solve``)
    replicates : int, how many (a rerun with more extends a finished run; the first ones are the same)
    method : {"wild", "residual", "parametric"} (parametric needs ``/DataVar``)
    seed : int
    block : {"spaxel", "pixel"}, the wild bootstrap's signs per spectrum or per pixel
    batch : int, replicates per pass over the S-tiles (at least one per rank)

    Returns
    -------
    dict with ``replicates`` (finished ones, the statistics' sample), ``computed`` (this run), ``seconds``
    (all), ``seconds_per_replicate`` (the batches' wall time: passes, NNLS, writes, per replicate
    computed), ``pass_seconds`` and ``solve_seconds`` (rank 0's share), ``summary`` (component
    totals: mean, std).
    """
    comm = get_comm(comm)
    t0 = time.perf_counter()
    replicates = int(check_number("--replicates", replicates, minimum=1, integer=True))
    batch = max(int(check_number("--batch", batch, minimum=1, integer=True)), comm.Get_size())
    seed = int(check_number("--seed", seed, minimum=0, integer=True))
    if method not in bs.METHODS:
        raise InputError(f"--method {method}: expected one of {', '.join(bs.METHODS)}")
    if block not in bs.BLOCKS:
        raise InputError(f"--block {block}: expected one of {', '.join(bs.BLOCKS)}")
    fit = _read_fit(path, method, comm)
    inputs = load_solve_inputs(path, use_weights=fit["use_weights"], operator=fit["operator"],
                               norm_mode=fit["norm_mode"] or None, amp_mode=fit["amp_mode"] or None, comm=comm)
    reg = Regularization.build(inputs.C, inputs.P, ridge=fit["ridge"], regul=fit["regul"],
                               regul_order=fit["regul_order"], pop_shape=population_shape(path, inputs.P, comm),
                               orbit_targets=fit["orbit_targets"], orbit_strength=fit["orbit_strength"])
    check_nnls_memory(inputs.n_params, comm, every_rank=True)   # every rank solves replicates
    system = gram_system(inputs, use_cache=True, comm=comm)
    x_hat = fit["x"]
    total = g_hat = None
    if comm.Get_rank() == 0:
        g_hat = system["gram"] @ x_hat                    # Aᵀ W ŷ (the unregularised G)
        total = system["gram"] + reg.dense() if reg.active else system["gram"]
    total, g_hat = bcast_array(total, comm), bcast_array(g_hat, comm)
    params = {"method": method, "seed": seed, "block": block, "x.digest": array_digest(x_hat),
              "operator": inputs.operator.kind, "regul": fit["regul"], "ridge": fit["ridge"]}
    pending = _prepare(path, inputs.n_params, replicates, params, comm)
    residual, variance, used, mine = _residuals(path, inputs, x_hat, method, comm)
    spectrum_rows = (_spectrum_rows(path, inputs, residual, mine, comm)
                     if (method, block) == ("wild", "spaxel") and pending else None)
    t_pass = t_solve = 0.0
    t_loop = time.perf_counter()
    for start in range(0, len(pending), batch):
        todo = pending[start:start + batch]
        t1 = time.perf_counter()
        if spectrum_rows is not None:                 # wild, one sign per spectrum: Σ_s ε_s u_s
            delta = np.zeros((len(todo), inputs.n_params))
            for t, u in spectrum_rows.items():
                delta += bs.wild_signs(seed, todo, t[0], t[1] - t[0]) @ u
            delta = allreduce_sum(delta, comm)
        else:
            delta = _adjoint_pass(path, inputs, todo, residual, variance, used, mine, method, seed, block, comm)
        t2 = time.perf_counter()
        rows, error = {}, None
        try:
            for j, r in enumerate(todo):
                if j % comm.Get_size() == comm.Get_rank():
                    rows[r] = _replicate_solve(total, g_hat + delta[j], x_hat, fit["orbit"], inputs.P, reg)
        except (InputError, ConsistencyError) as exc:
            error = exc
        raise_if_any(error, comm)
        t_solve += time.perf_counter() - t2
        t_pass += t2 - t1
        _write_rows(path, rows, todo, comm)
        _LOG.info("bootstrap: %d/%d replicates", min(start + batch, len(pending)), len(pending))
    t_loop = time.perf_counter() - t_loop
    summary, finished = _summarise(path, inputs, comm)
    seconds = time.perf_counter() - t0
    done = len(pending)
    _LOG.info("bootstrap %s: %d replicates (%d computed now, %s, seed %d), %.1fs; component totals %s +- %s",
              path, finished, done, method, seed, seconds, np.array2string(summary["mean"], precision=5),
              np.array2string(summary["std"], precision=5))
    return {"replicates": finished, "computed": done, "seconds": seconds,
            "seconds_per_replicate": t_loop / done if done else 0.0, "pass_seconds": t_pass,
            "solve_seconds": t_solve, "summary": summary}


def bootstrap_is_current(f) -> bool:
    """The file's ``/Uncertainty`` was made for its current ``/X_global`` (a later solve makes it
    stale until the next ``uncertainty`` run).  Local (an open file)."""
    if REPLICATES not in f or lay.X_GLOBAL not in f:
        return False
    x = np.asarray(f[lay.X_GLOBAL][...], dtype=np.float64)
    return str(f[REPLICATES].attrs.get("x.digest", "")) == array_digest(x)


def refuse_polynomials(add_degree, mult_degree, where: str) -> None:
    """Raise :class:`InputError` for a fit with polynomials (``where``: what says so).  Local.

    A replicate is one NNLS on the plain fit's normal equations with the data changed; a fit
    with additive or multiplicative polynomials would need them refitted in every replicate
    (the projection, the alternation), which the bootstrap does not do.
    """
    add, mult = check_degrees(add_degree, mult_degree)
    if add >= 0 or mult > 0:
        raise InputError(f"{where}: the fit has polynomials (--add-degree {add}, --mult-degree {mult}); the "
                         f"bootstrap refits only x on the plain normal equations, not the polynomials: bootstrap "
                         f"a fit without --add-degree/--mult-degree")


def _read_fit(path: str, method: str, comm) -> dict:
    """x̂ and the settings of the exact fit (``/X_global``, ``/Solve`` attributes); refuses a file
    the bootstrap cannot use before anything is written.  Collective."""
    with open_h5(path, "r", comm) as f:
        if method == "parametric" and lay.DATA_VAR not in f:
            raise InputError(f"{lay.DATA_VAR}: dataset missing from {path}; --method parametric needs the data "
                             f"variance (written by `cubefit_mpi ingest` from the cube's STAT extension)")
        if lay.X_GLOBAL not in f or lay.SOLVE not in f:
            raise InputError(f"{lay.X_GLOBAL}: no exact fit in {path}; run `cubefit_mpi solve {path}` first")
        if str(f[lay.X_GLOBAL].attrs.get("method", "")) != "exact":
            raise InputError(f"{lay.X_GLOBAL}: made by {f[lay.X_GLOBAL].attrs.get('method', '?')}; the bootstrap "
                             f"reuses an exact fit's normal equations: run `cubefit_mpi solve {path}` first")
        refuse_polynomials(int(f[lay.X_GLOBAL].attrs.get("add_degree", -1)),
                           int(f[lay.X_GLOBAL].attrs.get("mult_degree", 0)), lay.X_GLOBAL)
        a = dict(f[lay.SOLVE].attrs)
        fit = {"x": np.asarray(f[lay.X_GLOBAL][...], dtype=np.float64),
               "ridge": float(a.get("ridge", 0.0)), "regul": float(a.get("regul", 0.0)),
               "regul_order": int(a.get("regul_order", 2)), "orbit_strength": float(a.get("orbit_strength", 0.0)),
               "use_weights": bool(a.get("use_weights", True)), "operator": str(a.get("operator", "auto")),
               "norm_mode": str(a.get("norm_mode", "")), "amp_mode": str(a.get("amp_mode", "")),
               "orbit_targets": np.asarray(f[ORBIT_WEIGHTS][...]) if ORBIT_WEIGHTS in f else None}
        mode = str(a.get("orbit_mode", "penalty"))
        totals = str(a.get("orbit_totals", "fractions"))
        if mode == "strict" and totals == "absolute":
            fit["orbit_targets"] = np.asarray(f[ORBIT_MASSES][...])
    strict = mode == "strict" and fit["orbit_targets"] is not None
    fit["orbit"] = OrbitSpec("strict", totals, fit["orbit_targets"], None) if strict else None
    if strict or fit["orbit_targets"] is None or fit["orbit_strength"] == 0.0:
        fit["orbit_targets"], fit["orbit_strength"] = None, 0.0        # no penalty term
    return fit


def _replicate_solve(total, rhs, x_hat, orbit: OrbitSpec | None, n_pop: int, reg) -> np.ndarray:
    """One replicate's NNLS (:func:`.root_nnls.exact_nnls`), warm-started from x̂; under the fit's
    strict orbit constraints when it had them.  Local."""
    if orbit is None:
        return exact_nnls(total, rhs, reg, x0=x_hat).result.x
    return strict_nnls(total, rhs, orbit, n_pop, x0=x_hat,
                       solver=lambda g, b, *, tol, x0: exact_nnls(g, b, reg, tol=tol, x0=x0).result)[0]


def _prepare(path: str, n: int, replicates: int, params: dict, comm) -> list:
    """Create (or keep, or extend) ``/Uncertainty/replicates`` and its flags; the pending indices.  Collective.

    The free space for the new rows is checked first (exit 2), and their bytes (allocated when
    created or extended) are reserved before the flush that records them
    (:func:`~cubefit_mpi.io.space.reserved_flush`): a full disk costs this run's rows only.
    """
    with open_h5(path, "r", comm) as f:
        same = _same_run(f, params)
        have = int(f[REPLICATES].shape[0]) if same else 0
    require_free_space(path, dataset_bytes((max(replicates - have, 0), n), "f4") + max(replicates - have, 0),
                       f"bootstrap replicates ({GROUP})", comm)
    start = agree(file_size(path) if comm.Get_rank() == 0 else None, comm)
    with open_h5(path, "r+", comm) as f:
        same = _same_run(f, params)
        if not same:
            if GROUP in f:
                del f[GROUP]
            # allocated when created or extended: a serial run's file is extended by a parallel one
            f.create_dataset(REPLICATES, shape=(replicates, n), maxshape=(None, n), dtype="f4",
                             chunks=(1, n), fillvalue=np.nan, dcpl=allocated_now())
            f.create_dataset(DONE, shape=(replicates,), maxshape=(None,), dtype="u1", chunks=(DONE_CHUNK,),
                             fillvalue=0, dcpl=allocated_now())
            for k, v in params.items():
                f[REPLICATES].attrs[k] = v
        elif f[REPLICATES].shape[0] < replicates:
            f[REPLICATES].resize(replicates, axis=0)
            f[DONE].resize(replicates, axis=0)
        done = np.asarray(f[DONE][...], dtype=bool)
        reserved_flush(f, f"bootstrap replicates ({GROUP})", comm, start, [f[REPLICATES], f[DONE]])
    return [int(r) for r in np.flatnonzero(~done[:replicates])]


def _same_run(f, params: dict) -> bool:
    """``/Uncertainty/replicates`` exists and was drawn with ``params``.  Local."""
    return REPLICATES in f and all(str(f[REPLICATES].attrs.get(k)) == str(v) for k, v in params.items())


def _residuals(path: str, inputs, x_hat: np.ndarray, method: str, comm):
    """This rank's S-tiles with their residuals ``y − A x̂`` (and ``/DataVar`` rows).  Collective."""
    mine = inputs.operator.my_tiles(comm)
    x_cp = x_hat.reshape(inputs.C, inputs.P)
    residual, variance = {}, {}
    with open_h5(path, "r", comm) as f:
        blocks = inputs.operator.read_blocks(x_cp)
        used = None
        for tile in padded_schedule(mine, comm):
            model = inputs.operator.spectra(f, tile, x_cp, blocks=blocks)
            y = read_block(f[lay.DATACUBE], None if tile is None else (tile[0], 0),
                           None if tile is None else (tile[1] - tile[0], inputs.L), np.float64)
            var = None
            if method == "parametric":
                var = read_block(f[lay.DATA_VAR], None if tile is None else (tile[0], 0),
                                 None if tile is None else (tile[1] - tile[0], inputs.L), np.float64)
            if tile is not None:
                residual[tile] = np.where(np.isfinite(y), y - model, 0.0)
                variance[tile] = var
        used = inputs.mask
    return residual, variance, used, mine


def _spectrum_rows(path: str, inputs, residual: dict, mine, comm) -> dict:
    """``u_s = A_sᵀ W r_s`` ``(n, N)`` for each S-tile of this rank: with one wild sign per spectrum a
    replicate's ``Aᵀ W e*`` is ``Σ_s ε_s u_s``, so one pass serves every replicate (memory: this
    rank's spectra × N doubles).  Collective."""
    weighting = inputs.weighting
    idx, w = weighting.used, weighting.sqrt_w ** 2
    rows = {}
    with open_h5(path, "r", comm) as f:
        for tile in padded_schedule(mine, comm):
            vectors = None if tile is None else (residual[tile][:, idx] * w)[:, :, None]
            out = inputs.operator.products(f, tile, idx, vectors)
            if tile is not None:
                rows[tile] = out[:, :, 0]
    return rows


def _adjoint_pass(path, inputs, todo, residual, variance, used, mine, method, seed, block, comm) -> np.ndarray:
    """``Aᵀ W e*`` ``(len(todo), N)`` of the batch's replicates, summed over ranks.  Collective."""
    weighting = inputs.weighting
    sqrt_w, idx = weighting.sqrt_w, weighting.used
    out = np.zeros((len(todo), inputs.n_params))
    with open_h5(path, "r", comm) as f:
        for tile in padded_schedule(mine, comm):
            v_w = None
            if tile is not None:
                n = tile[1] - tile[0]
                v_w = np.empty((n, idx.size, len(todo)))
                for j, r in enumerate(todo):
                    e = bs.draw_errors(method, residual[tile], used, seed=seed, replicate=r, first=tile[0],
                                       block=block, variance=variance[tile])
                    v_w[:, :, j] = e[:, idx] * sqrt_w
            part = inputs.operator.adjoint(f, tile, weighting, v_w)
            if part is not None:
                out += part
    return allreduce_sum(out, comm)


def _write_rows(path: str, rows: dict, todo: list, comm) -> None:
    """The batch's rows, gathered on rank 0 and written in one collective call per run of
    consecutive replicates; a flush; then their done flags.  Collective."""
    gathered = comm.gather(rows, root=0)
    root = comm.Get_rank() == 0
    if root:
        rows = {r: x for part in gathered for r, x in part.items()}
    runs = _runs(todo)
    with open_h5(path, "r+", comm) as f:
        for first, stop in runs:
            block = np.stack([rows[r] for r in range(first, stop)]).astype(np.float32) if root else None
            write_block(f[REPLICATES], (first, 0) if root else None, block)
        reserved_flush(f, "bootstrap replicates", comm)          # rows in allocated space; the flush's room first
        for first, stop in runs:
            write_block(f[DONE], (first,) if root else None, np.ones(stop - first, np.uint8) if root else None)
        reserved_flush(f, "bootstrap replicates", comm)


def _runs(indices: list) -> list:
    """``[(first, stop)]`` of the runs of consecutive integers in the sorted ``indices``.  Local."""
    runs = []
    for r in indices:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def _summarise(path: str, inputs, comm) -> dict:
    """Statistics of the finished replicates under ``/Uncertainty`` (rank 0 reads and computes,
    staged writes).  Collective."""
    results = None
    if comm.Get_rank() == 0:
        results = _statistics(path, inputs.C, inputs.P)
    results = comm.bcast(results, root=0)
    specs = [(f"{GROUP}/{name}", values.shape, "f8") for name, values in results["arrays"].items()]
    with open_h5(path, "r+", comm) as f:
        root = comm.Get_rank() == 0
        with staged_datasets(f, specs, comm, f"the bootstrap summary ({GROUP})") as staged:   # all or none
            for name, values in results["arrays"].items():
                write_block(staged[f"{GROUP}/{name}"], (0,) * values.ndim if root else None, values if root else None)
        group = f[GROUP]
        group.attrs["n_replicates"] = results["n"]
        group.attrs["definition"] = ("replicates of the exact fit: y* = A x_hat + e* (see docs/CubeFit.md, "
                                     "'Uncertainties'); statistics over the finished replicates")
        for key in ("method", "seed", "block", "operator"):
            group.attrs[key] = f[REPLICATES].attrs[key]
    return results["totals"], results["n"]


def _statistics(path: str, n_comp: int, n_pop: int) -> dict:
    """The summary arrays of the finished replicates (one process).  Local."""
    from mpi4py import MPI

    with open_h5(path, "r", MPI.COMM_SELF) as f:
        done = np.asarray(f[DONE][...], dtype=bool)
        reps = np.asarray(f[REPLICATES][...], dtype=np.float64)[done]
        pops = {name: np.asarray(f[f"/Populations/{name}"][...], dtype=np.float64)
                for name in ("log_age", "metallicity") if f"/Populations/{name}" in f
                and f[f"/Populations/{name}"].shape == (n_pop,)}
    totals = bs.component_totals(reps, n_comp)
    arrays = {"component_totals": totals}
    groups = {"weights": bs.weight_statistics(reps), "totals": bs.weight_statistics(totals)}
    for name, values in pops.items():
        per_replicate = bs.weighted_means(reps, n_comp, values)
        arrays[f"mean_{name}"] = per_replicate
        groups[f"mean_{name}"] = dict(zip(STAT_NAMES, _nan_statistics(per_replicate)))
    for group, stats in groups.items():
        for stat in STAT_NAMES:
            arrays[f"{group}_{stat}"] = np.asarray(stats[stat], dtype=np.float64)
    return {"arrays": arrays, "totals": groups["totals"], "n": int(done.sum())}


def _nan_statistics(values: np.ndarray):
    """mean, std, 16/50/84 percentiles over replicates ignoring NaN (a component without weight)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pct = np.nanpercentile(values, bs.PERCENTILES, axis=0)
        return np.nanmean(values, axis=0), np.nanstd(values, axis=0, ddof=1), pct[0], pct[1], pct[2]
