"""Measuring this machine for the performance model: the stages' inner kernels, collective HDF5
write/read bandwidth, MPI reduce latency and bandwidth (:func:`probe`, collective), and the
per-core rates of one process (:func:`measure_core`, local)."""
from __future__ import annotations

import math
import os
import statistics
import time

import numpy as np

from . import model as sm


def timed_collectively(comm, fn):
    comm.Barrier()
    t0 = time.perf_counter()
    out = fn()
    comm.Barrier()
    return comm.allreduce(time.perf_counter() - t0, op=_mpi().MAX), out


def _mpi():
    from ..parallel.comm import mpi

    return mpi()


def stage_kernels(P: int, L: int, n_params: int, l_used: int) -> dict:
    """The stages' inner kernels at these sizes, as zero-argument callables.  Local.

    ``build``: one (s, c) of the builder's own :func:`compute_unit` (FFT convolution of P
    templates on the mock's grids for L pixels, sparse rebin, clip, scale, float32);
    ``solve``: one spaxel's SYRK update of a min(N, 512) × L_used design block;
    ``design``: the float32 → weighted float64 copy of an (N', L_used) block.
    Returns ``{"build": fn, "solve": fn, "design": fn, "syrk_n": N', "fft_work": P·nfft·log2 nfft}``.
    """
    from types import SimpleNamespace

    from scipy.linalg.blas import dsyrk

    from ..numerics.convolve import FFTConvolver
    from ..numerics.kernels import interpolation_matrix
    from ..numerics.rebin import rebin_operator
    from ..numerics.synthetic_galaxy import MockSpec, make_grids
    from ..stages.build import compute_unit

    rng = np.random.default_rng(0)
    obs, tem, vel = make_grids(MockSpec(spaxels=1, components=1, populations=1, wavelengths=L))
    interp, shifts = interpolation_matrix(vel, float(tem[1] - tem[0]))
    conv = FFTConvolver(rng.uniform(0.5, 1.5, size=(P, tem.size)), shifts)
    inp = SimpleNamespace(dims=SimpleNamespace(P=P, L=L), scale=np.ones((1, 1)),
                          rebin_lt=rebin_operator(tem, obs).T.tocsr())
    kernel = interp @ np.exp(-0.5 * (vel / 150.0) ** 2)
    kernels = (kernel / kernel.sum())[None, None, :]
    n = int(min(n_params, 512))
    design = rng.uniform(size=(n, l_used))
    gram = np.zeros((n, n), order="F")
    models = rng.uniform(size=(n, l_used)).astype(np.float32)
    sqrt_w = np.ones(l_used)
    nfft = sm.next_fast_len(tem.size + shifts.size - 1)
    return {"build": lambda: compute_unit(conv, inp, kernels, 0, 1, 0, 1),
            "solve": lambda: dsyrk(1.0, design.T, beta=1.0, c=gram, trans=1, lower=0, overwrite_c=1),
            "design": lambda: np.multiply(models, sqrt_w, out=design), "syrk_n": n,
            "fft_work": P * nfft * math.log2(nfft)}


def _timed_concurrently(fn, comm, seconds: float) -> float:
    """Median seconds of one ``fn()`` while every rank runs it (5 samples, ~``seconds`` in all)."""
    fn()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 5:           # sized on rank 0, then agreed
        fn()
        reps += 1
    reps = comm.bcast(max(reps, 1))
    return statistics.median(timed_collectively(comm, lambda: [fn() for _ in range(reps)])[0] for _ in range(5)) / reps


def _fit_line(x: list, y: list) -> tuple[float, float]:
    """(intercept, slope) of a least-squares line, both clipped at a tiny positive value."""
    slope, intercept = np.polyfit(np.asarray(x, dtype=float), np.asarray(y, dtype=float), 1)
    return max(float(intercept), 1e-7), max(float(slope), 1e-13)


def probe(scratch: str, comm, *, write_block_bytes: int = 2**22, read_block_bytes: int = 2**22,
          kernels: dict | None = None, cpu_seconds: float = 0.2, rounds: int = 4) -> dict:
    """Machine probe: CPU availability, collective HDF5 write/read rounds, reduce α/β.  Collective over comm.

    ``cpu_build``, ``cpu_solve``: seconds of the stages' inner kernels (:func:`stage_kernels`)
    while all ranks run them at once: against one rank, how much a core slows down when the
    node is busy.  Write rounds copy the builder's: every rank writes one block collectively
    into a dataset allocated up front, the file is flushed (with MPI-IO that is
    ``MPI_File_sync``: the data reach the storage), a done byte is written; read rounds read
    one block per rank from the file reopened, as the solver's passes do.  The median round with a 4 KiB block is
    the fixed cost per round (``write_round``, ``read_round`` seconds); the median round with
    the stage's own block (a build unit, a solve S-tile) adds the aggregate bandwidth
    (``write_bw``, ``read_bw`` bytes/s, all ranks together).  ``latency``/``bandwidth``: a
    line fitted to median Reduce times of 8 B .. 8 MiB (none with one rank).
    """
    from ..io.blocks import read_block, write_block
    from ..io.datasets import allocated_now
    from ..io.h5file import open_h5

    rank, size = comm.Get_rank(), comm.Get_size()
    cpu = {f"cpu_{name}": _timed_concurrently(kernels[name], comm, cpu_seconds)
           for name in ("build", "solve") if kernels}
    path = os.path.join(scratch, f"probe-{size}.h5")
    sizes = {kind: (4096, max(full, 65536)) for kind, full in (("write", write_block_bytes), ("read", read_block_bytes))}
    timed = {"write": [], "read": []}
    rows = rounds + 1                                       # the first round of each size is a warm-up

    def dataset(f, name, nbytes):
        return f.create_dataset(name, shape=(rows * size, nbytes // 4), dtype="f4", chunks=(1, nbytes // 4),
                                dcpl=allocated_now(), fill_time="never")

    with open_h5(path, "w", comm) as f:
        for nbytes in sizes["write"]:
            block = np.full((1, nbytes // 4), rank, dtype=np.float32)
            dset, done = dataset(f, f"write{nbytes}", nbytes), f.create_dataset(f"done{nbytes}", (rows * size,), "u1")

            def one_round(k):
                write_block(dset, (k * size + rank, 0), block)
                f.flush()
                write_block(done, (k * size + rank,), np.ones(1, dtype=np.uint8))

            timed["write"].append((size * nbytes, statistics.median(
                [timed_collectively(comm, lambda: one_round(k))[0] for k in range(rows)][1:])))
        for nbytes in sizes["read"]:
            dset = dataset(f, f"read{nbytes}", nbytes)
            for k in range(rows):
                write_block(dset, (k * size + rank, 0), np.full((1, nbytes // 4), rank, dtype=np.float32))
    with open_h5(path, "r", comm) as f:                     # reopened: reads start cold, as a pass's do
        for nbytes in sizes["read"]:
            dset = f[f"read{nbytes}"]
            timed["read"].append((size * nbytes, statistics.median(
                [timed_collectively(comm, lambda: read_block(dset, (k * size + rank, 0), (1, nbytes // 4)))[0]
                 for k in range(rows)][1:])))
    if rank == 0:
        os.remove(path)
    write_round, write_slope = _fit_line(*zip(*timed["write"]))
    read_round, read_slope = _fit_line(*zip(*timed["read"]))
    latency, bandwidth = 0.0, math.inf
    if size > 1:
        sizes, times = [1, 2**10, 2**14, 2**17, 2**20], []            # doubles
        for n in sizes:
            send, recv = np.ones(n), np.empty(n)
            times.append(statistics.median(timed_collectively(comm, lambda: comm.Reduce(send, recv, op=_mpi().SUM, root=0))[0]
                                           for _ in range(5 if n >= 2**17 else 20)))
        latency, slope = _fit_line([8 * n for n in sizes], times)
        bandwidth = 1.0 / slope
    return {**cpu, "write_round": write_round, "write_bw": 1.0 / write_slope,
            "read_round": read_round, "read_bw": 1.0 / read_slope, "latency": latency, "bandwidth": bandwidth}


CORE_KEYS = ("build_sc_seconds", "build_ref_work", "blas_flops", "design_seconds_per_elem", "mem_bandwidth",
             "nnls_iter_seconds")


def galaxy_problem(S: int, C: int, P: int, L: int, active_set: int = 2000) -> sm.Problem:
    """The model's :class:`Problem` for an S×C×P×L fit on the mock's grids (60 km/s pixels,
    templates 2× oversampled plus the ±800 km/s guard) with the builder's default chunks.  Local."""
    from ..io.datasets import default_chunks
    from ..numerics.kernels import kernel_shifts
    from ..numerics.synthetic_galaxy import MockSpec, make_grids

    _, tem, vel = make_grids(MockSpec(spaxels=1, components=1, populations=1, wavelengths=L))
    s_chunk, c_chunk, _ = default_chunks(S, C, P, L)
    K = int(kernel_shifts(vel, float(tem[1] - tem[0])).size)
    return sm.Problem(S, C, P, L, int(tem.size), K, s_chunk, c_chunk, L, active_set)


def _best_of(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_core(problem: sm.Problem) -> dict:
    """Per-core costs of this machine at ``problem``'s sizes (one process, 1 BLAS thread).  Local.

    ``build_sc_seconds``: one (s, c) of the builder's :func:`compute_unit` at P and L;
    ``blas_flops``: a per-spaxel SYRK of min(N, 512) × L_used; ``design_seconds_per_elem``:
    the float32 → weighted float64 copy; ``mem_bandwidth``: a streaming mat-vec;
    ``nnls_iter_seconds``: rank 0's NNLS on a random N=300 problem minus its modelled stream
    and flop terms, per iteration.
    """
    from ..numerics.nnls import nnls_gram

    bench = stage_kernels(problem.P, problem.L, problem.N, problem.l_used)
    n = bench["syrk_n"]
    rng = np.random.default_rng(1)
    rows, vec = rng.uniform(size=(1024, 8192)), rng.uniform(size=8192)
    machine = sm.Machine(blas_flops=n * (n + 1) * problem.l_used / _best_of(bench["solve"], 3),
                         mem_bandwidth=rows.nbytes / _best_of(lambda: rows @ vec, 5))
    a = rng.uniform(size=(600, 300))
    x_true = np.where(rng.uniform(size=300) < 0.3, rng.uniform(size=300), 0.0)
    gram, rhs = a.T @ a, a.T @ (a @ x_true)
    t0 = time.perf_counter()
    result = nnls_gram(gram, rhs)
    seconds = time.perf_counter() - t0
    k = max(result.passive_size, 1)
    return {"build_sc_seconds": _best_of(bench["build"], 9), "build_ref_work": bench["fft_work"],
            "blas_flops": machine.blas_flops,
            "design_seconds_per_elem": _best_of(bench["design"], 5) / (n * problem.l_used),
            "mem_bandwidth": machine.mem_bandwidth,
            "nnls_iter_seconds": max(0.0, seconds - sm.nnls_seconds(machine, 300, k)) / max(result.iterations, 1)}
