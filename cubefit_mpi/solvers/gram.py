"""What the exact solver and Kaczmarz know about the problem (:class:`SolveInputs`: sizes, mask,
λ-weights, the tile plan, the operator that gives A, and the provenance that keys the caches),
and the passes, which the operator runs: G = AᵀWA, b = AᵀWy, yᵀWy, diag(G), chosen Gram columns,
and the independent χ² residual pass (:mod:`cubefit_mpi.operators`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config.errors import InputError
from ..config.knobs import get_knobs
from ..io import layout as lay
from ..io.h5file import open_h5
from ..numerics.digest import array_digest, rows_digest
from ..operators.base import Operator, Weighting
from ..operators.select import open_operator
from ..parallel.comm import get_comm, mpi
from ..parallel.decomposition import block_range, tile_bounds
from ..parallel.threads import limit_blas_threads


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
    operator: Operator | None = None
    add_degree: int = -1             # additive Legendre terms eliminated from the fit (-1: none)

    @property
    def weighting(self) -> Weighting:
        return Weighting(self.mask, self.weights, self.add_degree)

    @property
    def n_params(self) -> int:
        return self.C * self.P

    @property
    def sqrt_w(self) -> np.ndarray:
        """√w on the unmasked pixels, shape (L_used,)."""
        w = np.ones(self.L) if self.weights is None else self.weights
        return np.sqrt(w[self.mask])


def load_solve_inputs(path: str, *, use_weights: bool = True, operator: str = "auto", norm_mode: str | None = None,
                      amp_mode: str | None = None, prefer_stored: bool = False, add_degree: int = -1,
                      comm=None) -> SolveInputs:
    """Choose the operator, read mask and λ-weights, fingerprint the data.  Collective over comm.

    ``add_degree`` >= 0 eliminates additive Legendre terms up to that degree per spectrum
    (:class:`~cubefit_mpi.operators.base.Weighting`; the caches key on it).

    ``operator`` is ``auto``, ``factored`` or ``hypercube``
    (:func:`~cubefit_mpi.operators.select.open_operator`; ``norm_mode``/``amp_mode`` for factored
    models of a file without a hypercube).  Raises :class:`InputError` for a hypercube that is
    not usable, factors that are not exact, a missing data cube or λ-weights of the wrong length.
    Nothing is written before the operator has passed.
    """
    comm = get_comm(comm)
    limit_blas_threads(comm, get_knobs().blas_threads)
    op = open_operator(path, operator, norm_mode=norm_mode, amp_mode=amp_mode, prefer_stored=prefer_stored, comm=comm)
    S, C, P, L = op.S, op.C, op.P, op.L
    weights = None
    if use_weights:
        from ..stages.weights import read_lambda_weights

        weights = read_lambda_weights(path, comm=comm)
    with open_h5(path, "r", comm) as f:
        if lay.DATACUBE not in f:
            raise InputError(f"{lay.DATACUBE}: dataset missing from {path}; the solver fits it")
        if f[lay.DATACUBE].shape != (S, L):
            raise InputError(f"{lay.DATACUBE}: expected shape ({S}, {L}) to match the models, "
                             f"got {f[lay.DATACUBE].shape}")
        mask = np.asarray(f[lay.MASK][...], dtype=bool) if lay.MASK in f else np.ones(L, dtype=bool)
        if weights is not None and weights.shape != (L,):
            raise InputError(f"{lay.LAMBDA_WEIGHTS}: expected shape ({L},), got {weights.shape}")
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
    weighting = Weighting(mask, weights, int(add_degree))
    try:
        weighting.additive
    except ValueError as exc:
        raise InputError(f"--add-degree {add_degree}: {exc} (/Mask)") from None
    provenance = {**op.provenance(), "mask.digest": array_digest(mask), "weights.digest": array_digest(weights),
                  **weighting.provenance()}
    bad_rows = comm.allgather(digest if digest < 0 else None)
    bad_rows = [-1 - d for d in bad_rows if d is not None]
    if bad_rows:
        raise InputError(f"{lay.DATACUBE}: NaN/Inf at spaxel {min(bad_rows)} on a pixel where {lay.MASK} is True")
    provenance["data.digest"] = format(comm.allreduce(digest, op=mpi().BXOR), "x")
    return SolveInputs(path, S, C, P, L, mask, weights, op.s_tiles, provenance, op, int(add_degree))


def normal_equations(inputs: SolveInputs, comm=None) -> dict:
    """One pass: G (rank 0 only), b, yᵀWy and diag(G) (every rank).  Collective over comm."""
    return inputs.operator.normal_equations(inputs.weighting, get_comm(comm))


def diagonal_pass(inputs: SolveInputs, comm=None) -> dict:
    """One pass for b, yᵀWy and diag(G) only (memory O(N)).  Collective over comm."""
    return inputs.operator.diagonal_pass(inputs.weighting, get_comm(comm))


def gram_columns(inputs: SolveInputs, cols: np.ndarray, comm=None) -> np.ndarray | None:
    """``G[:, cols]`` (N, k), on rank 0 (None elsewhere).  Collective over comm."""
    return inputs.operator.gram_columns(inputs.weighting, cols, get_comm(comm))


def residual_chi2(inputs: SolveInputs, x: np.ndarray, comm=None) -> float:
    """χ² = Σ_{s, λ∈mask} w (y − A x)², by a separate float64 pass.  Collective over comm."""
    return inputs.operator.residual_chi2(inputs.weighting, x, get_comm(comm))
