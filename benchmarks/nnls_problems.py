"""Realistic (G, b) systems for the NNLS benchmarks and tests, built on the shared MILES library.

The fit is the package's: spaxel ``s`` is ``y_s = Σ_c Σ_p x_cp (κ_sc * T_p) + noise`` on an
observed grid uniform in ln λ, where ``T_p`` are MILES SSP templates log-rebinned to a grid
``oversample`` times finer, ``κ_sc`` the unit kernel of component c's LOSVD at spaxel s times
its amplitude, and the convolution a sum of template shifts.  The design is never formed.
Writing ``B[k, p, :]`` for template p shifted by ``shifts[k]`` template pixels and rebinned to
the observed grid,

    A_s[(c, p), :] = Σ_k κ_s[c, k] B[k, p, :]

so the Gram matrix factors (unweighted, w = 1):

    G[(c, p), (c', p')] = Σ_{k, k'} M[c, k, c', k'] Φ[k, p, k', p'],
    M = Σ_s κ_s κ_sᵀ   (C·K × C·K),     Φ = Σ_l B[:, :, l] B[:, :, l]ᵀ   (K·P × K·P),

and b, yᵀy likewise (:func:`build_system`).  Defaults as in issue 14's table: 4 metallicities
× 53 ages = 212 templates (``pop_shape`` (53, 4), ages the slow axis), 400 spaxels, 1 % noise,
observed 4800–5800 Å at 60 km/s, templates at 30 km/s, LOSVDs on ±600 km/s.  C components with
distinct kinematics (discs, counter-rotating discs, bulges; random velocities and
dispersions); the truth is a smooth star-formation history per component.

Everything is deterministic in the seed.  Needs ``/work/shared/data/miles_ssp.npz``
(``MILES``); :func:`miles_available` says whether it is there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cubefit_mpi.numerics.constants import SPEED_OF_LIGHT_KMS
from cubefit_mpi.numerics.kernels import interpolation_matrix, losvd_amplitude, unit_kernels
from cubefit_mpi.numerics.rebin import overlap_rebin, rebin_operator
from cubefit_mpi.numerics.synthetic_galaxy import make_losvd, spaxel_xy
from cubefit_mpi.numerics.wavelength_grids import centres, edges_from_centres, template_edges, uniform_log_edges

MILES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "miles_ssp.npz"
if not MILES.exists():
    MILES = Path("/work/shared/data/miles_ssp.npz")
MET_PICK = (0, 4, 8, 11)          # of the 12 sorted MILES metallicities: -2.27, -0.96, 0.06, 0.40


def miles_available() -> bool:
    return MILES.exists()


@dataclass(frozen=True)
class ProblemSpec:
    components: int = 4
    spaxels: int = 400
    noise: float = 0.01           # sigma per spaxel, relative to its mean model flux
    seed: int = 0
    lam_lo: float = 4800.0
    lam_hi: float = 5800.0
    velscale: float = 60.0        # km/s per observed pixel
    oversample: int = 2
    vmax: float = 600.0           # km/s, half-width of the LOSVD grid
    dv: float = 30.0              # km/s, LOSVD bin width
    ages: int = 53                # MILES ages used (evenly spaced of the 53; fewer for tests)


@dataclass
class Problem:
    """A normal-equations system and what made it.

    gram : (N, N) float64, unregularised G = Σ_s A_sᵀ A_s, N = C·P, row-major over (C, P)
    rhs : (N,) float64, b = Σ_s A_sᵀ y_s;  yy : float, Σ_s y_sᵀ y_s
    x_true : (N,) float64;  pop_shape : (53, 4);  n_comp, n_pop : C, P
    """

    gram: np.ndarray
    rhs: np.ndarray
    yy: float
    x_true: np.ndarray
    pop_shape: tuple
    n_comp: int
    n_pop: int


def _templates(spec: ProblemSpec):
    """(obs ln λ centres (L,), template ln λ centres (T,), templates (P, T) mean 1, pop_shape)."""
    data = np.load(MILES)
    mets = np.unique(data["met"])[list(MET_PICK)]
    keep = np.flatnonzero(np.isin(data["met"], mets))
    all_ages = np.unique(data["age"])
    ages = all_ages[np.unique(np.linspace(0, all_ages.size - 1, spec.ages).round().astype(int))]
    keep = keep[np.isin(data["age"][keep], ages)]
    order = keep[np.lexsort((data["met"][keep], data["age"][keep]))]       # ages slow, metallicities fast
    n_age = ages.size
    dln = spec.velscale / SPEED_OF_LIGHT_KMS
    obs_edges = uniform_log_edges(math.log(spec.lam_lo), math.log(spec.lam_hi), dln)
    tem_edges = template_edges(obs_edges, spec.oversample, spec.vmax + 4 * spec.dv)
    lin_edges, _ = edges_from_centres(data["lam"])
    flux = overlap_rebin(lin_edges, tem_edges, measure="lambda").apply(data["flux"][order].astype(np.float64))
    flux /= flux.mean(axis=1, keepdims=True)
    return centres(obs_edges), centres(tem_edges), flux, (n_age, len(MET_PICK))


def _components(n_comp: int, seed: int) -> list[dict]:
    """Kinematics of each component for :func:`make_losvd` (deterministic in ``seed``)."""
    rng = np.random.default_rng([seed, 101])
    kinds = ("disc", "counter_disc", "bulge")
    out = []
    for c in range(n_comp):
        kind = kinds[c % 3]
        out.append(dict(kind=kind, v0=float(rng.uniform(60, 260)) * (-1 if kind == "counter_disc" else 1),
                        sigma0=float(rng.uniform(40, 90) if kind != "bulge" else rng.uniform(120, 220)),
                        h3=float(rng.uniform(-0.08, 0.08)), h4=float(rng.uniform(0.0, 0.05)),
                        scale=float(rng.uniform(0.4, 2.0)), weight=float(rng.uniform(0.3, 1.5)),
                        pa=float(rng.uniform(-0.4, 0.4)), incl=float(rng.uniform(0.8, 1.2))))
    return out


def _x_true(n_comp: int, pop_shape, seed: int) -> np.ndarray:
    """Smooth star-formation histories (C, P): one or two bumps in (age, metallicity) each."""
    rng = np.random.default_rng([seed, 103])
    n_age, n_met = pop_shape
    age, met = np.meshgrid(np.arange(n_age), np.arange(n_met), indexing="ij")
    x = np.zeros((n_comp, n_age, n_met))
    for c in range(n_comp):
        for _ in range(int(rng.integers(1, 3))):
            a0, m0 = rng.uniform(0, n_age - 1), rng.uniform(0, n_met - 1)
            wa, wm = rng.uniform(2.0, 8.0), rng.uniform(0.6, 1.5)
            x[c] += rng.uniform(0.3, 1.5) * np.exp(-0.5 * (((age - a0) / wa) ** 2 + ((met - m0) / wm) ** 2))
    return x.reshape(n_comp, n_age * n_met)


def _shifted_rebinned(templates, shifts, rebin):
    """B (K, P, L): each template shifted by ``shifts[k]`` template pixels, rebinned."""
    n_pop, n_tem = templates.shape
    out = np.empty((shifts.size, n_pop, rebin.shape[1]))
    for j, k in enumerate(shifts):
        moved = np.zeros_like(templates)
        if k >= 0:
            moved[:, k:] = templates[:, :n_tem - k]
        else:
            moved[:, :n_tem + k] = templates[:, -k:]
        out[j] = np.asarray(moved @ rebin)
    return out


def build_system(spec: ProblemSpec) -> Problem:
    """(G, b, yᵀy) of ``spec`` through the factored form (see the module notes)."""
    obs, tem, templates, pop_shape = _templates(spec)
    n_pop, n_comp = templates.shape[0], spec.components
    vel = spec.dv * np.arange(-round(spec.vmax / spec.dv), round(spec.vmax / spec.dv) + 1, dtype=np.float64)
    interp, shifts = interpolation_matrix(vel, tem[1] - tem[0])
    losvd = make_losvd(spaxel_xy(spec.spaxels), vel, _components(n_comp, spec.seed))   # (S, V, C)
    kernels, _ = unit_kernels(losvd, interp)                                          # (S, C, K)
    kappa = kernels * losvd_amplitude(losvd, vel, "sum")[:, :, None]                  # (S, C, K)
    n_k = shifts.size
    basis = _shifted_rebinned(templates, shifts, rebin_operator(tem, obs, "overlap"))  # (K, P, L)
    flat_b = basis.reshape(n_k * n_pop, -1)
    phi = (flat_b @ flat_b.T).reshape(n_k, n_pop, n_k, n_pop)
    phi_kk = np.ascontiguousarray(phi.transpose(0, 2, 1, 3)).reshape(n_k * n_k, n_pop * n_pop)
    del phi
    flat_kappa = kappa.reshape(spec.spaxels, n_comp * n_k)
    m4 = (flat_kappa.T @ flat_kappa).reshape(n_comp, n_k, n_comp, n_k)
    n = n_comp * n_pop
    gram = np.empty((n, n))
    rows = max(1, int(2**27 // (n_comp * n_pop * n_pop)))            # components per GEMM (~1 GiB out)
    for c0 in range(0, n_comp, rows):
        c1 = min(n_comp, c0 + rows)
        m_rows = np.ascontiguousarray(m4[c0:c1].transpose(0, 2, 1, 3)).reshape((c1 - c0) * n_comp, n_k * n_k)
        block = (m_rows @ phi_kk).reshape(c1 - c0, n_comp, n_pop, n_pop)          # [c, c', p, p']
        gram[c0 * n_pop:c1 * n_pop] = block.transpose(0, 2, 1, 3).reshape((c1 - c0) * n_pop, n)
        del block
    del phi_kk
    gram = 0.5 * (gram + gram.T) if n <= 4096 else _symmetrise(gram)
    x_true = _x_true(n_comp, pop_shape, spec.seed)
    mixed = np.einsum("cp,kpl->ckl", x_true, basis).reshape(n_comp * n_k, -1)       # (C·K, L)
    clean = flat_kappa @ mixed                                                        # (S, L)
    rng = np.random.default_rng([spec.seed, 107])
    sigma = spec.noise * np.abs(clean).mean(axis=1, keepdims=True)
    y = clean + sigma * rng.standard_normal(clean.shape)
    by = (flat_b @ y.T).reshape(n_k, n_pop, spec.spaxels)                             # [k, p, s]
    rhs = np.einsum("sck,kps->cp", kappa, by).reshape(n)
    return Problem(gram, rhs, float(np.sum(y * y)), x_true.reshape(n), pop_shape, n_comp, n_pop)


def _symmetrise(gram, block=2048):
    """``(G + Gᵀ)/2`` in place, block by block (no second N×N array)."""
    n = gram.shape[0]
    for i in range(0, n, block):
        for j in range(i, n, block):
            upper = gram[i:i + block, j:j + block]
            lower = gram[j:j + block, i:i + block]
            mean = 0.5 * (upper + lower.T)
            upper[...] = mean
            lower[...] = mean.T
    return gram


def regularization(problem: Problem, regul: float, order: int = 2):
    """The package's smoothness term over ``pop_shape`` for ``problem`` (a Regularization)."""
    from cubefit_mpi.numerics.regularization import Regularization

    return Regularization.build(problem.n_comp, problem.n_pop, regul=regul, regul_order=order,
                                pop_shape=problem.pop_shape)


def cached_system(spec: ProblemSpec, cache_dir: str | None) -> Problem:
    """:func:`build_system`, stored as ``.npy`` files in ``cache_dir`` (none: always rebuilt)."""
    if not cache_dir:
        return build_system(spec)
    root = Path(cache_dir) / (f"miles_C{spec.components}_S{spec.spaxels}_n{spec.noise:g}_seed{spec.seed}"
                              f"_a{spec.ages}_v{spec.vmax:g}")
    files = {name: root / f"{name}.npy" for name in ("gram", "rhs", "meta")}
    if all(f.exists() for f in files.values()):
        meta = np.load(files["meta"], allow_pickle=False)
        n_comp, n_pop, n_age, n_met = (int(v) for v in meta[:4])
        return Problem(np.load(files["gram"], mmap_mode=None), np.load(files["rhs"]), float(meta[4]),
                       meta[5:], (n_age, n_met), n_comp, n_pop)
    problem = build_system(spec)
    root.mkdir(parents=True, exist_ok=True)
    np.save(files["gram"], problem.gram)
    np.save(files["rhs"], problem.rhs)
    np.save(files["meta"], np.concatenate([[problem.n_comp, problem.n_pop, *problem.pop_shape, problem.yy],
                                           problem.x_true]))
    return problem
