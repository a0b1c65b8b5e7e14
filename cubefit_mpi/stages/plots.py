"""Stage ``plot``: diagnostic PNGs of a fit, drawn by rank 0 with matplotlib's Agg canvas.

Files written into ``out_dir`` (only those whose inputs exist):

``spectra_best_worst.png``
    the N best (left) and N worst (right) spaxels by the reconstruction's per-spaxel RMSE (or
    χ²): data, model and residual, masked ranges shaded.  Without a stored reconstruction an
    evenly spaced sample of 2N spaxels is drawn, their models computed from ``A`` and ``x``.
``population_weights.png``
    x[c, :] for every component, as an image over the population grid when ``/Templates`` has
    ``pop_shape`` (axes labelled from ``/Populations``), else as bars; ``/Truth/x`` beside it.
``component_totals.png``
    Σ_p x[c, p] as fractions of Σ x, beside the orbit-weight targets ``/Solve/orbit_weights``
    and the truth, when present.
``convergence.png``
    RMSE and its EWMA against step from the newest fit-tracker sidecar ``FILE.fit.<id>.<time>.h5``.
``rmse_map.png``
    the per-spaxel RMSE at ``/Spaxels/xy`` (needs both and a reconstruction).
``polynomials.png``
    when the solve fitted polynomials of this x (``/Solve/mult_poly``, ``/Solve/add_poly``):
    the multiplicative factor ``g_s(λ)`` and the additive term ``Σ_j a_sj P_j(λ)`` (relative to
    each spectrum's median flux) over all spaxels: median and 5–95 % range.  The models of the
    spectra include them.
``uncertainty.png``
    component totals, mean age and [M/H] with their bootstrap intervals, and per component the
    weights' median and interval width (:mod:`.plots_uncertainty`; needs a current ``/Uncertainty``).

Reads only the rows it draws (plus the small per-spaxel statistics).  Importing this module
imports neither matplotlib nor pyplot; figures are drawn on ``FigureCanvasAgg`` without pyplot,
so no global backend or figure state is touched.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from ..config.errors import InputError
from ..io import layout as lay
from ..io.h5file import open_h5
from ..io.polynomials import read_polynomials
from ..operators.select import open_operator
from ..numerics.reconstruction import residual_stats, x_checksum
from ..parallel.collectives import agree, raise_if_any
from ..parallel.comm import get_comm, mpi
from ..solvers.uncertainty import bootstrap_is_current
from .figures import new_figure, population_axes, population_grid, read_truth, save_png, set_ticks
from .plots_uncertainty import UNCERTAINTY_PNG, has_uncertainty, plot_uncertainty
from .recon import (
    CHI2_SUFFIX, RECON_DEFAULT, RMSE_SUFFIX, model_rows, normalise_name, read_mask_and_weights, read_x
)

_LOG = logging.getLogger("cubefit_mpi.stages.plots")

SPECTRA_PNG = "spectra_best_worst.png"
POPULATIONS_PNG = "population_weights.png"
TOTALS_PNG = "component_totals.png"
CONVERGENCE_PNG = "convergence.png"
RMSE_MAP_PNG = "rmse_map.png"
POLYNOMIALS_PNG = "polynomials.png"
ORBIT_WEIGHTS = "/Solve/orbit_weights"


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def make_plots(path, out_dir, *, n_spaxels: int = 3, recon: str = RECON_DEFAULT,
               x_dataset: str = lay.X_GLOBAL, rank_by: str = "rmse", comm=None) -> list[str]:
    """Draw the diagnostic PNGs of ``path`` into ``out_dir``.  Collective over comm.

    Rank 0 reads the file (serially) and draws; the other ranks wait and receive the list.

    Parameters
    ----------
    path : str
        The cube file (needs ``x_dataset``; ``recon`` or ``/HyperCube/models`` for the spectra).
    out_dir : str
        Folder for the PNGs (created).
    n_spaxels : int
        N best and N worst spaxels drawn.
    recon : str
        Reconstruction dataset written by :func:`cubefit_mpi.stages.recon.reconstruct`.
    x_dataset : str
        The weights (C*P,).
    rank_by : {"rmse", "chi2"}
        Per-spaxel statistic that orders best and worst.

    Returns
    -------
    list of str, the files written, on every rank.

    Raises
    ------
    InputError
        On every rank: bad ``n_spaxels``/``rank_by``, x missing or invalid, neither the
        reconstruction nor the models present.
    """
    comm = get_comm(comm)
    written, error = None, None
    if comm.Get_rank() == 0:
        try:
            written = draw_all(os.fspath(path), os.fspath(out_dir), n_spaxels=n_spaxels,
                               recon=normalise_name(recon), x_dataset=normalise_name(x_dataset),
                               rank_by=rank_by)
        except Exception as exc:            # raised on every rank below, never left hanging
            error = exc
    raise_if_any(error, comm)
    return agree(written, comm)


def draw_all(path: str, out_dir: str, *, n_spaxels: int, recon: str, x_dataset: str,
             rank_by: str) -> list[str]:
    """Everything :func:`make_plots` draws, on this process alone.  Local."""
    if int(n_spaxels) != n_spaxels or n_spaxels < 1:
        raise InputError(f"--n {n_spaxels}: expected a positive integer")
    if rank_by not in ("rmse", "chi2"):
        raise InputError(f"rank_by={rank_by!r}: expected 'rmse' or 'chi2'")
    with open_h5(path, "r", mpi().COMM_SELF) as f:
        n_comp, n_pop = _components_populations(f, path)
        x_cp = read_x(f, x_dataset, n_comp, n_pop)
        has_recon = recon in f and recon + CHI2_SUFFIX in f and recon + RMSE_SUFFIX in f
        if has_recon:
            _check_recon(f, recon, x_cp)
        written = draw_fit(f, path, out_dir, x_cp, n_spaxels=n_spaxels, recon=recon if has_recon else None,
                           rank_by=rank_by)
        if has_recon and lay.SPAXEL_XY in f:
            written.append(plot_rmse_map(f, os.path.join(out_dir, RMSE_MAP_PNG), recon))
        else:
            _LOG.info("no rmse map: needs %s and %s%s", lay.SPAXEL_XY, recon, RMSE_SUFFIX)
        add, mult, _ = read_polynomials(f, f[lay.DATACUBE].shape[0], x_cp)
        if add is not None or mult is not None:
            written.append(plot_polynomials(f, os.path.join(out_dir, POLYNOMIALS_PNG), add, mult))
        if has_uncertainty(f) and x_dataset == lay.X_GLOBAL and bootstrap_is_current(f):
            written.append(plot_uncertainty(f, os.path.join(out_dir, UNCERTAINTY_PNG), x_cp))
        elif has_uncertainty(f):
            _LOG.info("no uncertainty figure: %s was made for another x than %s", lay.UNCERTAINTY, x_dataset)
    sidecar = newest_sidecar(path)
    if sidecar is None:
        _LOG.info("no convergence plot: no fit-tracker sidecar %s.fit.*.h5", path)
    else:
        done = plot_convergence(sidecar, os.path.join(out_dir, CONVERGENCE_PNG))
        if done:
            written.insert(3, done)
    _LOG.info("plots: wrote %s", ", ".join(os.path.basename(p) for p in written))
    return written


def draw_fit(f, path: str, out_dir: str, x, *, n_spaxels: int = 3, recon: str | None = None,
             rank_by: str = "rmse", x_note: str | None = None) -> list[str]:
    """Spectra, population weights and component totals of one ``x``, into ``out_dir``.  Local.

    Parameters
    ----------
    f : the cube file, open (serially) for reading
    path : str, its name (for messages)
    out_dir : str, created when missing
    x : (C·P,) or (C, P) float64, the weights to draw (a solution or a live snapshot)
    n_spaxels : int, best and worst spaxels drawn
    recon : str or None, a reconstruction of this ``x`` to rank all spaxels by; None computes the
        models of an evenly spaced sample from ``/HyperCube/models``
    rank_by : {"rmse", "chi2"}
    x_note : str, optional, where ``x`` comes from (shown in the spectra's title)

    Returns
    -------
    list of str: ``spectra_best_worst.png``, ``population_weights.png``, ``component_totals.png``.
    Each PNG is written atomically (a temporary file renamed over it): a viewer never sees half.
    """
    n_comp, n_pop = _components_populations(f, path)
    x_cp = np.asarray(x, dtype=np.float64)
    if x_cp.size != n_comp * n_pop:
        raise InputError(f"x: expected C*P = {n_comp}*{n_pop} values, got {x_cp.size}")
    x_cp = x_cp.reshape(n_comp, n_pop)
    os.makedirs(out_dir, exist_ok=True)
    truth = read_truth(f, n_comp, n_pop)
    return [plot_spectra(f, path, os.path.join(out_dir, SPECTRA_PNG), n_spaxels, recon, x_cp, rank_by, x_note),
            plot_populations(f, os.path.join(out_dir, POPULATIONS_PNG), x_cp, truth),
            plot_totals(f, os.path.join(out_dir, TOTALS_PNG), x_cp, truth)]


# ---------------------------------------------------------------------------------------------
# helpers (local)
# ---------------------------------------------------------------------------------------------
def _components_populations(f, path: str) -> tuple[int, int]:
    if lay.MODELS in f and len(f[lay.MODELS].shape) == 4:
        return tuple(int(n) for n in f[lay.MODELS].shape[1:3])
    if lay.LOSVD in f and lay.TEMPLATES in f:
        return int(f[lay.LOSVD].shape[2]), int(f[lay.TEMPLATES].shape[0])
    raise InputError(f"{lay.MODELS}: missing from {path} (and no {lay.LOSVD}/{lay.TEMPLATES} to size x)")


def _check_recon(f, recon: str, x_cp: np.ndarray) -> None:
    shape = f[lay.DATACUBE].shape if lay.DATACUBE in f else None
    if shape is None or f[recon].shape != shape:
        raise InputError(f"{recon}: expected shape {shape} like {lay.DATACUBE}, got {f[recon].shape}")
    stored = f[recon].attrs.get("recon.x_crc32")
    if stored is not None and int(stored) != x_checksum(x_cp):
        _LOG.warning("%s was made from another x than the current one; rerun `cubefit_mpi recon`", recon)


def masked_spans(used: np.ndarray | None, wave: np.ndarray) -> list[tuple[float, float]]:
    """Wavelength spans ``(lo, hi)`` (pixel edges) of the contiguous runs of masked pixels.  Local.

    Parameters
    ----------
    used : (L,) bool or None (None: nothing masked)
    wave : (L,) float64, increasing pixel centres
    """
    if used is None or used.all():
        return []
    edges = np.concatenate(([wave[0] - (wave[1] - wave[0]) / 2], (wave[1:] + wave[:-1]) / 2,
                            [wave[-1] + (wave[-1] - wave[-2]) / 2])) if wave.size > 1 else \
        np.array([wave[0] - 0.5, wave[0] + 0.5])
    flags = np.concatenate(([0], (~used).astype(np.int8), [0]))
    starts = np.flatnonzero(np.diff(flags) == 1)
    stops = np.flatnonzero(np.diff(flags) == -1)
    return [(float(edges[a]), float(edges[b])) for a, b in zip(starts, stops)]


def select_best_worst(metric: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``n`` smallest and ``n`` largest finite values (worst first).  Local."""
    valid = np.flatnonzero(np.isfinite(metric))
    order = valid[np.argsort(metric[valid], kind="stable")]
    return order[:n], order[::-1][:n]


# ---------------------------------------------------------------------------------------------
# the plots (local; each returns the path written)
# ---------------------------------------------------------------------------------------------
def plot_spectra(f, path: str, out_path: str, n: int, recon: str | None, x_cp: np.ndarray,
                 rank_by: str, x_note: str | None = None) -> str:
    """Data, model and residual of the best and worst spaxels.  Local.

    ``x_note`` says where ``x`` comes from in the title when it is not the stored solution.
    """
    n_s, n_l = f[lay.DATACUBE].shape
    used, weights, _ = read_mask_and_weights(f, n_l)
    if lay.OBS_PIX in f:
        wave, xlabel = np.exp(np.asarray(f[lay.OBS_PIX][...], dtype=np.float64)), "wavelength [Å]"
    else:
        wave, xlabel = np.arange(n_l, dtype=np.float64), "pixel"
    if recon is not None:
        suffix = RMSE_SUFFIX if rank_by == "rmse" else CHI2_SUFFIX
        best, worst = select_best_worst(np.asarray(f[recon + suffix][...], dtype=np.float64), n)
        source = f"ranked by {rank_by} over all {n_s} spaxels ({recon})"
    else:
        sample = np.unique(np.linspace(0, n_s - 1, min(2 * n, n_s)).round().astype(int))
        best, worst = sample, sample       # ranked within the sample below
        source = f"evenly spaced sample of {sample.size} spaxels " + \
            (f"({x_note})" if x_note else f"(no {recon or RECON_DEFAULT}: run `recon`)")
    rows = np.unique(np.concatenate((best, worst)))
    data = np.asarray(f[lay.DATACUBE][rows, :], dtype=np.float64)
    if recon is not None:
        model = np.asarray(f[recon][rows, :], dtype=np.float64)
    else:
        model = model_rows(f, open_operator(path, "auto", comm=mpi().COMM_SELF), x_cp, rows)
    chi2, rmse, _ = residual_stats(data, model, used, weights)
    if recon is None:
        local_best, local_worst = select_best_worst(rmse if rank_by == "rmse" else chi2, n)
        best, worst = rows[local_best], rows[local_worst]
    where = {int(s): i for i, s in enumerate(rows)}
    spans = masked_spans(used, wave)
    n_panels = max(len(best), len(worst), 1)
    fig = new_figure(12, 2.6 * n_panels + 0.6)
    grid = fig.add_gridspec(2 * n_panels, 2, height_ratios=[3, 1] * n_panels)
    for col, (label, chosen) in enumerate((("best", best), ("worst", worst))):
        for k, s in enumerate(chosen):
            i = where[int(s)]
            top = fig.add_subplot(grid[2 * k, col])
            bottom = fig.add_subplot(grid[2 * k + 1, col], sharex=top)
            ok = np.isfinite(data[i]) & (used if used is not None else True)
            top.plot(wave, data[i], color="black", lw=0.8, label="data")
            top.plot(wave, model[i], color="tab:red", lw=0.8, label="model")
            bottom.plot(wave, np.where(ok, data[i] - model[i], np.nan), color="tab:green", lw=0.7)
            bottom.axhline(0.0, color="grey", lw=0.5)
            for lo, hi in spans:
                for ax in (top, bottom):
                    ax.axvspan(lo, hi, color="grey", alpha=0.25, lw=0)
            top.set_title(f"{label} #{k + 1}: spaxel {int(s)}  rmse={rmse[i]:.3g}  χ²={chi2[i]:.3g}",
                          fontsize=9)
            top.tick_params(labelbottom=False)
            bottom.set_ylabel("resid.", fontsize=8)
            if k == 0:
                top.legend(fontsize=7, loc="best")
            if k == len(chosen) - 1:
                bottom.set_xlabel(xlabel)
    fig.suptitle(f"best / worst spaxels, {source}; grey = masked", fontsize=10)
    return save_png(fig, out_path)


def plot_populations(f, out_path: str, x_cp: np.ndarray, truth: np.ndarray | None) -> str:
    """Population weights per component (image over the grid, else bars), truth beside.  Local."""
    n_comp, n_pop = x_cp.shape
    pop_shape = population_grid(f, n_pop)
    panels = [("fit", x_cp)] + ([("truth", truth)] if truth is not None else [])
    if pop_shape is not None:
        (xlab, xval), (ylab, yval) = population_axes(f, pop_shape)
        fig = new_figure(4.2 * len(panels), 3.0 * n_comp + 0.4)
        for c in range(n_comp):
            for j, (name, weights) in enumerate(panels):
                ax = fig.add_subplot(n_comp, len(panels), c * len(panels) + j + 1)
                image = ax.imshow(weights[c].reshape(pop_shape).T, origin="lower", aspect="auto",
                                  cmap="viridis", vmin=0.0, interpolation="nearest")
                fig.colorbar(image, ax=ax, shrink=0.9)
                set_ticks(ax, "x", xval, pop_shape[0])
                set_ticks(ax, "y", yval, pop_shape[1])
                ax.set_xlabel(xlab, fontsize=8)
                ax.set_ylabel(ylab, fontsize=8)
                ax.set_title(f"component {c}: {name} (Σ={weights[c].sum():.3g})", fontsize=9)
    else:
        fig = new_figure(max(6.0, 0.25 * n_pop + 2), 2.4 * n_comp + 0.4)
        width = 0.8 / len(panels)
        for c in range(n_comp):
            ax = fig.add_subplot(n_comp, 1, c + 1)
            for j, (name, weights) in enumerate(panels):
                ax.bar(np.arange(n_pop) + (j - (len(panels) - 1) / 2) * width, weights[c], width, label=name)
            ax.set_title(f"component {c}", fontsize=9)
            ax.set_ylabel("x")
            ax.legend(fontsize=7)
        ax.set_xlabel("population p")
    fig.suptitle("population weights x[c, p]" + (" (fit beside truth)" if truth is not None else ""),
                 fontsize=10)
    return save_png(fig, out_path)


def plot_totals(f, out_path: str, x_cp: np.ndarray, truth: np.ndarray | None) -> str:
    """Component totals Σ_p x as fractions, beside the orbit-weight targets and truth.  Local."""
    n_comp = x_cp.shape[0]
    totals = x_cp.sum(axis=1)
    series = [("fit", totals)]
    if ORBIT_WEIGHTS in f and f[ORBIT_WEIGHTS].size == n_comp:
        series.append(("orbit-weight target", np.asarray(f[ORBIT_WEIGHTS][...], dtype=np.float64).reshape(-1)))
    if truth is not None:
        series.append(("truth", truth.sum(axis=1)))
    fig = new_figure(max(5.0, 1.2 * n_comp + 2), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    for j, (name, values) in enumerate(series):
        frac = values / values.sum() if values.sum() > 0 else np.zeros_like(values)
        pos = np.arange(n_comp) + (j - (len(series) - 1) / 2) * width
        bars = ax.bar(pos, frac, width, label=name)
        if j == 0:
            ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=7)
    ax.set_xticks(np.arange(n_comp))
    ax.set_xticklabels([f"c={c}" for c in range(n_comp)])
    ax.set_ylabel("fraction of Σ x")
    ax.set_title("component totals Σ_p x[c, p] (labels: fitted totals)", fontsize=10)
    ax.legend(fontsize=8)
    return save_png(fig, out_path)


def plot_rmse_map(f, out_path: str, recon: str) -> str:
    """Per-spaxel RMSE at the spaxel positions.  Local."""
    xy = np.asarray(f[lay.SPAXEL_XY][...], dtype=np.float64)
    rmse = np.asarray(f[recon + RMSE_SUFFIX][...], dtype=np.float64)
    if xy.shape != (rmse.size, 2):
        raise InputError(f"{lay.SPAXEL_XY}: expected shape ({rmse.size}, 2), got {xy.shape}")
    fig = new_figure(6, 5)
    ax = fig.add_subplot(1, 1, 1)
    size = float(np.clip((260.0 / np.sqrt(max(rmse.size, 1))) ** 2, 2.0, 400.0))
    points = ax.scatter(xy[:, 0], xy[:, 1], c=rmse, s=size, marker="s", cmap="magma", linewidths=0)
    fig.colorbar(points, ax=ax, label="rmse")
    ax.set_aspect("equal")
    ax.set_xlabel("x [arcsec]")
    ax.set_ylabel("y [arcsec]")
    ax.set_title(f"residual rmse per spaxel ({recon}{RMSE_SUFFIX})", fontsize=10)
    return save_png(fig, out_path)


def plot_polynomials(f, out_path: str, add: np.ndarray | None, mult: np.ndarray | None) -> str:
    """The fitted polynomials over all spaxels: median and 5–95 % range of ``g_s(λ)`` and of
    ``Σ_j a_sj P_j(λ)`` / median flux of each spectrum.  Local."""
    from ..numerics.polynomials import with_polynomials

    n_s, n_l = f[lay.DATACUBE].shape
    if lay.OBS_PIX in f:
        wave, xlabel = np.exp(np.asarray(f[lay.OBS_PIX][...], dtype=np.float64)), "wavelength [Å]"
    else:
        wave, xlabel = np.arange(n_l, dtype=np.float64), "pixel"
    panels = []
    if mult is not None:
        panels.append((f"multiplicative g_s (degree {mult.shape[1]})", with_polynomials(np.ones((n_s, n_l)), None, mult)))
    if add is not None:
        flux = np.nanmedian(np.asarray(f[lay.DATACUBE][...], dtype=np.float64), axis=1)
        term = with_polynomials(np.zeros((n_s, n_l)), add, None)
        with np.errstate(invalid="ignore", divide="ignore"):
            panels.append((f"additive term / median flux (degree {add.shape[1] - 1})",
                           term / np.where(np.abs(flux) > 0, np.abs(flux), np.nan)[:, None]))
    fig = new_figure(6.0 * len(panels), 3.6)
    for i, (title, values) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        lo, mid, hi = np.nanpercentile(values, [5, 50, 95], axis=0)
        ax.fill_between(wave, lo, hi, color="tab:blue", alpha=0.3, lw=0, label="5-95 %")
        ax.plot(wave, mid, color="tab:blue", lw=1.2, label="median")
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"fitted polynomials over {n_s} spaxels", fontsize=10)
    return save_png(fig, out_path)


def newest_sidecar(path: str) -> str | None:
    """Newest fit-tracker sidecar ``<FILE>.fit.<id>.<YYYYmmddTHHMMSS>.h5`` beside ``path``.  Local.

    Newest by the timestamp in the name, then by modification time
    (:func:`cubefit_mpi.stages.tracker.find_sidecars`); None when there is none.
    """
    from ..io.tracker_sidecar import find_sidecars

    found = find_sidecars(path)
    return found[-1] if found else None


def _read_history(sidecar: str) -> dict[str, np.ndarray] | None:
    from ..io.tracker_sidecar import read_history

    try:                                      # SWMR read: works while the solver still writes it
        return read_history(sidecar)
    except (OSError, KeyError, ValueError) as exc:
        _LOG.warning("%s: unreadable (%s); no convergence plot", sidecar, str(exc).splitlines()[0])
        return None


def plot_convergence(sidecar: str, out_path: str) -> str | None:
    """RMSE and EWMA against step from a tracker sidecar; None when it holds no history.  Local.

    The history (``/history/{step,epoch,rmse,ewma,time}``, common length) is read by
    :func:`cubefit_mpi.stages.tracker.read_history`.
    """
    hist = _read_history(sidecar)
    if hist is None:
        return None
    if hist["step"].size == 0:
        _LOG.info("%s: empty history; no convergence plot", sidecar)
        return None
    step = hist["step"]
    fig = new_figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(step, hist["rmse"], label="rmse", color="tab:blue", lw=0.8, alpha=0.7)
    ax.plot(step, hist["ewma"], label="ewma", color="tab:red", lw=1.5)
    values = np.concatenate((hist["rmse"], hist["ewma"]))
    if np.all(values[np.isfinite(values)] > 0):
        ax.set_yscale("log")
    for s in step[1:][np.diff(hist["epoch"]) != 0]:
        ax.axvline(s, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("rmse")
    ax.set_title(f"convergence ({os.path.basename(sidecar)}; dotted = new epoch)", fontsize=9)
    ax.legend(fontsize=8)
    return save_png(fig, out_path)
