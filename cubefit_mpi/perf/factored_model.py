"""Performance model of the exact solve from the two factors (no hypercube; pure numerics).

The terms (flops counted as multiply-adds × 2; see :mod:`cubefit_mpi.operators.factored`):

* one pass over the spaxels, shared by the ranks: ``M += κκᵀ`` (S·(CK)² by SYRK), the
  projections ``Z = Y_w B_wᵀ`` (2·S·L_used·K·P) and ``b`` (2·S·C·K·P), reading ``/LOSVD`` and
  ``/DataCube`` once (S·(V·C + L)·8 bytes);
* the contraction, shared by the ranks over (p-block, p'-block) pairs: Φ's blocks
  ((K·P)²·L_used, half by symmetry ×2) and G's (C²·K²·P², half by symmetry ×2);
* the communication: ``M`` and ``b`` summed everywhere, G's upper blocks sent to rank 0 (N²/2
  doubles, one copy: no rank but rank 0 holds an N×N array);
* the rank-0 NNLS (:func:`cubefit_mpi.perf.model.nnls_seconds`).

Rank 0 holds G (and the NNLS its factor), so the G budget sets the ranks per node;
:func:`best_layout` picks the most ranks per node whose budget still holds G, the rest of the
node's cores as BLAS threads.  Local (no MPI).
"""
from __future__ import annotations

from . import model as sm


def pass_flops(problem: sm.Problem) -> float:
    """Flops of the pass over all spaxels (M, the projections, b).  Local."""
    S, C, P, K, lu = problem.S, problem.C, problem.P, problem.K, problem.l_used
    return S * (C * K) ** 2 + 2.0 * S * lu * K * P + 2.0 * S * C * K * P


def contraction_flops(problem: sm.Problem) -> float:
    """Flops of G from M and Φ's blocks (upper block pairs only).  Local."""
    C, P, K, lu = problem.C, problem.P, problem.K, problem.l_used
    return (K * P) ** 2 * lu + (C * K * P) ** 2


def best_layout(problem: sm.Problem, machine: sm.Machine, nodes: int) -> sm.Layout:
    """The most ranks per node whose partial N×N G fits the per-rank budget, threads for the rest.  Local."""
    per_node = machine.cores_per_node
    while per_node > 1 and problem.N ** 2 * sm.BYTES_F64 > machine.gram_budget(per_node):
        per_node //= 2
    threads = max(1, machine.cores_per_node // per_node)
    return sm.Layout(int(nodes) * per_node, per_node, threads)


def predict_factored_solve(problem: sm.Problem, machine: sm.Machine, layout: sm.Layout) -> sm.Prediction:
    """Seconds of ``cubefit_mpi solve --operator factored`` (no cache, no verification pass).  Local."""
    ranks, threads = layout.ranks, layout.threads
    rate = machine.blas_flops * threads / layout.oversubscription(machine)
    compute = (pass_flops(problem) + contraction_flops(problem)) / ranks / rate
    read_bytes = problem.S * (problem.L + problem.C * 64) * sm.BYTES_F64 / ranks   # DataCube + LOSVD (V ~ 64)
    io = read_bytes / min(machine.read_bw_rank, machine.read_bw_node / layout.ranks_per_node) * layout.shared(machine)
    ck = problem.C * problem.K
    comm = (sm.message_seconds(machine, ranks, ck * ck * sm.BYTES_F64)
            + (problem.N ** 2 / 2.0 * sm.BYTES_F64 / machine.bandwidth if ranks > 1 else 0.0)
            + 2 * sm.message_seconds(machine, ranks, problem.N * sm.BYTES_F64))
    serial = sm.nnls_seconds(machine, problem.N, problem.k, "auto")
    notes = [f"{layout.ranks_per_node} rank(s) per node x {threads} threads (G of "
             f"{problem.N ** 2 * sm.BYTES_F64 / 2**30:.1f} GiB on rank 0)"]
    if problem.N ** 2 * sm.BYTES_F64 > machine.gram_budget(layout.ranks_per_node):
        notes.append("G does not fit even one rank per node: the working-set method would be used")
    return sm.Prediction("solve", ranks, layout.nodes, "factored", machine.solve_setup_seconds, compute, io, comm,
                         serial, 1, ranks, notes)


def factored_table(problem: sm.Problem, machine: sm.Machine, nodes: list[int]) -> list[dict]:
    """Predictions of the factored solve at each node count (the best layout each).  Local."""
    rows, first = [], None
    for count in nodes:
        pred = predict_factored_solve(problem, machine, best_layout(problem, machine, count))
        first = first or pred
        rows.append({"nodes": pred.nodes, "ranks": pred.ranks, "method": pred.method, "passes": pred.passes,
                     "setup": pred.setup, "compute": pred.compute, "io": pred.io, "comm": pred.comm,
                     "serial": pred.serial, "total": pred.total, "speedup": first.total / pred.total,
                     "efficiency": first.total / pred.total / (pred.nodes / first.nodes), "bound": pred.bound,
                     "notes": pred.notes, "fails": False})
    return rows
