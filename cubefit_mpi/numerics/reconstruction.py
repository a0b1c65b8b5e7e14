"""The numerics of ``recon``: which (c, p) blocks of A to read for a given x, their contraction
against x, and per-spaxel residual statistics.  Pure functions of arrays (local)."""
from __future__ import annotations

import zlib

import numpy as np


def active_blocks(x_cp: np.ndarray, c_chunk: int, p_chunk: int) -> list[tuple[int, int, int, int]]:
    """The (c, p) blocks of ``A`` to read: only where ``x`` is non-zero.  Local.

    The (C, P) plane is cut into cells of the read grid (the dataset's chunks); inside a cell,
    each run of consecutive components with a non-zero weight is one block ``(c0, c1, p0, p1)``,
    its P range trimmed to the non-zero weights.  A component whose weights are all zero in a
    cell is never read there.

    Parameters
    ----------
    x_cp : (C, P) float64
        The weights.
    c_chunk, p_chunk : int
        Cell size along C and P.

    Returns
    -------
    list of (c0, c1, p0, p1), in C-major order; empty when ``x_cp`` is all zero.
    """
    n_c, n_p = x_cp.shape
    blocks = []
    for cell_c0, cell_c1 in _cells(n_c, c_chunk):
        for cell_p0, cell_p1 in _cells(n_p, p_chunk):
            nonzero = x_cp[cell_c0:cell_c1, cell_p0:cell_p1] != 0
            active = np.concatenate(([0], nonzero.any(axis=1).astype(np.int8), [0]))
            starts = np.flatnonzero(np.diff(active) == 1)
            stops = np.flatnonzero(np.diff(active) == -1)
            for a, b in zip(starts, stops):
                cols = np.flatnonzero(nonzero[a:b].any(axis=0))
                blocks.append((cell_c0 + int(a), cell_c0 + int(b),
                               cell_p0 + int(cols[0]), cell_p0 + int(cols[-1]) + 1))
    return blocks


def _cells(n: int, size: int) -> list[tuple[int, int]]:
    size = max(1, int(size))
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def contract_block(block: np.ndarray, x_block: np.ndarray) -> np.ndarray:
    """``Σ_{c,p} x[c, p] · block[:, c, p, :]`` in float64.  Local.

    Parameters
    ----------
    block : (S_tile, Cb, Pb, L) float (converted to float64)
    x_block : (Cb, Pb) float64

    Returns
    -------
    (S_tile, L) float64
    """
    n_s, n_c, n_p, n_l = block.shape
    flat = np.asarray(block, dtype=np.float64).reshape(n_s, n_c * n_p, n_l)
    return np.matmul(np.asarray(x_block, dtype=np.float64).reshape(-1), flat)


def residual_stats(data: np.ndarray, model: np.ndarray, used: np.ndarray | None,
                   weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-spaxel χ², RMSE and number of used pixels.  Local.

    Parameters
    ----------
    data : (n, L) float64, observed spectra (NaN allowed; non-finite pixels are not used)
    model : (n, L) float64, reconstructed spectra
    used : (L,) bool or None, True = pixel used (``/Mask``); None = all pixels
    weights : (L,) float64 or None, λ-weights (None = 1)

    Returns
    -------
    chi2 : (n,) float64, ``Σ_λ w_λ (y − ŷ)²`` over used pixels
    rmse : (n,) float64, ``sqrt(Σ_λ (y − ŷ)² / n_used)``, NaN where no pixel is used
    n_used : (n,) int64
    """
    data = np.asarray(data, dtype=np.float64)
    ok = np.isfinite(data)
    if used is not None:
        ok &= np.asarray(used, dtype=bool)[None, :]
    resid = np.where(ok, data - np.asarray(model, dtype=np.float64), 0.0)
    sq = resid * resid
    n_used = ok.sum(axis=1).astype(np.int64)
    chi2 = sq.sum(axis=1) if weights is None else sq @ np.asarray(weights, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rmse = np.where(n_used > 0, np.sqrt(sq.sum(axis=1) / np.maximum(n_used, 1)), np.nan)
    return chi2, rmse, n_used


def x_checksum(x: np.ndarray) -> int:
    """CRC32 of ``x`` as float64 bytes: tells whether a reconstruction is stale.  Local."""
    return int(zlib.crc32(np.ascontiguousarray(x, dtype=np.float64).tobytes()))
