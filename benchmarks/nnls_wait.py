"""Rank 0's exact NNLS while the other ranks wait: how they wait, and rank 0's BLAS threads.

    mpiexec -n 2 .venv/bin/python benchmarks/nnls_wait.py [--components 16] [--regul 1e3] [--repeat 5]

Run by ``benchmarks/nnls.py --wait`` (or directly).  The same NNLS (the package's ``auto``
method on a MILES-based system, rank 0) is timed in four set-ups, interleaved, ``--repeat``
times each (medians; the machine is shared):

* ``bcast, 1 thread``   -- the old way: the others block in ``MPI_Bcast`` (MPICH busy-polls
  there) and rank 0 keeps ``limit_blas_threads``' share, cores // ranks;
* ``bcast, all cores``  -- rank 0 raises its BLAS threads, the others still spin in the broadcast;
* ``sleep, 1 thread``   -- the others sleep in ``wait_for_root``, rank 0 keeps its share;
* ``sleep, all cores``  -- ... and rank 0 takes all the cores;
* ``sleep, idle cores`` -- the package's way (``solvers.root_nnls.solve_on_root``): rank 0 takes
  the cores idle right now (``parallel.threads.node_blas_threads``).

Prints the markdown rows, and the CPU seconds a waiting rank used per wall second.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nnls_problems import ProblemSpec, cached_system, regularization  # noqa: E402

from cubefit_mpi.numerics.nnls_select import add_quadratic_terms, expects_dense, solve_gram  # noqa: E402
from cubefit_mpi.parallel.collectives import bcast_array, wait_for_root  # noqa: E402
from cubefit_mpi.parallel.threads import limit_blas_threads, node_blas_threads, process_cores  # noqa: E402

SETUPS = [("bcast", "share"), ("bcast", "all"), ("sleep", "share"), ("sleep", "all"), ("sleep", "idle")]


def one_run(comm, gram, rhs, dense, how, cores, share):
    """Seconds of rank 0's solve until every rank has x, CPU seconds of this rank meanwhile, threads."""
    comm.Barrier()
    t0, cpu0 = time.perf_counter(), time.process_time()
    x = None
    threads = 0
    if comm.rank == 0:
        if cores == "idle":
            with node_blas_threads() as threads:
                x = solve_gram(gram, rhs, expect_dense=dense).result.x
        else:
            threads = process_cores() if cores == "all" else share
            with threadpool_limits(limits=threads, user_api="blas"):
                x = solve_gram(gram, rhs, expect_dense=dense).result.x
    if how == "sleep":
        wait_for_root(comm)
    x = bcast_array(x, comm)
    return time.perf_counter() - t0, time.process_time() - cpu0, threads


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--components", type=int, default=16)
    ap.add_argument("--regul", type=float, default=1e3)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cache", default=os.environ.get("CUBEFIT_BENCH_CACHE", "/tmp/cubefit_nnls_bench"))
    args = ap.parse_args(argv)
    comm = MPI.COMM_WORLD
    share = max(1, limit_blas_threads(comm) or (os.cpu_count() or 1) // comm.size)
    gram = rhs = None
    dense = args.regul > 0
    if comm.rank == 0:
        problem = cached_system(ProblemSpec(components=args.components), args.cache)
        gram, rhs = problem.gram, problem.rhs
        reg = regularization(problem, args.regul)
        if reg.active:
            add_quadratic_terms(gram, reg)
            dense = expects_dense(reg)
    times = {s: [] for s in SETUPS}
    cpu_wait = {s: [] for s in SETUPS}
    used = {s: [] for s in SETUPS}
    for _ in range(args.repeat):
        for setup in SETUPS:
            wall, cpu, threads = one_run(comm, gram, rhs, dense, *setup, share)
            others = comm.gather(cpu / wall if comm.rank else None, root=0)
            if comm.rank == 0:
                times[setup].append(wall)
                used[setup].append(threads)
                cpu_wait[setup].append(float(np.mean([c for c in others[1:]])) if comm.size > 1 else 0.0)
    if comm.rank == 0:
        n = rhs.size
        base = statistics.median(times[SETUPS[0]])
        print(f"\n{comm.size} ranks, N={n}, regul={args.regul:g}, {args.repeat} interleaved runs each (medians); "
              f"rank 0's share {share} thread(s), all cores {process_cores()}; load average "
              f"{os.getloadavg()[0]:.1f}")
        print("| waiting ranks | rank 0's BLAS threads | NNLS until all ranks have x | vs the old way "
              "| CPU of a waiting rank per second |")
        print("|---|---|---:|---:|---:|")
        for setup in SETUPS:
            med = statistics.median(times[setup])
            label = "spin in MPI_Bcast" if setup[0] == "bcast" else "sleep in wait_for_root"
            threads = "/".join(str(t) for t in sorted(set(used[setup])))
            if setup[1] == "idle":
                threads = f"idle cores: {threads}"
            print(f"| {label} | {threads} | {med:.2f} s | {base / med:.2f}x "
                  f"| {statistics.median(cpu_wait[setup]):.2f} |")


if __name__ == "__main__":
    main()
