"""Streaming passes over the hypercube for the exact solver: G = AᵀWA, b = AᵀWy, yᵀWy, diag(G),
chosen Gram columns, and the independent χ² residual pass.

Ranks read their S-tiles of ``/HyperCube/models`` (collective, chunk-aligned), drop masked pixels,
scale rows by √w, cast each tile to float64 and accumulate with BLAS (SYRK for G, GEMM for
columns).  Partial sums are reduced to rank 0 in float64 (G as row blocks of its upper triangle,
each message under 2**27 elements).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..config.errors import InputError
from ..config.knobs import get_knobs
from ..io import layout as lay
from ..io.blocks import read_block
from ..io.h5file import open_h5, open_uncached
from ..io.hypercube_state import require_usable_models
from ..numerics.digest import array_digest, rows_digest
from ..parallel.collectives import allreduce_sum, reduce_sum
from ..parallel.comm import get_comm, mpi
from ..parallel.decomposition import block_range, padded_schedule, tile_bounds
from ..parallel.threads import limit_blas_threads
from ..parallel.timers import PhaseTimer
from .limits import gram_reduce_row_blocks

_LOG = logging.getLogger("cubefit_mpi.solve")


@dataclass
class SolveInputs:
    """What every rank knows about the problem (small arrays and the tile plan)."""

    path: str
    S: int
    C: int
    P: int
    L: int
    mask: np.ndarray                 # (L,) bool, True = used
    weights: np.ndarray | None       # (L,) λ-weights or None
    s_tiles: list = field(default_factory=list)
    provenance: dict = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return self.C * self.P

    @property
    def sqrt_w(self) -> np.ndarray:
        """√w on the unmasked pixels, shape (L_used,)."""
        w = np.ones(self.L) if self.weights is None else self.weights
        return np.sqrt(w[self.mask])


def load_solve_inputs(path: str, *, use_weights: bool = True, comm=None) -> SolveInputs:
    """Check the hypercube is usable, read mask and λ-weights, fingerprint data.  Collective over comm.

    Raises :class:`InputError` for a hypercube that is not usable
    (:func:`~cubefit_mpi.io.hypercube_state.require_usable_models`: incomplete, mid-conversion,
    mid-recompression, built from other inputs), a missing data cube, or λ-weights of the
    wrong length.  Nothing is written before the hypercube has passed.
    """
    comm = get_comm(comm)
    limit_blas_threads(comm, get_knobs().blas_threads)
    with open_h5(path, "r", comm) as f:             # refuse an unusable hypercube before writing anything
        require_usable_models(f, comm)
    weights = None
    if use_weights:
        from ..stages.weights import read_lambda_weights

        weights = read_lambda_weights(path, comm=comm)
    with open_h5(path, "r", comm) as f:
        models = f[lay.MODELS]
        S, C, P, L = models.shape
        attrs = f[lay.HYPERCUBE].attrs
        if lay.DATACUBE not in f:
            raise InputError(f"{lay.DATACUBE}: dataset missing from {path}; the solver fits it")
        if f[lay.DATACUBE].shape != (S, L):
            raise InputError(f"{lay.DATACUBE}: expected shape ({S}, {L}) to match {lay.MODELS}, "
                             f"got {f[lay.DATACUBE].shape}")
        mask = np.asarray(f[lay.MASK][...], dtype=bool) if lay.MASK in f else np.ones(L, dtype=bool)
        if weights is not None and weights.shape != (L,):
            raise InputError(f"{lay.LAMBDA_WEIGHTS}: expected shape ({L},), got {weights.shape}")
        s_chunk = (models.chunks or (max(1, min(S, 64)),))[0]
        lo, hi = block_range(S, comm.Get_size(), comm.Get_rank())
        digest = 0
        for a, b in tile_bounds(hi - lo, 1024):
            rows = np.asarray(f[lay.DATACUBE][lo + a:lo + b])
            bad = ~np.isfinite(rows[:, mask])
            if bad.any():
                s, l = np.argwhere(bad)[0]
                digest = -1 - (lo + a + int(s))
                break
            digest ^= rows_digest(rows, lo + a)
        provenance = {
            "models.version": str(attrs.get("models.version", "")),
            "models.fingerprint": str(attrs.get("inputs.fingerprint", "")),
            "norm.mode": str(attrs.get("norm.mode", "")),
            "mask.digest": array_digest(mask),
            "weights.digest": array_digest(weights),
        }
    bad_rows = comm.allgather(digest if digest < 0 else None)
    bad_rows = [-1 - d for d in bad_rows if d is not None]
    if bad_rows:
        raise InputError(f"{lay.DATACUBE}: NaN/Inf at spaxel {min(bad_rows)} on a pixel where {lay.MASK} is True")
    provenance["data.digest"] = format(comm.allreduce(digest, op=mpi().BXOR), "x")
    return SolveInputs(path, S, C, P, L, mask, weights, tile_bounds(S, s_chunk), provenance)


def _my_tiles(inputs: SolveInputs, comm) -> list:
    lo, hi = block_range(len(inputs.s_tiles), comm.Get_size(), comm.Get_rank())
    return inputs.s_tiles[lo:hi]


def iter_design_blocks(inputs: SolveInputs, comm, *, need_data: bool = True, timer: PhaseTimer | None = None):
    """Yield this rank's weighted design blocks ``(B (N, L_used), z (L_used,))``, one per spaxel.

    ``B[(c, p), λ] = √w_λ A[s, c, p, λ]`` over the unmasked pixels, float64, C-contiguous (a view
    into a buffer reused for the next spaxel); ``z = √w y_s``.  Collective over comm: every rank
    makes the same number of collective reads, so iterate the generator to the end on every rank.
    ``timer`` (optional) gets the reads as phase ``io``.
    """
    timer = timer or PhaseTimer()
    sqrt_w = inputs.sqrt_w
    used = np.flatnonzero(inputs.mask)
    all_used = used.size == inputs.L
    n = inputs.n_params
    buf = np.empty((n, used.size))
    with open_h5(inputs.path, "r", comm) as f:
        models, data = open_uncached(f, lay.MODELS), f[lay.DATACUBE]   # each tile is read once
        for tile in padded_schedule(_my_tiles(inputs, comm), comm):
            if tile is None:
                with timer.phase("io"):
                    read_block(models, None, None)
                    if need_data:
                        read_block(data, None, None)
                continue
            s0, s1 = tile
            with timer.phase("io"):
                a_tile = read_block(models, (s0, 0, 0, 0), (s1 - s0, inputs.C, inputs.P, inputs.L))
                y_tile = read_block(data, (s0, 0), (s1 - s0, inputs.L)) if need_data else None
            for i in range(s1 - s0):
                a_s = a_tile[i].reshape(n, inputs.L)
                np.multiply(a_s if all_used else a_s[:, used], sqrt_w, out=buf)
                yield buf, (y_tile[i, used] * sqrt_w if need_data else None)


def _syrk_update(gram: np.ndarray, design: np.ndarray) -> None:
    """``gram[upper] += design @ design.T`` in place (gram Fortran-ordered)."""
    from scipy.linalg.blas import dsyrk

    dsyrk(1.0, design.T, beta=1.0, c=gram, trans=1, lower=0, overwrite_c=1)


def reduce_upper_to_root(gram: np.ndarray, comm) -> np.ndarray | None:
    """Sum the upper triangles of every rank's ``gram`` on rank 0, symmetrised.  Collective over comm."""
    n = gram.shape[0]
    out = np.zeros((n, n)) if comm.Get_rank() == 0 else None
    for i0, i1 in gram_reduce_row_blocks(n):
        part = reduce_sum(np.ascontiguousarray(gram[i0:i1, i0:]), comm)
        if out is not None:
            out[i0:i1, i0:] = part
    if out is not None:
        upper = np.triu(out)
        out = upper + np.triu(upper, 1).T
    return out


def normal_equations(inputs: SolveInputs, comm=None) -> dict:
    """One pass: G (rank 0 only), b, yᵀWy and diag(G) (every rank).  Collective over comm."""
    comm = get_comm(comm)
    t0 = time.perf_counter()
    n = inputs.n_params
    gram = np.zeros((n, n), order="F")
    rhs = np.zeros(n)
    yy = 0.0
    timer = PhaseTimer()
    blocks = iter_design_blocks(inputs, comm, timer=timer)
    while True:
        with timer.phase("compute"):            # includes the masking/scaling copy in the generator
            item = next(blocks, None)
            if item is None:
                break
            design, target = item
            _syrk_update(gram, design)
            rhs += design @ target
            yy += float(target @ target)
    timer.seconds["compute"] -= timer.seconds["io"]
    t_pass = time.perf_counter() - t0
    with timer.phase("comm"):
        rhs = allreduce_sum(rhs, comm)
        yy = float(allreduce_sum(np.array([yy]), comm)[0])
        gram = reduce_upper_to_root(gram, comm)
        diag = None
        if gram is not None:
            diag = gram.diagonal().copy()
        diag = comm.bcast(diag, root=0)
    return {"gram": gram, "rhs": rhs, "yy": yy, "diag": diag, "pass_seconds": t_pass,
            "reduce_seconds": time.perf_counter() - t0 - t_pass, "phases": dict(timer.seconds),
            "phases_by_rank": timer.by_rank(comm)}


def diagonal_pass(inputs: SolveInputs, comm=None) -> dict:
    """One pass for b, yᵀWy and diag(G) only (memory O(N)).  Collective over comm."""
    comm = get_comm(comm)
    n = inputs.n_params
    rhs, diag, yy = np.zeros(n), np.zeros(n), 0.0
    for design, target in iter_design_blocks(inputs, comm):
        rhs += design @ target
        diag += np.einsum("ij,ij->i", design, design)
        yy += float(target @ target)
    return {"rhs": allreduce_sum(rhs, comm), "diag": allreduce_sum(diag, comm),
            "yy": float(allreduce_sum(np.array([yy]), comm)[0])}


def gram_columns(inputs: SolveInputs, cols: np.ndarray, comm=None) -> np.ndarray | None:
    """One pass for ``G[:, cols]`` (N, k), on rank 0 (None elsewhere).  Collective over comm."""
    comm = get_comm(comm)
    block = np.zeros((inputs.n_params, len(cols)))
    for design, _ in iter_design_blocks(inputs, comm, need_data=False):
        block += design @ design[cols].T
    return reduce_sum(block, comm)


def residual_chi2(inputs: SolveInputs, x: np.ndarray, comm=None) -> float:
    """χ² = Σ_{s, λ∈mask} w (y − A x)², by a separate float64 pass.  Collective over comm."""
    comm = get_comm(comm)
    chi2 = 0.0
    for design, target in iter_design_blocks(inputs, comm):
        resid = target - x @ design
        chi2 += float(resid @ resid)
    return float(allreduce_sum(np.array([chi2]), comm)[0])
