"""How well the performance model predicts this machine: a scaling study at 1 and 2 ranks with
``--model``, and the model's error at each point (measured wall / predicted wall − 1).

    .venv/bin/python benchmarks/scaling_model.py [--problem 300,4,80,400] [--repeat 3]

The model is calibrated on the 1-rank medians of the same run (per-tile costs, I/O level,
set-up) plus the probes at 2 ranks (bandwidths, reduce α/β, CPU contention); the 2-rank
errors are the prediction.  The target is |error| <= 25 % at 2 ranks on a quiet machine: a
process of another user taking a core in the middle of a run shows as ``contention`` > 1 and
makes the point unpredictable.  Prints a markdown table for docs/scaling.md.
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="300,4,80,400", help="S,C,P,L of the mock (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "cubefit_mpi", "scaling", "--ranks", "1,2", "--what", "build,solve",
               "--repeat", str(args.repeat), "--model", "--out", out, args.problem]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            return 1
        with open(Path(out) / "scaling.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
    print(f"command: {' '.join(cmd[1:4])} ... {args.problem} (median of {args.repeat})")
    print("| ranks | stage | measured s | model s | error | contention |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for r in rows:
        error = float(r["model_error"])
        if r["ranks"] == "2":
            worst = max(worst, abs(error))
        print(f"| {r['ranks']} | {r['what']} | {float(r['wall']):.2f} | {float(r['model_wall']):.2f} | "
              f"{error:+.1%} | {float(r['model_contention']):.2f} |")
    print(f"worst 2-rank error {worst:.1%} (target <= 25 %): {'met' if worst <= 0.25 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
