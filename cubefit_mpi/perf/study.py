"""The scaling study (``cubefit_mpi scaling``): time ``build`` and the exact ``solve`` at several rank counts, write a CSV
and plots, and compare with the performance model (:mod:`cubefit_mpi.perf.model`).

The study runs in one plain process (not under mpiexec).  For each rank count it launches
``mpiexec -n N`` (or ``srun -n N --mpi=pmi2`` inside a Slurm allocation) of
``python -m mpi4py -m cubefit_mpi scaling-worker``; the worker (:func:`cubefit_mpi.perf.worker.worker`) runs a short
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
from pathlib import Path

import numpy as np

from ..config.errors import InputError
from ..io import layout as lay
from ..parallel.launcher import THREAD_VARIABLES, child_environment, launch_command
from . import model as sm
from .worker import PHASES, RESULT_TAG

_LOG = logging.getLogger("cubefit_mpi.perf.study")
STAGES = ("build", "solve")


# ---------------------------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------------------------
def _worker_env() -> dict:
    env = child_environment({"CUBEFIT_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"})
    for var in THREAD_VARIABLES:
        env.setdefault(var, "1")
    return env


def run_worker(ranks: int, path: str, what: list[str], scratch: str, timeout: float) -> dict:
    """Launch one worker run and return its JSON result.  Local (starts its own MPI job)."""
    cmd = launch_command(ranks) + [sys.executable, "-m", "mpi4py", "-m", "cubefit_mpi", "scaling-worker", path,
                             "--what", ",".join(what), "--scratch", scratch]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_worker_env())
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
    from ..numerics.synthetic_galaxy import MockSpec
    from ..parallel.comm import mpi
    from ..stages.mock import make_mock

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


