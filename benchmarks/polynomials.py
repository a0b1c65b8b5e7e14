"""The cost of the polynomials: ``solve --add-degree 8`` and ``solve --mult-degree 8`` against a plain
exact solve of the same file, measured in the same run.

    .venv/bin/python benchmarks/polynomials.py [--cases demo,miles16] [--ranks 2] [--repeat 3] [--repeat-mult 1]
                                               [--degree 8] [--spaxels 400]

Cases (each made once with ``mock --templates miles`` and ``weights``, as ``make demo`` does):

* ``demo``: the demo's galaxy (``scripts/demo.sh``: 400 spaxels, 3 components, 212 MILES SSPs,
  600 pixels, S/N 60, 12 masked pixels): N = 636;
* ``miles16``: the same with 16 components: N = 16 x 212 = 3,392.

Every solve is a fresh process under ``mpiexec -n RANKS`` with ``use_cache=False`` (each one makes
its own normal equations) and the χ² verification pass, timed end to end around
``solve_exact``; medians of ``--repeat`` (``--repeat-mult`` for the multiplicative fit), the
variants interleaved round by round (a shared machine's load drifts).
Targets: additive <= 1.2x a plain solve, multiplicative <= (iterations + 1)x.  Prints markdown
rows for docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CASES = {"demo": 3, "miles16": 16}          # components; everything else as scripts/demo.sh

SOLVE_SCRIPT = r"""
import json, sys, time
from mpi4py import MPI
from cubefit_mpi.solvers.exact import solve_exact
comm = MPI.COMM_WORLD
add, mult = int(sys.argv[2]), int(sys.argv[3])
comm.Barrier(); t0 = time.perf_counter()
x, stats = solve_exact(sys.argv[1], use_cache=False, add_degree=add, mult_degree=mult, comm=comm)
comm.Barrier(); wall = time.perf_counter() - t0
if comm.rank == 0:
    keep = {k: stats.get(k) for k in ("n_params", "operator", "kkt.ok", "chi2", "poly.iterations", "poly.gram_passes",
                                      "poly.x_steps", "poly.converged", "pass_seconds")}
    print("RESULT " + json.dumps({"wall": wall, **keep}))
"""


def cli(ranks: int, *args) -> None:
    subprocess.run(["mpiexec", "-n", str(ranks), PY, "-m", "mpi4py", "-m", "cubefit_mpi", *map(str, args)],
                   check=True, capture_output=True, cwd=ROOT)


def make_case(path: Path, components: int, ranks: int, spaxels: int = 400) -> None:
    cli(ranks, "mock", path, "--templates", "miles", "--spaxels", spaxels, "--components", components,
        "--wavelengths", 600, "--seed", 1, "--noise", 60, "--masked-pixels", 12)
    cli(ranks, "weights", path)


def solve(path: Path, ranks: int, add: int, mult: int) -> dict:
    out = subprocess.run(["mpiexec", "-n", str(ranks), PY, "-c", SOLVE_SCRIPT, str(path), str(add), str(mult)],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def measure(path: Path, ranks: int, variants: list, repeat: int, repeat_mult: int) -> list[dict]:
    """Every variant ``(add, mult)`` ``repeat`` times (``repeat_mult`` with multiplicative terms),
    interleaved round by round so that a change of the machine's load hits all alike; medians."""
    runs = [[] for _ in variants]
    for round_ in range(max(repeat, repeat_mult)):
        for i, (add, mult) in enumerate(variants):
            if round_ < (repeat_mult if mult else repeat):
                runs[i].append(solve(path, ranks, add, mult))
    results = []
    for done in runs:
        result = dict(done[-1])
        result["wall"] = statistics.median(r["wall"] for r in done)
        results.append(result)
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="demo,miles16")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--repeat-mult", type=int, default=1)
    p.add_argument("--degree", type=int, default=8)
    p.add_argument("--spaxels", type=int, default=400, help="S of every case (400 as the demo; fewer for a quick check)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            path = Path(tmp) / f"{case}.h5"
            make_case(path, CASES[case], args.ranks, args.spaxels)
            d = args.degree
            plain, add, mult, both = measure(path, args.ranks, [(-1, 0), (d, 0), (-1, d), (d, d)], args.repeat,
                                             args.repeat_mult)
            for name, r in (("plain", plain), (f"--add-degree {args.degree}", add),
                            (f"--mult-degree {args.degree}", mult),
                            (f"--add-degree {args.degree} --mult-degree {args.degree}", both)):
                ratio = r["wall"] / plain["wall"]
                its = r.get("poly.iterations")
                if name == "plain":
                    target = ""
                elif its is None:
                    target = f"<= 1.2x: {'met' if ratio <= 1.2 else 'NOT met'}"
                else:
                    target = f"<= {its + 1}x: {'met' if ratio <= its + 1 else 'NOT met'}"
                detail = "" if its is None else (f"{its} ({r['poly.x_steps']}; {r['poly.gram_passes']} extra "
                                                 f"normal-equation passes; KKT {'OK' if r['kkt.ok'] else 'NOT MET'})")
                rows.append(f"| {case} (S = {args.spaxels}, N = {r['n_params']}, {r['operator']}) | {name} | "
                            f"{r['wall']:.2f} s | "
                            f"{ratio:.2f}x | {detail} | {target} |")
                print(rows[-1], flush=True)
    print()
    print(f"Measured by `benchmarks/polynomials.py --cases {args.cases} --ranks {args.ranks} --repeat {args.repeat} "
          f"--repeat-mult {args.repeat_mult} --degree {args.degree} --spaxels {args.spaxels}` (medians, wall time of "
          f"solve_exact, cache off, verification on):")
    print()
    print("| case | solve | time | vs plain | iterations | target |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
