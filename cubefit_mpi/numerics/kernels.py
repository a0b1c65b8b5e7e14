"""LOSVD histograms to unit-area convolution kernels on the template grid (pure numerics).

Conventions (``docs/CubeFit.md``):

* velocity ``v`` (km/s) and pixel shift ``k`` are related by ``k = ln(1 + v/c) / Δlnλ_T``;
  positive ``v`` moves flux redward (to larger ln λ);
* the LOSVD row holds values at the ``VelPix`` bin centres.  It is linearly interpolated at the
  velocities of the integer pixel shifts ``v_k = c (exp(k Δlnλ_T) − 1)``, zero outside the
  velocity grid, clipped at 0, and normalised to unit sum;
* the amplitude is ``sum`` (Σ_v LOSVD) or ``trapz`` (∫ LOSVD dv over VelPix).

The interpolation is linear in the LOSVD values, so it is one matrix ``(K, V)``
(:func:`interpolation_matrix`) applied to many rows at once.

Local (no MPI, no I/O).
"""
from __future__ import annotations

import numpy as np

from .constants import SPEED_OF_LIGHT_KMS

AMP_MODES = ("sum", "trapz")
DEFAULT_AMP = "sum"


def velocity_to_shift(velocity, dlnlam: float) -> np.ndarray:
    """Pixel shift ``ln(1 + v/c) / Δlnλ`` of velocities ``v`` in km/s.  Local."""
    return np.log1p(np.asarray(velocity, dtype=np.float64) / SPEED_OF_LIGHT_KMS) / dlnlam


def shift_to_velocity(shift, dlnlam: float) -> np.ndarray:
    """Velocity in km/s of a pixel shift (inverse of :func:`velocity_to_shift`).  Local."""
    return SPEED_OF_LIGHT_KMS * np.expm1(np.asarray(shift, dtype=np.float64) * dlnlam)


def kernel_shifts(vel_pix: np.ndarray, dlnlam: float) -> np.ndarray:
    """Integer pixel shifts ``(K,)`` spanned by the velocity grid, ascending.  Local.

    From ``floor(shift(v_min))`` to ``ceil(shift(v_max))``: every shift at which the
    interpolated LOSVD can be non-zero.
    """
    vel = np.asarray(vel_pix, dtype=np.float64)
    lo = int(np.floor(velocity_to_shift(vel[0], dlnlam) + 1e-9))
    hi = int(np.ceil(velocity_to_shift(vel[-1], dlnlam) - 1e-9))
    return np.arange(lo, hi + 1)


def interpolation_matrix(vel_pix: np.ndarray, dlnlam: float) -> tuple[np.ndarray, np.ndarray]:
    """Matrix ``M (K, V)`` with ``kernel_raw = M @ losvd_row`` and the shifts ``(K,)``.  Local.

    Row k holds the linear-interpolation weights of the LOSVD bin centres at velocity ``v_k``;
    rows outside ``[v_min, v_max]`` are zero.
    """
    vel = np.asarray(vel_pix, dtype=np.float64)
    shifts = kernel_shifts(vel, dlnlam)
    v_k = shift_to_velocity(shifts, dlnlam)
    matrix = np.zeros((shifts.size, vel.size))
    inside = (v_k >= vel[0]) & (v_k <= vel[-1])
    if vel.size == 1:
        matrix[np.isclose(v_k, vel[0], rtol=0, atol=1e-9 * max(1.0, abs(vel[0]))), 0] = 1.0
        return matrix, shifts
    j = np.clip(np.searchsorted(vel, v_k, side="right") - 1, 0, vel.size - 2)
    frac = (v_k - vel[j]) / (vel[j + 1] - vel[j])
    rows = np.nonzero(inside)[0]
    matrix[rows, j[rows]] = 1.0 - frac[rows]
    matrix[rows, j[rows] + 1] += frac[rows]
    return matrix, shifts


def losvd_amplitude(losvd: np.ndarray, vel_pix: np.ndarray, mode: str = "sum") -> np.ndarray:
    """Amplitude of LOSVD rows along the velocity axis (``axis=-2`` for ``(..., V, C)``).  Local.

    Parameters
    ----------
    losvd : (..., V, C) float64
    vel_pix : (V,) float64, km/s
    mode : {"sum", "trapz"}

    Returns
    -------
    (..., C) float64
    """
    arr = np.asarray(losvd, dtype=np.float64)
    if mode == "sum":
        return arr.sum(axis=-2)
    if mode == "trapz":
        vel = np.asarray(vel_pix, dtype=np.float64)
        if vel.size < 2:
            return np.zeros(arr.shape[:-2] + arr.shape[-1:])
        dv = np.diff(vel)
        return 0.5 * np.einsum("...vc,v->...c", arr[..., 1:, :] + arr[..., :-1, :], dv)
    raise ValueError(f"amplitude mode {mode!r}: expected one of {', '.join(AMP_MODES)}")


def unit_kernels(losvd: np.ndarray, interp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit-sum kernels from LOSVD rows.  Local.

    Parameters
    ----------
    losvd : (..., V, C) float64
        LOSVD histograms (velocity axis second to last).
    interp : (K, V) float64
        From :func:`interpolation_matrix`.

    Returns
    -------
    kernels : (..., C, K) float64
        Non-negative, each row summing to 1; rows whose interpolated LOSVD is all zero are 0.
    empty : (..., C) bool
        True where the interpolated row was all zero (the caller decides if that is an error).
    """
    raw = np.einsum("kv,...vc->...ck", interp, np.asarray(losvd, dtype=np.float64))
    np.clip(raw, 0.0, None, out=raw)
    total = raw.sum(axis=-1)
    empty = total <= 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        kernels = np.where(empty[..., None], 0.0, raw / np.where(empty, 1.0, total)[..., None])
    return kernels, empty

