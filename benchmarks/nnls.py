"""Exact NNLS on MILES-based (G, b): Lawson–Hanson (the old solver) against the new one, issue 14.

    .venv/bin/python benchmarks/nnls.py [--repeat 3] [--threads 1] [--cache DIR] [--large 94] [--designs] [--wait]

Systems from ``benchmarks/nnls_problems.py`` (4 metallicities × 53 ages = 212 MILES templates,
C mock components, 400 spaxels, 1 % noise); the smoothness term of ``--regul`` is the package's
(second differences over the 53 × 4 grid), added to G in place as ``solve_exact`` does.

* The table: N = 848 (C = 4) and 3,392 (C = 16), regul 0 and 1e3.  "old" is rank 0's step as
  it was (G + R as a new array, ``nnls_gram`` = Lawson–Hanson, the certificate, xᵀGx), "new"
  the package's path now, ``solvers.root_nnls.solve_on_root``
  at one rank (``CUBEFIT_NNLS_GRAM_METHOD=auto``); both with ``--threads`` BLAS threads (default
  1, as issue 14's table; 0: all cores, the package's default for rank 0's NNLS -- on a shared
  machine whose cores are busy, more threads than free cores make OpenBLAS many times slower);
  old and new alternate, ``--repeat`` runs each; medians of wall seconds and of CPU seconds (the
  CPU time is what the shared machine's load disturbs least), with iterations, non-zero
  weights, factorizations, both certificates and the optimum's agreement.
* ``--large C``: N = 212 C (default 94: N = 19,928) at regul 1e3, new solver only (Lawson–Hanson
  would take hours): seconds, certificate, peak memory (accounted: G + factor; and the process's
  peak RSS).
* ``--designs``: the design comparison -- block pivoting told nothing (``auto``'s own rule), and the
  interior-point prototype with its crossover (``benchmarks/nnls_designs.py``).
* ``--wait``: ``mpiexec -n 2 benchmarks/nnls_wait.py`` (how the other ranks wait, rank 0's threads).

Prints markdown rows ready for ``docs/performance.md``.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from nnls_designs import nnls_interior  # noqa: E402
from nnls_problems import ProblemSpec, cached_system, miles_available, regularization  # noqa: E402

from cubefit_mpi.numerics.certificate import certify  # noqa: E402
from cubefit_mpi.numerics.nnls import nnls_gram  # noqa: E402
from cubefit_mpi.numerics.nnls_select import add_quadratic_terms, solve_gram  # noqa: E402
from cubefit_mpi.parallel.threads import node_blas_threads  # noqa: E402
from cubefit_mpi.solvers.root_nnls import solve_on_root  # noqa: E402

SELF = MPI.COMM_SELF
ROWS = [(4, 0.0), (4, 1e3), (16, 0.0), (16, 1e3)]
THREADS = [1]


def timed(fn, repeat):
    """(median wall seconds, last result) of ``repeat`` calls."""
    seconds, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), result


def objective(gram, rhs, x):
    return 0.5 * float(x @ (gram @ x)) - float(rhs @ x)


def old_root(problem, reg):
    """Rank 0's step as it was: G + R as a new array, Lawson–Hanson, certificate, xᵀGx."""
    gram, rhs = problem.gram, problem.rhs
    total = gram + reg.dense() if reg.active else gram
    with node_blas_threads(THREADS[0]):
        result = nnls_gram(total, rhs, tol=1e-10)
        cert = certify(total, rhs, result.x)
        float(result.x @ (gram @ result.x))
    return result, cert, objective(total, rhs, result.x)


def new_root(problem, reg):
    """Rank 0's step now: ``solve_on_root`` at one rank (R in place, the auto method, certificate)."""
    x, info = solve_on_root(problem.gram, problem.rhs, reg, tol=1e-10, comm=SELF)
    return x, info


def interleaved(problem, reg, repeat):
    """Old and new alternately, ``repeat`` times each: medians of wall and CPU seconds."""
    walls, cpus = {"old": [], "new": []}, {"old": [], "new": []}
    out = {}
    for _ in range(repeat):
        for name, fn in (("old", old_root), ("new", new_root)):
            t0, c0 = time.perf_counter(), time.process_time()
            out[name] = fn(problem, reg)
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
    med = {k: (statistics.median(walls[k]), statistics.median(cpus[k])) for k in walls}
    return med, out


def table(args):
    print(f"\nold = rank 0's step before (G + R copied, Lawson-Hanson), new = solve_on_root (auto); "
          f"{args.repeat} interleaved runs each, medians of wall (CPU) seconds; "
          f"{THREADS[0] or 'all'} BLAS thread(s) of {os.cpu_count()} cores")
    print("| N | regul | old | iterations | passive | KKT | new | method | iterations | factorizations | passive "
          "| KKT | speed-up wall (CPU) | optimum (rel. objective diff; max rel. x diff) |")
    print("|---|---|---:|---:|---:|---|---:|---|---:|---:|---:|---|---:|---|")
    for comps, regul in ROWS:
        problem = cached_system(ProblemSpec(components=comps), args.cache)
        reg = regularization(problem, regul)
        med, out = interleaved(problem, reg, args.repeat)
        old, cert_old, f_old = out["old"]
        x, info = out["new"]
        gram = problem.gram + reg.dense() if reg.active else problem.gram
        f_new = objective(gram, problem.rhs, x)
        dx = np.abs(x - old.x).max() / max(np.abs(old.x).max(), 1e-300)
        (w_old, c_old), (w_new, c_new) = med["old"], med["new"]
        print(f"| {problem.rhs.size:,} | {regul:g} | {w_old:.2f} s ({c_old:.2f}) | {old.iterations:,} "
              f"| {old.passive_size:,} | {'ok' if cert_old.ok else 'NOT MET'} | {w_new:.2f} s ({c_new:.2f}) "
              f"| {info['nnls.method']} | {info['iterations']:,} | {info['nnls.factorizations']} "
              f"| {info['active_set']:,} | {'ok' if info['kkt.ok'] else 'NOT MET'} "
              f"| **{w_old / w_new:.1f}x** ({c_old / c_new:.1f}x) | {abs(f_new - f_old) / abs(f_old):.1e}; "
              f"{dx:.1e} |", flush=True)


def large(args):
    problem = cached_system(ProblemSpec(components=args.large), args.cache)
    reg = regularization(problem, 1e3)
    cpu0 = time.process_time()
    x, info = solve_on_root(problem.gram, problem.rhs, reg, tol=1e-10, comm=SELF)
    cpu = time.process_time() - cpu0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\nN = {problem.rhs.size:,} (C = {args.large}), regul 1e3, new solver, one run, "
          f"{THREADS[0] or 'all'} BLAS thread(s):")
    print("| N | method | seconds (CPU) | iterations | factorizations | passive | KKT | peak: G + factor "
          "| process peak RSS |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|")
    print(f"| {problem.rhs.size:,} | {info['nnls.method']} | {info['nnls.seconds']:.0f} s ({cpu:.0f}) "
          f"| {info['iterations']} "
          f"| {info['nnls.factorizations']} | {info['active_set']:,} | {'ok' if info['kkt.ok'] else 'NOT MET'} "
          f"| {info['nnls.peak_bytes'] / 1e9:.2f} GB | {rss / 1e9:.2f} GB |", flush=True)


def designs(args):
    print(f"\ndesigns (medians of {args.repeat}): block pivoting told 'dense' (the package at --regul), "
          "auto's own rule (Lawson-Hanson first), interior point + crossover")
    print("| N | regul | block pivoting | factorizations | auto, no hint | interior point + crossover "
          "| factorizations | KKT (bp / auto / ipm) |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for comps, regul in ROWS:
        problem = cached_system(ProblemSpec(components=comps), args.cache)
        reg = regularization(problem, regul)
        gram, rhs = problem.gram, problem.rhs
        if reg.active:
            add_quadratic_terms(gram, reg)
        with node_blas_threads(THREADS[0]):
            t_bp, bp = timed(lambda: solve_gram(gram, rhs, method="block-pivoting"), args.repeat)
            t_auto, auto = timed(lambda: solve_gram(gram, rhs, method="auto"), args.repeat)
            t_ipm, ipm = timed(lambda: nnls_interior(gram, rhs), args.repeat)
        oks = ["ok" if certify(gram, rhs, r.x).ok else "NOT MET" for r in (bp.result, auto.result, ipm)]
        if reg.active:
            add_quadratic_terms(gram, reg, -1.0)
        print(f"| {rhs.size:,} | {regul:g} | {t_bp:.2f} s ({bp.method}) | {bp.factorizations} | {t_auto:.2f} s "
              f"({auto.method}) | {t_ipm:.2f} s | {ipm.factorizations} | {' / '.join(oks)} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads of both solvers (0: all cores)")
    ap.add_argument("--cache", default=os.environ.get("CUBEFIT_BENCH_CACHE", "/tmp/cubefit_nnls_bench"),
                    help="directory for the generated systems (.npy; N = 19,928 takes 3.2 GB)")
    ap.add_argument("--large", type=int, default=0, metavar="C", help="also N = 212 C at regul 1e3 (e.g. 94)")
    ap.add_argument("--designs", action="store_true", help="also the design comparison")
    ap.add_argument("--wait", action="store_true", help="also the 2-rank study of benchmarks/nnls_wait.py")
    ap.add_argument("--no-table", action="store_true", help="skip the four-row table")
    args = ap.parse_args(argv)
    THREADS[0] = args.threads
    if args.threads > 0:
        os.environ["CUBEFIT_BLAS_THREADS"] = str(args.threads)        # solve_on_root's threads
    if not miles_available():
        sys.exit("benchmarks/nnls.py needs the shared MILES library (../shared/data/miles_ssp.npz)")
    if not args.no_table:
        table(args)
    if args.designs:
        designs(args)
    if args.wait:
        cmd = ["mpiexec", "-n", "2", sys.executable, str(HERE / "nnls_wait.py"), "--cache", args.cache,
               "--repeat", str(max(args.repeat, 5))]
        print(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    if args.large:
        large(args)


if __name__ == "__main__":
    main()
