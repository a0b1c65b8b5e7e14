"""Additive and multiplicative Legendre polynomials in the exact solve (``solve --add-degree D_a
--mult-degree D_m``, pPXF's ``degree`` and ``mdegree``).

The objective, with the model ``g_s ⊙ (A_s x) + Q a_s`` of each spectrum
(:mod:`cubefit_mpi.numerics.polynomials`)::

    F(x, m, a) = ½ Σ_s ‖√W (y_s − g_s ⊙ A_s x − Q a_s)‖² + ½ xᵀRx,   x ≥ 0,   g_s = 1 + Σ_j m_sj P_j

**Additive only.**  The a_s are eliminated exactly (the weighting's projection, the same for
every spectrum), the exact solve of x is the ordinary one on the projected normal equations,
and one pass over the spectra recovers ``a_s = (QᵀWQ)⁻¹QᵀW (y_s − A_s x)``.

**Multiplicative.**  Block-coordinate steps, each exact, from the additive-only solution (g = 1):

* **g-step** (x fixed): per spectrum a weighted linear least-squares problem in (m_s, a_s),
  in parallel over spectra (each rank its spaxels); a spectrum keeps its coefficients when the
  new ones are not better, so F never increases;
* **x-step** (g fixed): the exact NNLS on the normal equations of ``√W g_s A_s`` (projected off
  the additive span).  The plain alternation converges linearly and slowly where x and g are
  correlated (tens of iterations for 1e-6 on smooth templates), so the x-step first tries the
  **Gauss–Newton** step: the same NNLS with every spectrum's rows also projected off the
  directions ``√W P_j ⊙ A_s x`` in which its coefficients move its model (the Schur complement
  of the coupling between x and m, exact for the linearised problem); it is taken only when,
  after its g-step, F is not larger; else the plain x-step is taken (it cannot raise F).
  Quadratic convergence near the optimum: 2–4 iterations in the tests.

Stops when an iteration lowers F by less than ``REL_TOL`` relative (or not at all: the optimum
to rounding), or after ``MAX_ITERATIONS``.  The accepted objectives are computed by one
formula (:func:`~cubefit_mpi.numerics.polynomials.fit_spectra`) and never increase, by
construction.  Each iteration costs one pass for the normal equations (two when the
Gauss–Newton step is refused), one NNLS and one pass over the spectra.  The multiplicative fit
needs the Gram method (N×N within ``CUBEFIT_GRAM_MAX_BYTES``).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ..config.errors import InputError
from ..io import layout as lay
from ..io.blocks import read_block
from ..io.h5file import open_h5
from ..numerics import polynomials as pl
from ..operators.base import Weighting
from ..parallel.collectives import allreduce_sum
from ..parallel.decomposition import padded_schedule
from .gram import SolveInputs

_LOG = logging.getLogger("cubefit_mpi.solve")
MAX_ITERATIONS = 30
REL_TOL = 1e-10


def check_degrees(add_degree, mult_degree) -> tuple[int, int]:
    """``(D_a, D_m)`` with None as off (−1 and 0).  Local.  Raises :class:`InputError`."""
    add = -1 if add_degree is None else add_degree
    mult = 0 if mult_degree is None else mult_degree
    for name, value, low in (("--add-degree", add, -1), ("--mult-degree", mult, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InputError(f"{name} {value}: expected an integer >= {low} (or none)")
    return int(add), int(mult)


def spectra_pass(inputs: SolveInputs, weighting: Weighting, x: np.ndarray, *, fit_mult: bool, comm) -> dict:
    """The polynomial coefficients of every spectrum given ``x``.  Collective over comm.

    Ranks take their S-tiles of the operator (the ones its passes visit); per tile the model
    ``A x`` (:meth:`~cubefit_mpi.operators.base.Operator.spectra`) and the data are fitted by
    :func:`~cubefit_mpi.numerics.polynomials.fit_spectra` (``fit_mult``: the multiplicative
    coefficients too, from ``weighting.mult``; else those are kept).

    Returns
    -------
    dict: ``add (S, D_a+1)`` or None, ``mult (S, D_m)`` or None and ``chi2_before``, ``chi2``
    ``(S,)`` (with the given and the returned coefficients) on every rank; ``tangent (S, L_used)``:
    ``√W A_s x`` of this rank's spaxels (zero elsewhere).
    """
    op = inputs.operator
    used, sqrt_w = weighting.used, weighting.sqrt_w
    x_cp = np.asarray(x, dtype=np.float64).reshape(inputs.C, inputs.P)
    S = inputs.S
    mult_basis = weighting.mult_basis if fit_mult else None
    n_add = weighting.add_degree + 1
    sums = np.zeros((S, n_add + weighting.mult_degree + 2))          # add | mult | chi2_before | chi2
    tangent = np.zeros((S, used.size)) if fit_mult else None
    with open_h5(inputs.path, "r", comm) as f:
        blocks = op.read_blocks(x_cp)
        for tile in padded_schedule(op.my_tiles(comm), comm):
            model = op.spectra(f, tile, x_cp, blocks=blocks)
            y = read_block(f[lay.DATACUBE], None if tile is None else (tile[0], 0),
                           None if tile is None else (tile[1] - tile[0], inputs.L), np.float64)
            if tile is None:
                continue
            s0, s1 = tile
            model_w = model[:, used] * sqrt_w
            old = None if weighting.mult is None else weighting.mult[s0:s1]
            if old is not None and not fit_mult:
                model_w = model_w * weighting.factors(s0, s1)
            fit = pl.fit_spectra(model_w, y[:, used] * sqrt_w, mult_basis, weighting.additive, old)
            if n_add:
                sums[s0:s1, :n_add] = fit["add"]
            if old is not None:
                sums[s0:s1, n_add:-2] = fit["mult"] if fit_mult else old
            sums[s0:s1, -2], sums[s0:s1, -1] = fit["chi2_before"], fit["chi2"]
            if fit_mult:
                tangent[s0:s1] = model_w
    sums = allreduce_sum(sums, comm)                                   # each row from one rank
    return {"add": sums[:, :n_add] if n_add else None,
            "mult": sums[:, n_add:-2] if weighting.mult is not None else None,
            "chi2_before": sums[:, -2], "chi2": sums[:, -1], "tangent": tangent}


def fit_polynomials(inputs: SolveInputs, reg, x: np.ndarray, stats: dict, mult_degree: int, solve_system, *,
                    method: str, tol: float, comm) -> tuple[np.ndarray, dict, dict]:
    """The polynomials of a solve whose x (additive terms eliminated, g = 1) is given.  Collective over comm.

    Parameters
    ----------
    inputs : the solve's inputs (``add_degree`` set)
    reg : the quadratic terms (:class:`~cubefit_mpi.numerics.regularization.Regularization`)
    x : (N,) float64, the exact solution with g = 1; stats : its statistics (updated)
    mult_degree : int, D_m (0: additive only)
    solve_system : ``(system, reg, tol, comm) -> (x, info)``, the exact solver's NNLS on rank 0
    method : the exact method (the multiplicative fit needs ``"gram"``)

    Returns
    -------
    x : (N,) float64; stats : updated (``chi2``, ``objective``, ``poly.*``);
    coefficients : ``{"add": (S, D_a+1) or None, "mult": (S, D_m) or None, "attrs": {...}}``
    """
    base = inputs.weighting
    penalty = (lambda v: reg.penalty(v)) if reg.active else (lambda v: 0.0)
    if mult_degree == 0:
        fit = spectra_pass(inputs, base, x, fit_mult=False, comm=comm)
        stats.update({"poly.add_degree": base.add_degree, "poly.mult_degree": 0})
        return x, stats, {"add": fit["add"], "mult": None, "attrs": {}}
    if method != "gram":
        raise InputError(f"--mult-degree {mult_degree}: needs the Gram method (the N x N normal equations, N = "
                         f"{inputs.n_params}, within CUBEFIT_GRAM_MAX_BYTES); use --exact-method gram or raise the limit")
    t0 = time.perf_counter()

    def weighting(mult, tangent=None):
        return Weighting(base.mask, base.weights, base.add_degree, mult, tangent)

    fit = spectra_pass(inputs, weighting(np.zeros((inputs.S, mult_degree))), x, fit_mult=True, comm=comm)
    history = [0.5 * float(np.sum(fit["chi2_before"])) + penalty(x), 0.5 * float(np.sum(fit["chi2"])) + penalty(x)]
    steps, passes, converged, info = [], 0, False, {}
    for _ in range(MAX_ITERATIONS):
        accepted = None
        for kind in ("gauss-newton", "alternation"):
            w = weighting(fit["mult"], fit["tangent"] if kind == "gauss-newton" else None)
            system = inputs.operator.normal_equations(w, comm)
            passes += 1
            x_new, step_info = solve_system(system, reg, tol, comm)
            trial = spectra_pass(inputs, weighting(fit["mult"]), x_new, fit_mult=True, comm=comm)
            value = 0.5 * float(np.sum(trial["chi2"])) + penalty(x_new)
            if value <= history[-1]:
                accepted = (kind, x_new, trial, value, step_info)
                break
        if accepted is None:                       # neither step lowers F: the optimum, to rounding
            converged = True
            break
        kind, x, fit, value, info = accepted
        steps.append(kind)
        change = history[-1] - value
        history.append(value)
        _LOG.info("polynomials: iteration %d (%s x-step): objective %.12g (%.3g lower)", len(steps), kind, value, change)
        if change <= REL_TOL * value:
            converged = True
            break
    chi2 = float(np.sum(fit["chi2"]))
    stats.update({k: v for k, v in info.items() if k.startswith("kkt.") or k in ("active_set", "iterations")})
    stats.update({"chi2": chi2, "objective": history[-1], "poly.add_degree": base.add_degree,
                  "poly.mult_degree": mult_degree, "poly.iterations": len(steps), "poly.converged": converged,
                  "poly.gauss_newton_steps": steps.count("gauss-newton"), "poly.passes": passes,
                  "poly.seconds": time.perf_counter() - t0, "poly.objective_history": np.asarray(history)})
    attrs = {"iterations": len(steps), "converged": converged, "objective_history": np.asarray(history),
             "x_steps": ",".join(steps)}
    _LOG.info("polynomials: %s after %d iteration(s) (%d Gauss-Newton), objective %.12g, chi2 %.10g",
              "converged" if converged else f"stopped at the cap of {MAX_ITERATIONS}", len(steps),
              steps.count("gauss-newton"), history[-1], chi2)
    return x, stats, {"add": fit["add"], "mult": fit["mult"], "attrs": attrs}
