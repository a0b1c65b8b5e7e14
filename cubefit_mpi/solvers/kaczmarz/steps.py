"""Numerics of the batched Kaczmarz solver: one band step and the tile-level safeguards.

Pure functions of NumPy arrays (Local: no MPI, no I/O).  The stage
:mod:`cubefit_mpi.solvers.kaczmarz.solver` reads the tiles, reduces over ranks and calls these.

Conventions
-----------
* A *band* is a contiguous range of components ``c0:c1``; its design matrix ``design_w`` is
  ``(n, rows)`` float64 with one row per column ``(c, p)`` (row-major over ``(c, p)``) and one
  column per data row ``(s, λ)`` of the tile (unmasked pixels only), already multiplied by
  ``√w_λ``.  ``r_w`` is the weighted residual ``√w · (y − A x)`` of the tile.  Gradients,
  denominators and norms are therefore in the weighted metric, while ``dx`` (the update of
  ``x``) is in natural units.
* A quadratic along a direction: ``f(α) = ‖r − α d‖² = ‖r‖² − 2αp + α²q`` with
  ``p = ⟨r, d⟩`` and ``q = ‖d‖²``.  Every backtracking test uses this closed form, so a
  decision is the same on every rank that holds the same three numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...numerics.nnls_dense import nnls_dense
from .band_design import BandDesign

__all__ = ["StepConfig", "BandStep", "sanitize", "freeze_mask", "blended_denominator",
           "decorrelation_nudge", "backtrack", "trust_scale", "cap_scale", "band_step",
           "merge_candidates", "polish_width", "as_band_design", "top_k", "pixel_subsample", "polish_solve", "ratio_step",
           "weighted_rmse"]


@dataclass(frozen=True)
class StepConfig:
    """The numeric settings of one band step (from the knobs and the solver's arguments).

    Attributes
    ----------
    lr : float, base learning rate multiplying the preconditioned gradient
    bt_steps, bt_factor : band backtracking (``CUBEFIT_BT_STEPS``; 0 = no band check)
    trust_tau : float, ``‖ΔR_w‖ ≤ τ‖R_w‖`` (``CUBEFIT_TRUST_TAU``)
    eps : float, floor of denominators (``CUBEFIT_EPS``)
    zero_col_rel, zero_col_abs : column freeze thresholds (``CUBEFIT_ZERO_COL_*``)
    energy_blend : float, weight β of the global column energy in the denominator
        (``CUBEFIT_GLOBAL_ENERGY_BLEND``, clipped to [0, 1])
    decorrelate : float, η of the de-correlation nudge (0 = off)
    flat_rtol : float, eigenvalue threshold of the nudge's flat directions
    project_nonneg : bool, keep ``x + dx ≥ 0``
    n_candidates : int, polish candidates proposed per band (``CUBEFIT_NNLS_PROP_PER_BAND``)
    block : int, columns per component (P): the de-correlation works within a component
    """

    lr: float = 1.0
    bt_steps: int = 3
    bt_factor: float = 0.5
    trust_tau: float = 0.7
    eps: float = 1e-12
    zero_col_rel: float = 1e-12
    zero_col_abs: float = 1e-24
    energy_blend: float = 1e-3
    decorrelate: float = 0.0
    flat_rtol: float = 1e-4
    project_nonneg: bool = True
    n_candidates: int = 6
    block: int = 1

    @classmethod
    def from_knobs(cls, knobs, *, lr: float, decorrelate: float, project_nonneg: bool,
                   block: int) -> "StepConfig":
        """Build from resolved :class:`~cubefit_mpi.config.knobs.Knobs` and the solver's arguments.  Local."""
        return cls(lr=float(lr), bt_steps=knobs.bt_steps, bt_factor=knobs.bt_factor,
                   trust_tau=knobs.trust_tau, eps=knobs.eps, zero_col_rel=knobs.zero_col_rel,
                   zero_col_abs=knobs.zero_col_abs, energy_blend=min(1.0, knobs.global_energy_blend),
                   decorrelate=float(decorrelate), project_nonneg=bool(project_nonneg),
                   n_candidates=knobs.nnls_prop_per_band, block=int(block))


@dataclass
class BandStep:
    """Outcome of :func:`band_step` for one band of one tile.

    Attributes
    ----------
    dx : (n,) float64, the accepted update of the band's columns (zero when rejected)
    dr_w : (rows,) float64, ``dx @ design_w`` (weighted change of the model)
    alpha : float, band backtracking factor applied (1 when not backtracked)
    trust_clipped : bool, the trust region shortened the step
    trust_ratio : float, ``‖dr_w‖ / ‖r_w‖`` of the accepted step (≤ τ)
    n_frozen : int, frozen columns
    shrinks : int, backtracking shrinks made
    rejected : bool, band backtracking found no decrease (dx = 0)
    candidates : (k,) int, band-local column indices proposed for the polish, best first
    scores : (k,) float64, their scores ``g² / den``
    """

    dx: np.ndarray
    dr_w: np.ndarray
    alpha: float
    trust_clipped: bool
    trust_ratio: float
    n_frozen: int
    shrinks: int
    rejected: bool
    candidates: np.ndarray
    scores: np.ndarray


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def sanitize(array: np.ndarray) -> int:
    """Set non-finite entries of ``array`` to zero in place; return how many.  Local."""
    bad = ~np.isfinite(array)
    count = int(np.count_nonzero(bad))
    if count:
        array[bad] = 0.0
    return count


def freeze_mask(energy: np.ndarray, rel: float, abs_: float) -> np.ndarray:
    """Columns too weak to update: ``E < abs_`` or ``E < rel · median(E)``.  Local.

    Parameters
    ----------
    energy : (n,) float64, ``Σ_rows (√w A)²`` of each column on this tile
    rel, abs_ : thresholds (``CUBEFIT_ZERO_COL_REL``, ``CUBEFIT_ZERO_COL_ABS``)

    Returns
    -------
    frozen : (n,) bool
    """
    if energy.size == 0:
        return np.zeros(0, dtype=bool)
    return (energy < abs_) | (energy < rel * float(np.median(energy)))


def blended_denominator(energy: np.ndarray, energy_ref: np.ndarray, blend: float, eps: float) -> np.ndarray:
    """``max((1 − β)·E_tile + β·Ē, eps)``: local column energy blended with the global one.  Local.

    Parameters
    ----------
    energy : (n,) float64, this tile's weighted column energy
    energy_ref : (n,) float64, the global column energy scaled to one tile (see the stage)
    blend : float β in [0, 1]; eps : float floor
    """
    return np.maximum((1.0 - blend) * energy + blend * energy_ref, eps)


def decorrelation_nudge(design_w: np.ndarray, direction: np.ndarray, eta: float, active: np.ndarray,
                        block: int, flat_rtol: float = 1e-4) -> np.ndarray:
    """Remove a fraction η of the step along the *flat* directions across P.  Local.

    Within each component (blocks of ``block`` consecutive columns, i.e. over the populations
    P), the active columns' tile Gram matrix is scaled to unit diagonal, ``Ĝ = S⁻¹ G S⁻¹`` with
    ``S = diag(√G_jj)``.  Its eigenvectors with eigenvalue ``≤ flat_rtol · λ_max`` span the
    directions the tile's data can hardly tell apart (mixtures of near-identical templates).
    The diagonal preconditioning puts part of the step along them (``D⁻¹ g`` leaves the range of
    ``Aᵀ``) and the solver then drifts there without changing the model.  The nudge removes
    the fraction η of that part, in the scaled coordinates ``z = S x``:
    ``d ← S⁻¹ (I − η U_f U_fᵀ) S d``.  The model change ``A d`` is unchanged to within
    ``√flat_rtol`` relative, so the residual decrease of the step is kept.

    Parameters
    ----------
    design_w : (n, rows) float64 or :class:`BandDesign`; direction : (n,) float64
    eta : float in [0, 1]; active : (n,) bool; block : int; flat_rtol : float, relative
    eigenvalue threshold

    Returns
    -------
    (n,) float64, the nudged direction (a new array)
    """
    out = np.array(direction, dtype=np.float64, copy=True)
    if eta <= 0.0 or out.size == 0:
        return out
    design = as_band_design(design_w)
    block = max(1, int(block))
    for start in range(0, out.size, block):
        idx = np.flatnonzero(active[start:start + block]) + start
        if idx.size < 2:
            continue
        gram = design.gram(idx)
        scale = np.sqrt(np.maximum(np.diag(gram), np.finfo(np.float64).tiny))
        values, vectors = np.linalg.eigh(gram / np.outer(scale, scale))
        flat = vectors[:, values <= flat_rtol * values[-1]]
        if flat.shape[1]:
            z = scale * out[idx]
            z -= eta * (flat @ (flat.T @ z))
            out[idx] = z / scale
    return out


def backtrack(p: float, q: float, *, steps: int, factor: float, alpha0: float = 1.0) -> tuple[float, int]:
    """The first α in ``α0, α0·f, …, α0·f^steps`` with ``‖r − α d‖ < ‖r‖``; 0 if none.  Local.

    Parameters
    ----------
    p : float ``⟨r, d⟩``; q : float ``‖d‖²`` (weighted)
    steps : int, shrinks allowed; factor : float f in [0, 1]; alpha0 : float, first trial

    Returns
    -------
    alpha : float (0.0 means rejected); shrinks : int, shrinks made
    """
    alpha = float(alpha0)
    for shrink in range(int(steps) + 1):
        if alpha > 0.0 and alpha * q < 2.0 * p:      # ‖r − αd‖² − ‖r‖² = α(αq − 2p) < 0
            return alpha, shrink
        if shrink < steps:
            alpha *= factor
    return 0.0, int(steps)


def trust_scale(dr_norm: float, r_norm: float, tau: float) -> float:
    """Factor ≤ 1 making ``‖ΔR_w‖ ≤ τ ‖R_w‖``.  Local."""
    limit = tau * r_norm
    if dr_norm <= limit:
        return 1.0
    return limit / dr_norm if dr_norm > 0.0 else 0.0


def cap_scale(energy_step: float, y_norm: float, tau: float) -> float:
    """Global step cap: factor ≤ 1 making ``√(Σ dx² E) ≤ τ ‖Y‖``.  Local.

    Parameters
    ----------
    energy_step : float ``Σ_{c,p} dx_cp² E[c,p]`` (over all bands of the tile)
    y_norm : float ``‖Y‖`` over the whole cube (unmasked pixels); tau : ``CUBEFIT_GLOBAL_TAU``
    """
    size = float(np.sqrt(max(energy_step, 0.0)))
    limit = tau * y_norm
    if size <= limit:
        return 1.0
    return limit / size


def top_k(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, best first, ties by index (O(n), not a full sort).  Local."""
    n = score.size
    if k <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    if k < n:
        kth = np.partition(score, n - k)[n - k]           # the k-th largest value
        idx = np.flatnonzero(score >= kth)                  # ascending: ties stay in index order
    else:
        idx = np.arange(n)
    return idx[np.lexsort((idx, -score[idx]))][:k]


def as_band_design(design_w) -> BandDesign:
    """``design_w`` itself if a :class:`BandDesign`, else a dense ``(n, rows)`` matrix wrapped.  Local."""
    return design_w if isinstance(design_w, BandDesign) else BandDesign.dense(design_w)


def weighted_rmse(r2: float, sum_w: float) -> float:
    """``√(Σ w r² / Σ w)``.  Local."""
    return float(np.sqrt(max(r2, 0.0) / sum_w)) if sum_w > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# the band step
# ---------------------------------------------------------------------------------------------
def band_step(design_w, r_w: np.ndarray, x: np.ndarray, energy_ref: np.ndarray,
              cfg: StepConfig, energy: np.ndarray | None = None, frozen: np.ndarray | None = None) -> BandStep:
    """One preconditioned, projected, trust-region, backtracked Kaczmarz step of a band.  Local.

    1. ``E_j = Σ (√w A_j)²``, ``g_j = ⟨√w A_j, r_w⟩``; columns with tiny ``E`` are frozen.
    2. ``d_j = lr · g_j / max((1−β) E_j + β Ē_j, eps)`` (diagonal preconditioning), divided by
       minus the fraction ``decorrelate`` of its flat part (:func:`decorrelation_nudge`).
    3. Projection: ``dx = max(d, −x)`` so that ``x + dx ≥ 0``.
    4. Trust region: ``dx`` is scaled so that ``‖dx @ design_w‖ ≤ τ ‖r_w‖``.
    5. Backtracking (``bt_steps > 0``): α = 1, f, f², … until ``‖r_w − α ΔR_w‖ < ‖r_w‖``;
       none → the band's step is rejected (dx = 0).  ``bt_steps = 0`` takes the step unchecked.
    6. Polish candidates: the ``n_candidates`` unfrozen columns with the largest
       ``g_j² / den_j`` (the decrease a one-column exact line search would give) among those
       that can move (``g_j > 0`` or ``x_j > 0``).

    Parameters
    ----------
    design_w : :class:`BandDesign` or (n, rows) float64, the sanitised weighted band design
    r_w : (rows,) float64, weighted residual of the tile (all bands)
    x : (n,) float64, current values of the band's columns
    energy_ref : (n,) float64, the global column energy scaled to one tile
    cfg : StepConfig
    energy : (n,) float64, the band's column energy on this tile when already known (it does
        not change between epochs); computed when None
    frozen : (n,) bool, ``freeze_mask(energy, …)`` when already known; computed when None

    Returns
    -------
    BandStep
    """
    design = as_band_design(design_w)
    energy = design.energy() if energy is None else energy
    grad = design.rmatvec(r_w)
    frozen = freeze_mask(energy, cfg.zero_col_rel, cfg.zero_col_abs) if frozen is None else frozen
    den = blended_denominator(energy, energy_ref, cfg.energy_blend, cfg.eps)
    direction = np.where(frozen, 0.0, cfg.lr * grad / den)
    if cfg.decorrelate > 0.0:
        direction = decorrelation_nudge(design, direction, cfg.decorrelate, ~frozen, cfg.block, cfg.flat_rtol)
    dx = np.maximum(direction, -x) if cfg.project_nonneg else direction
    dr_w = design.matvec(dx)
    r_norm = float(np.linalg.norm(r_w))
    dr_norm = float(np.linalg.norm(dr_w))
    scale = trust_scale(dr_norm, r_norm, cfg.trust_tau)
    if scale < 1.0:
        dx *= scale
        dr_w *= scale
        dr_norm *= scale
    alpha, shrinks, rejected = 1.0, 0, False
    if cfg.bt_steps > 0:
        alpha, shrinks = backtrack(float(r_w @ dr_w), dr_norm * dr_norm, steps=cfg.bt_steps,
                                   factor=cfg.bt_factor)
        rejected = alpha == 0.0
        if alpha != 1.0:
            dx *= alpha
            dr_w *= alpha
    movable = ~frozen & ((grad > 0.0) | (x > 0.0)) if cfg.project_nonneg else ~frozen
    score = np.where(movable, grad * grad / den, -np.inf)
    keep = top_k(score, cfg.n_candidates)
    keep = keep[np.isfinite(score[keep]) & (score[keep] > 0.0)]
    return BandStep(dx=dx, dr_w=dr_w, alpha=alpha, trust_clipped=scale < 1.0,
                    trust_ratio=alpha * dr_norm / r_norm if r_norm > 0 else 0.0,
                    n_frozen=int(frozen.sum()), shrinks=shrinks, rejected=rejected,
                    candidates=keep.astype(np.int64), scores=score[keep])


# ---------------------------------------------------------------------------------------------
# the polish
# ---------------------------------------------------------------------------------------------
def merge_candidates(indices: np.ndarray, scores: np.ndarray, limit: int) -> np.ndarray:
    """The ``limit`` best distinct candidates, best score first, ties by index.  Local.

    Parameters
    ----------
    indices : (k,) int, global column indices; scores : (k,) float64; limit : int

    Returns
    -------
    (≤ limit,) int64
    """
    indices = np.asarray(indices, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((indices, -scores))
    picked, seen = [], set()
    for i in order:
        if int(indices[i]) not in seen:
            seen.add(int(indices[i]))
            picked.append(int(indices[i]))
        if len(picked) >= limit:
            break
    return np.asarray(picked, dtype=np.int64)


def polish_width(n_candidates: int, n_rows: int, max_cols: int, max_bytes: int) -> int:
    """Columns the polish may use: ``min(k, NNLS_MAX_COLS, NNLS_MAX_BYTES // (8 · rows))``.  Local."""
    by_bytes = int(max_bytes) // max(8 * int(n_rows), 1)
    return max(0, min(int(n_candidates), int(max_cols), by_bytes))


def pixel_subsample(n_used: int, sub_l: int) -> np.ndarray:
    """Evenly spaced indices of ``sub_l`` of the ``n_used`` unmasked pixels (all when 0).  Local.

    Returns
    -------
    (≤ sub_l,) int64, increasing
    """
    if sub_l <= 0 or sub_l >= n_used:
        return np.arange(n_used, dtype=np.int64)
    return np.unique(np.round(np.linspace(0.0, n_used - 1.0, int(sub_l))).astype(np.int64))


def polish_solve(design_w: np.ndarray, r_w: np.ndarray, x_k: np.ndarray, *, method: str,
                 max_iter: int) -> np.ndarray:
    """Tile-local weighted NNLS on the candidate columns.  Local.

    Solves ``min_z ‖(r_w + x_k @ design_w) − z @ design_w‖``, ``z ≥ 0``: the best non-negative
    values of the candidate columns with every other column held fixed.

    Parameters
    ----------
    design_w : (k, rows) float64, the candidates' weighted rows (possibly λ-subsampled)
    r_w : (rows,) float64, weighted residual on the same rows
    x_k : (k,) float64, current values (warm start of ``fista``; ``mu`` starts from its own
        positive vector, since multiplicative updates cannot move an entry away from zero)
    method : {"nnls", "lsq", "mu", "fista"}; max_iter : int

    Returns
    -------
    z : (k,) float64 ≥ 0
    """
    target = r_w + x_k @ design_w
    start = None if method == "mu" else x_k        # multiplicative updates keep zeros at zero
    return nnls_dense(design_w.T, target, method=method, max_iter=max_iter, x0=start)


# ---------------------------------------------------------------------------------------------
# orbit weights
# ---------------------------------------------------------------------------------------------
def ratio_step(x_cp: np.ndarray, targets: np.ndarray, eta: float) -> np.ndarray:
    """Move the component totals a fraction η of the way to ``targets``, keeping Σx.  Local.

    With ``T_c = Σ_p x_cp`` and ``T = Σ_c T_c``, the new totals are
    ``T*_c = (1 − η) T_c + η t_c T``; each component is rescaled by ``T*_c / T_c`` (its
    population mix is kept), or filled uniformly with ``T*_c / P`` when ``T_c = 0``.

    Parameters
    ----------
    x_cp : (C, P) float64 ≥ 0; targets : (C,) float64 summing to 1; eta : float in [0, 1]

    Returns
    -------
    (C, P) float64 ≥ 0 (a new array)
    """
    x_cp = np.array(x_cp, dtype=np.float64, copy=True)
    totals = x_cp.sum(axis=1)
    total = float(totals.sum())
    if eta <= 0.0 or total <= 0.0:
        return x_cp
    wanted = (1.0 - eta) * totals + eta * np.asarray(targets, dtype=np.float64) * total
    for c in range(x_cp.shape[0]):
        if totals[c] > 0.0:
            x_cp[c] *= wanted[c] / totals[c]
        else:
            x_cp[c] = wanted[c] / x_cp.shape[1]
    return x_cp


def strict_totals(x_cp: np.ndarray, targets: np.ndarray, totals: str = "fractions") -> np.ndarray:
    """Rescale each component's block so its total meets the target exactly.  Local.

    ``fractions``: the totals become ``t_c Σx`` (Σx kept: :func:`ratio_step` with η = 1, the
    exact, mass-preserving projection); ``absolute``: they become ``m_c``.  A component whose
    block is all zero is filled uniformly (``target / P``); its population mix is otherwise kept.

    Parameters
    ----------
    x_cp : (C, P) float64 ≥ 0; targets : (C,) float64 (fractions summing to 1, or m_c)
    totals : {"fractions", "absolute"}

    Returns
    -------
    (C, P) float64 ≥ 0 (a new array)
    """
    if totals == "fractions":
        return ratio_step(x_cp, targets, 1.0)
    x_cp = np.array(x_cp, dtype=np.float64, copy=True)
    have = x_cp.sum(axis=1)
    for c, want in enumerate(np.asarray(targets, dtype=np.float64)):
        if have[c] > 0.0:
            x_cp[c] *= want / have[c]
        else:
            x_cp[c] = want / x_cp.shape[1]
    return x_cp
