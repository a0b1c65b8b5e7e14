"""Wavelength grids (pure numerics): pixel edges from centres, uniform ln λ grids, the template
grid of an observed grid (oversampled, extended by the velocity guard), masks from ranges.

Grids are natural-log wavelength; ``edges (N+1,)`` bound ``N`` pixels.  Local (no MPI, no I/O).
"""
from __future__ import annotations

import math

import numpy as np

from .constants import SPEED_OF_LIGHT_KMS

UNIFORM_RTOL = 1e-6


def is_uniform(x: np.ndarray, rtol: float = UNIFORM_RTOL) -> bool:
    """True if the steps of ``x (N,)`` are equal to within ``rtol`` of their mean.  Local."""
    step = np.diff(np.asarray(x, dtype=np.float64))
    return bool(step.size > 0 and np.all(step > 0) and np.max(np.abs(step - step.mean())) <= rtol * step.mean())


def edges_from_centres(lam: np.ndarray) -> tuple[np.ndarray, str]:
    """ln λ pixel edges ``(N+1,)`` of pixels with centres ``lam (N,)`` (Å), and the grid kind.  Local.

    ``"linear"`` (uniform in λ): edges half-way between centres in λ; ``"log"`` (uniform in
    ln λ): half-way in ln λ; ``"irregular"``: half-way in λ.
    """
    lam = np.asarray(lam, dtype=np.float64)
    if lam.ndim != 1 or lam.size < 2 or not np.all(np.isfinite(lam)) or np.any(np.diff(lam) <= 0) or lam[0] <= 0:
        raise ValueError("wavelengths: expected at least 2 positive, finite, strictly increasing values")
    if is_uniform(lam):
        kind, centres = "linear", lam
    elif is_uniform(np.log(lam)):
        return pixel_edges(np.log(lam)), "log"
    else:
        kind, centres = "irregular", lam
    edges = pixel_edges(centres)
    if edges[0] <= 0:
        raise ValueError("wavelengths: the first pixel reaches λ <= 0")
    return np.log(edges), kind


def uniform_log_edges(lo: float, hi: float, dlnlam: float) -> np.ndarray:
    """Edges ``lo + k·dlnlam`` of the complete pixels inside ``[lo, hi]`` (ln λ).  Local."""
    n = int(math.floor((hi - lo) / dlnlam + 1e-9))
    if n < 2:
        raise ValueError(f"the range [{math.exp(lo):.2f}, {math.exp(hi):.2f}] A holds fewer than 2 pixels "
                         f"of {dlnlam * SPEED_OF_LIGHT_KMS:.4g} km/s")
    return lo + dlnlam * np.arange(n + 1)


def guard_pixels(vmax_kms: float, dlnlam_tem: float, oversample: int) -> int:
    """Template pixels added on each side of the observed range for LOSVD velocities up to ``vmax``.  Local.

    ``ceil(|ln(1 − vmax/c)| / Δlnλ_T) + oversample + 2`` -- the blue-side shift of the largest
    velocity, plus a margin of one observed pixel and two template pixels.
    """
    shift = -math.log1p(-min(abs(vmax_kms), 0.999 * SPEED_OF_LIGHT_KMS) / SPEED_OF_LIGHT_KMS)
    return int(math.ceil(shift / dlnlam_tem - 1e-9)) + int(oversample) + 2


def template_edges(obs_edges: np.ndarray, oversample: int, vmax_kms: float) -> np.ndarray:
    """ln λ edges of the template grid for an observed grid uniform in ln λ.  Local.

    Spacing ``Δlnλ_L / oversample``, edges aligned with the observed edges (every observed
    pixel is exactly ``oversample`` template pixels), extended by :func:`guard_pixels` on each
    side.
    """
    obs_edges = np.asarray(obs_edges, dtype=np.float64)
    n_obs = obs_edges.size - 1
    dln = (obs_edges[-1] - obs_edges[0]) / n_obs / int(oversample)
    guard = guard_pixels(vmax_kms, dln, oversample)
    k = np.arange(-guard, n_obs * int(oversample) + guard + 1)
    return obs_edges[0] + dln * k


def centres(edges: np.ndarray) -> np.ndarray:
    """Pixel centres half-way between ``edges (N+1,)``.  Local."""
    e = np.asarray(edges, dtype=np.float64)
    return 0.5 * (e[1:] + e[:-1])


def range_mask(edges: np.ndarray, ranges_aa) -> np.ndarray:
    """``(N,) bool``: True where the pixel (ln λ ``edges``) overlaps any ``(lo, hi)`` range in Å.  Local."""
    lam = np.exp(np.asarray(edges, dtype=np.float64))
    hit = np.zeros(lam.size - 1, dtype=bool)
    for lo, hi in ranges_aa:
        hit |= (lam[1:] > lo) & (lam[:-1] < hi)
    return hit


def pixel_edges(centres: np.ndarray) -> np.ndarray:
    """Edges ``(N+1,)`` half-way between the increasing ``centres (N,)``, the outer ones half a
    spacing beyond the first and last centre (in the variable of ``centres``).  Local."""
    c = np.asarray(centres, dtype=np.float64)
    if c.ndim != 1 or c.size < 2:
        raise ValueError("pixel_edges: need a 1-D grid of at least 2 centres")
    mid = 0.5 * (c[1:] + c[:-1])
    return np.concatenate(([c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]))
