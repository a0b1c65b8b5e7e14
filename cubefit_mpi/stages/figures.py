"""Drawing helpers shared by the stages' figures (``plot``, ``watch --plot``, the uncertainty
figure): a pyplot-free Agg figure, the atomic PNG write, the population grid and its axis labels,
the truth of a mock.  Local; importing it imports no matplotlib."""
from __future__ import annotations

import os

import numpy as np

from ..io import layout as lay

POP_AXES = (("/Populations/log_age", "log age [yr]"), ("/Populations/metallicity", "[M/H]"))
DPI = 100


def new_figure(width: float, height: float):
    """A matplotlib ``Figure`` on its own Agg canvas (no pyplot, no global state).  Local."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, out_path: str) -> str:
    """Write the PNG to a temporary file beside ``out_path``, then rename it over (atomic)."""
    tmp = f"{out_path}.{os.getpid()}.tmp"
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_path


def read_truth(f, n_comp: int, n_pop: int) -> np.ndarray | None:
    """``/Truth/x`` as (C, P) when the file is a mock of this size, else None.  Local."""
    if lay.TRUTH_X in f and f[lay.TRUTH_X].size == n_comp * n_pop:
        return np.asarray(f[lay.TRUTH_X][...], dtype=np.float64).reshape(n_comp, n_pop)
    return None


def population_axes(f, pop_shape: tuple[int, int]) -> list[tuple[str, np.ndarray | None]]:
    """Label and tick values of both population-grid axes, from ``/Populations`` when it fits."""
    axes: list[tuple[str, np.ndarray | None]] = [("population index (axis 0)", None),
                                                 ("population index (axis 1)", None)]
    for name, label in POP_AXES:
        if name not in f or f[name].size != pop_shape[0] * pop_shape[1]:
            continue
        grid = np.asarray(f[name][...], dtype=np.float64).reshape(pop_shape)
        for axis in (0, 1):
            along = grid[:, :1] if axis == 0 else grid[:1, :]
            if np.allclose(grid, along) and axes[axis][1] is None:
                axes[axis] = (label, along.reshape(-1))
                break
    return axes


def set_ticks(ax, which: str, values: np.ndarray | None, n: int) -> None:
    """At most 8 ticks along axis ``which`` ("x" or "y") of ``n`` cells, labelled by ``values``.  Local."""
    stride = max(1, -(-n // 8))
    pos = np.arange(0, n, stride)
    getattr(ax, f"set_{which}ticks")(pos)
    if values is not None:
        getattr(ax, f"set_{which}ticklabels")([f"{values[i]:.3g}" for i in pos], fontsize=7)


def population_grid(f, n_pop: int) -> tuple[int, int] | None:
    """The ``/Templates`` attribute ``pop_shape`` when it is a 2-D grid of ``n_pop``, else None.  Local."""
    if lay.TEMPLATES in f and "pop_shape" in f[lay.TEMPLATES].attrs:
        shape = tuple(int(v) for v in np.atleast_1d(f[lay.TEMPLATES].attrs["pop_shape"]))
        if len(shape) == 2 and shape[0] * shape[1] == n_pop:
            return shape
    return None
