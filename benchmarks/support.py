"""Work saved by component support: build, Gram passes and recon with and without skipping dark
(spaxel, component) pairs, on one file, in one run.

    .venv/bin/python benchmarks/support.py [--spaxels 2048 --components 4 --populations 100 --wavelengths 1000]
                                           [--dark 3] [--block S/2] [--repeat 3]

The mock's components ``1 .. --dark`` are dark (LOSVD zero) in half of the spaxels (alternate
blocks of ``--block``, default one contiguous half), so ``1 − dark / (2 C)`` of the (s, c) pairs carry light. Each stage runs as
shipped ("skip") and with every pair taken as lit ("full": the support replaced by all-True, the
builder's GEMM over every row), medians of ``--repeat``:

* ``build`` (GEMM fill of ``/HyperCube/models``, uncompressed);
* ``gram, hypercube`` (the streaming pass over the stored hypercube, no NNLS cache);
* ``gram, factors`` (the factors' pass over the spaxels and the contraction);
* ``recon`` (the model cube from the stored hypercube).

Both give the same x and χ² (tested in tests/test_component_support.py); the ratio full/skip
is the work saved, against the ideal 1 / (lit fraction) of the pair-proportional work.
Prints markdown rows for docs/performance.md.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CUBEFIT_LOG_LEVEL", "WARNING")
os.environ.setdefault("CUBEFIT_LAMBDA_WEIGHTS_ENABLE", "0")


@contextlib.contextmanager
def everything_lit():
    """Every (s, c) taken as lit by the builder, the operators and recon (the reference)."""
    from cubefit_mpi.numerics import factored as fa
    from cubefit_mpi.operators import factored as factored_op
    from cubefit_mpi.operators import select
    from cubefit_mpi.stages import build

    saved = (build.lit_model_tile, select.stored_support, factored_op.support_map)
    build.lit_model_tile = fa.model_tile
    select.stored_support = lambda f, models: None
    factored_op.support_map = lambda scale: np.ones(np.shape(scale), dtype=bool)
    try:
        yield
    finally:
        build.lit_model_tile, select.stored_support, factored_op.support_map = saved


def darken(path: str, dark: int, block: int) -> float:
    """Components 1..dark dark in alternate blocks of ``block`` spaxels (the first block dark);
    returns the lit fraction of (s, c)."""
    import h5py

    with h5py.File(path, "r+") as f:
        losvd = f["/LOSVD"][...]
        S, _, C = losvd.shape
        for c in range(1, dark + 1):
            for s0 in range(0, S, 2 * block):
                losvd[s0:s0 + block, :, c] = 0.0
        f["/LOSVD"][...] = losvd
        return float((losvd.sum(axis=1) > 0).mean())


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    from mpi4py import MPI

    from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
    from cubefit_mpi.solvers.exact import solve_exact
    from cubefit_mpi.stages.build import build_hypercube
    from cubefit_mpi.stages.mock import make_mock
    from cubefit_mpi.stages.recon import reconstruct

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spaxels", type=int, default=2048)
    p.add_argument("--components", type=int, default=4)
    p.add_argument("--populations", type=int, default=100)
    p.add_argument("--wavelengths", type=int, default=1000)
    p.add_argument("--dark", type=int, default=3)
    p.add_argument("--block", type=int, default=0,
                   help="spaxels per dark/lit block (default S/2: dark in one contiguous half, as a component "
                        "confined to part of the field; small blocks leave every S-tile partly lit)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None)
    args = p.parse_args(argv)
    comm = MPI.COMM_SELF
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="cubefit-bench-support-"))
    path = str(scratch / "support.h5")
    make_mock(path, MockSpec(spaxels=args.spaxels, components=args.components, populations=args.populations,
                             wavelengths=args.wavelengths, seed=3, snr=50), comm)
    lit = darken(path, args.dark, args.block or max(1, args.spaxels // 2))
    stages = {
        "build": lambda: build_hypercube(path, force=True, comm=comm),
        "gram, hypercube": lambda: solve_exact(path, operator="hypercube", use_cache=False, verify=False,
                                               use_weights=False, comm=comm),
        "gram, factors": lambda: solve_exact(path, operator="factored", use_cache=False, verify=False,
                                             use_weights=False, comm=comm),
        "recon": lambda: reconstruct(path, operator="hypercube", comm=comm),
    }
    rows = []
    for name, fn in stages.items():
        skip = timed(fn, args.repeat)
        with everything_lit():
            full = timed(fn, args.repeat)
        if name == "build":
            build_hypercube(path, force=True, comm=comm)         # the shipped build for the later stages
        rows.append((name, skip, full))
        print(f"{name}: skip {skip:.2f}s, full {full:.2f}s, saved {full / skip:.2f}x (ideal {1 / lit:.2f}x)", flush=True)
    print(f"\n`.venv/bin/python benchmarks/support.py --spaxels {args.spaxels} --components {args.components} "
          f"--populations {args.populations} --wavelengths {args.wavelengths} --dark {args.dark} "
          f"--block {args.block or args.spaxels // 2} --repeat {args.repeat}` ({100 * lit:.1f} % of (s, c) lit)\n")
    print("| stage | skipping dark pairs (s) | every pair (s) | full / skip | ideal |")
    print("|---|---|---|---|---|")
    for name, skip, full in rows:
        print(f"| {name} | {skip:.2f} | {full:.2f} | {full / skip:.2f}x | {1 / lit:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
