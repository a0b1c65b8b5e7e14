"""Cost of a bootstrap replicate against the fit it reuses, at 1 and 2 ranks.

    .venv/bin/python benchmarks/bootstrap.py [--cases miles,demo] [--ranks 1,2] [--replicates 32]

Cases (mock galaxies from the MILES SSPs shipped with the package):

``miles``
    N = 16 × 212 = 3,392, S = 400, 4800–5800 Å at 60 km/s (L = 945), 1 % noise, ``--regul 1e3``:
    the regularised MILES case of the NNLS issue's table, as a file.
``demo``
    ``make demo``'s galaxy (S = 400, C = 3, P = 212, L = 600, S/N 60), unregularised.

For each case and rank count, in one run: a fresh exact solve (factored operator, no cache: the
pass that forms G and b, the NNLS, the χ² check), then ``--replicates`` bootstrap replicates
(wild, per spaxel) from that fit. Reported: the fresh solve's seconds, the seconds per
replicate (the batch's adjoint pass and the NNLS, excluding the one-off set-up) and their ratio
(target ≤ 5 %), and the speed-up of the replicates from 1 to 2 ranks. Medians of ``--repeat``.
Prints markdown rows for docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CASES = {
    "miles": {"mock": ["--templates", "miles", "--spaxels", "400", "--components", "16", "--wavelengths", "945",
                       "--seed", "2", "--noise", "100"], "regul": 1e3},
    "demo": {"mock": ["--templates", "miles", "--spaxels", "400", "--components", "3", "--wavelengths", "600",
                      "--seed", "1", "--noise", "60", "--masked-pixels", "12"], "regul": 0.0},
}

SCRIPT = r"""
import json, sys, time
from mpi4py import MPI
from cubefit_mpi.solvers.exact import solve_exact
from cubefit_mpi.solvers.uncertainty import bootstrap_uncertainty
comm = MPI.COMM_WORLD
path, regul, replicates, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
comm.Barrier(); t0 = time.perf_counter()
x, stats = solve_exact(path, regul=regul, operator="factored", use_cache=False, use_weights=False, comm=comm)
comm.Barrier(); t1 = time.perf_counter()
out = bootstrap_uncertainty(path, replicates=replicates, seed=seed, batch=replicates, comm=comm)
comm.Barrier(); t2 = time.perf_counter()
if comm.rank == 0:
    print("RESULT " + json.dumps({"fresh": t1 - t0, "bootstrap": t2 - t1, "per_replicate": out["seconds_per_replicate"],
                                  "pass": out["pass_seconds"], "nnls": out["solve_seconds"], "n": stats["n_params"],
                                  "active_set": stats.get("active_set"), "kkt": stats.get("kkt.ok")}))
"""


def run(ranks: int, args: list, env: dict) -> dict:
    cmd = [PY, "-m", "mpi4py", "-c", SCRIPT, *map(str, args)]
    if ranks > 1:
        cmd = ["mpiexec", "-n", str(ranks), *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"benchmark run failed:\n{res.stderr[-3000:]}")
    line = next(line for line in res.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="miles,demo")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--replicates", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPIR_", "HYDRA"))}
    env.setdefault("CUBEFIT_LOG_LEVEL", "WARNING")
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="cubefit-bench-boot-"))
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases.split(","):
        spec = CASES[case]
        path = scratch / f"{case}.h5"
        subprocess.run([PY, "-m", "cubefit_mpi", "mock", str(path), *spec["mock"]], check=True, capture_output=True,
                       env=env)
        by_ranks = {}
        for ranks in (int(r) for r in args.ranks.split(",")):
            runs = [run(ranks, [path, spec["regul"], args.replicates, seed], env) for seed in range(args.repeat)]
            med = {k: statistics.median(r[k] for r in runs) for k in ("fresh", "per_replicate", "pass", "nnls")}
            by_ranks[ranks] = med
            rows.append((case, runs[0]["n"], runs[0]["active_set"], ranks, med))
            print(f"{case} N={runs[0]['n']} ranks={ranks}: fresh solve {med['fresh']:.2f}s, per replicate "
                  f"{med['per_replicate']:.3f}s ({100 * med['per_replicate'] / med['fresh']:.1f} % of the fresh solve; "
                  f"pass {med['pass'] / args.replicates:.3f}s, NNLS {med['nnls'] / args.replicates:.3f}s per replicate)",
                  flush=True)
        if 1 in by_ranks and 2 in by_ranks:
            print(f"{case}: replicates 1 -> 2 ranks: {by_ranks[1]['per_replicate'] / by_ranks[2]['per_replicate']:.2f}x")
    print(f"\n`.venv/bin/python benchmarks/bootstrap.py --cases {args.cases} --ranks {args.ranks} "
          f"--replicates {args.replicates} --repeat {args.repeat}`\n")
    print("| case | N | non-zero | ranks | fresh solve (s) | per replicate (s) | replicate / fresh | pass, NNLS per replicate (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for case, n, nz, ranks, med in rows:
        print(f"| {case} | {n} | {nz} | {ranks} | {med['fresh']:.2f} | {med['per_replicate']:.3f} | "
              f"{100 * med['per_replicate'] / med['fresh']:.1f} % | {med['pass'] / args.replicates:.3f}, "
              f"{med['nnls'] / args.replicates:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
