"""Benchmark of the hypercube builder against references measured in the same run.

    .venv/bin/python benchmarks/build.py [--spaxels 2000 --components 3 --populations 100 --wavelengths 1500]

Prints (medians over --repeat runs):
  * ours with each fill method (``CUBEFIT_BUILD_METHOD=gemm``: one GEMM of the two factors per
    unit; ``fft``: FFT convolution per (s, c) + sparse rebin), 1 rank and 2 ranks (mpiexec -n 2):
    seconds, per-(s,c) cost, 2-rank efficiency, peak RSS per rank against the size of one tile;
  * GEMM against FFT, and the GEMM build against the raw write floor (target <= 1.3x);
  * the predecessor's naive approach, per (s, c, p) ``scipy.signal.fftconvolve`` + dense ``R_T``
    matmul, timed on a sample of (s, c) pairs and extrapolated: ratio naive / ours per rank;
  * the floor: pyFFTW batched inverse FFTs of the same count and size + a raw h5py write of the
    same bytes: ratio ours / floor.
Results are appended to docs/performance.md by hand (the command above is recorded there).
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

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

RANK_SCRIPT = r"""
import json, resource, sys, time
from mpi4py import MPI
from cubefit_mpi.stages.build import build_hypercube
path = sys.argv[1]
comm = MPI.COMM_WORLD
comm.Barrier(); t0 = time.perf_counter()
out = build_hypercube(path, force=True, comm=comm)
comm.Barrier(); t = time.perf_counter() - t0
rss = comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, root=0)
if comm.rank == 0:
    print("RESULT " + json.dumps({"seconds": t, "rss": rss, "chunks": out["chunks"]}))
"""


def run_build(path: Path, ranks: int, method: str) -> dict:
    cmd = [PY, "-c", RANK_SCRIPT, str(path)]
    if ranks > 1:
        cmd = ["mpiexec", "-n", str(ranks)] + cmd
    env = {**os.environ, "CUBEFIT_LOG_LEVEL": "WARNING", "CUBEFIT_BUILD_METHOD": method}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[7:])


def naive_per_pair(path: Path, n_pairs: int) -> float:
    """Seconds per (s, c) of the predecessor's approach: fftconvolve per p + dense R_T matmul."""
    import h5py
    from scipy.signal import fftconvolve

    from cubefit_mpi.numerics.kernels import interpolation_matrix, unit_kernels

    with h5py.File(path, "r") as f:
        templates = f["/Templates"][...]
        rebin = f["/R_T"][...]
        tem, vel = f["/TemPix"][...], f["/VelPix"][...]
        losvd = f["/LOSVD"][:n_pairs]
    interp, shifts = interpolation_matrix(vel, tem[1] - tem[0])
    kernels, _ = unit_kernels(losvd, interp)
    lead = -shifts[0]
    t0 = time.perf_counter()
    count = 0
    for s in range(kernels.shape[0]):
        c = s % kernels.shape[1]
        out = np.empty((templates.shape[0], rebin.shape[1]))
        for p in range(templates.shape[0]):
            full = fftconvolve(templates[p], kernels[s, c])
            out[p] = full[lead:lead + templates.shape[1]] @ rebin
        count += 1
    return (time.perf_counter() - t0) / count


def floor_seconds(path: Path, dims: tuple, nfft: int, tmpdir: Path) -> dict:
    """pyFFTW batched irfft of P rows x S*C times + raw h5py write of the same float32 bytes."""
    import h5py
    import pyfftw

    S, C, P, L = dims
    spec = pyfftw.empty_aligned((P, nfft // 2 + 1), dtype="complex128")
    spec[:] = 1.0
    out = pyfftw.empty_aligned((P, nfft), dtype="float64")
    plan = pyfftw.FFTW(spec, out, axes=(-1,), direction="FFTW_BACKWARD", flags=("FFTW_ESTIMATE", "FFTW_DESTROY_INPUT"))
    sample = min(S * C, 400)
    t0 = time.perf_counter()
    for _ in range(sample):
        spec[:] = 1.0
        plan.execute()
    fft = (time.perf_counter() - t0) / sample * S * C
    block = np.ones((1, C, P, L), dtype=np.float32)
    target = tmpdir / "floor.h5"
    t0 = time.perf_counter()
    with h5py.File(target, "w") as f:
        d = f.create_dataset("x", shape=(S, C, P, L), dtype="f4")
        for s in range(S):
            d[s:s + 1] = block
    write = time.perf_counter() - t0
    target.unlink()
    return {"fft": fft, "write": write, "total": fft + write}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spaxels", type=int, default=2000)
    ap.add_argument("--components", type=int, default=3)
    ap.add_argument("--populations", type=int, default=100)
    ap.add_argument("--wavelengths", type=int, default=1500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--naive-pairs", type=int, default=6)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    from cubefit_mpi.numerics.convolve import FFTConvolver
    from cubefit_mpi.numerics.kernels import interpolation_matrix
    from cubefit_mpi.numerics.synthetic_galaxy import MockSpec, make_grids

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        path = tmp / "bench.h5"
        subprocess.run(["mpiexec", "-n", "2", PY, "-m", "mpi4py", "-m", "cubefit_mpi", "mock", str(path),
                        "--spaxels", str(args.spaxels), "--components", str(args.components),
                        "--populations", str(args.populations), "--wavelengths", str(args.wavelengths)],
                       check=True, capture_output=True)
        S, C, P, L = args.spaxels, args.components, args.populations, args.wavelengths
        spec = MockSpec(spaxels=S, components=C, populations=P, wavelengths=L)
        obs, tem, vel = make_grids(spec)
        _, shifts = interpolation_matrix(vel, tem[1] - tem[0])
        nfft = FFTConvolver(np.ones((1, tem.size)), shifts).nfft
        runs = {(m, n): [run_build(path, n, m) for _ in range(args.repeat)] for m in ("fft", "gemm") for n in (1, 2)}
        med = {key: statistics.median(r["seconds"] for r in value) for key, value in runs.items()}
        ours = {1: runs[("gemm", 1)], 2: runs[("gemm", 2)]}
        t1, t2 = med[("gemm", 1)], med[("gemm", 2)]
        naive = statistics.median(naive_per_pair(path, args.naive_pairs) for _ in range(args.repeat))
        floors = [floor_seconds(path, (S, C, P, L), nfft, tmp) for _ in range(args.repeat)]
        floor = statistics.median(f["total"] for f in floors)
        floor_fft = statistics.median(f["fft"] for f in floors)
        floor_write = statistics.median(f["write"] for f in floors)
        chunks = ours[1][0]["chunks"]
        tile_bytes = chunks[0] * chunks[1] * P * L * 4
        rss1 = max(max(r["rss"]) for r in ours[1])
        rss2 = max(max(r["rss"]) for r in ours[2])
    pairs = S * C
    report = {
        "size": f"S={S} C={C} P={P} L={L} T={tem.size} nfft={nfft} ({S * C * P * L * 4 / 2**30:.2f} GiB float32)",
        "fft_1rank_s": med[("fft", 1)], "fft_2rank_s": med[("fft", 2)], "gemm_over_fft": t1 / med[("fft", 1)],
        "gemm_over_write_floor": t1 / floor_write, "fft_per_sc_ms": 1e3 * med[("fft", 1)] / pairs,
        "ours_1rank_s": t1, "ours_2rank_s": t2, "efficiency_2rank": t1 / (2 * t2),
        "ours_per_sc_ms": 1e3 * t1 / pairs, "naive_per_sc_ms": 1e3 * naive, "speedup_vs_naive": naive * pairs / t1,
        "floor_s": floor, "floor_fft_s": floor_fft, "floor_write_s": floor_write, "ours_over_floor": t1 / floor,
        "peak_rss_rank_mib_1": rss1 / 2**20, "peak_rss_rank_mib_2": rss2 / 2**20,
        "tile_mib": tile_bytes / 2**20, "chunks": chunks,
    }
    print(json.dumps(report, indent=1))
    print(f"\nbuild {report['size']}, medians of {args.repeat}:")
    print(f"  gemm 1 rank {t1:.2f}s ({report['ours_per_sc_ms']:.2f} ms per (s,c)); 2 ranks {t2:.2f}s; "
          f"2-rank efficiency {100 * report['efficiency_2rank']:.0f}%")
    print(f"  fft  1 rank {med[('fft', 1)]:.2f}s ({report['fft_per_sc_ms']:.2f} ms per (s,c)); 2 ranks "
          f"{med[('fft', 2)]:.2f}s; gemm / fft = {report['gemm_over_fft']:.2f}")
    print(f"  gemm build / raw write floor = {report['gemm_over_write_floor']:.2f} (target <= 1.3)")
    print(f"  naive (fftconvolve per p + dense R_T) {report['naive_per_sc_ms']:.1f} ms per (s,c): "
          f"ours is {report['speedup_vs_naive']:.1f}x faster per rank")
    print(f"  floor (batched irfft {floor_fft:.2f}s + raw write {floor_write:.2f}s = {floor:.2f}s): "
          f"ours / floor = {report['ours_over_floor']:.2f}")
    print(f"  peak RSS per rank {rss1 / 2**20:.0f} MiB (1 rank), {rss2 / 2**20:.0f} MiB (2 ranks); "
          f"one tile {report['tile_mib']:.1f} MiB")


if __name__ == "__main__":
    main()
