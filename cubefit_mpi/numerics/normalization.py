"""Normalisation of the models: the scale of each (s, c), the masked mean data flux, and the
factor that flips a built hypercube between ``norm="model"`` and ``norm="data"``.  Local."""
from __future__ import annotations

import numpy as np

NORM_MODES = ("model", "data")
DEFAULT_NORM = "model"


def spaxel_scale(amp: np.ndarray, norm_mode: str, data_flux: np.ndarray | None) -> np.ndarray:
    """Scale ``(n, C)`` of each (s, c) model: amplitude, or data flux split by amplitude.  Local."""
    if norm_mode == "model":
        return amp
    total = amp.sum(axis=1, keepdims=True)
    frac = np.divide(amp, total, out=np.zeros_like(amp), where=total > 0)
    return frac * data_flux[:, None]


def masked_mean_flux(data: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Per-spaxel mean of ``data (n, L)`` over unmasked finite pixels.  Local."""
    use = np.isfinite(data)
    if mask is not None:
        use &= mask[None, :]
    count = use.sum(axis=1)
    total = np.where(use, data, 0.0).sum(axis=1)
    return np.divide(total, count, out=np.zeros(data.shape[0]), where=count > 0)


def norm_factor(to_mode: str, amp_sum: np.ndarray, data_flux: np.ndarray) -> np.ndarray:
    """Per-spaxel factor F[s] taking models from the other mode to ``to_mode``.  Local.

    model -> data: ``F = data_flux / Σ_c amp``; data -> model: ``F = Σ_c amp / data_flux``.
    Spaxels with zero amplitude have zero models in both modes (F = 1).  Raises ValueError when
    a spaxel with light has a non-positive or non-finite flux.
    """
    live = amp_sum > 0
    if np.any(live & ~(np.isfinite(data_flux) & (data_flux > 0))):
        first = int(np.argmax(live & ~(np.isfinite(data_flux) & (data_flux > 0))))
        raise ValueError(f"spaxel {first} has a non-positive or non-finite flux")
    factor = np.ones_like(amp_sum)
    if to_mode == "data":
        factor[live] = data_flux[live] / amp_sum[live]
    else:
        factor[live] = amp_sum[live] / data_flux[live]
    return factor
