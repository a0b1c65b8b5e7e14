"""Benchmarks of the factored operator against references measured in the same run.

    .venv/bin/python benchmarks/factored.py gram  [--spaxels 250 --components 40 --populations 100 --wavelengths 1000]
    .venv/bin/python benchmarks/factored.py large [--spaxels 2000 --components 60 --populations 360 --wavelengths 1250]

``gram``: G, b and yᵀWy from the factors against the hypercube pass on the same file (built
first, by the GEMM), one rank, medians of ``--repeat``; the ratio (target >= 50x), and the cost
of each term of the factored path (the pass over the spaxels, the contraction) against the
flops of the performance model (:mod:`cubefit_mpi.perf.factored_model`) at this core's GEMM
rate measured in the same run.

``large``: an exact solve from the inputs alone (no hypercube: at this size it would be
``S·C·P·L·4`` bytes, 216 GB for the default) on ``--ranks`` ranks, end to end (the operator,
the normal equations, the NNLS, the χ² verification pass), each phase's time and the peak
memory per rank; target < 15 minutes, certified.

Both print markdown rows for docs/performance.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

LARGE_SCRIPT = r"""
import json, resource, sys, time
from mpi4py import MPI
from cubefit_mpi.solvers.exact import solve_exact
comm = MPI.COMM_WORLD
comm.Barrier(); t0 = time.perf_counter()
x, stats = solve_exact(sys.argv[1], use_weights=False, operator="factored", use_cache=False, comm=comm)
comm.Barrier(); wall = time.perf_counter() - t0
rss = comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, root=0)
if comm.rank == 0:
    keep = {k: stats[k] for k in ("pass_seconds", "reduce_seconds", "solve_seconds", "verify_seconds", "kkt.ok",
                                  "chi2_consistent", "active_set", "iterations", "n_params", "operator")}
    print("RESULT " + json.dumps({"wall": wall, "rss": rss, **keep}))
"""


def mock(path: Path, args) -> None:
    subprocess.run(["mpiexec", "-n", "2", PY, "-m", "mpi4py", "-m", "cubefit_mpi", "mock", str(path),
                    "--spaxels", str(args.spaxels), "--components", str(args.components),
                    "--populations", str(args.populations), "--wavelengths", str(args.wavelengths),
                    "--seed", "3", "--noise", "50"], check=True, capture_output=True)


def gemm_rate(n: int = 1500, repeat: int = 5) -> float:
    """float64 flop/s of this core's GEMM (square n)."""
    a = np.random.default_rng(0).standard_normal((n, n))
    best = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ a
        best.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(best)


def bench_gram(args) -> None:
    from mpi4py import MPI

    from cubefit_mpi.io.h5file import open_h5
    from cubefit_mpi.operators.base import Weighting
    from cubefit_mpi.operators.select import open_operator
    from cubefit_mpi.perf import factored_model as fm
    from cubefit_mpi.perf.probe import galaxy_problem
    from cubefit_mpi.stages.build import build_hypercube

    SELF = MPI.COMM_SELF
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "gram.h5"
        mock(path, args)
        build_hypercube(str(path), comm=SELF)
        with open_h5(path, "r", SELF) as f:
            mask = np.asarray(f["/Mask"][...], dtype=bool) if "/Mask" in f else None
            S, C, P, L = f["/HyperCube/models"].shape
        weighting = Weighting(np.ones(L, bool) if mask is None else mask, None)
        hyper, fact, terms = [], [], []
        for _ in range(args.repeat):
            op = open_operator(str(path), "hypercube", comm=SELF)
            t0 = time.perf_counter()
            ref = op.normal_equations(weighting, SELF)
            hyper.append(time.perf_counter() - t0)
            op = open_operator(str(path), "factored", comm=SELF)
            t0 = time.perf_counter()
            got = op.normal_equations(weighting, SELF)
            fact.append(time.perf_counter() - t0)
            terms.append(got["phases"])
        rel = float(np.abs(got["gram"] - ref["gram"]).max() / np.abs(ref["gram"]).max())
        K = op.K
        problem = dataclasses.replace(galaxy_problem(S, C, P, L), K=K, l_used=int(weighting.mask.sum()))
        rate = gemm_rate()
        model_pass = fm.pass_flops(problem) / rate
        model_contract = fm.contraction_flops(problem) / rate
    t_h, t_f = statistics.median(hyper), statistics.median(fact)
    compute = statistics.median(t["compute"] for t in terms)
    io = statistics.median(t["io"] for t in terms)
    print(json.dumps({"hypercube_s": t_h, "factored_s": t_f, "ratio": t_h / t_f, "gram_rel_diff": rel,
                      "factored_compute_s": compute, "factored_io_s": io, "model_pass_s": model_pass,
                      "model_contraction_s": model_contract, "gemm_gflops": rate / 1e9, "K": K}, indent=1))
    cube_gb = S * C * P * L * 4 / 1e9
    print(f"\nG + b + y'Wy, S={S} C={C} P={P} L={L} K={K} (hypercube {cube_gb:.1f} GB), 1 rank, median of {args.repeat}:")
    print("| path | seconds | ratio |\n|---|---|---|")
    print(f"| hypercube pass (read + SYRK) | {t_h:.1f} | 1 |")
    print(f"| factored (pass + contraction) | {t_f:.2f} | {t_h / t_f:.0f}x faster (target >= 50x) |")
    print(f"factored terms: compute {compute:.2f} s, io {io:.3f} s; the model at {rate / 1e9:.1f} GFLOP/s: "
          f"pass {model_pass:.2f} s + contraction {model_contract:.2f} s = {model_pass + model_contract:.2f} s; "
          f"max |G_f - G_h| / max |G| = {rel:.2g} (the hypercube's float32 rounding)")


def bench_large(args) -> None:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "large.h5"
        t0 = time.perf_counter()
        mock(path, args)
        t_mock = time.perf_counter() - t0
        cmd = [PY, "-c", LARGE_SCRIPT, str(path)]
        if args.ranks > 1:
            cmd = ["mpiexec", "-n", str(args.ranks)] + cmd
        env = {**os.environ, "CUBEFIT_LOG_LEVEL": "INFO"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(1)
        result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    S, C, P, L = args.spaxels, args.components, args.populations, args.wavelengths
    print(json.dumps(result, indent=1))
    print(f"\nexact solve from the inputs, S={S} C={C} P={P} L={L} (N={C * P}; its hypercube would be "
          f"{S * C * P * L * 4 / 1e9:.0f} GB), {args.ranks} ranks (mock made in {t_mock:.0f} s, not counted):")
    print("| phase | seconds |\n|---|---|")
    for key in ("pass_seconds", "reduce_seconds", "solve_seconds", "verify_seconds"):
        print(f"| {key.replace('_seconds', '')} | {result[key]:.1f} |")
    print(f"| total (end to end) | {result['wall']:.1f} |")
    print(f"certified: {result['kkt.ok']} (chi2 check {result['chi2_consistent']}), active set {result['active_set']}, "
          f"{result['iterations']} NNLS iterations; peak RSS per rank "
          + ", ".join(f"{r / 2**30:.2f} GiB" for r in result["rss"]) + "; target < 15 min: "
          + ("met" if result["wall"] < 900 else "NOT met"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=("gram", "large"))
    ap.add_argument("--spaxels", type=int)
    ap.add_argument("--components", type=int)
    ap.add_argument("--populations", type=int)
    ap.add_argument("--wavelengths", type=int)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    defaults = {"gram": (250, 40, 100, 1000), "large": (2000, 60, 360, 1250)}[args.case]
    for key, value in zip(("spaxels", "components", "populations", "wavelengths"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    (bench_gram if args.case == "gram" else bench_large)(args)


if __name__ == "__main__":
    main()
