"""The uncertainty figure of ``plot`` (``uncertainty.png``), drawn when the file has a bootstrap.

Three rows of panels from ``/Uncertainty`` (written by ``cubefit_mpi uncertainty``):

* component totals ``Σ_p x[c, p]``: the fit, the replicates' median with their 16–84 % interval
  as error bars, and the truth of a mock;
* the light-weighted mean log age and [M/H] per component (when ``/Populations`` has them), the
  same way;
* per component, the weights' median and the width of their 16–84 % interval: two images over
  the population grid (``pop_shape``), or bars with error bars without a grid.

Local (one process reads the file serially, as the other plots).
"""
from __future__ import annotations

import numpy as np

from ..io import layout as lay
from .figures import new_figure, population_axes, population_grid, read_truth, save_png, set_ticks

UNCERTAINTY_PNG = "uncertainty.png"
DERIVED = (("mean_log_age", "/Populations/log_age", "mean log age [yr]"),
           ("mean_metallicity", "/Populations/metallicity", "mean [M/H]"))


def has_uncertainty(f) -> bool:
    """The file has a finished bootstrap summary.  Local."""
    return all(name in f for name in (lay.UNCERTAINTY_DONE, f"{lay.UNCERTAINTY}/totals_p50",
                                      f"{lay.UNCERTAINTY}/weights_p50"))


def plot_uncertainty(f, out_path: str, x_cp: np.ndarray) -> str:
    """``uncertainty.png`` of the fit ``x_cp (C, P)`` and its bootstrap.  Local."""
    n_comp, n_pop = x_cp.shape
    g = f[lay.UNCERTAINTY]
    truth = read_truth(f, n_comp, n_pop)
    derived = [(key, label, _derived_value(f, source, x_cp), None if truth is None else _derived_value(f, source, truth))
               for key, source, label in DERIVED if f"{key}_p50" in g]
    grid = population_grid(f, n_pop)
    columns = max(2, 1 + len(derived))
    fig = new_figure(4.2 * columns, 3.2 * (1 + n_comp) + 0.5)
    _interval_panel(fig.add_subplot(1 + n_comp, columns, 1), g, "totals", x_cp.sum(axis=1),
                    None if truth is None else truth.sum(axis=1), "component total Σ_p x")
    for j, (key, label, fitted, true) in enumerate(derived):
        _interval_panel(fig.add_subplot(1 + n_comp, columns, 2 + j), g, key, fitted, true, label)
    p16, p50, p84 = (np.asarray(g[f"weights_{s}"][...]).reshape(n_comp, n_pop) for s in ("p16", "p50", "p84"))
    for c in range(n_comp):
        if grid is not None:
            axes = population_axes(f, grid)
            for j, (name, values) in enumerate((("median", p50[c]), ("16-84 % width", p84[c] - p16[c]))):
                ax = fig.add_subplot(1 + n_comp, columns, columns * (1 + c) + 1 + j)
                image = ax.imshow(values.reshape(grid).T, origin="lower", aspect="auto", cmap="viridis", vmin=0.0,
                                  interpolation="nearest")
                fig.colorbar(image, ax=ax, shrink=0.9)
                for which, (label, ticks), n in (("x", axes[0], grid[0]), ("y", axes[1], grid[1])):
                    set_ticks(ax, which, ticks, n)
                    getattr(ax, f"set_{which}label")(label, fontsize=8)
                ax.set_title(f"component {c}: weights, {name}", fontsize=9)
        else:
            ax = fig.add_subplot(1 + n_comp, 1, 2 + c)
            pos = np.arange(n_pop)
            ax.bar(pos, p50[c], 0.6, yerr=np.vstack([p50[c] - p16[c], p84[c] - p50[c]]), capsize=2,
                   label="bootstrap median, 16-84 %")
            ax.plot(pos, x_cp[c], "k_", markersize=10, label="fit")
            if truth is not None:
                ax.plot(pos, truth[c], "r.", label="truth")
            ax.set_title(f"component {c}: weights", fontsize=9)
            ax.set_xlabel("population p")
            ax.legend(fontsize=7)
    a = f[lay.UNCERTAINTY_REPLICATES].attrs
    fig.suptitle(f"bootstrap: {int(g.attrs.get('n_replicates', 0))} replicates ({a.get('method', '?')}, "
                 f"seed {a.get('seed', '?')}); bars: 16-84 % of the replicates", fontsize=10)
    return save_png(fig, out_path)


def _derived_value(f, source: str, x_cp: np.ndarray) -> np.ndarray:
    """The light-weighted mean of ``/Populations/...`` per component for weights ``x_cp``.  Local."""
    values = np.asarray(f[source][...], dtype=np.float64)
    total = x_cp.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (x_cp @ values) / total, np.nan)


def _interval_panel(ax, g, key: str, fitted: np.ndarray, truth: np.ndarray | None, label: str) -> None:
    """One quantity per component: the replicates' median and 16–84 % interval, the fit, the truth.  Local."""
    p16, p50, p84 = (np.asarray(g[f"{key}_{s}"][...], dtype=np.float64) for s in ("p16", "p50", "p84"))
    pos = np.arange(p50.size)
    ax.errorbar(pos, p50, yerr=np.vstack([p50 - p16, p84 - p50]), fmt="o", capsize=3, label="bootstrap 16-50-84 %")
    ax.plot(pos, fitted, "k_", markersize=14, label="fit")
    if truth is not None:
        ax.plot(pos, truth, "r*", label="truth")
    ax.set_xticks(pos)
    ax.set_xticklabels([f"c={c}" for c in pos])
    ax.set_ylabel(label, fontsize=8)
    ax.legend(fontsize=7)
