"""Synthetic galaxies with known truth (pure numerics).

A realistic small IFU problem:

* observed grid uniform in ln λ from 4800 Å at ``velscale_obs`` km/s per pixel; a template grid
  ``oversample`` times finer that covers it plus the LOSVD velocity guard;
* SSP-like templates on an (age × metallicity) grid: a continuum whose slope changes with age,
  Balmer lines that weaken with age, metal lines (Mg b, Fe, Na D, ...) that strengthen with age
  and metallicity, and a fixed forest of weak lines -- so neighbouring templates are strongly
  correlated, as in real libraries (``templates="synthetic"``, the default: exact control for
  tests);
* or a real library (``templates="miles"``: the stage passes the spectra on their own grid,
  :func:`library_on_grid` log-rebins them by exact overlap, per Å, and divides each by its mean
  over the template grid, so the weights are light weights of unit-mean templates, as for the
  synthetic ones);
* a 2-D spaxel grid and components with distinct kinematics (a rotating disc, a
  counter-rotating disc, a hot bulge, then variations), Gauss–Hermite LOSVDs histogrammed on
  ``VelPix`` with spatially varying amplitudes;
* a sparse non-negative ``x_true (C, P)``.

The data path is independent of the builder: templates are mixed per component first
(``Σ_p x_cp T_p``), each mixture is convolved by shift-and-add in float64 (not by FFT),
rebinned, and scaled by the LOSVD amplitude ("model" normalisation, "sum" amplitude).
Every per-spaxel quantity depends only on the seed and the spaxel index, so any split of the
spaxels over ranks gives identical bytes.

Local (no MPI, no I/O).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

from .constants import SPEED_OF_LIGHT_KMS
from .convolve import convolve_direct
from .kernels import interpolation_matrix, losvd_amplitude, unit_kernels
from .rebin import overlap_rebin
from .wavelength_grids import edges_from_centres, pixel_edges

# rest-frame air wavelengths (Å) of the strong features; (name, λ, family)
STRONG_LINES = (
    ("Hgamma", 4340.5, "balmer"), ("Hbeta", 4861.3, "balmer"), ("Halpha", 6562.8, "balmer"),
    ("Fe4383", 4383.5, "metal"), ("Fe4531", 4531.1, "metal"), ("Fe5015", 5015.0, "metal"),
    ("Mgb5167", 5167.3, "metal"), ("Mgb5173", 5172.7, "metal"), ("Mgb5184", 5183.6, "metal"),
    ("Fe5270", 5270.4, "metal"), ("Fe5335", 5335.2, "metal"), ("Fe5406", 5406.1, "metal"),
    ("Fe5709", 5709.4, "metal"), ("Fe5782", 5782.1, "metal"), ("NaD5890", 5889.95, "metal"),
    ("NaD5896", 5895.92, "metal"), ("Ca6162", 6162.2, "metal"), ("Ca6495", 6494.9, "metal"),
)
LIBRARY_SEED = 20240521        # the weak-line forest is a fixed "library", the same for all seeds
TEMPLATE_SOURCES = ("synthetic", "miles")
DEFAULT_POPULATIONS = 24       # synthetic templates; a library gives its own number


@dataclass(frozen=True)
class MockSpec:
    """What to make.  ``snr=None`` means noise-free; ``masked_pixels`` pixels are masked."""

    spaxels: int
    components: int
    populations: int
    wavelengths: int
    seed: int = 0
    snr: float | None = None
    masked_pixels: int = 0
    velscale_obs: float = 60.0      # km/s per observed pixel
    oversample: int = 2             # template pixels per observed pixel
    lam0: float = 4800.0            # Å, first observed pixel centre
    vmax: float = 800.0             # km/s, half-width of VelPix
    dv: float = 40.0                # km/s, VelPix spacing
    templates: str = "synthetic"    # "synthetic" (make_templates) or a shipped library ("miles")

    def __post_init__(self):
        if self.templates not in TEMPLATE_SOURCES:
            raise ValueError(f"--templates {self.templates!r}: expected one of {', '.join(TEMPLATE_SOURCES)}")
        for name in ("spaxels", "components", "populations", "wavelengths"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name}: expected a positive integer, got {getattr(self, name)}")
        if self.wavelengths < 8:
            raise ValueError(f"--wavelengths: expected at least 8, got {self.wavelengths}")
        if self.snr is not None and not self.snr > 0:
            raise ValueError(f"--noise: expected a positive signal-to-noise ratio, got {self.snr}")
        if not 0 <= self.masked_pixels < self.wavelengths:
            raise ValueError(f"--masked-pixels: expected 0 <= K < {self.wavelengths}, got {self.masked_pixels}")

    def attrs(self) -> dict:
        """Generating parameters, for HDF5 attributes (None stored as NaN)."""
        return {k: (np.nan if v is None else v) for k, v in asdict(self).items()}


# ---------------------------------------------------------------------------------------------
# grids
# ---------------------------------------------------------------------------------------------
def make_grids(spec: MockSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``obs_pix (L,)``, ``tem_pix (T,)`` (ln λ) and ``vel_pix (V,)`` (km/s).  Local."""
    dln_obs = spec.velscale_obs / SPEED_OF_LIGHT_KMS
    obs_pix = math.log(spec.lam0) + dln_obs * np.arange(spec.wavelengths)
    dln_tem = dln_obs / spec.oversample
    n_half = int(round(spec.vmax / spec.dv))
    vel_pix = spec.dv * np.arange(-n_half, n_half + 1, dtype=np.float64)
    guard = int(np.ceil(-np.log1p(-spec.vmax / SPEED_OF_LIGHT_KMS) / dln_tem)) + spec.oversample + 2
    lo = obs_pix[0] - 0.5 * dln_obs - guard * dln_tem
    n_tem = int(np.ceil((obs_pix[-1] + 0.5 * dln_obs + guard * dln_tem - lo) / dln_tem)) + 1
    tem_pix = lo + dln_tem * np.arange(n_tem)
    return obs_pix, tem_pix, vel_pix


def pop_grid_shape(n_pop: int) -> tuple[int, int]:
    """(n_age, n_met) with n_age * n_met == P, as square as possible, ages the longer axis.  Local."""
    n_met = max(d for d in range(1, int(math.isqrt(n_pop)) + 1) if n_pop % d == 0)
    return n_pop // n_met, n_met


# ---------------------------------------------------------------------------------------------
# templates
# ---------------------------------------------------------------------------------------------
def make_templates(tem_pix: np.ndarray, n_pop: int) -> tuple[np.ndarray, dict]:
    """SSP-like templates ``(P, T)`` float64 (all positive) and their population grid.  Local.

    Returns the templates and ``{"pop_shape", "log_age" (P,), "metallicity" (P,)}``.
    """
    n_age, n_met = pop_grid_shape(n_pop)
    log_age = np.repeat(np.linspace(8.0, 10.1, n_age), n_met)          # log10 yr
    metal = np.tile(np.linspace(-1.5, 0.3, n_met) if n_met > 1 else np.array([0.0]), n_age)
    age_f = (log_age - 8.0) / 2.1                                        # 0 young .. 1 old
    met_f = (metal + 1.5) / 1.8
    lam = np.exp(tem_pix)
    continuum = (lam[None, :] / 5000.0) ** (-(2.6 - 2.4 * age_f[:, None]) + 0.3 * met_f[:, None])
    log_absorb = np.zeros((n_pop, lam.size))
    sigma_line = 70.0 / SPEED_OF_LIGHT_KMS                               # intrinsic width, ln λ
    for _name, centre, family in STRONG_LINES:
        if family == "balmer":
            depth = 0.55 * np.exp(-2.2 * age_f) * (1.0 - 0.25 * met_f) + 0.05
        else:
            depth = (0.08 + 0.45 * age_f) * (0.35 + 0.65 * met_f)
        profile = np.exp(-0.5 * ((tem_pix - math.log(centre)) / (sigma_line * 1.6)) ** 2)
        log_absorb += np.log1p(-np.clip(depth, 0.0, 0.9))[:, None] * profile[None, :]
    forest = np.random.default_rng(LIBRARY_SEED)
    lo, hi = tem_pix[0], tem_pix[-1]
    n_weak = max(8, int((hi - lo) / (8 * sigma_line)))
    centres = forest.uniform(lo, hi, n_weak)
    strength = forest.uniform(0.02, 0.15, n_weak)
    age_slope = forest.uniform(-0.5, 1.0, n_weak)
    for c0, s0, a0 in zip(centres, strength, age_slope):
        depth = s0 * (0.4 + 0.6 * met_f) * (1.0 + a0 * (age_f - 0.5))
        profile = np.exp(-0.5 * ((tem_pix - c0) / sigma_line) ** 2)
        log_absorb += np.log1p(-np.clip(depth, 0.0, 0.9))[:, None] * profile[None, :]
    templates = continuum * np.exp(log_absorb)
    templates /= templates.mean(axis=1, keepdims=True)
    return templates, {"pop_shape": (n_age, n_met), "log_age": log_age, "metallicity": metal}


def library_on_grid(tem_pix: np.ndarray, lam: np.ndarray, flux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A template library log-rebinned onto the template grid, each template of unit mean.  Local.

    Parameters
    ----------
    tem_pix : (T,) float64
        ln λ of the template grid (uniform).
    lam : (T0,) float64
        Pixel-centre wavelengths (Å) of the library.
    flux : (P, T0) float
        Flux densities per Å.

    Returns
    -------
    templates : (P, T) float64
        Exact-overlap rebin per Å (:func:`~cubefit_mpi.numerics.rebin.overlap_rebin`,
        ``measure="lambda"``, as ``ingest`` does), divided by ``norm``.
    norm : (P,) float64
        Each rebinned template's mean over the grid, in the library's units: ``x / norm`` turns
        light weights into the library's weights (mass for MILES).

    Raises
    ------
    ValueError
        When the template grid reaches outside the library.
    """
    in_edges, _ = edges_from_centres(lam)
    out_edges = pixel_edges(np.asarray(tem_pix, dtype=np.float64))
    have, need = np.exp(in_edges[[0, -1]]), np.exp(out_edges[[0, -1]])
    if need[0] < have[0] or need[1] > have[1]:
        raise ValueError(f"the template grid {need[0]:.1f}-{need[1]:.1f} A (the observed range plus the velocity "
                         f"guard) reaches outside the library's {have[0]:.1f}-{have[1]:.1f} A")
    rebinned = overlap_rebin(in_edges, out_edges, measure="lambda").apply(np.asarray(flux, dtype=np.float64))
    norm = rebinned.mean(axis=1)
    return rebinned / norm[:, None], norm


# ---------------------------------------------------------------------------------------------
# spaxels, components, LOSVDs
# ---------------------------------------------------------------------------------------------
def spaxel_xy(n_spaxels: int, pixel: float = 0.2) -> np.ndarray:
    """Coordinates ``(S, 2)`` in arcsec of the first S spaxels of a centred square raster.  Local."""
    nx = int(math.ceil(math.sqrt(n_spaxels)))
    ny = int(math.ceil(n_spaxels / nx))
    idx = np.arange(n_spaxels)
    return np.column_stack(((idx % nx - (nx - 1) / 2.0) * pixel, (idx // nx - (ny - 1) / 2.0) * pixel))


def component_params(n_comp: int, seed: int) -> list[dict]:
    """Kinematic parameters of each component (deterministic in ``seed``).  Local."""
    rng = np.random.default_rng([seed, 11])
    kinds = ("disc", "counter_disc", "bulge")
    params = []
    for c in range(n_comp):
        kind = kinds[c % 3]
        generation = c // 3
        jitter = rng.uniform(0.85, 1.15, size=5)
        base = {"disc": dict(v0=220.0, sigma0=45.0, h3=-0.08, h4=0.02, scale=1.6, weight=1.0),
                "counter_disc": dict(v0=-140.0, sigma0=70.0, h3=0.06, h4=0.03, scale=1.0, weight=0.45),
                "bulge": dict(v0=25.0, sigma0=170.0, h3=0.0, h4=0.05, scale=0.5, weight=1.6)}[kind]
        params.append(dict(
            kind=kind,
            v0=base["v0"] * jitter[0] * (1.0 - 0.25 * generation),
            sigma0=base["sigma0"] * jitter[1] * (1.0 + 0.3 * generation),
            h3=base["h3"], h4=base["h4"],
            scale=base["scale"] * jitter[2], weight=base["weight"] * jitter[3],
            pa=float(rng.uniform(-0.3, 0.3)), incl=float(rng.uniform(0.8, 1.2)),
        ))
    return params


def gauss_hermite(vel: np.ndarray, v_mean, sigma, h3, h4) -> np.ndarray:
    """Gauss–Hermite LOSVD density at ``vel`` (broadcasting), clipped at 0.  Local."""
    y = (vel - v_mean) / sigma
    h3_poly = (2.0 * math.sqrt(2.0) * y**3 - 3.0 * math.sqrt(2.0) * y) / math.sqrt(6.0)
    h4_poly = (4.0 * y**4 - 12.0 * y**2 + 3.0) / math.sqrt(24.0)
    dens = np.exp(-0.5 * y**2) / (sigma * math.sqrt(2.0 * math.pi)) * (1.0 + h3 * h3_poly + h4 * h4_poly)
    return np.clip(dens, 0.0, None)


def make_losvd(xy: np.ndarray, vel_pix: np.ndarray, comps: list[dict]) -> np.ndarray:
    """LOSVD histograms ``(n, V, C)`` float64 for spaxels at ``xy (n, 2)``.  Local.

    Bin value = density at the bin centre × bin width × the component's surface brightness.
    """
    dv = float(vel_pix[1] - vel_pix[0]) if vel_pix.size > 1 else 1.0
    out = np.empty((xy.shape[0], vel_pix.size, len(comps)))
    for c, p in enumerate(comps):
        cos_pa, sin_pa = math.cos(p["pa"]), math.sin(p["pa"])
        x_maj = xy[:, 0] * cos_pa + xy[:, 1] * sin_pa
        y_min = (-xy[:, 0] * sin_pa + xy[:, 1] * cos_pa) / (0.6 * p["incl"])
        r = np.hypot(x_maj, y_min)
        cos_phi = np.divide(x_maj, r, out=np.zeros_like(r), where=r > 0)
        if p["kind"] == "bulge":
            v_mean = p["v0"] * np.tanh(r / p["scale"]) * cos_phi
            sigma = p["sigma0"] * (1.0 + r / p["scale"]) ** -0.25
            surface = np.exp(-((r / p["scale"]) ** 0.5) * 2.0)
        else:
            v_mean = p["v0"] * (2.0 / math.pi) * np.arctan(r / (0.3 * p["scale"])) * cos_phi
            sigma = p["sigma0"] * (1.0 + 0.5 * np.exp(-r / p["scale"]))
            surface = np.exp(-r / p["scale"])
        h3 = p["h3"] * v_mean / max(abs(p["v0"]), 1.0)
        dens = gauss_hermite(vel_pix[None, :], v_mean[:, None], sigma[:, None], h3[:, None], p["h4"])
        out[:, :, c] = dens * dv * (p["weight"] * (0.05 + surface))[:, None]
    return out


def make_x_true(n_comp: int, n_pop: int, seed: int) -> np.ndarray:
    """Sparse non-negative weights ``(C, P)``: 1–3 populations per component.  Local."""
    rng = np.random.default_rng([seed, 13])
    x = np.zeros((n_comp, n_pop))
    for c in range(n_comp):
        k = int(min(n_pop, rng.integers(1, 4)))
        picks = rng.choice(n_pop, size=k, replace=False)
        x[c, picks] = rng.uniform(0.5, 2.0, size=k)
    return x


def make_mask(n_pix: int, n_masked: int, seed: int) -> np.ndarray:
    """Boolean ``(L,)``, True = used; ``n_masked`` pixels masked in up to 3 contiguous ranges.  Local."""
    mask = np.ones(n_pix, dtype=bool)
    if n_masked <= 0:
        return mask
    rng = np.random.default_rng([seed, 17])
    n_ranges = int(min(3, n_masked))
    sizes = np.full(n_ranges, n_masked // n_ranges)
    sizes[: n_masked % n_ranges] += 1
    starts = np.sort(rng.choice(max(1, n_pix - int(sizes.max())), size=n_ranges, replace=False))
    remaining = n_masked
    for start, size in zip(starts, sizes):
        mask[start:start + size] = False
    remaining = n_masked - int((~mask).sum())
    if remaining > 0:  # ranges overlapped: mask further pixels from the start
        free = np.nonzero(mask)[0][:remaining]
        mask[free] = False
    return mask


# ---------------------------------------------------------------------------------------------
# the independent data path
# ---------------------------------------------------------------------------------------------
@dataclass
class MockModel:
    """Everything shared by all spaxels of one mock (templates, grids, operators)."""

    spec: MockSpec
    obs_pix: np.ndarray
    tem_pix: np.ndarray
    vel_pix: np.ndarray
    templates: np.ndarray
    pop_info: dict
    comps: list
    x_true: np.ndarray
    mask: np.ndarray
    rebin_lt: sp.csr_matrix      # (L, T), observed = rebin_lt @ template-grid spectrum
    interp: np.ndarray           # (K, V)
    shifts: np.ndarray           # (K,)

    @classmethod
    def create(cls, spec: MockSpec, rebin_op: sp.spmatrix, library: tuple | None = None) -> "MockModel":
        """``rebin_op`` is the ``(T, L)`` operator for the grids of :func:`make_grids`.

        ``library``: with ``spec.templates`` other than ``"synthetic"``, ``(lam (T0,) Å,
        flux (P, T0) per Å, pop_info)`` on the library's own grid, ``pop_info`` with
        ``pop_shape``, ``log_age (P,)``, ``metallicity (P,)``; ``pop_info["norm"] (P,)`` is added
        (see :func:`library_on_grid`).
        """
        obs_pix, tem_pix, vel_pix = make_grids(spec)
        if spec.templates == "synthetic":
            templates, pop_info = make_templates(tem_pix, spec.populations)
        else:
            if library is None:
                raise ValueError(f"--templates {spec.templates}: the library's spectra are needed")
            lam, flux, pop_info = library
            if spec.populations != flux.shape[0]:
                raise ValueError(f"--populations {spec.populations}: the {spec.templates} library has "
                                 f"{flux.shape[0]} populations (pop_shape {tuple(pop_info['pop_shape'])}); "
                                 f"leave --populations out to use them all")
            try:
                templates, norm = library_on_grid(tem_pix, lam, flux)
            except ValueError as exc:
                raise ValueError(f"--wavelengths {spec.wavelengths}: {exc}; use fewer wavelengths") from None
            pop_info = {**pop_info, "norm": norm}
        interp, shifts = interpolation_matrix(vel_pix, tem_pix[1] - tem_pix[0])
        return cls(spec, obs_pix, tem_pix, vel_pix, templates, pop_info,
                   component_params(spec.components, spec.seed),
                   make_x_true(spec.components, spec.populations, spec.seed),
                   make_mask(spec.wavelengths, spec.masked_pixels, spec.seed),
                   sp.csr_matrix(rebin_op.T), interp, shifts)

    def losvd(self, s0: int, s1: int) -> np.ndarray:
        """LOSVD ``(s1-s0, V, C)`` of spaxels ``[s0, s1)``."""
        return make_losvd(spaxel_xy(self.spec.spaxels)[s0:s1], self.vel_pix, self.comps)

    def spectra(self, s0: int, s1: int, losvd: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Noisy (or clean) spectra ``(n, L)`` and noise sigma ``(n,)`` of spaxels ``[s0, s1)``.

        Masked pixels are NaN in the returned data, as bad pixels are in real cubes.
        """
        losvd = self.losvd(s0, s1) if losvd is None else losvd
        mixtures = self.x_true @ self.templates                          # (C, T)
        kernels, _ = unit_kernels(losvd, self.interp)                     # (n, C, K)
        amp = losvd_amplitude(losvd, self.vel_pix, "sum")                 # (n, C)
        conv = convolve_direct(mixtures[None, :, :], kernels, self.shifts)  # (n, C, T)
        on_template_grid = (conv * amp[:, :, None]).sum(axis=1)          # (n, T)
        clean = np.asarray(self.rebin_lt @ on_template_grid.T).T          # (n, L)
        sigma = np.zeros(s1 - s0)
        if self.spec.snr is not None:
            for i, s in enumerate(range(s0, s1)):
                level = float(np.median(np.abs(clean[i, self.mask])))
                sigma[i] = level / self.spec.snr
                clean[i] += np.random.default_rng([self.spec.seed, 7, s]).normal(0.0, sigma[i], clean.shape[1])
        clean[:, ~self.mask] = np.nan
        return clean, sigma

