"""The exact global solve: min ½‖W^½(y − A x)‖² (+ quadratic terms), x ≥ 0, to a KKT certificate.

1. One streaming pass forms G = AᵀWA, b = AᵀWy, yᵀWy (float64) per rank, reduced to rank 0,
   and cached under ``/Solve`` with provenance attributes (a stale cache is detected and rebuilt).
2. Rank 0 adds the optional quadratic terms (ridge, smoothness, orbit weights) to G in place and
   runs the exact NNLS on (G, b) (:mod:`.root_nnls`: Lawson–Hanson or block pivoting,
   ``CUBEFIT_NNLS_GRAM_METHOD``); x is broadcast.
3. The certificate is computed independently of the solver; χ² is recomputed by a separate
   residual pass over the hypercube and compared with yᵀWy − 2bᵀx + xᵀGx.

When the N×N Gram matrix does not fit (``CUBEFIT_GRAM_MAX_BYTES``, default from the node's
memory and the ranks on it), the working-set method (:mod:`.working_set`) is used instead.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ..config.errors import ConsistencyError, InputError
from ..config.knobs import get_knobs
from ..config.options import check_number, keyword_checked
from ..io import layout as lay
from ..io.blocks import write_block
from ..io.datasets import staged_bytes, staged_datasets, write_small
from ..io.h5file import open_h5
from ..io.polynomials import write_polynomials
from ..io.space import require_free_space
from ..numerics.certificate import certificate_dict
from ..numerics.regularization import Regularization
from ..parallel.collectives import bcast_array
from ..parallel.comm import get_comm
from ..parallel.comm import ranks_on_node
from .limits import gram_budget_for, node_memory_bytes
from .gram import SolveInputs, load_solve_inputs, normal_equations, residual_chi2
from .orbit import DEFAULT_ORBIT_MODE, DEFAULT_ORBIT_TOTALS, OrbitSpec, orbit_spec
from .root_nnls import check_nnls_memory, exact_nnls, solve_on_root

_LOG = logging.getLogger("cubefit_mpi.solve")
GRAM = "/Solve/gram"
RHS = "/Solve/rhs"
ORBIT_WEIGHTS = "/Solve/orbit_weights"
ORBIT_MULTIPLIERS = "/Solve/orbit_multipliers"
ORBIT_MASSES = "/Solve/orbit_masses"
COMPONENT_TOTALS = "/Solve/component_totals"
CHI2_RTOL = 1e-9


def gram_budget(ranks_on_node: int, node_memory: int | None = None) -> int:
    """Bytes one of ``ranks_on_node`` ranks may spend on an N×N Gram matrix.  Local.

    ``CUBEFIT_GRAM_MAX_BYTES`` when set; else :func:`~.limits.gram_budget_for` of ``node_memory``
    (default: this node's).
    """
    given = get_knobs().gram_max_bytes
    if given > 0:
        return given
    return gram_budget_for(node_memory_bytes() if node_memory is None else int(node_memory), ranks_on_node)


def gram_budget_bytes(comm) -> int:
    """:func:`gram_budget` for the ranks of ``comm`` on this rank's node.  Collective over comm."""
    return gram_budget(ranks_on_node(comm))


def _cache_matches(f, provenance: dict) -> bool:
    if GRAM not in f or RHS not in f:
        return False
    attrs = f[GRAM].attrs
    return all(str(attrs.get(k, "")) == str(v) for k, v in provenance.items()) and bool(attrs.get("complete", False))


def cached_gram(inputs: SolveInputs, comm=None) -> dict | None:
    """G (rank 0 only, None elsewhere), b and yᵀWy from ``/Solve`` when it holds a current, complete
    cache for these inputs (same models, data, mask and λ-weights), else None.  Collective over comm."""
    comm = get_comm(comm)
    with open_h5(inputs.path, "r", comm) as f:
        if not _cache_matches(f, inputs.provenance):
            return None
        return {"gram": np.asarray(f[GRAM][...]) if comm.Get_rank() == 0 else None,
                "rhs": np.asarray(f[RHS][...]), "yy": float(f[GRAM].attrs["yy"])}


def gram_system(inputs: SolveInputs, *, use_cache: bool = True, comm=None) -> dict:
    """(G on rank 0, b, yᵀWy, diag) from the cache when current, else one pass (then cached).  Collective."""
    comm = get_comm(comm)
    cached = cached_gram(inputs, comm) if use_cache else None
    if cached is not None:
        cached.update(pass_seconds=0.0, reduce_seconds=0.0, from_cache=True)
        cached["diag"] = comm.bcast(cached["gram"].diagonal().copy() if comm.Get_rank() == 0 else None)
        _LOG.info("Gram matrix from the cache in %s (no pass over the hypercube)", inputs.path)
        return cached
    system = normal_equations(inputs, comm)
    system["from_cache"] = False
    n = inputs.n_params
    with open_h5(inputs.path, "r+", comm) as f, \
            staged_datasets(f, [(GRAM, (n, n), "f8"), (RHS, (n,), "f8")], comm, "the Gram cache") as staged:
        root = comm.Get_rank() == 0
        write_block(staged[GRAM], (0, 0) if root else None, system["gram"] if root else None)
        write_block(staged[RHS], (0,) if root else None, system["rhs"] if root else None)
        staged[GRAM].attrs.update({**inputs.provenance, "yy": system["yy"], "complete": True})
    return system


@keyword_checked
def solve_exact(path: str, *, ridge: float | None = None, regul: float = 0.0, regul_order: int = 2,
                orbit_weights=None, orbit_strength: float | None = None, orbit_mode: str = DEFAULT_ORBIT_MODE,
                orbit_totals: str = DEFAULT_ORBIT_TOTALS, use_cache: bool = True, verify: bool = True,
                use_weights: bool = True, tol: float = 1e-10, exact_method: str = "auto", comm=None,
                operator: str = "auto", norm_mode: str | None = None, amp_mode: str | None = None,
                add_degree: int | None = None, mult_degree: int | None = None) -> tuple[np.ndarray, dict]:
    """Solve for ``/X_global`` exactly.  Collective over comm.

    Parameters
    ----------
    path : str
    ridge : float, optional  ρ of ½ρ‖x‖² (default ``CUBEFIT_NNLS_L2``)
    regul : float  λ of the smoothness term over the population grid (``/Templates`` attr ``pop_shape``)
    regul_order : {1, 2}  first or second differences
    orbit_weights : (C,) array, dataset name, file or "a,b,c"; targets of the component totals
    orbit_strength : float  μ of ½μ Σ_c (Σ_p x_cp − t_c Σ x)² (mode penalty)
    orbit_mode : {"auto", "strict", "penalty"}  strict: the totals are equality constraints,
        certified with their multipliers (``/Solve/orbit_multipliers``); auto: penalty when
        ``orbit_strength`` is given, else strict (:mod:`.orbit`)
    orbit_totals : {"fractions", "absolute"}  strict targets as fractions of Σx or as totals
    use_cache : bool  reuse a current ``/Solve`` Gram matrix
    verify : bool  recompute χ² by a separate residual pass (one more read of the hypercube)
    exact_method : {"auto", "gram", "working-set"}
    operator : {"auto", "factored", "hypercube"}  where A comes from: its two factors (no
        hypercube needed) or ``/HyperCube/models`` (:mod:`cubefit_mpi.operators.select`)
    norm_mode, amp_mode : the normalisation of factored models of a file without a hypercube
    add_degree : int, optional  additive Legendre terms up to this degree per spectrum, eliminated
        exactly (None or -1: none); stored at ``/Solve/add_poly``
    mult_degree : int, optional  multiplicative Legendre terms of degrees 1..D per spectrum (None
        or 0: none), fitted by exact alternating steps (:mod:`.polynomials`); ``/Solve/mult_poly``

    Returns
    -------
    x : (C·P,) float64, row-major over (C, P)
    stats : dict (χ², certificate, sizes, timings)
    """
    from .polynomials import check_degrees, fit_polynomials

    comm = get_comm(comm)
    t0 = time.perf_counter()
    ridge, regul = _check_terms(ridge, regul, regul_order)
    add_degree, mult_degree = check_degrees(add_degree, mult_degree)
    inputs = load_solve_inputs(path, use_weights=use_weights, operator=operator, norm_mode=norm_mode,
                               amp_mode=amp_mode, add_degree=add_degree, comm=comm)
    orbit = orbit_spec(orbit_weights, inputs.C, path, mode=orbit_mode, totals=orbit_totals, strength=orbit_strength)
    orbit_strength = _check_orbit_strength(orbit)
    if orbit.strict and (add_degree >= 0 or mult_degree > 0):
        raise InputError("--orbit-mode strict: not available with --add-degree / --mult-degree (use --orbit-mode "
                         "penalty with --orbit-strength)")
    reg = Regularization.build(inputs.C, inputs.P, ridge=ridge, regul=regul, regul_order=regul_order,
                               pop_shape=population_shape(path, inputs.P, comm),
                               orbit_targets=orbit.targets if orbit.mode == "penalty" else None,
                               orbit_strength=orbit_strength)
    if inputs.weights is not None and comm.Get_rank() == 0:
        from ..numerics.lambda_weights import weights_banner

        _LOG.info(weights_banner(inputs.weights, inputs.mask))
    method, budget = _choose_method(exact_method, inputs.n_params, comm)
    _check_space(inputs, method, orbit, use_cache, comm)
    if orbit.strict and method != "gram":
        raise InputError(f"--orbit-mode strict: needs the Gram method, but N={inputs.n_params} takes the {method} "
                         f"method (raise CUBEFIT_GRAM_MAX_BYTES to fit N x N float64, or use --orbit-mode penalty)")
    _LOG.info("exact solve of N=%d (C=%d, P=%d) by the %s method on %d rank(s)", inputs.n_params, inputs.C,
              inputs.P, method, comm.Get_size())
    x, stats = _solve(method, inputs, reg, orbit, budget=budget, tol=tol, use_cache=use_cache, comm=comm)
    stats.update(method=f"exact-{method}", operator=inputs.operator.kind, n_params=inputs.n_params,
                 n_ranks=comm.Get_size(), ridge=ridge, regul=regul, regul_order=regul_order,
                 orbit_strength=orbit_strength, orbit_mode=orbit.mode, orbit_totals=orbit.totals,
                 use_weights=bool(use_weights),
                 norm_mode=inputs.operator.norm_mode, amp_mode=inputs.operator.amp_mode)
    if verify:
        _verify(inputs, x, stats, comm)
    else:
        stats["chi2"] = stats["chi2_formula"]
    polynomials = {}
    if add_degree >= 0 or mult_degree > 0:
        x, stats, polynomials = fit_polynomials(inputs, reg, x, stats, mult_degree, _solve_on_root, method=method,
                                                tol=tol, gram_system=gram_system, comm=comm)
    stats["component_totals"] = x.reshape(inputs.C, inputs.P).sum(axis=1)
    stats["seconds"] = time.perf_counter() - t0
    _write_solution(path, x, stats, orbit, comm)
    write_polynomials(path, x, polynomials, polynomials.get("attrs"), comm)
    _log_summary(stats)
    return x, stats


def _check_terms(ridge, regul, regul_order) -> tuple[float, float]:
    """The quadratic terms' strengths, checked (ridge None = ``CUBEFIT_NNLS_L2``).  Local."""
    ridge = get_knobs().nnls_l2 if ridge is None else check_number("--ridge", ridge, minimum=0.0)
    regul = check_number("--regul", regul, minimum=0.0)
    if regul_order not in (1, 2):
        raise InputError(f"--regul-order {regul_order}: expected 1 or 2")
    return ridge, regul


def _check_orbit_strength(orbit: OrbitSpec) -> float:
    """μ of the penalty (0 unless the mode is penalty), checked.  Local."""
    strength = check_number("--orbit-strength", 0.0 if orbit.strength is None else orbit.strength, minimum=0.0)
    if orbit.mode == "penalty" and strength == 0.0:
        raise InputError("--orbit-mode penalty: the exact method needs --orbit-strength > 0 (the penalty's mu)")
    return strength


def _check_space(inputs: SolveInputs, method: str, orbit: OrbitSpec, use_cache: bool, comm) -> None:
    """Refuse before the pass when the results (and a Gram cache to write) will not fit.  Collective."""
    n, c = inputs.n_params, inputs.C
    specs = [(lay.X_GLOBAL, (n,), "f8"), (COMPONENT_TOTALS, (c,), "f8")]
    specs += [(name, (c,), "f8") for name in (ORBIT_WEIGHTS, ORBIT_MASSES, ORBIT_MULTIPLIERS)] if orbit.targets is not None else []
    with open_h5(inputs.path, "r", comm) as f:
        if method == "gram" and not (use_cache and _cache_matches(f, inputs.provenance)):
            specs += [(GRAM, (n, n), "f8"), (RHS, (n,), "f8")]
        need = staged_bytes(f, specs)
    require_free_space(inputs.path, need, "solve", comm)


def _choose_method(exact_method: str, n: int, comm) -> tuple[str, int]:
    """``gram`` when the N×N Gram matrix fits the per-rank budget, else ``working-set``.  Collective."""
    budget = gram_budget_bytes(comm)
    method = exact_method
    if method == "auto":
        method = "gram" if n * n * 8 <= budget else "working-set"
    if method not in ("gram", "working-set"):
        raise InputError(f"--exact-method {method}: expected auto, gram or working-set")
    return method, budget


def _solve(method: str, inputs: SolveInputs, reg: Regularization, orbit: OrbitSpec, *, budget: int, tol: float,
           use_cache: bool, comm) -> tuple[np.ndarray, dict]:
    """x and the solver's stats by the chosen method.  Collective over comm."""
    if method == "working-set":
        from .working_set import solve_working_set

        x, info = solve_working_set(inputs, reg, budget=budget, tol=tol, comm=comm)
        return x, dict(info)
    check_nnls_memory(inputs.n_params, comm)
    system = gram_system(inputs, use_cache=use_cache, comm=comm)
    t_solve = time.perf_counter()
    x, info = _solve_on_root(system, reg, tol, comm, orbit=orbit, n_pop=inputs.P)
    info.update(passes=0 if system["from_cache"] else 1, from_cache=system["from_cache"],
                pass_seconds=system["pass_seconds"], reduce_seconds=system["reduce_seconds"],
                solve_seconds=time.perf_counter() - t_solve, phases_by_rank=system.get("phases_by_rank", []))
    return x, dict(info)


def _verify(inputs: SolveInputs, x: np.ndarray, stats: dict, comm) -> None:
    """χ² by a separate residual pass, against ``yᵀWy − 2bᵀx + xᵀGx``.  Collective over comm.

    A disagreement beyond ``CHI2_RTOL`` (relative, with ``1e-13 yᵀWy`` absolute for near-perfect
    fits) means the cached normal equations do not belong to this file: the cache is discarded
    and :class:`~cubefit_mpi.config.errors.ConsistencyError` (exit 1) names both values.
    """
    t_v = time.perf_counter()
    chi2 = residual_chi2(inputs, x, comm)
    stats["chi2"] = chi2
    stats["chi2_rel_diff"] = abs(chi2 - stats["chi2_formula"]) / max(chi2, 1e-300)
    stats["chi2_consistent"] = bool(abs(chi2 - stats["chi2_formula"]) <= CHI2_RTOL * chi2 + 1e-13 * stats["yy"])
    stats["verify_seconds"] = time.perf_counter() - t_v
    if not stats["chi2_consistent"]:
        discard_cache(inputs.path, comm)
        raise ConsistencyError(f"{inputs.path}: the residual pass gives chi2 = {chi2:.10g} but the normal equations "
                               f"give {stats['chi2_formula']:.10g} (relative difference {stats['chi2_rel_diff']:.3g} > "
                               f"{CHI2_RTOL:g}); the Gram cache under {lay.SOLVE} was discarded and /X_global was not "
                               f"written: solve again")


def discard_cache(path: str, comm) -> None:
    """Delete the cached Gram matrix and right-hand side.  Collective over comm."""
    with open_h5(path, "r+", comm) as f:
        for name in (GRAM, RHS):
            if name in f:
                del f[name]


def population_shape(path: str, n_pop: int, comm) -> tuple:
    """The population grid ``pop_shape`` of ``/Templates`` when it fits ``n_pop``, else ``(n_pop,)``.  Collective."""
    with open_h5(path, "r", comm) as f:
        if lay.TEMPLATES in f and "pop_shape" in f[lay.TEMPLATES].attrs:
            shape = tuple(int(v) for v in f[lay.TEMPLATES].attrs["pop_shape"])
            if int(np.prod(shape)) == n_pop:
                return shape
    return (n_pop,)


def _solve_on_root(system: dict, reg: Regularization, tol: float, comm, *, orbit: OrbitSpec | None = None,
                   n_pop: int | None = None) -> tuple[np.ndarray, dict]:
    """Rank 0 solves the (regularised) system (:func:`.root_nnls.solve_on_root`; under the strict
    orbit constraints when ``orbit`` is strict); x and the summary are broadcast, an error on rank 0
    is raised on every rank.  Collective."""
    if orbit is not None and orbit.strict:
        return _strict_on_root(system, reg, orbit, n_pop, tol, comm)
    x, info = solve_on_root(system["gram"], system["rhs"], reg, tol=tol, comm=comm)
    info.update(yy=system["yy"], objective=info["objective"] + 0.5 * system["yy"],
                chi2_formula=system["yy"] - 2.0 * float(system["rhs"] @ x) + info.pop("curvature"))
    return x, info


def _strict_on_root(system: dict, reg: Regularization, orbit: OrbitSpec, n_pop: int, tol: float, comm
                    ) -> tuple[np.ndarray, dict]:
    """Rank 0's NNLS under the strict orbit constraints (:func:`.orbit.strict_nnls`, its inner NNLS the
    package's :func:`.root_nnls.exact_nnls`); x and the summary broadcast, an error raised on every
    rank.  Collective."""
    from ..parallel.collectives import raise_if_any
    from .orbit import strict_nnls

    check_nnls_memory(int(np.asarray(system["rhs"]).size), comm, gram_held=True)
    x = info = error = None
    if comm.Get_rank() == 0:
        try:
            gram, rhs = system["gram"], system["rhs"]
            total = gram + reg.dense() if reg.active else gram
            x, multipliers, cert, result = strict_nnls(
                total, rhs, orbit, n_pop, tol=tol,
                solver=lambda g, b, *, tol, x0: exact_nnls(g, b, reg, tol=tol, x0=x0).result)
            info = {"iterations": result.outer_iterations + result.finish_iterations, "converged": result.converged,
                    "active_set": int(np.count_nonzero(x > 0)), "message": result.message, "yy": system["yy"],
                    "chi2_formula": system["yy"] - 2.0 * float(rhs @ x) + float(x @ (gram @ x)),
                    "objective": 0.5 * float(x @ (total @ x)) - float(rhs @ x) + 0.5 * system["yy"],
                    "orbit_multipliers": multipliers, "orbit_constraint_residual": result.constraint_residual,
                    "orbit_outer_iterations": result.outer_iterations, **certificate_dict(cert)}
        except (InputError, ConsistencyError) as exc:
            error = exc
    raise_if_any(error, comm)
    x = bcast_array(x, comm)
    info = comm.bcast(info, root=0)
    return x, info


def _write_solution(path: str, x: np.ndarray, stats: dict, orbit: OrbitSpec, comm) -> None:
    """``/X_global``, ``/Solve`` attributes, component totals (and the orbit targets as fractions,
    their absolute values and the constraints' multipliers when used; stale ones are removed).  Collective."""
    root = comm.Get_rank() == 0
    with open_h5(path, "r+", comm) as f:
        items = [(lay.X_GLOBAL, x, {"method": "exact", "chi2": stats["chi2"], "layout": "row-major (C, P)",
                                    "add_degree": int(stats.get("poly.add_degree", -1)),
                                    "mult_degree": int(stats.get("poly.mult_degree", 0))}),
                 (COMPONENT_TOTALS, stats["component_totals"], None)]
        orbit_items = [(ORBIT_WEIGHTS, orbit.fractions),
                       (ORBIT_MASSES, orbit.targets if orbit.totals == "absolute" else None),
                       (ORBIT_MULTIPLIERS, stats.get("orbit_multipliers"))]
        items += [(name, np.asarray(values, dtype=np.float64), None) for name, values in orbit_items if values is not None]
        write_small(f, items, comm, "the solution")
        for name, values in orbit_items:                # stale targets of an earlier solve
            if values is None and name in f:
                del f[name]
        group = f.require_group(lay.SOLVE)
        for key, value in stats.items():
            if isinstance(value, (bool, np.bool_, int, float, str, np.integer, np.floating)):
                group.attrs[key] = value
        group.attrs["solved_at"] = comm.bcast(time.strftime("%Y-%m-%dT%H:%M:%S") if root else None)


def _log_summary(stats: dict) -> None:
    _LOG.info("chi2=%.10g (formula %.10g, rel diff %.2e), objective=%.10g, active set %d/%d, %d iterations",
              stats["chi2"], stats["chi2_formula"], stats.get("chi2_rel_diff", 0.0), stats["objective"],
              stats["active_set"], stats["n_params"], stats["iterations"])
    _LOG.info("KKT certificate %s: primal_min=%.3g dual_min=%.3g (tol %.3g) passive=%.3g complementarity=%.3g",
              "OK" if stats["kkt.ok"] else "NOT MET", stats["kkt.primal_min"], stats["kkt.dual_min"],
              stats["kkt.tol"], stats["kkt.passive_stationarity"], stats["kkt.complementarity"])
    _LOG.info("component totals: %s", np.array2string(np.asarray(stats["component_totals"]), precision=6))
    if stats.get("orbit_mode") == "strict":
        _LOG.info("strict orbit weights (%s): constraint residual %.3g, multipliers %s", stats["orbit_totals"],
                  stats["orbit_constraint_residual"], np.array2string(np.asarray(stats["orbit_multipliers"]),
                                                                      precision=6))
