"""The exact solve when the N×N Gram matrix does not fit: a working-set method.

Pass 0 computes b, diag(G) and yᵀWy.  Each further pass computes only the Gram columns of the
most KKT-violating columns (scaled gradient ``g_j / √G_jj`` most negative), the working-set
problem is solved exactly (the NNLS of ``CUBEFIT_NNLS_GRAM_METHOD`` on ``G[W, W]``, warm-started),
and the full gradient follows from the stored columns: ``g = G[:, W] x_W − b``.  It stops on the
same KKT certificate as the full method.  Memory per rank: ``N × |W|`` float64.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ..config.errors import InputError
from ..numerics.regularization import Regularization
from ..parallel.collectives import bcast_array
from .limits import working_set_block
from .gram import SolveInputs, diagonal_pass, gram_columns
from .root_nnls import exact_nnls

_LOG = logging.getLogger("cubefit_mpi.solve")


def solve_working_set(inputs: SolveInputs, reg: Regularization, *, budget: int, tol: float, comm,
                      block: int | None = None, max_passes: int = 200) -> tuple[np.ndarray, dict]:
    """Working-set exact NNLS; returns (x, info) like the full method.  Collective over comm."""
    from ..numerics.certificate import certificate_dict, certify

    n = inputs.n_params
    max_cols = int(budget // (8 * n))
    if max_cols < 1:
        raise InputError(f"CUBEFIT_GRAM_MAX_BYTES={budget}: cannot hold even one Gram column of N={n} "
                         f"({8 * n} bytes); raise it or use fewer ranks per node")
    block = int(block or working_set_block(n))
    t0 = time.perf_counter()
    first = diagonal_pass(inputs, comm)
    rhs, yy = first["rhs"], first["yy"]
    diag_total = first["diag"] + (reg.diagonal() if reg.active else 0.0)
    working = np.zeros(0, dtype=int)
    columns = np.zeros((n, 0)) if comm.Get_rank() == 0 else None   # unregularised G[:, W], rank 0
    x = np.zeros(n)
    gradient = -rhs.copy()
    passes, iterations = 1, 0
    live = diag_total > 0
    scale = float(np.max(np.abs(rhs[live]) / np.sqrt(diag_total[live]), initial=0.0))
    threshold = tol * max(scale, 1e-300)           # the same stopping rule as nnls_gram
    while True:
        scaled = np.zeros(n)
        scaled[live] = gradient[live] / np.sqrt(diag_total[live])
        scaled[working] = 0.0
        candidates = np.flatnonzero(scaled < -threshold)
        if candidates.size == 0:
            break
        if working.size >= max_cols:
            raise InputError(f"CUBEFIT_GRAM_MAX_BYTES={budget}: the working set needs more than {max_cols} "
                             f"columns of N={n}; raise the limit")
        take = min(block, max_cols - working.size)
        new = candidates[np.argsort(scaled[candidates])[:take]]
        block_cols = gram_columns(inputs, new, comm)
        passes += 1
        working = np.concatenate([working, new])
        info = None
        if comm.Get_rank() == 0:
            columns = np.hstack([columns, block_cols])
            g_ws = columns[working] + (reg.columns(working)[working] if reg.active else 0.0)
            result = exact_nnls(g_ws, rhs[working], reg, tol=tol, x0=x[working]).result
            x = np.zeros(n)
            x[working] = result.x
            full_cols = columns + (reg.columns(working) if reg.active else 0.0)
            gradient = full_cols @ result.x - rhs
            iterations += result.iterations
            info = (result.converged, result.passive_size)
        x = bcast_array(x, comm)
        gradient = bcast_array(gradient, comm)
        info = comm.bcast(info, root=0)
        _LOG.info("working set: pass %d, |W| = %d, active %d", passes, working.size, info[1])
        if passes > max_passes:
            break
    summary = None
    if comm.Get_rank() == 0:
        cert = certify(diag_total, rhs, x, gradient=gradient)
        x_w = x[working]
        curvature = float(x_w @ (columns[working] @ x_w)) if working.size else 0.0
        summary = {"iterations": iterations, "converged": passes <= max_passes, "active_set": int((x > 0).sum()),
                   "message": f"working set of {working.size} columns", "yy": yy,
                   "chi2_formula": yy - 2.0 * float(rhs @ x) + curvature,
                   "objective": cert.objective + 0.5 * yy, "passes": passes, "working_set": int(working.size),
                   "pass_seconds": time.perf_counter() - t0, "solve_seconds": 0.0, "reduce_seconds": 0.0,
                   "from_cache": False, **certificate_dict(cert)}
    return x, comm.bcast(summary, root=0)
