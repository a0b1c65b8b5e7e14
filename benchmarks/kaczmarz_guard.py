"""Validation and cost of the Kaczmarz epoch guard (issue 18): the tables of docs/kaczmarz.md and
docs/performance.md.

    .venv/bin/python benchmarks/kaczmarz_guard.py [--epochs 100] [--ranks 1,2,3,4] [--demo] [--dir /tmp]
    .venv/bin/python benchmarks/kaczmarz_guard.py --spaxels 96 --populations 16 --wavelengths 200 --epochs 20

The case of the issue: ``python -m cubefit_mpi mock --spaxels 512 --components 3 --populations 48
--wavelengths 600 --noise 30``, built (default chunks), λ-weights, the exact solve (f*, and the Gram
cache under /Solve).  ``--demo`` adds the demo's galaxy (``scripts/demo.sh``: MILES SSPs, S 400,
C 3, P 212, L 600, S/N 60, 12 masked pixels; ``--demo-epochs``).  For each number of ranks, the
solve with the guard off (``CUBEFIT_EPOCH_GUARD=0``: the last iterate, as before) and on:

* the objective ½χ² of every epoch's iterate, recomputed by the script from the Gram matrix
  (independent of the solver's own tracking), at epochs 20 and the last, its minimum, and the
  returned objective and gap ``(f − f*)/(f(0) − f*)``;
* the check: returned ≤ the start and ≤ every epoch's (relative tolerance 1e-6 for the probe
  rows' float32 products), and the guarded run at N ranks against the guarded 1-rank run.

The cost: the median epoch time (epochs 2 onwards) with the guard off, on with the objective from
the Gram cache, and on without one (the probe rows), each against the guard-off epoch in the same
run.  Rows are printed ready to paste.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PY = sys.executable
KZ_SCRIPT = r"""
import json, sys
import h5py, numpy as np
from mpi4py import MPI
from cubefit_mpi.solvers.kaczmarz.solver import solve_kaczmarz
path, epochs, gram_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
class Snapshots:
    def __init__(self): self.xs = []
    def log_rmse(self, *a): pass
    def progress(self, *a): pass
    def snapshot(self, x, epoch, rmse): self.xs.append(np.array(x, copy=True))
tracker = Snapshots()
x, st = solve_kaczmarz(path, epochs=epochs, tracker=tracker)
if MPI.COMM_WORLD.rank == 0:
    with h5py.File(gram_path, "r") as f:
        G, b, yy = f["/Solve/gram"][...], f["/Solve/rhs"][...], float(f["/Solve/gram"].attrs["yy"])
    f = lambda v: float(0.5 * yy - b @ v + 0.5 * v @ G @ v)
    print("RESULT " + json.dumps({
        "values": [f(v) for v in tracker.xs], "returned": f(x), "objective": st["objective"],
        "f0": st["objective_zero"], "f_star": st.get("exact_objective"), "gap": st.get("gap_rel"),
        "returned_epoch": st["returned_epoch"], "rejected": st["epochs_rejected"],
        "source": st["objective_source"], "s_groups": st["s_groups"], "c_bands": st["c_bands"],
        "epoch_seconds": st["epoch_seconds"].tolist(), "tracking_seconds": st["tracking_seconds"].tolist()}))
"""


def sh(cmd, env=None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}:\n{out.stderr[-3000:]}")
    return out.stdout


def cli(*args, env=None):
    return sh([PY, "-m", "cubefit_mpi", *map(str, args)], env)


def make_case(root: Path, name: str, mock_args: list, build_args: list, env: dict) -> Path:
    path = root / f"{name}.h5"
    cli("mock", path, *mock_args)
    cli("build", path, *build_args)
    cli("solve", path, "--operator", "hypercube", env=env)   # λ-weights, the exact solution, the Gram cache
    #                                          (of the stored hypercube: the operator Kaczmarz reads)
    return path


def kaczmarz(case: Path, work: Path, ranks: int, epochs: int, guard: bool, gram: bool, env: dict) -> dict:
    shutil.copy(case, work)
    if not gram:
        import h5py

        with h5py.File(work, "r+") as f:
            del f["/Solve/gram"], f["/Solve/rhs"]
    cmd = [PY, "-c", KZ_SCRIPT, str(work), str(epochs), str(case)]
    if ranks > 1:
        cmd = ["mpiexec", "-n", str(ranks), PY, "-m", "mpi4py"] + cmd[1:]
    out = sh(cmd, {**env, "CUBEFIT_EPOCH_GUARD": "1" if guard else "0"})
    return json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][7:])


def verdict(res: dict) -> bool:
    rtol = 1e-9 if res["source"] == "gram" else 1e-6
    return res["returned"] <= res["f0"] and all(res["returned"] <= v * (1 + rtol) for v in res["values"])


def validate(name: str, case: Path, root: Path, ranks: list, epochs: int, env: dict) -> list:
    rows, one = [], None
    for n in ranks:
        for guard in (False, True):
            res = kaczmarz(case, root / "work.h5", n, epochs, guard, True, env)
            vals = res["values"]
            gap = (res["returned"] - res["f_star"]) / (res["f0"] - res["f_star"])
            if guard and n == ranks[0]:
                one = res["returned"]
            vs_one = f"{res['returned'] / one:.3f}" if guard and one else "—"
            rows.append(f"| {name} | {n} ({res['s_groups']}×{res['c_bands']}) | {'on' if guard else 'off'} | "
                        f"{vals[min(19, len(vals) - 1)]:.6g} | {vals[-1]:.6g} | {min(vals):.6g} | "
                        f"{res['returned']:.6g} (epoch {res['returned_epoch']}) | {gap:.2e} | "
                        f"{res['rejected'] if guard else '—'} | {'yes' if verdict(res) else 'NO'} | {vs_one} |")
            print(rows[-1], file=sys.stderr, flush=True)              # progress
    return rows


def cost(name: str, case: Path, root: Path, ranks: list, epochs: int, env: dict) -> list:
    rows = []
    for n in ranks:
        med = {}
        for label, guard, gram in (("off", False, True), ("gram", True, True), ("probe", True, False)):
            res = kaczmarz(case, root / "work.h5", n, epochs, guard, gram, env)
            med[label] = statistics.median(res["epoch_seconds"][1:])
            med[label + "_track"] = statistics.median(res["tracking_seconds"][1:]) if guard else 0.0
        rows.append(f"| {name} | {n} | {med['off']:.4f} | {med['gram']:.4f} ({med['gram_track'] * 1e3:.2f} ms "
                    f"tracking) | {med['gram'] / med['off']:.3f} | {med['probe']:.4f} | "
                    f"{med['probe'] / med['off']:.3f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spaxels", type=int, default=512)
    ap.add_argument("--populations", type=int, default=48)
    ap.add_argument("--wavelengths", type=int, default=600)
    ap.add_argument("--noise", type=float, default=30.0)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--ranks", default="1,2,3,4")
    ap.add_argument("--cost-epochs", type=int, default=10)
    ap.add_argument("--demo", action="store_true", help="also the demo's galaxy (MILES, S 400, P 212)")
    ap.add_argument("--demo-epochs", type=int, default=20)
    ap.add_argument("--weights", choices=("both", "on", "off"), default="both",
                    help="λ-weights on (the default of solve), off (CUBEFIT_LAMBDA_WEIGHTS_ENABLE=0) or both")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        label = f"S {args.spaxels} C 3 P {args.populations} L {args.wavelengths} S/N {args.noise:g}"
        weights = {"on": [True], "off": [False], "both": [True, False]}[args.weights]
        cases = []
        for w in weights:
            env = {} if w else {"CUBEFIT_LAMBDA_WEIGHTS_ENABLE": "0"}
            cases.append((f"{label}, λ-weights {'on' if w else 'off'}",
                          make_case(root, f"ill{int(w)}", ["--spaxels", args.spaxels, "--components", 3,
                                                           "--populations", args.populations, "--wavelengths",
                                                           args.wavelengths, "--noise", args.noise], [], env),
                          args.epochs, env))
        if args.demo:
            cases.append(("demo (MILES, S 400 P 212), λ-weights on",
                          make_case(root, "demo", ["--templates", "miles", "--spaxels", 400, "--components", 3,
                                                   "--wavelengths", 600, "--seed", 1, "--noise", 60,
                                                   "--masked-pixels", 12], ["--norm", "model"], {}),
                          args.demo_epochs, {}))
        rows = []
        for name, case, epochs, env in cases:
            rows += validate(name, case, root, ranks, epochs, env)
        print(f"| case | ranks (S-groups×c-bands) | guard | ½χ² epoch 20 | ½χ² last epoch | min over epochs | "
              f"returned | gap | epochs undone | ≤ start and every epoch | ÷ 1 rank |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
        print()
        cost_rows = []
        for name, case, _, env in cases:
            cost_rows += cost(name, case, root, ranks[:2], args.cost_epochs, env)
        print("| case | ranks | epoch, guard off (s) | guard on, objective from the Gram cache (s) | ratio | "
              "guard on, probe rows (s) | ratio |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(cost_rows))


if __name__ == "__main__":
    main()
