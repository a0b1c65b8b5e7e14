"""Stage ``scaling``: time ``build`` and the exact ``solve`` at several rank counts, write a CSV
and plots, and compare with the performance model (:mod:`cubefit_mpi.scaling_model`).

The study runs in one plain process (not under mpiexec).  For each rank count it launches
``mpiexec -n N`` (or ``srun -n N --mpi=pmi2`` inside a Slurm allocation) of
``python -m mpi4py -m cubefit_mpi scaling-worker``; the worker (:func:`worker`) runs a short
probe (CPU availability, collective HDF5 write/read bandwidth, MPI reduce latency and
bandwidth), then the timed stages on a fresh copy of the input file, and prints one JSON line
with every rank's phase timings.  Each point is repeated and the medians are kept.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import layout as lay
from . import scaling_model as sm
from .errors import InputError

_LOG = logging.getLogger("cubefit_mpi.scaling")
RESULT_TAG = "CUBEFIT_SCALING_RESULT "
STAGES = ("build", "solve")
PHASES = ("compute", "io", "comm")


# ---------------------------------------------------------------------------------------------
# the worker (runs under MPI)
# ---------------------------------------------------------------------------------------------
def _wall(comm, fn):
    comm.Barrier()
    t0 = time.perf_counter()
    out = fn()
    comm.Barrier()
    return comm.allreduce(time.perf_counter() - t0, op=_mpi().MAX), out


def _mpi():
    from .parallel import mpi

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

    from .convolve import FFTConvolver
    from .hypercube_builder import compute_unit
    from .kernels import interpolation_matrix
    from .mock import MockSpec, make_grids
    from .rebin import rebin_operator

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
    return statistics.median(_wall(comm, lambda: [fn() for _ in range(reps)])[0] for _ in range(5)) / reps


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
    import h5py

    from .hdf5_manager import open_h5, read_block, write_block

    rank, size = comm.Get_rank(), comm.Get_size()
    cpu = {f"cpu_{name}": _timed_concurrently(kernels[name], comm, cpu_seconds)
           for name in ("build", "solve") if kernels}
    path = os.path.join(scratch, f"probe-{size}.h5")
    sizes = {kind: (4096, max(full, 65536)) for kind, full in (("write", write_block_bytes), ("read", read_block_bytes))}
    timed = {"write": [], "read": []}
    rows = rounds + 1                                       # the first round of each size is a warm-up

    def dataset(f, name, nbytes):
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        return f.create_dataset(name, shape=(rows * size, nbytes // 4), dtype="f4", chunks=(1, nbytes // 4),
                                dcpl=dcpl, fill_time="never")

    with open_h5(path, "w", comm) as f:
        for nbytes in sizes["write"]:
            block = np.full((1, nbytes // 4), rank, dtype=np.float32)
            dset, done = dataset(f, f"write{nbytes}", nbytes), f.create_dataset(f"done{nbytes}", (rows * size,), "u1")

            def one_round(k):
                write_block(dset, (k * size + rank, 0), block)
                f.flush()
                write_block(done, (k * size + rank,), np.ones(1, dtype=np.uint8))

            timed["write"].append((size * nbytes, statistics.median(
                [_wall(comm, lambda: one_round(k))[0] for k in range(rows)][1:])))
        for nbytes in sizes["read"]:
            dset = dataset(f, f"read{nbytes}", nbytes)
            for k in range(rows):
                write_block(dset, (k * size + rank, 0), np.full((1, nbytes // 4), rank, dtype=np.float32))
    with open_h5(path, "r", comm) as f:                     # reopened: reads start cold, as a pass's do
        for nbytes in sizes["read"]:
            dset = f[f"read{nbytes}"]
            timed["read"].append((size * nbytes, statistics.median(
                [_wall(comm, lambda: read_block(dset, (k * size + rank, 0), (1, nbytes // 4)))[0]
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
            times.append(statistics.median(_wall(comm, lambda: comm.Reduce(send, recv, op=_mpi().SUM, root=0))[0]
                                           for _ in range(5 if n >= 2**17 else 20)))
        latency, slope = _fit_line([8 * n for n in sizes], times)
        bandwidth = 1.0 / slope
    return {**cpu, "write_round": write_round, "write_bw": 1.0 / write_slope,
            "read_round": read_round, "read_bw": 1.0 / read_slope, "latency": latency, "bandwidth": bandwidth}


def problem_of(path: str, chunks, comm) -> dict:
    """The model's sizes of a built file: S, C, P, L, T, K, chunks, unmasked pixels.  Collective."""
    from .hdf5_manager import open_h5
    from .kernels import kernel_shifts

    with open_h5(path, "r", comm) as f:
        S, C, P, L = (int(v) for v in f[lay.MODELS].shape)
        tem = np.asarray(f[lay.TEM_PIX][...])
        K = int(kernel_shifts(np.asarray(f[lay.VEL_PIX][...]), float(tem[1] - tem[0])).size)
        l_used = int(np.asarray(f[lay.MASK][...], dtype=bool).sum()) if lay.MASK in f else L
    return {"S": S, "C": C, "P": P, "L": L, "T": int(tem.size), "K": K, "s_chunk": int(chunks[0]),
            "c_chunk": int(chunks[1]), "l_used": l_used}


def _phase_lists(phases_by_rank: list) -> dict:
    return {p: [float(r.get(p, 0.0)) for r in phases_by_rank] for p in PHASES}


def stage_blocks(path: str) -> dict:
    """Sizes of a cube file for the probe: P, L, N, unmasked pixels, the bytes one rank writes per
    build round (a unit) and reads per pass round (an S-tile) with the builder's default
    chunks.  Local (reads shapes and the mask only)."""
    import h5py

    from .hypercube_builder import default_chunks

    with h5py.File(path, "r") as f:
        S, _, C = f[lay.LOSVD].shape
        P, L = f[lay.TEMPLATES].shape[0], f[lay.OBS_PIX].shape[0]
        l_used = int(np.asarray(f[lay.MASK][...], dtype=bool).sum()) if lay.MASK in f else L
    s_chunk, c_chunk, _ = default_chunks(S, C, P, L)
    return {"P": int(P), "L": int(L), "N": int(C * P), "l_used": l_used, "unit": s_chunk * c_chunk * P * L * 4,
            "tile": s_chunk * C * P * L * 4}


def worker(path: str, what: list[str], scratch: str, comm) -> dict:
    """Probe, then run and time each stage of ``what`` on ``path``.  Collective over comm.

    Heavy imports happen before the timed regions.  ``solve`` without ``build`` builds first
    (untimed).  The solve is the exact Gram method without cache, verification pass or
    λ-weights (weights change no cost).
    """
    import importlib

    for module in ("pyfftw", "scipy.linalg.blas", "scipy.sparse"):   # import cost is not part of a stage
        importlib.import_module(module)

    from .hypercube_builder import build_hypercube
    from .solvers.exact import solve_exact

    sizes = comm.bcast(stage_blocks(path) if comm.Get_rank() == 0 else None)
    kernels = stage_kernels(sizes["P"], sizes["L"], sizes["N"], sizes["l_used"])
    out = {"ranks": comm.Get_size(), "probe": probe(scratch, comm, write_block_bytes=sizes["unit"],
                                                    read_block_bytes=sizes["tile"], kernels=kernels)}
    if "build" in what or "solve" in what:
        wall, built = _wall(comm, lambda: build_hypercube(path, force=True, comm=comm))
        if "build" in what:
            out["build"] = {"wall": wall, "phases": _phase_lists(built["phases_by_rank"])}
        out["problem"] = problem_of(path, built["chunks"], comm)
    if "solve" in what:
        wall, (_, stats) = _wall(comm, lambda: solve_exact(path, use_cache=False, verify=False, use_weights=False,
                                                           comm=comm))
        out["solve"] = {"wall": wall, "phases": _phase_lists(stats.get("phases_by_rank") or [{}] * comm.Get_size()),
                        "serial": float(stats.get("solve_seconds", 0.0)), "active_set": int(stats["active_set"]),
                        "method": stats["method"]}
    return out


# ---------------------------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------------------------
def launcher(ranks: int) -> list[str]:
    """``srun -n N --mpi=pmi2`` inside a Slurm allocation (with srun on PATH), else ``mpiexec -n N``.  Local."""
    if os.environ.get("SLURM_JOB_ID") and shutil.which("srun"):
        return ["srun", "-n", str(ranks), "--mpi=pmi2"]
    return ["mpiexec", "-n", str(ranks)]


def _child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPIR_", "HYDRA", "MPI_LOCAL"))}
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    env["CUBEFIT_LOG_LEVEL"] = "WARNING"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_worker(ranks: int, path: str, what: list[str], scratch: str, timeout: float) -> dict:
    """Launch one worker run and return its JSON result.  Local (starts its own MPI job)."""
    cmd = launcher(ranks) + [sys.executable, "-m", "mpi4py", "-m", "cubefit_mpi", "scaling-worker", path,
                             "--what", ",".join(what), "--scratch", scratch]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env())
    except subprocess.TimeoutExpired:
        raise InputError(f"--timeout {timeout:g}: the run at {ranks} rank(s) did not finish ({' '.join(cmd)})") \
            from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        raise RuntimeError(f"scaling run at {ranks} rank(s) failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                           + "\n".join(tail))
    return json.loads(lines[-1][len(RESULT_TAG):])


def parse_target(text: str) -> tuple[str, object]:
    """``("mock", (S, C, P, L))`` for "S,C,P,L", else ``("file", path)``.  Local."""
    parts = text.split(",")
    if len(parts) == 4 and all(p.strip().isdigit() for p in parts):
        dims = tuple(int(p) for p in parts)
        if min(dims) < 1:
            raise InputError(f"{text}: a mock size S,C,P,L needs four positive integers")
        return "mock", dims
    if not os.path.isfile(text):
        raise InputError(f"{text}: expected an existing cube file or a mock size S,C,P,L")
    return "file", text


def copy_inputs(src: str, dst: str) -> None:
    """Copy ``src``'s inputs to a new ``dst`` (no hypercube, solution or cache).  Local, serial."""
    import h5py

    skip = {lay.HYPERCUBE.strip("/"), lay.SOLVE.strip("/"), lay.X_GLOBAL.strip("/")}
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for key, value in f.attrs.items():
            g.attrs[key] = value
        for name in f:
            if name not in skip:
                f.copy(name, g)


def _make_input(kind: str, target, spaxels: int | None, out_dir: Path) -> str:
    from .mock import MockSpec
    from .mock_galaxy import make_mock
    from .parallel import mpi

    if kind == "file":
        dst = out_dir / "input.h5"
        if not dst.exists():
            copy_inputs(str(target), str(dst))
        return str(dst)
    S, C, P, L = target
    S = spaxels or S
    dst = out_dir / f"input-{S}x{C}x{P}x{L}.h5"
    if not dst.exists():
        try:
            spec = MockSpec(spaxels=S, components=C, populations=P, wavelengths=L, seed=1)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        make_mock(str(dst), spec, mpi().COMM_SELF)
    return str(dst)


# ---------------------------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------------------------
def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def run_study(target: str, ranks: list[int], what: list[str], out_dir: str, *, repeat: int = 3,
              weak: bool = False, model: bool = False, timeout: float = 3600.0) -> dict:
    """Run the study; write ``scaling.csv`` and the PNGs into ``out_dir``.  Local (rank 0 alone).

    Returns ``{"rows": [...], "csv": path, "pngs": [...], "samples": raw results}``.
    """
    kind, parsed = parse_target(target)
    if weak and kind != "mock":
        raise InputError("--weak: needs a mock size S,C,P,L (the spaxel count grows with the ranks)")
    bad = [s for s in what if s not in STAGES]
    if bad or not what:
        raise InputError(f"--what {','.join(what)}: expected a comma list of {', '.join(STAGES)}")
    if not ranks or min(ranks) < 1:
        raise InputError("--ranks: expected positive integers, e.g. 1,2,4")
    if repeat < 1:
        raise InputError(f"--repeat {repeat}: expected a positive integer")
    ranks = sorted(set(ranks))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if max(ranks) > cores and not os.environ.get("SLURM_JOB_ID"):
        _LOG.warning("ranks %s exceed the %d cores of this machine: those points are oversubscribed",
                     [r for r in ranks if r > cores], cores)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / "runs"
    scratch.mkdir(exist_ok=True)
    inputs = {n: _make_input(kind, parsed, parsed[0] * n if weak else None, out) for n in ranks}
    samples = {n: [] for n in ranks}
    for r in range(repeat):                      # interleaved: slow drifts of the load hit every point
        for n in ranks:
            run_file = scratch / f"run-{n}.h5"
            shutil.copyfile(inputs[n], run_file)
            _LOG.info("scaling: %s at %d rank(s), repeat %d/%d", ",".join(what), n, r + 1, repeat)
            samples[n].append(run_worker(n, str(run_file), what, str(scratch), timeout))
            run_file.unlink()
    rows = summarize(samples, what, weak=weak, cores=cores)
    if model:
        add_model(rows, samples, what)
    csv_path = write_csv(rows, out / "scaling.csv")
    pngs = plot_study(rows, out, weak=weak)
    (out / "samples.json").write_text(json.dumps({str(k): v for k, v in samples.items()}, indent=1))
    return {"rows": rows, "csv": str(csv_path), "pngs": [str(p) for p in pngs], "samples": samples}


def summarize(samples: dict, what: list[str], *, weak: bool = False, cores: int = 1) -> list[dict]:
    """One row per (ranks, stage): medians over repeats of wall and phase max/mean.  Local."""
    rows = []
    for stage in what:
        base = None
        for n in sorted(samples):
            runs = [s[stage] for s in samples[n]]
            row = {"ranks": n, "what": stage, "spaxels": samples[n][0]["problem"]["S"], "repeats": len(runs),
                   "wall": _median([r["wall"] for r in runs]), "wall_min": min(r["wall"] for r in runs)}
            for phase in PHASES:
                row[f"{phase}_max"] = _median([max(r["phases"][phase] or [0.0]) for r in runs])
                row[f"{phase}_mean"] = _median([statistics.fmean(r["phases"][phase] or [0.0]) for r in runs])
            row["serial"] = _median([r.get("serial", 0.0) for r in runs])
            row["other"] = max(0.0, row["wall"] - row["compute_max"] - row["io_max"] - row["comm_max"] - row["serial"])
            base = base or (n, row["wall"])
            ratio = base[1] / row["wall"]
            row["speedup"] = ratio * n / base[0] if weak else ratio
            row["efficiency"] = ratio if weak else ratio * base[0] / n
            row["oversubscribed"] = n > cores
            rows.append(row)
    return rows


def machine_at(samples: dict, ranks: int, stage: str = "build") -> sm.Machine:
    """This machine as the probes of the runs at ``ranks`` saw it (all ranks on one node).  Local.

    Aggregate bandwidths and per-round costs of reads and writes, reduce α/β from this
    count's probes (one rank's share of the bandwidth: the aggregate / ranks -- with one rank
    HDF5 runs without MPI-IO, so a 1-rank rate says little about ranks on MPI-IO);
    ``contention``: how much slower the ``stage``'s inner kernel ran per rank in the probe
    than at the smallest count, beyond plain oversubscription of the cores.
    """
    base = min(samples)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    p = {k: _median([s["probe"][k] for s in samples[ranks]]) for k in samples[ranks][0]["probe"]}
    p1 = {k: _median([s["probe"][k] for s in samples[base]]) for k in samples[base][0]["probe"]}
    key = f"cpu_{stage}"
    slowdown = p[key] / max(p1[key], 1e-12) / max(1.0, ranks / cores) if key in p else 1.0
    return sm.Machine(name="this machine", cores_per_node=cores, node_memory=_node_memory(),
                      write_bw_rank=p["write_bw"] / ranks, write_bw_node=p["write_bw"],
                      read_bw_rank=p["read_bw"] / ranks, read_bw_node=p["read_bw"],
                      io_round_seconds=p["write_round"], read_tile_seconds=p["read_round"],
                      latency=p["latency"] if ranks > 1 else 1e-6,
                      bandwidth=p["bandwidth"] if ranks > 1 and math.isfinite(p["bandwidth"]) else 1e12,
                      contention=max(1.0, slowdown) if ranks > base else 1.0)


def _node_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 8.0 * 2**30


def add_model(rows: list[dict], samples: dict, what: list[str]) -> None:
    """Add ``model_*`` columns: the model calibrated on the smallest rank count's medians.  Local.

    Per-tile costs, rank bandwidths and set-up come from the smallest count's runs
    (:func:`scaling_model.calibrate`); node bandwidths, reduce α/β and CPU contention from the
    probe of each count's own runs.
    """
    base = min(samples)
    active = {n: int(_median([s["solve"]["active_set"] for s in samples[n]])) if "solve" in what else 2000
              for n in samples}
    problems = {n: sm.Problem(**samples[n][0]["problem"], active_set=active[n]) for n in samples}
    by_key = {(r["ranks"], r["what"]): r for r in rows}
    ref = {st: by_key[(base, st)] for st in what}
    calib = {st: sm.Sample(wall=ref[st]["wall"], compute=ref[st]["compute_max"], io=ref[st]["io_max"],
                           comm=ref[st]["comm_max"], serial=ref[st]["serial"], active_set=active[base])
             for st in what}
    costs = sm.calibrate(problems[base], machine_at(samples, base), calib.get("build"), calib.get("solve"))
    for n in samples:
        layout = sm.Layout(n, n, 1)                # all ranks on this one node
        for st in what:
            machine = sm.with_probe(costs, machine_at(samples, n, st))
            pred = sm.predict(st, problems[n], machine, layout)
            row = by_key[(n, st)]
            row.update(model_wall=pred.total, model_compute=pred.compute, model_io=pred.io, model_comm=pred.comm,
                       model_error=row["wall"] / pred.total - 1.0, model_contention=machine.contention)


CSV_COLUMNS = ["ranks", "what", "spaxels", "repeats", "wall", "wall_min", "compute_max", "compute_mean", "io_max",
               "io_mean", "comm_max", "comm_mean", "serial", "other", "speedup", "efficiency", "oversubscribed",
               "model_wall", "model_compute", "model_io", "model_comm", "model_error", "model_contention"]


def write_csv(rows: list[dict], path) -> Path:
    """``scaling.csv``: one row per (ranks, stage), seconds with 6 significant digits.  Local."""
    path = Path(path)
    columns = [c for c in CSV_COLUMNS if any(c in r for r in rows)]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


# ---------------------------------------------------------------------------------------------
# plots (matplotlib Agg, no pyplot)
# ---------------------------------------------------------------------------------------------
def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def plot_study(rows: list[dict], out_dir, *, weak: bool = False) -> list[Path]:
    """``scaling_time.png``, ``scaling_speedup.png``, ``scaling_efficiency.png``,
    ``scaling_phases.png`` in ``out_dir``.  Local."""
    out_dir = Path(out_dir)
    stages = list(dict.fromkeys(r["what"] for r in rows))
    ranks = sorted({r["ranks"] for r in rows})
    kind = "weak" if weak else "strong"
    paths = []
    for name, key, ylabel in (("time", "wall", "seconds (median)"), ("speedup", "speedup", "speedup"),
                              ("efficiency", "efficiency", "parallel efficiency")):
        fig, ax = _figure()
        for stage in stages:
            sel = [r for r in rows if r["what"] == stage]
            ax.plot([r["ranks"] for r in sel], [r[key] for r in sel], "o-", label=f"{stage} measured")
            if key == "wall" and all("model_wall" in r for r in sel):
                ax.plot([r["ranks"] for r in sel], [r["model_wall"] for r in sel], "x--", label=f"{stage} model")
        if key == "speedup":
            ax.plot(ranks, [n / ranks[0] for n in ranks], ":", color="grey", label="ideal")
        if key == "efficiency":
            ax.axhline(1.0, ls=":", color="grey", label="ideal")
            ax.set_ylim(0, 1.15 * max(1.0, max(r["efficiency"] for r in rows)))
        ax.set_xscale("log", base=2)
        if key == "wall":
            ax.set_yscale("log")
        ax.set_xticks(ranks, [str(n) for n in ranks])
        ax.set_xlabel("MPI ranks")
        ax.set_ylabel(ylabel)
        ax.set_title(f"cubefit_mpi {kind} scaling: {name}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        paths.append(out_dir / f"scaling_{name}.png")
        fig.savefig(paths[-1])
    fig, ax = _figure()
    labels, bottom = [f"{r['what']}\n{r['ranks']}" for r in rows], np.zeros(len(rows))
    for phase in PHASES + ("serial", "other"):
        values = np.array([r[f"{phase}_max"] if phase in PHASES else r[phase] for r in rows])
        ax.bar(range(len(rows)), values, bottom=bottom, label=phase if phase != "serial" else "rank-0 NNLS")
        bottom += values
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("seconds (slowest rank per phase, median)")
    ax.set_title("phase breakdown per stage and rank count")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "scaling_phases.png")
    fig.savefig(paths[-1])
    return paths


# ---------------------------------------------------------------------------------------------
# the model for a target machine: micro-benchmarks of one core + given node parameters
# ---------------------------------------------------------------------------------------------
CORE_KEYS = ("build_sc_seconds", "build_ref_work", "blas_flops", "design_seconds_per_elem", "mem_bandwidth",
             "nnls_iter_seconds")


def galaxy_problem(S: int, C: int, P: int, L: int, active_set: int = 2000) -> sm.Problem:
    """The model's :class:`Problem` for an S×C×P×L fit on the mock's grids (60 km/s pixels,
    templates 2× oversampled plus the ±800 km/s guard) with the builder's default chunks.  Local."""
    from .hypercube_builder import default_chunks
    from .kernels import kernel_shifts
    from .mock import MockSpec, make_grids

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
    from .nnls import nnls_gram

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
