"""Benchmark of the solvers against references measured in the same run.

    .venv/bin/python benchmarks/solve.py [--spaxels 2000 --components 3 --populations 100 --wavelengths 1500]
                                         [--large 200,10,200,1000] [--ranks 2] [--png docs/solve_gap.png]

For each case (medians over --repeat runs):
  * floors: one read of /HyperCube/models, tile by tile (h5py, float32), and the SYRK arithmetic
    alone (per-spaxel dsyrk of the same sizes, S/ranks of them): the pass cannot beat either;
  * exact solve (Gram pass + NNLS, no cache, no verification pass): seconds and ratio to the floor;
    the same with the χ² verification pass; the re-solve from the cache (no I/O);
  * scipy.optimize.nnls on the dense weighted system when it fits in --dense-max-gb, else on
    chol(G) (the same objective);
  * the working-set method forced by CUBEFIT_GRAM_MAX_BYTES: passes and seconds;
  * the spec's Kaczmarz solver given 10x the exact solve's wall time: its objective gap;
  * its time per epoch (one solve of --kz-epochs epochs; the median of the epochs after the
    first, which also computes the column energies) at 1 and --ranks ranks, against one read of
    the hypercube by the same ranks (each an equal share of the S-tiles, independent reads, no
    arithmetic), measured in the same process just before.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PY = sys.executable
SOLVE_SCRIPT = r"""
import json, os, sys, time
from mpi4py import MPI
from cubefit_mpi.solvers.exact import solve_exact
path, cache, verify, method = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1", sys.argv[4]
comm = MPI.COMM_WORLD
comm.Barrier(); t0 = time.perf_counter()
x, stats = solve_exact(path, use_cache=cache, verify=verify, exact_method=method, comm=comm)
comm.Barrier(); t = time.perf_counter() - t0
if comm.rank == 0:
    keep = {k: v for k, v in stats.items() if isinstance(v, (int, float, bool, str))}
    print("RESULT " + json.dumps({"seconds": t, **keep}))
"""


def run(cmd, env=None) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


def solve(path, ranks, *, cache=False, verify=False, method="auto", env=None) -> dict:
    cmd = [PY, "-c", SOLVE_SCRIPT, str(path), str(int(cache)), str(int(verify)), method]
    if ranks > 1:
        cmd = ["mpiexec", "-n", str(ranks)] + cmd
    return run(cmd, {"CUBEFIT_LOG_LEVEL": "WARNING", "CUBEFIT_LAMBDA_WEIGHTS_ENABLE": "0", **(env or {})})


def read_floor(path) -> float:
    import h5py

    t0 = time.perf_counter()
    with h5py.File(path, "r", rdcc_nbytes=0) as f:
        d = f["/HyperCube/models"]
        step = d.chunks[0] if d.chunks else 64
        for s in range(0, d.shape[0], step):
            d[s:s + step]
    return time.perf_counter() - t0


def blas_floor(S, n, n_used, ranks) -> float:
    """Seconds of the SYRK arithmetic alone: S / ranks per-spaxel dsyrk of (N x L_used) float64,
    with the BLAS threads one rank gets (cores // ranks)."""
    from scipy.linalg.blas import dsyrk
    from threadpoolctl import threadpool_limits

    limit = threadpool_limits(limits=max(1, (os.cpu_count() or 1) // ranks), user_api="blas")
    block = np.random.default_rng(0).uniform(size=(n, n_used))
    gram = np.zeros((n, n), order="F")
    count = -(-S // ranks)
    t0 = time.perf_counter()
    for _ in range(count):
        dsyrk(1.0, block.T, beta=1.0, c=gram, trans=1, lower=0, overwrite_c=1)
    seconds = time.perf_counter() - t0
    limit.restore_original_limits()
    return seconds


def make_case(tmp: Path, name: str, S: int, C: int, P: int, L: int) -> Path:
    path = tmp / f"{name}.h5"
    base = ["mpiexec", "-n", "2", PY, "-m", "mpi4py", "-m", "cubefit_mpi"]
    subprocess.run(base + ["mock", str(path), "--spaxels", str(S), "--components", str(C), "--populations", str(P),
                           "--wavelengths", str(L), "--noise", "40", "--masked-pixels", "10", "--seed", "3"],
                   check=True, capture_output=True)
    subprocess.run(base + ["build", str(path)], check=True, capture_output=True)
    return path


def dense_reference(path, gram, rhs, dense_max_gb) -> dict:
    import h5py
    import scipy.optimize

    with h5py.File(path, "r") as f:
        S, C, P, L = f["/HyperCube/models"].shape
        mask = f["/Mask"][...] if "/Mask" in f else np.ones(L, bool)
    n = C * P
    rows = S * int(mask.sum())
    if rows * n * 8 / 2**30 <= dense_max_gb:
        with h5py.File(path, "r") as f:
            A = f["/HyperCube/models"][...][..., mask].astype(np.float64)
            y = f["/DataCube"][...][:, mask]
        design = A.transpose(0, 3, 1, 2).reshape(-1, n)
        t0 = time.perf_counter()
        x, _ = scipy.optimize.nnls(design, y.reshape(-1), maxiter=50 * n)
        kind = "dense A"
    else:
        chol = np.linalg.cholesky(gram + 1e-12 * np.trace(gram) / n * np.eye(n)).T
        target = np.linalg.solve(chol.T, rhs)
        t0 = time.perf_counter()
        x, _ = scipy.optimize.nnls(chol, target, maxiter=50 * n)
        kind = "chol(G)"
    seconds = time.perf_counter() - t0
    return {"kind": kind, "seconds": seconds, "objective": 0.5 * float(x @ gram @ x) - float(rhs @ x)}


def kaczmarz_gap(path, budget_s, exact_objective, gram, rhs, ranks) -> dict | None:
    try:
        import cubefit_mpi.solvers.kaczmarz.solver  # noqa: F401
    except ImportError:
        return None
    script = r"""
import json, sys, time
from mpi4py import MPI
from cubefit_mpi.solvers.kaczmarz.solver import solve_kaczmarz
path, budget = sys.argv[1], float(sys.argv[2])
comm = MPI.COMM_WORLD
t0 = time.perf_counter(); epochs = 0; x = None; hist = []
while time.perf_counter() - t0 < budget:
    x, stats = solve_kaczmarz(path, epochs=1, warm_start="zeros" if x is None else x, comm=comm)
    epochs += 1
    hist.append((time.perf_counter() - t0, x.tolist()))
if comm.rank == 0:
    print("RESULT " + json.dumps({"epochs": epochs, "seconds": time.perf_counter() - t0, "hist": hist}))
"""
    cmd = [PY, "-c", script, str(path), str(budget_s)]
    if ranks > 1:
        cmd = ["mpiexec", "-n", str(ranks)] + cmd
    out = run(cmd, {"CUBEFIT_LOG_LEVEL": "WARNING", "CUBEFIT_LAMBDA_WEIGHTS_ENABLE": "0"})
    obj = lambda x: 0.5 * float(x @ gram @ x) - float(rhs @ x)  # noqa: E731
    curve = [(t, obj(np.asarray(x))) for t, x in out["hist"]]
    scale = abs(exact_objective) + 1e-300
    return {"epochs": out["epochs"], "seconds": out["seconds"],
            "gap_final": (curve[-1][1] - exact_objective) / scale,
            "curve": [(t, (o - exact_objective) / scale) for t, o in curve]}


EPOCH_SCRIPT = r"""
import json, statistics, sys, time
from mpi4py import MPI
from cubefit_mpi.io.h5file import open_h5, open_uncached
from cubefit_mpi.io.blocks import read_block
from cubefit_mpi.parallel.decomposition import block_range, tile_bounds
from cubefit_mpi.solvers.kaczmarz.solver import solve_kaczmarz
path, epochs, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
comm = MPI.COMM_WORLD

def one_read():
    comm.Barrier(); t0 = time.perf_counter()
    with open_h5(path, "r", comm) as f:
        d = open_uncached(f, "/HyperCube/models")
        tiles = tile_bounds(d.shape[0], d.chunks[0])
        lo, hi = block_range(len(tiles), comm.size, comm.rank)
        buf = None
        for a, b in tiles[lo:hi]:
            buf = read_block(d, (a, 0, 0, 0), (b - a,) + d.shape[1:], collective=False,
                             out=buf if buf is not None and buf.shape[0] >= b - a else None)
        comm.Barrier()
    return time.perf_counter() - t0

floor = statistics.median(one_read() for _ in range(repeat))
x, stats = solve_kaczmarz(path, epochs=epochs, comm=comm)
if comm.rank == 0:
    ep = [float(v) for v in stats["epoch_seconds"]]
    print("RESULT " + json.dumps({"floor_s": floor, "epoch_s": ep, "read_ahead": stats.get("read_ahead")}))
"""


def kaczmarz_epochs(path, ranks, epochs, repeat) -> dict:
    cmd = [PY, "-c", EPOCH_SCRIPT, str(path), str(epochs), str(repeat)]
    if ranks > 1:
        cmd = ["mpiexec", "-n", str(ranks)] + cmd
    out = run(cmd, {"CUBEFIT_LOG_LEVEL": "WARNING", "CUBEFIT_LAMBDA_WEIGHTS_ENABLE": "0"})
    steady = statistics.median(out["epoch_s"][1:]) if len(out["epoch_s"]) > 1 else out["epoch_s"][0]
    return {"ranks": ranks, "floor_s": out["floor_s"], "first_epoch_s": out["epoch_s"][0], "epoch_s": steady,
            "epoch_over_floor": steady / out["floor_s"], "read_ahead": out["read_ahead"]}


def bench_case(tmp, name, dims, args) -> dict:
    import h5py

    S, C, P, L = dims
    path = make_case(tmp, name, S, C, P, L)
    reps = args.repeat
    floor = statistics.median(read_floor(path) for _ in range(reps))
    with h5py.File(path, "r") as f:
        n_used = int(f["/Mask"][...].sum()) if "/Mask" in f else L
    floor_blas = statistics.median(blas_floor(S, C * P, n_used, args.ranks) for _ in range(reps))
    exact = [solve(path, args.ranks) for _ in range(reps)]
    t_exact = statistics.median(r["seconds"] for r in exact)
    verified = solve(path, args.ranks, verify=True)
    cached = solve(path, args.ranks, cache=True)
    cached = solve(path, args.ranks, cache=True)
    with h5py.File(path, "r") as f:
        gram, rhs = f["/Solve/gram"][...], f["/Solve/rhs"][...]
    n = C * P
    ws_budget = 8 * n * n - 8                 # just too small for the full Gram matrix
    ws = solve(path, args.ranks, method="working-set", env={"CUBEFIT_GRAM_MAX_BYTES": str(ws_budget)})
    ref = dense_reference(path, gram, rhs, args.dense_max_gb)
    ours_obj = 0.5 * (exact[0]["chi2_formula"] - exact[0]["yy"])
    kz = kaczmarz_gap(path, 10 * t_exact, ours_obj, gram, rhs, args.ranks) if args.kaczmarz else None
    if kz is not None:
        kz["per_epoch"] = [kaczmarz_epochs(path, r, args.kz_epochs, reps) for r in sorted({1, args.ranks})]
    os.unlink(path)
    return {"case": name, "S": S, "C": C, "P": P, "L": L, "N": n, "ranks": args.ranks,
            "floor_read_s": floor, "floor_blas_s": floor_blas, "exact_s": t_exact,
            "exact_over_floor": t_exact / max(floor, floor_blas),
            "exact_pass_s": statistics.median(r["pass_seconds"] for r in exact),
            "exact_nnls_s": statistics.median(r["solve_seconds"] for r in exact),
            "exact_verified_s": verified["seconds"], "cached_resolve_s": cached["seconds"],
            "kkt_ok": exact[0]["kkt.ok"], "chi2": exact[0]["chi2"], "active_set": exact[0]["active_set"],
            "working_set_s": ws["seconds"], "working_set_passes": ws["passes"],
            "working_set_cols": ws["working_set"], "working_set_budget_bytes": ws_budget,
            "working_set_rel_objective_diff": abs(ws["objective"] - exact[0]["objective"]) / abs(exact[0]["objective"]),
            "scipy_kind": ref["kind"], "scipy_s": ref["seconds"],
            "scipy_rel_objective_diff": (ref["objective"] - ours_obj) / abs(ours_obj),
            "kaczmarz": kz}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spaxels", type=int, default=2000)
    ap.add_argument("--components", type=int, default=3)
    ap.add_argument("--populations", type=int, default=100)
    ap.add_argument("--wavelengths", type=int, default=1500)
    ap.add_argument("--large", default="200,10,200,1000", help="S,C,P,L of the large-N case ('' to skip)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dense-max-gb", type=float, default=2.0)
    ap.add_argument("--no-kaczmarz", dest="kaczmarz", action="store_false")
    ap.add_argument("--kz-epochs", type=int, default=6, help="epochs of the time-per-epoch run")
    ap.add_argument("--png", default=None, help="write the Kaczmarz gap-vs-time plot here")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    cases = [("base", (args.spaxels, args.components, args.populations, args.wavelengths))]
    if args.large:
        cases.append(("large", tuple(int(v) for v in args.large.split(","))))
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name, dims in cases:
            results.append(bench_case(Path(tmp), name, dims, args))
    for r in results:
        kz = r.pop("kaczmarz")
        print(json.dumps(r, indent=1))
        print(f"\n{r['case']}: S={r['S']} C={r['C']} P={r['P']} L={r['L']} N={r['N']} on {r['ranks']} ranks, "
              f"medians of {args.repeat}")
        print(f"  exact {r['exact_s']:.2f}s (pass {r['exact_pass_s']:.2f}s, NNLS {r['exact_nnls_s']:.2f}s); floor = max(one "
              f"read {r['floor_read_s']:.2f}s, SYRK arithmetic per rank {r['floor_blas_s']:.2f}s): "
              f"{r['exact_over_floor']:.2f}x; with the chi2 pass {r['exact_verified_s']:.2f}s; "
              f"re-solve from cache {r['cached_resolve_s']:.2f}s")
        print(f"  scipy nnls on {r['scipy_kind']}: {r['scipy_s']:.2f}s, objective rel diff {r['scipy_rel_objective_diff']:.2e}")
        print(f"  working set (budget {r['working_set_budget_bytes']} B): {r['working_set_passes']} passes, "
              f"{r['working_set_cols']} columns, {r['working_set_s']:.2f}s, objective rel diff "
              f"{r['working_set_rel_objective_diff']:.1e}")
        if kz is not None:
            print(f"  kaczmarz given 10x the exact time: {kz['epochs']} epochs, relative objective gap "
                  f"{kz['gap_final']:.3e}")
            for e in kz["per_epoch"]:
                print(f"  kaczmarz per epoch at {e['ranks']} rank(s): {e['epoch_s']:.3f}s (first {e['first_epoch_s']:.3f}s, "
                      f"read-ahead {e['read_ahead']}); one read by the same ranks {e['floor_s']:.3f}s: "
                      f"{e['epoch_over_floor']:.2f}x")
            if args.png:
                _plot(kz, r, args.png)


def _plot(kz, r, png):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    t, gap = zip(*kz["curve"])
    ax.semilogy(t, np.maximum(gap, 1e-16), "o-", label="kaczmarz")
    ax.axvline(r["exact_s"], color="k", ls="--", label="exact solve (gap 0)")
    ax.set_xlabel("wall time [s]")
    ax.set_ylabel("relative objective gap")
    ax.set_title(f"{r['case']}: N={r['N']}, {r['ranks']} ranks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)


if __name__ == "__main__":
    main()
