"""Column energy ``E[c, p] = Σ_{s, λ} u_λ A²`` of hypercube tiles (u: mask × λ-weights).  Local."""
from __future__ import annotations

import numpy as np


def pixel_weights(n_pix: int, mask: np.ndarray | None, weights: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel factor ``(L,)`` of the column energy: w (or 1), 0 where masked.  Local."""
    used = np.ones(n_pix) if weights is None else np.asarray(weights, dtype=np.float64)
    return used if mask is None else np.where(mask, used, 0.0)


def tile_energy(tile: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Σ_{s, λ} used_λ A² of a tile ``(s, c, P, L)`` float32, as ``(c, P)`` float64.  Local.

    Summed spaxel by spaxel in order, so the builder (which adds each (s, c) as it computes it)
    and a later read-back give the same bits.
    """
    energy = np.zeros(tile.shape[1:3])
    for block in tile:
        for j, pair in enumerate(block):
            energy[j] += np.square(pair, dtype=np.float64) @ used
    return energy
