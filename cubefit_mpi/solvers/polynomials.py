"""Additive and multiplicative Legendre polynomials in the exact solve (``solve --add-degree D_a
--mult-degree D_m``, pPXF's ``degree`` and ``mdegree``).

The objective, with the model ``g_s ⊙ (A_s x) + Q a_s`` of each spectrum
(:mod:`cubefit_mpi.numerics.polynomials`)::

    F(x, m, a) = ½ Σ_s ‖√W (y_s − g_s ⊙ A_s x − Q a_s)‖² + ½ xᵀRx,   x ≥ 0,   g_s = 1 + Σ_j m_sj P_j

**Additive only.**  The a_s are eliminated exactly (the weighting's projection, the same for
every spectrum), the exact solve of x is the ordinary one on the projected normal equations,
and one pass over the spectra recovers ``a_s = (QᵀWQ)⁻¹QᵀW (y_s − A_s x)``.

**Multiplicative.**  Block-coordinate steps from the additive-only solution (g = 1), each one
either exact or checked:

* **g-step** (x fixed): per spectrum a weighted linear least-squares problem in (m_s, a_s),
  in parallel over spectra (each rank its spaxels); a spectrum keeps its coefficients when the
  new ones are not better, so F never increases.  The same pass gives the gradient of the
  reduced objective ``F̃(x) = min_{m,a} F`` in x, ``∇ = −Σ_s A_sᵀ √W g_s r_s`` (the envelope
  theorem: no Gram matrix needed) with the residuals ``r_s`` of the new coefficients.
* **x-step** (g fixed): the NNLS of the Gauss–Newton model ``min_{x ≥ 0} ∇ᵀ(x − x_k) + ½ (x −
  x_k)ᵀ H (x − x_k) + ½ xᵀRx``.  H is the Gauss–Newton Hessian of F̃: the Gram matrix of the
  rows ``√W g_s A_s`` projected off the additive span *and* off the directions
  ``√W P_j ⊙ A_s x`` in which each spectrum's coefficients move its model (the Schur
  complement of the coupling between x and m; without it the plain alternation converges
  linearly and, where x and g are correlated, slowly).  It is made once, at the start, from the
  g = 1 normal equations (the solve's own, cached) minus ``Σ_s Y_s Y_sᵀ`` (``Y_s = A_sᵀ √W Z_s``,
  one pass) and then kept (**frozen**): an iteration costs one pass over the spectra and one
  NNLS, no Gram matrix.  Its fixed point is the exact optimum whatever H is (the gradient is
  exact).  A step is kept only when F, after its g-step, is not larger; otherwise, or when an
  iteration gains more than ``SLOW`` of the previous one, the Hessian is made afresh at the
  current point (**fresh**: the normal equations of the g-weighted, projected rows,
  :class:`~cubefit_mpi.operators.base.Weighting` with ``tangent``); and when that step fails
  too, the exact x-step given g (**alternation**: the NNLS on the g-weighted normal
  equations, which cannot raise F).  The factored operator makes g-weighted normal equations
  from the ``2 D_m + 1`` Legendre terms of ``g_s²`` (weighted Φ's and spaxel sums) or spaxel by
  spaxel, whichever needs fewer operations; the hypercube per spaxel.

Stops when an iteration lowers F by less than ``REL_TOL`` relative *and* the KKT certificate of
``min_{x≥0} F̃`` (from the exact gradient) holds, when no step lowers F (the optimum to
rounding), or after ``MAX_ITERATIONS``; the small gain alone is not enough (with noise a gain
of 1e-10 relative can leave x ~1e-5 from the optimum and the certificate unmet).  The accepted objectives are computed by one formula
(:func:`~cubefit_mpi.numerics.polynomials.fit_spectra`) and never increase, by construction.
In the tests and on the MILES demo, 3–4 frozen iterations reach 1e-10; noise-free mocks
converge linearly (each iteration gains ~10x) down to rounding.  The multiplicative fit needs
the Gram method (N×N within ``CUBEFIT_GRAM_MAX_BYTES``).
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
from ..parallel.collectives import allreduce_sum, bcast_array, reduce_upper_to_root
from ..parallel.decomposition import padded_schedule
from .gram import SolveInputs

_LOG = logging.getLogger("cubefit_mpi.solve")
MAX_ITERATIONS = 30
REL_TOL = 1e-10
SLOW = 0.25                 # a frozen Hessian is refreshed when an iteration gains more than this of the last


def check_degrees(add_degree, mult_degree) -> tuple[int, int]:
    """``(D_a, D_m)`` with None as off (−1 and 0).  Local.  Raises :class:`InputError`."""
    add = -1 if add_degree is None else add_degree
    mult = 0 if mult_degree is None else mult_degree
    for name, value, low in (("--add-degree", add, -1), ("--mult-degree", mult, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InputError(f"{name} {value}: expected an integer >= {low} (or none)")
    return int(add), int(mult)


def spectra_pass(inputs: SolveInputs, weighting: Weighting, x: np.ndarray, *, fit_mult: bool, gradient: bool = False,
                 correction: bool = False, comm) -> dict:
    """The polynomial coefficients of every spectrum given ``x``.  Collective over comm.

    Ranks take their tiles of spectra (:meth:`~cubefit_mpi.operators.base.Operator.spectra_tiles`);
    per tile the model ``A x`` (:meth:`~cubefit_mpi.operators.base.Operator.spectra`) and the data are fitted by
    :func:`~cubefit_mpi.numerics.polynomials.fit_spectra` (``fit_mult``: the multiplicative
    coefficients too, from ``weighting.mult``; else those are kept).

    Returns
    -------
    dict: ``add (S, D_a+1)`` or None, ``mult (S, D_m)`` or None and ``chi2_before``, ``chi2``
    ``(S,)`` (with the given and the returned coefficients) on every rank; ``tangent (S,
    L_used)``: ``√W A_s x`` of this rank's spaxels (zero elsewhere; the fresh Hessian sums it over
    ranks); with ``gradient`` the gradient of the data term in x with the returned
    coefficients, ``gradient (N,)``, and ``rhs (N,)`` = ``Σ_s A_sᵀ √W g_s (projected √W y_s)``,
    on every rank; with ``correction`` ``Σ_s Y_s Y_sᵀ`` (N, N) on rank 0, ``Y_s = A_sᵀ √W Z_s``
    for the orthonormal directions ``Z_s`` of the multiplicative terms at g = 1
    (:func:`~cubefit_mpi.numerics.polynomials.spectrum_bases`).
    """
    op = inputs.operator
    used, sqrt_w = weighting.used, weighting.sqrt_w
    x_cp = np.asarray(x, dtype=np.float64).reshape(inputs.C, inputs.P)
    S, N = inputs.S, inputs.n_params
    mult_basis = weighting.mult_basis if fit_mult else None
    n_add = weighting.add_degree + 1
    sums = np.zeros((S, n_add + weighting.mult_degree + 2))          # add | mult | chi2_before | chi2
    tangent = np.zeros((S, used.size)) if fit_mult else None
    grad, rhs = np.zeros(N), np.zeros(N)
    corr = np.zeros((N, N)) if correction else None
    with open_h5(inputs.path, "r", comm) as f:
        blocks = op.read_blocks(x_cp)
        for tile in padded_schedule(op.spectra_tiles(comm), comm):
            model = op.spectra(f, tile, x_cp, blocks=blocks)
            y = read_block(f[lay.DATACUBE], None if tile is None else (tile[0], 0),
                           None if tile is None else (tile[1] - tile[0], inputs.L), np.float64)
            fit = vectors = bases = None
            if tile is not None:
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
                g = 1.0 if weighting.mult is None else pl.mult_factor(sums[s0:s1, n_add:-2], weighting.mult_basis)
                data_w = weighting.project(y[:, used] * sqrt_w)
                vectors = np.stack([g * fit["resid"] * sqrt_w, g * data_w * sqrt_w], axis=2)   # gradient, b
                if correction:
                    bases = pl.spectrum_bases(model_w, weighting.mult_basis, weighting.additive)[:, :, n_add:]
            if gradient:
                products = op.products(f, tile, used, vectors)
                if products is not None:
                    grad -= products[:, :, 0].sum(axis=0)
                    rhs += products[:, :, 1].sum(axis=0)
            if correction:
                products = op.products(f, tile, used, None if bases is None else bases * sqrt_w[:, None])
                if products is not None:
                    flat = products.transpose(1, 0, 2).reshape(N, -1)
                    corr += flat @ flat.T
    sums = allreduce_sum(sums, comm)                                   # each row from one rank
    return {"add": sums[:, :n_add] if n_add else None,
            "mult": sums[:, n_add:-2] if weighting.mult is not None else None,
            "chi2_before": sums[:, -2], "chi2": sums[:, -1], "tangent": tangent,
            "gradient": allreduce_sum(grad, comm) if gradient else None,
            "rhs": allreduce_sum(rhs, comm) if gradient else None,
            "correction": reduce_upper_to_root(corr, comm) if correction else None}


def fit_polynomials(inputs: SolveInputs, reg, x: np.ndarray, stats: dict, mult_degree: int, solve_system, *,
                    method: str, tol: float, gram_system, comm) -> tuple[np.ndarray, dict, dict]:
    """The polynomials of a solve whose x (additive terms eliminated, g = 1) is given.  Collective over comm.

    Parameters
    ----------
    inputs : the solve's inputs (``add_degree`` set)
    reg : the quadratic terms (:class:`~cubefit_mpi.numerics.regularization.Regularization`)
    x : (N,) float64, the exact solution with g = 1; stats : its statistics (updated)
    mult_degree : int, D_m (0: additive only)
    solve_system : ``(system, reg, tol, comm) -> (x, info)``, the exact solver's NNLS on rank 0
    method : the exact method (the multiplicative fit needs ``"gram"``)
    gram_system : ``(inputs, comm=comm) -> system``: the normal equations of the g = 1 solve (its cache)

    Returns
    -------
    x : (N,) float64; stats : updated (``chi2``, ``objective``, ``poly.*``);
    coefficients : ``{"add": (S, D_a+1) or None, "mult": (S, D_m) or None, "attrs": {...}}``
    """
    base = inputs.weighting
    if mult_degree == 0:
        fit = spectra_pass(inputs, base, x, fit_mult=False, comm=comm)
        stats.update({"poly.add_degree": base.add_degree, "poly.mult_degree": 0})
        return x, stats, {"add": fit["add"], "mult": None, "attrs": {}}
    if method != "gram":
        raise InputError(f"--mult-degree {mult_degree}: needs the Gram method (the N x N normal equations, N = "
                         f"{inputs.n_params}, within CUBEFIT_GRAM_MAX_BYTES); use --exact-method gram or raise the limit")
    t0 = time.perf_counter()
    fit = _Fit(inputs, reg, solve_system, tol, comm)
    x, state, steps = fit.run(x, mult_degree, gram_system(inputs, comm=comm)["gram"])
    history = fit.history
    chi2 = float(np.sum(state["chi2"]))
    stats.update(fit.certificate(x, state))
    stats.update({k: v for k, v in fit.info.items() if k in ("iterations",)})
    stats.update({"chi2": chi2, "objective": history[-1], "poly.add_degree": base.add_degree,
                  "poly.mult_degree": mult_degree, "poly.iterations": len(steps), "poly.converged": fit.converged,
                  "poly.x_steps": ",".join(steps), "poly.gram_passes": fit.gram_passes,
                  "poly.seconds": time.perf_counter() - t0, "poly.objective_history": np.asarray(history)})
    attrs = {"iterations": len(steps), "converged": fit.converged, "objective_history": np.asarray(history),
             "x_steps": ",".join(steps)}
    _LOG.info("polynomials: %s after %d iteration(s) (x-steps %s; %d pass(es) for normal equations), objective "
              "%.12g, chi2 %.10g", "converged" if fit.converged else f"stopped at the cap of {MAX_ITERATIONS}",
              len(steps), ",".join(steps) or "none", fit.gram_passes, history[-1], chi2)
    return x, stats, {"add": state["add"], "mult": state["mult"], "attrs": attrs}


class _Fit:
    """The multiplicative fit's iterations (see the module docstring).  Collective over comm."""

    def __init__(self, inputs: SolveInputs, reg, solve_system, tol: float, comm):
        self.inputs, self.reg, self.solve_system, self.tol, self.comm = inputs, reg, solve_system, tol, comm
        self.base = inputs.weighting
        self.history: list[float] = []
        self.info: dict = {}
        self.gram_passes = 0
        self.converged = False
        self.cert = None                    # (x, its certificate): the last one made

    def weighting(self, mult, tangent=None) -> Weighting:
        return Weighting(self.base.mask, self.base.weights, self.base.add_degree, mult, tangent)

    def objective(self, state: dict, x: np.ndarray) -> float:
        return 0.5 * float(np.sum(state["chi2"])) + (self.reg.penalty(x) if self.reg.active else 0.0)

    def certificate(self, x: np.ndarray, state: dict) -> dict:
        """The KKT certificate of ``min_{x>=0} F̃(x)`` at ``x``: the exact gradient of the last pass
        (with the coefficients' optimum) and the ridge/smoothness terms, scaled by the
        Hessian's diagonal.  Collective over comm."""
        from ..numerics.certificate import certificate_dict, certify

        if self.cert is not None and self.cert[0] is x:
            return self.cert[1]
        cert = None
        if self.comm.Get_rank() == 0:
            gradient = state["gradient"] + (self.reg.matvec(x) if self.reg.active else 0.0)
            diag = self.hessian_diag + (self.reg.diagonal() if self.reg.active else 0.0)
            cert = certificate_dict(certify(diag, state["rhs"], x, gradient=gradient))
            cert["active_set"] = int(np.count_nonzero(x))
        cert = self.comm.bcast(cert, root=0)
        self.cert = (x, cert)
        return cert

    def step(self, kind: str, x: np.ndarray, state: dict, hessian):
        """A candidate x of one x-step kind and its g-step.  Returns ``(x_new, state_new, hessian)``."""
        root = self.comm.Get_rank() == 0
        if kind == "alternation":                       # the exact NNLS given g
            system = self.inputs.operator.normal_equations(self.weighting(state["mult"]), self.comm)
            self.gram_passes += 1
        else:
            if kind == "fresh":                         # the Gauss-Newton Hessian at this point
                tangent = allreduce_sum(state["tangent"], self.comm)    # every row on every rank: any tiling
                fresh = self.inputs.operator.normal_equations(self.weighting(state["mult"], tangent), self.comm)
                self.gram_passes += 1
                hessian = fresh["gram"]
            rhs = bcast_array(hessian @ x - state["gradient"] if root else None, self.comm)   # every rank
            system = {"gram": hessian, "rhs": rhs, "yy": 0.0}
        x_new, self.trial_info = self.solve_system(system, self.reg, self.tol, self.comm)
        trial = spectra_pass(self.inputs, self.weighting(state["mult"]), x_new, fit_mult=True, gradient=True,
                             comm=self.comm)
        return x_new, trial, hessian

    def run(self, x: np.ndarray, mult_degree: int, gram0):
        """Iterate from the g = 1 solution ``x`` and its normal equations ``gram0`` (rank 0).
        Returns ``(x, state, steps)``."""
        zeros = np.zeros((self.inputs.S, mult_degree))
        state = spectra_pass(self.inputs, self.weighting(zeros), x, fit_mult=True, gradient=True, correction=True,
                             comm=self.comm)
        hessian = None
        if gram0 is not None:                                                    # Gauss-Newton at g = 1, frozen
            hessian = gram0
            hessian -= state["correction"]
        state["correction"] = None
        self.hessian_diag = None if hessian is None else np.maximum(np.diag(hessian), 0.0).copy()
        self.history = [0.5 * float(np.sum(state["chi2_before"])) + (self.reg.penalty(x) if self.reg.active else 0.0),
                        self.objective(state, x)]
        steps, last_change, refresh = [], None, False
        for _ in range(MAX_ITERATIONS):
            accepted = None
            for kind in ("fresh", "alternation") if refresh else ("frozen", "fresh", "alternation"):
                x_new, trial, hessian = self.step(kind, x, state, hessian)
                value = self.objective(trial, x_new)
                if value <= self.history[-1]:
                    accepted = kind
                    break
            if accepted is None:                   # no step lowers F: the optimum, to rounding
                self.converged = True
                break
            change = self.history[-1] - value
            x, state = x_new, trial
            self.info = self.trial_info
            steps.append(accepted)
            self.history.append(value)
            _LOG.info("polynomials: iteration %d (%s x-step): objective %.12g (%.3g lower)", len(steps), accepted,
                      value, change)
            # converged: no progress at all (rounding), or a small gain where the KKT certificate
            # of the reduced problem holds (a gain of 1e-10 alone leaves x at ~1e-5)
            if change <= 0.0 or (change <= REL_TOL * value and self.certificate(x, state)["kkt.ok"]):
                self.converged = True
                break
            # a frozen Hessian that no longer converges fast is refreshed at the next iteration
            refresh = accepted != "fresh" and last_change is not None and change > SLOW * last_change
            last_change = change
        return x, state, steps

