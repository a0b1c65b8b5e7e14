"""The weighted design of one c-band on one S-tile, kept as the hypercube blocks read (no copy).

Pure NumPy (Local: no MPI, no I/O).  The Kaczmarz solver needs four products with the weighted
design ``√w A`` of a band on a tile — column energies, gradients ``(√w A) r``, model changes
``dx (√w A)`` and a few rows for the polish — and each is one pass over the block as read from
``/HyperCube/models`` (``(ns, n, L)`` float32, one ``(n, L)`` matrix per spaxel).  Laying the
block out as a float64 ``(n, ns·L_used)`` matrix first would cost more than the read itself (a
cast, a mask and a scale: 0.26 ns per element against 0.06 ns for a float32 BLAS pass over a
tile in cache), so the weights ``√w`` and the pixel mask are applied to the *vectors* instead:
``√w`` is zero on masked pixels, the row space of every vector is ``(ns, L)`` flattened, and
masked rows of the data and of the residual are zero.

Precision: the matrix–vector products run in the block's dtype (float32 as stored, with BLAS
accumulation); sums over spaxels and every vector handed back are float64.  :meth:`matmat` with
``precise=True`` casts each spaxel's block to float64 (the objective that is reported).
"""
from __future__ import annotations

import numpy as np

__all__ = ["BandDesign"]


class BandDesign:
    """``√w A`` of one band on one tile.

    Parameters
    ----------
    blocks : (ns, n, L) array (float32 as read, or float64); row ``j`` of spaxel ``s`` is the
        model spectrum of column ``j``.  It is used in place (see :meth:`sanitize`).
    sqrt_w : (L,) float64, ``√w`` on used pixels and 0 on masked ones
    """

    def __init__(self, blocks: np.ndarray, sqrt_w: np.ndarray):
        if blocks.ndim != 3 or blocks.shape[2] != sqrt_w.shape[0]:
            raise ValueError(f"blocks {blocks.shape} do not match sqrt_w {sqrt_w.shape}")
        self.blocks = blocks
        self.sqrt_w = np.asarray(sqrt_w, dtype=np.float64)
        self._w = (self.sqrt_w * self.sqrt_w).astype(blocks.dtype)

    @classmethod
    def dense(cls, design_w: np.ndarray) -> "BandDesign":
        """Wrap a dense weighted design ``(n, rows)`` (one pseudo-spaxel, unit weights).  Local."""
        design_w = np.asarray(design_w)
        return cls(design_w[None], np.ones(design_w.shape[1]))

    @property
    def n(self) -> int:
        return self.blocks.shape[1]

    @property
    def rows(self) -> int:
        return self.blocks.shape[0] * self.blocks.shape[2]

    def _vec(self, v: np.ndarray) -> np.ndarray:
        """``√w ⊙ v`` as ``(ns, L)`` in the blocks' dtype."""
        return (np.asarray(v).reshape(self.blocks.shape[0], -1) * self.sqrt_w).astype(self.blocks.dtype, copy=False)

    # --- the passes -----------------------------------------------------------------------------
    def energy(self) -> np.ndarray:
        """``E_j = Σ_rows (√w A_j)²`` (n,) float64; non-finite when the block is.  Local."""
        out = np.zeros(self.n)
        tmp = np.empty(self.blocks.shape[1:], dtype=self.blocks.dtype)
        with np.errstate(invalid="ignore", over="ignore"):      # non-finite blocks are expected here
            for block in self.blocks:
                np.square(block, out=tmp)
                out += tmp @ self._w
        return out

    def rmatvec(self, v: np.ndarray) -> np.ndarray:
        """``(√w A) v`` (n,) float64 for a weighted row vector ``v (rows,)``.  Local."""
        per_spaxel = np.matmul(self.blocks, self._vec(v)[:, :, None])
        return per_spaxel[:, :, 0].sum(axis=0, dtype=np.float64)

    def matvec(self, dx: np.ndarray) -> np.ndarray:
        """``dx (√w A)`` (rows,) float64 for ``dx (n,)``.  Local."""
        model = np.matmul(np.asarray(dx).astype(self.blocks.dtype, copy=False), self.blocks)
        return (model * self.sqrt_w).reshape(-1)

    def matmat(self, xs: np.ndarray, precise: bool = False) -> np.ndarray:
        """``xs (√w A)`` (k, rows) float64 for ``xs (k, n)``; ``precise``: in float64.  Local."""
        xs = np.atleast_2d(xs)
        if xs.shape[0] == 1 and not precise:
            return self.matvec(xs[0])[None, :]
        ns, _, L = self.blocks.shape
        out = np.empty((xs.shape[0], ns, L))
        if precise:
            x64 = xs.astype(np.float64, copy=False)
            for s, block in enumerate(self.blocks):
                np.matmul(x64, block.astype(np.float64), out=out[:, s])
        else:
            out[:] = np.matmul(xs.astype(self.blocks.dtype, copy=False), self.blocks).transpose(1, 0, 2)
        out *= self.sqrt_w
        return out.reshape(xs.shape[0], -1)

    def take(self, local: np.ndarray, pixels: np.ndarray | None = None) -> np.ndarray:
        """Weighted rows of columns ``local`` on ``pixels`` of every spaxel (k, ns·len(pixels)) float64.  Local."""
        sub = self.blocks[:, local, :] if pixels is None else self.blocks[:, local][:, :, pixels]
        sw = self.sqrt_w if pixels is None else self.sqrt_w[pixels]
        return (sub.astype(np.float64) * sw).transpose(1, 0, 2).reshape(len(local), -1)

    def gram(self, idx: np.ndarray) -> np.ndarray:
        """``(√w A_idx)(√w A_idx)ᵀ`` (k, k) float64 of the columns ``idx``.  Local."""
        out = np.zeros((len(idx), len(idx)))
        for block in self.blocks:
            sub = block[idx].astype(np.float64) * self.sqrt_w
            out += sub @ sub.T
        return out

    def sanitize(self, used: np.ndarray | None = None) -> int:
        """Set non-finite block values to zero in place; return how many were on ``used`` pixels.  Local."""
        bad = ~np.isfinite(self.blocks)
        count = int(np.count_nonzero(bad if used is None else bad[..., used]))
        if bad.any():
            self.blocks[bad] = 0
        return count
