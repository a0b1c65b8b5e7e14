"""Component support: which (spaxel, component) pairs carry light (pure numerics).

A pair with a zero scale (no LOSVD amplitude, or no data flux under ``norm="data"``) has all-zero
models ``A[s, c, :, :]``: the builder, the Gram pass, recon and Kaczmarz can skip it and get the
same result.  Local (no MPI, no I/O).
"""
from __future__ import annotations

import numpy as np


def support_map(scale: np.ndarray) -> np.ndarray:
    """``(S, C) bool``: True where the (s, c) models are not all zero (``scale > 0``).  Local."""
    return np.asarray(scale) > 0


def tile_support(support: np.ndarray, tiles: list[tuple[int, int]]) -> np.ndarray:
    """``(n_tiles, C) bool``: a component is lit on a tile when it is lit in any of its spaxels.  Local."""
    return np.array([support[s0:s1].any(axis=0) for s0, s1 in tiles], dtype=bool).reshape(len(tiles), -1)


def lit_columns(lit: np.ndarray, n_pop: int) -> np.ndarray:
    """Columns ``c·P + p`` (ascending) of the lit components ``lit (C,) bool``.  Local."""
    comps = np.flatnonzero(lit)
    return (comps[:, None] * int(n_pop) + np.arange(int(n_pop))[None, :]).reshape(-1)


def summary(support: np.ndarray) -> str:
    """One line: the lit fraction of (s, c) and the lit spaxels per component.  Local."""
    S, C = support.shape
    per = support.sum(axis=0)
    return (f"{100.0 * support.mean():.1f}% of (s, c) lit; spaxels lit per component: "
            + ", ".join(f"c{c}={int(n)}/{S}" for c, n in enumerate(per[:12])) + (" ..." if C > 12 else ""))
