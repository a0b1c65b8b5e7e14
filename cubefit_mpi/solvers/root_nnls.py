"""Rank 0's exact NNLS on the dense Gram system, the other ranks asleep.  Collective over comm.

:func:`solve_on_root` is step 2 of the exact method (:mod:`.exact`): the memory check (G plus
one N×N factor on rank 0; :func:`check_nnls_memory`), the quadratic terms added to G in place
(and taken off after), the method of ``CUBEFIT_NNLS_GRAM_METHOD``
(:func:`~cubefit_mpi.numerics.nnls_select.solve_gram`), rank 0's BLAS threads raised to the
node's idle cores (N ≥ :data:`NODE_THREADS_MIN_N`) while the other ranks sleep in
:func:`~cubefit_mpi.parallel.collectives.wait_for_root`, the solver-independent certificate,
and a log of method, time and peak memory.
"""
from __future__ import annotations

import logging
import os
import resource
import time
from contextlib import nullcontext

import numpy as np

from ..config.errors import InputError
from ..config.knobs import get_knobs
from ..numerics.certificate import KKT_TOL, certificate_dict, certify
from ..numerics.nnls_select import GramSolution, add_quadratic_terms, expects_dense, factor_bytes, solve_gram
from ..parallel.collectives import bcast_array, raise_if_any, wait_for_root
from ..parallel.comm import get_comm, ranks_on_node
from ..parallel.threads import node_blas_threads

_LOG = logging.getLogger("cubefit_mpi.solve")
_GB = 1e9
NODE_THREADS_MIN_N = 2048       # smaller NNLS (< 0.1 s) keep the launch's threads: no 50 ms core sampling


def _size(nbytes) -> str:
    return f"{int(nbytes)} bytes" + (f" ({nbytes / _GB:.2f} GB)" if nbytes >= 1e7 else "")


def available_bytes() -> int:
    """Memory the OS can still give this node (``MemAvailable``; free pages where unknown).  Local."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return 0


def check_nnls_memory(n: int, comm=None, *, gram_held: bool = False) -> dict:
    """Refuse, before any work, an exact NNLS whose G plus one N×N factor rank 0 cannot hold.  Collective.

    Needed: ``2 · 8 N²`` bytes on rank 0 (G, and the factor of
    :func:`~cubefit_mpi.numerics.nnls_select.solve_gram`).  Available: ``CUBEFIT_GRAM_MAX_BYTES``
    × the ranks on rank 0's node (their shares are idle during the solve) when the knob is set,
    else the node's ``MemAvailable`` (plus G's bytes if ``gram_held``).  Raises
    :class:`InputError` with both figures; returns ``{"needed", "available", "source"}``.
    """
    comm = get_comm(comm)
    gram_bytes = 8 * int(n) * int(n)
    needed = gram_bytes + factor_bytes(n)
    knob = get_knobs().gram_max_bytes
    on_node = ranks_on_node(comm)
    verdict = None
    if comm.Get_rank() == 0:
        if knob > 0:
            verdict = (knob * on_node, f"CUBEFIT_GRAM_MAX_BYTES={knob} x {on_node} rank(s) on the node")
        else:
            verdict = (available_bytes() + (gram_bytes if gram_held else 0),
                       "MemAvailable of rank 0's node (CUBEFIT_GRAM_MAX_BYTES=0)")
    available, source = comm.bcast(verdict, root=0)
    if needed > available:
        raise InputError(
            f"the exact NNLS of N={n} needs {_size(needed)} on rank 0 (G {_size(gram_bytes)} + one N x N factor "
            f"{_size(factor_bytes(n))}) but {_size(available)} are available ({source}); raise "
            f"CUBEFIT_GRAM_MAX_BYTES, run on a node with more memory or use --exact-method working-set")
    return {"needed": needed, "available": available, "source": source}


def exact_nnls(gram, rhs, reg=None, *, tol: float = 1e-10, x0=None) -> GramSolution:
    """The package's exact NNLS of a Gram system, by the method of ``CUBEFIT_NNLS_GRAM_METHOD``.  Local.

    Every exact NNLS goes through here (the Gram method's rank-0 solve, the working set's
    subproblems, the bootstrap's replicates), so the knob and ``auto``'s rule
    (:func:`~cubefit_mpi.numerics.nnls_select.solve_gram`) apply to all of them.

    Parameters
    ----------
    gram : (N, N) float64, the quadratic terms of ``reg`` already included; read only
    rhs : (N,) float64
    reg : Regularization or None, tells ``auto`` to expect a dense solution (a smoothness term)
    tol : float, as :func:`~cubefit_mpi.numerics.nnls.nnls_gram`
    x0 : (N,) float64 or None, non-negative warm start

    Returns
    -------
    GramSolution
    """
    dense = reg is not None and reg.active and expects_dense(reg)
    return solve_gram(gram, rhs, method=get_knobs().nnls_gram_method, tol=tol, x0=x0, expect_dense=dense)


def solve_on_root(gram, rhs, reg, *, tol: float, comm=None, x0=None) -> tuple[np.ndarray, dict]:
    """Exact NNLS of ``min ½xᵀ(G+R)x − bᵀx, x ≥ 0`` on rank 0; x and the summary on every rank.  Collective.

    Parameters
    ----------
    gram : (N, N) float64 on rank 0 (None elsewhere); R is added in place and taken off again
        (equal to the original to rounding)
    rhs : (N,) float64, on every rank
    reg : Regularization (the quadratic terms R)
    tol : float, the NNLS tolerance (as :func:`~cubefit_mpi.numerics.nnls.nnls_gram`)
    x0 : (N,) float64 or None, warm start (rank 0)

    Returns
    -------
    x : (N,) float64
    info : dict -- ``iterations``, ``converged``, ``active_set``, ``message``, ``objective``
        (½xᵀ(G+R)x − bᵀx), ``curvature`` (xᵀGx), the ``kkt.*`` certificate and ``nnls.*``
        (method, seconds, threads (0: as launched), factorizations, peak_bytes, rss_peak_bytes)
    """
    comm = get_comm(comm)
    n = int(np.asarray(rhs).size)
    check_nnls_memory(n, comm, gram_held=True)
    knobs = get_knobs()
    x = info = error = None
    if comm.Get_rank() == 0:
        try:
            x, info = _solve_here(gram, rhs, reg, tol, knobs, x0)
        except Exception as exc:      # re-raised on every rank below, after the others are released
            error = exc
    wait_for_root(comm)
    raise_if_any(error, comm)
    x = bcast_array(x, comm)
    info = comm.bcast(info, root=0)
    return x, info


def _solve_here(gram, rhs, reg, tol, knobs, x0):
    """Rank 0's part of :func:`solve_on_root`.  Local."""
    active = reg is not None and reg.active
    t0 = time.perf_counter()
    if active:
        add_quadratic_terms(gram, reg)
    try:
        raise_threads = knobs.blas_threads > 0 or gram.shape[0] >= NODE_THREADS_MIN_N
        with node_blas_threads(knobs.blas_threads) if raise_threads else nullcontext(0) as threads:
            t_solve = time.perf_counter()
            solution = exact_nnls(gram, rhs, reg, tol=tol, x0=x0)
            seconds = time.perf_counter() - t_solve
            x = solution.result.x
            cert = certify(gram, rhs, x)
    finally:
        if active:
            add_quadratic_terms(gram, reg, -1.0)
    curvature = float(x @ (gram @ x))
    result = solution.result
    peak = gram.nbytes + solution.work_bytes + 16 * gram.shape[0] * 8
    info = {"iterations": result.iterations, "converged": result.converged, "active_set": result.passive_size,
            "message": result.message, "objective": cert.objective, "curvature": curvature,
            "nnls.method": solution.method, "nnls.seconds": seconds, "nnls.threads": threads,
            "nnls.factorizations": solution.factorizations, "nnls.peak_bytes": peak,
            "nnls.rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            **certificate_dict(cert)}
    _LOG.info("exact NNLS (%s, %s): N=%d, %d non-zero, %d iterations, %d factorizations, %.3g s on %s BLAS "
              "thread(s); peak memory on rank 0 %.3g GB (G %.3g GB + factor %.3g GB; process peak RSS %.3g GB)",
              solution.method, knobs.nnls_gram_method, gram.shape[0], result.passive_size, result.iterations,
              solution.factorizations, time.perf_counter() - t0, threads or "the launch's", peak / _GB,
              gram.nbytes / _GB, solution.work_bytes / _GB, info["nnls.rss_peak_bytes"] / _GB)
    if not cert.ok:
        _LOG.warning("exact NNLS (%s): KKT certificate NOT MET: primal_min=%.3g dual_min=%.3g (tol %.3g) "
                     "passive=%.3g complementarity=%.3g (tol %.3g); %s -- x is not certified optimal",
                     solution.method, cert.primal_min, cert.dual_min, cert.tol, cert.passive_stationarity,
                     cert.complementarity, KKT_TOL, result.message)
    return x, info
