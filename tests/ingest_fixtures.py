"""A MUSE-like galaxy on disk with known truth, for ``ingest`` and end-to-end tests.

:func:`write_muse_like_inputs` writes a FITS cube linear in λ (DATA + STAT, a celestial and
spectral WCS, a few all-NaN spaxels, one bad channel and one bad pixel), a pPXF-style template
``.npz`` on a fine linear grid, an LOSVD ``.npz`` and, optionally, a bin map.

The cube is made so that, after ``ingest`` (documented grid rules, per-Å flux density), the
observed spectra equal -- to rounding -- what the builder computes from the ingested templates
and LOSVDs with ``x_true`` (norm "model", amplitude "sum").  Everything is computed here
independently of :mod:`cubefit_mpi.numerics.rebin`:

* the templates' ln λ grid version is taken from the cumulative flux ``F(λ)`` of the fine
  linear spectra (piecewise linear, so interpolating it at the new edges is exact);
* the galaxy on the template grid is ``Σ_c amp[s,c] (Σ_p x[c,p] T_p) ⊛ K[s,c]`` by direct
  shift-and-add (the mock's reference path), averaged over the ``oversample`` template pixels of
  each observed pixel (``/R_T`` of aligned grids);
* the linear-λ spectra ``y_lin`` solve ``M y_lin = model_L`` where ``M`` is the per-Å log-rebin
  built from cumulative sums (minimum-norm correction of a smooth interpolation).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cubefit_mpi.numerics.convolve import convolve_direct
from cubefit_mpi.numerics.kernels import interpolation_matrix, losvd_amplitude, unit_kernels
from cubefit_mpi.numerics.synthetic_galaxy import component_params, make_losvd, make_templates, make_x_true

C_KMS = 299792.458


def cumulative_rebin_matrix(in_edges_aa: np.ndarray, out_edges_aa: np.ndarray) -> np.ndarray:
    """Dense ``M (n_out, n_in)``: per-Å means over output pixels of a piecewise-constant f_λ.

    Built from the cumulative flux at the input edges, linearly interpolated at the output
    edges (all in Å).
    """
    n_in = in_edges_aa.size - 1
    cum = np.zeros((n_in + 1, n_in))
    cum[1:] = np.tril(np.ones((n_in, n_in))) * np.diff(in_edges_aa)[None, :]
    k = np.clip(np.searchsorted(in_edges_aa, out_edges_aa, side="right") - 1, 0, n_in - 1)
    t = (out_edges_aa - in_edges_aa[k]) / (in_edges_aa[k + 1] - in_edges_aa[k])
    at_edges = (1 - t)[:, None] * cum[k] + t[:, None] * cum[k + 1]
    return np.diff(at_edges, axis=0) / np.diff(out_edges_aa)[:, None]


def _template_grid_version(lam_fine: np.ndarray, fine: np.ndarray, tem_edges_ln: np.ndarray) -> np.ndarray:
    dl = lam_fine[1] - lam_fine[0]
    knots = np.concatenate(([lam_fine[0] - dl / 2], lam_fine + dl / 2))
    cum = np.concatenate((np.zeros((fine.shape[0], 1)), np.cumsum(fine * dl, axis=1)), axis=1)
    at = np.exp(tem_edges_ln)
    F = np.stack([np.interp(at, knots, row) for row in cum])
    return np.diff(F, axis=1) / np.diff(at)[None, :]


def write_muse_like_inputs(tmpdir, *, ny=6, nx=5, n_lin=240, lam0=4800.0, dlam=1.25, velscale=110.0,
                           oversample=2, components=2, populations=6, seed=1, vmax=600.0, dv=50.0,
                           nan_spaxels=((0, 0), (2, 3), (5, 4)), bad_channel=100, bad_pixel=((1, 1), 150),
                           binning=None, unit="Angstrom", dtype=np.float64) -> dict:
    """Write the inputs of ``ingest`` under ``tmpdir``; return paths, truth and expectations.

    ``binning``: None (one spectrum per finite spaxel), ``"sum"`` or ``"mean"`` (2x2-block bin
    map written to ``bins.npy``; the member spectra add up to, or average to, the bin's truth).
    ``unit``: CUNIT3 (``"Angstrom"`` or ``"nm"``, values converted; anything else is written as is).
    Returns ``{"cube", "templates", "losvd", "bins", "velscale", "oversample", "x_true", "norm_mode",
    "amp_mode", "obs_edges", "tem_edges", "model_L" (S, L), "y_lin" (ny, nx, n_lin) as written,
    "var_lin", "M" (L, n_lin), "kept" (ny, nx) bool, "bin_map", "n_members", "bad_lin" (n_lin,)
    bool}``.
    """
    from astropy.io import fits

    tmpdir = Path(tmpdir)
    rng = np.random.default_rng([seed, 99])
    # --- grids (documented rules) ----------------------------------------------------------
    lam_lin = lam0 + dlam * np.arange(n_lin)
    in_edges = lam0 - dlam / 2 + dlam * np.arange(n_lin + 1)
    dln = velscale / C_KMS
    n_obs = int(math.floor((math.log(in_edges[-1]) - math.log(in_edges[0])) / dln + 1e-9))
    obs_edges = math.log(in_edges[0]) + dln * np.arange(n_obs + 1)
    dln_t = dln / oversample
    guard = int(math.ceil(-math.log1p(-vmax / C_KMS) / dln_t - 1e-9)) + oversample + 2
    tem_edges = obs_edges[0] + dln_t * np.arange(-guard, n_obs * oversample + guard + 1)
    vel = dv * np.arange(-round(vmax / dv), round(vmax / dv) + 1)
    # --- templates on a fine linear grid -----------------------------------------------------
    lam_fine = np.arange(math.exp(tem_edges[0]) - 20.0, math.exp(tem_edges[-1]) + 20.0, 0.4)
    fine, pop = make_templates(np.log(lam_fine), populations)
    n_age, n_met = pop["pop_shape"]
    ages_gyr = 10 ** np.unique(pop["log_age"]) / 1e9
    metals = pop["metallicity"][:n_met]
    np.savez(tmpdir / "templates.npz", templates=fine.T.reshape(-1, n_age, n_met), lam=lam_fine,
             ages=ages_gyr, metals=metals)
    tem_T = _template_grid_version(lam_fine, fine, tem_edges)
    # --- spaxels, bins, LOSVDs, truth ------------------------------------------------------
    kept = np.ones((ny, nx), dtype=bool)
    for y, x in nan_spaxels:
        kept[y, x] = False
    yy, xx = np.mgrid[0:ny, 0:nx]
    xy = np.column_stack(((xx - (nx - 1) / 2) * 0.2, (yy - (ny - 1) / 2) * 0.2)).reshape(-1, 2)
    if binning is None:
        bin_map = None
        target = np.where(kept.ravel(), np.cumsum(kept.ravel()) - 1, -1)
    else:
        bin_map = ((yy // 2) * ((nx + 1) // 2) + xx // 2).astype(np.int64)
        target = np.where(kept.ravel(), bin_map.ravel(), -1)
    n_spec = int(target.max()) + 1
    n_members = np.bincount(target[target >= 0], minlength=n_spec)
    spec_xy = np.stack([xy[target == t].mean(axis=0) for t in range(n_spec)])
    comps = component_params(components, seed)
    losvd = make_losvd(spec_xy, vel, comps)
    x_true = make_x_true(components, populations, seed)
    mixtures = x_true @ tem_T                                          # (C, T)
    interp, shifts = interpolation_matrix(vel, dln_t)
    kernels, _ = unit_kernels(losvd, interp)
    amp = losvd_amplitude(losvd, vel, "sum")
    model_T = (convolve_direct(mixtures[None], kernels, shifts) * amp[:, :, None]).sum(axis=1)
    model_L = model_T[:, guard:guard + n_obs * oversample].reshape(n_spec, n_obs, oversample).mean(axis=2)
    # --- linear-λ spectra whose log-rebin is model_L ---------------------------------------
    M = cumulative_rebin_matrix(in_edges, np.exp(obs_edges))
    obs_centres_aa = np.exp(0.5 * (obs_edges[1:] + obs_edges[:-1]))
    guess = np.stack([np.interp(lam_lin, obs_centres_aa, row) for row in model_L])
    y_spec = guess + (model_L - guess @ M.T) @ np.linalg.pinv(M).T    # (S_spec, n_lin)
    y_lin = np.full((ny, nx, n_lin), np.nan)
    flat = y_lin.reshape(-1, n_lin)
    for s in np.flatnonzero(target >= 0):
        t = target[s]
        if binning == "sum":
            flat[s] = y_spec[t] / n_members[t]
        else:
            flat[s] = y_spec[t]
    var_lin = (1e-3 + 0.01 * np.abs(np.nan_to_num(y_lin))) ** 2 * rng.uniform(0.5, 1.5, size=(ny, nx, 1))
    var_lin[~kept] = np.nan
    bad_lin = np.zeros(n_lin, dtype=bool)
    if bad_channel is not None:
        y_lin[:, :, bad_channel] = np.nan
        bad_lin[bad_channel] = True
    if bad_pixel is not None:
        (py, px), pl = bad_pixel
        y_lin[py, px, pl] = np.nan
        bad_lin[pl] = True
    y_lin = y_lin.astype(dtype)
    var_lin = var_lin.astype(dtype)
    # --- files -----------------------------------------------------------------------------
    scale = {"Angstrom": 1.0, "nm": 0.1}.get(unit, 1.0)
    header = fits.Header()
    for key, value in (("CTYPE1", "RA---TAN"), ("CTYPE2", "DEC--TAN"), ("CTYPE3", "AWAV"),
                       ("CUNIT1", "deg"), ("CUNIT2", "deg"), ("CUNIT3", unit),
                       ("CRPIX1", (nx + 1) / 2), ("CRPIX2", (ny + 1) / 2), ("CRPIX3", 1.0),
                       ("CRVAL1", 150.1), ("CRVAL2", 2.2), ("CRVAL3", lam0 * scale),
                       ("CD1_1", -0.2 / 3600), ("CD2_2", 0.2 / 3600), ("CD3_3", dlam * scale),
                       ("BUNIT", "10**(-20)*erg/s/cm**2/Angstrom")):
        header[key] = value
    data_hdu = fits.ImageHDU(np.moveaxis(y_lin, 2, 0), header=header, name="DATA")
    stat_header = header.copy()
    stat_header["BUNIT"] = "(10**(-20)*erg/s/cm**2/Angstrom)**2"
    stat_hdu = fits.ImageHDU(np.moveaxis(var_lin, 2, 0), header=stat_header, name="STAT")
    cube = tmpdir / "cube.fits"
    fits.HDUList([fits.PrimaryHDU(), data_hdu, stat_hdu]).writeto(cube, overwrite=True)
    np.savez(tmpdir / "losvd.npz", losvd=losvd, vel=vel)
    bins = None
    if bin_map is not None:
        bins = tmpdir / "bins.npy"
        np.save(bins, bin_map)
    return {"cube": str(cube), "templates": str(tmpdir / "templates.npz"), "losvd": str(tmpdir / "losvd.npz"),
            "bins": None if bins is None else str(bins), "velscale": velscale, "oversample": oversample,
            "x_true": x_true, "norm_mode": "model", "amp_mode": "sum", "obs_edges": obs_edges,
            "tem_edges": tem_edges, "tem_T": tem_T, "model_L": model_L, "y_lin": y_lin.astype(np.float64),
            "var_lin": var_lin.astype(np.float64), "M": M, "kept": kept, "bin_map": bin_map,
            "n_members": n_members, "bad_lin": bad_lin, "losvd_array": losvd, "vel": vel,
            "pop_shape": (n_age, n_met), "in_edges_aa": in_edges}
