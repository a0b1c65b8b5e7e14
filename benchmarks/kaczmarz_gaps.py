"""How close the Kaczmarz solver gets to the exact optimum: the table of docs/kaczmarz.md.

    .venv/bin/python benchmarks/kaczmarz_gaps.py [--dir /tmp] [--guard 0]

Mock S=200 C=3 P=12 L=300 (S-tiles of 16, λ-weights on), noise-free and S/N 30.  For each
setting and number of epochs: the relative gap (f − f*) / (f(0) − f*) to the exact NNLS optimum
f* (the exact solver's, with its KKT certificate), one rank, printed as a markdown table.
``--guard 0``: with ``CUBEFIT_EPOCH_GUARD=0`` (the last iterate, as before the epoch guard).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from mpi4py import MPI

from cubefit_mpi.config.knobs import Knobs
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.solvers.exact import solve_exact
from cubefit_mpi.solvers.kaczmarz.solver import solve_kaczmarz
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.mock import make_mock

SELF = MPI.COMM_SELF
SETTINGS = [  # (label, knobs, solver keywords, epochs)
    ("default (polish on 6 columns)", {}, {}, (1, 3, 10)),
    ("`NNLS_ENABLE=0`", {"CUBEFIT_NNLS_ENABLE": "0"}, {}, (1, 10)),
    ("polish on all 36 columns (`NNLS_PROP_PER_BAND=36`)", {"CUBEFIT_NNLS_PROP_PER_BAND": "36"}, {}, (1, 3, 10)),
    ("`--warm-start jacobi`, default", {}, {"warm_start": "jacobi"}, (3,)),
]
EPOCHS = (1, 3, 10)


def case(root: Path, name: str, snr) -> tuple[Path, float]:
    path = root / f"{name}.h5"
    make_mock(str(path), MockSpec(spaxels=200, components=3, populations=12, wavelengths=300, seed=0, snr=snr), SELF)
    build_hypercube(str(path), S_chunk=16, comm=SELF)
    _, stats = solve_exact(str(path), comm=SELF)              # writes /X_global (method exact) and λ-weights
    return path, stats["objective"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None)
    ap.add_argument("--guard", choices=("1", "0"), default="1", help="CUBEFIT_EPOCH_GUARD (default 1)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        for data, snr in (("noise-free", None), ("S/N 30", 30.0)):
            path, f_star = case(root, data.replace("/", "").replace(" ", ""), snr)
            for label, env, kw, epochs in SETTINGS:
                gaps = {}
                for e in epochs:
                    work = root / "work.h5"
                    shutil.copy(path, work)
                    _, st = solve_kaczmarz(str(work), epochs=e, comm=SELF, knobs=Knobs.from_env({**env, "CUBEFIT_EPOCH_GUARD": args.guard}), **kw)
                    gaps[e] = st["gap_rel"]
                cells = [f"{gaps[e]:.1e}" if e in gaps else "—" for e in EPOCHS]
                star = "f* ≈ 0" if abs(f_star) < 1e-6 else f"f* = {f_star:.3g}"
                rows.append(f"| {data}{f' ({star})' if label.startswith('default') else ''} | {label} | "
                            + " | ".join(cells) + " |")
    print("| data | setting | 1 epoch | 3 epochs | 10 epochs |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
