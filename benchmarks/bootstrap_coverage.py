"""Validation of the bootstrap: how often its 68 % interval covers the truth of a mock.

    .venv/bin/python benchmarks/bootstrap_coverage.py [--realisations 200] [--replicates 100]
    mpiexec -n 2 .venv/bin/python -m mpi4py benchmarks/bootstrap_coverage.py ...   # realisations over ranks

One noise-free mock galaxy (``--spaxels``, ``--components``, ``--populations``, ``--wavelengths``,
synthetic SSP-like templates, sparse known ``/Truth/x``) is made once; every realisation adds
fresh Gaussian noise (σ_s = median |y_s| / ``--snr`` per spaxel, as ``mock --noise``), writes it
with its variance, fits it exactly (:func:`~cubefit_mpi.solvers.exact.solve_exact`, factored
operator, no λ-weights, ``--regul``) and runs the bootstrap
(:func:`~cubefit_mpi.solvers.uncertainty.bootstrap_uncertainty`, ``--method``, ``--block``).
Each rank takes every ``size``-th realisation on its own file (``COMM_SELF``).

Reported, per component and over all: the fraction of realisations whose 16–84 % interval
covers the truth (target 60–76 % for the component totals and the mean log age), the ratio of
the bootstrap's spread to the spread of the fits over the realisations (1 = calibrated; a
coverage below 68 % with a ratio near 1 comes from the fit's bias, not from the spread), and the
coverage of the individual weights, split by truth > 0 and truth = 0 (a weight on its bound).
Writes a JSON of everything and a figure (``--figure``) for docs/uncertainty.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CUBEFIT_LAMBDA_WEIGHTS_ENABLE", "0")
os.environ.setdefault("CUBEFIT_LOG_LEVEL", "WARNING")

QUANTITIES = ("totals", "mean_log_age", "mean_metallicity")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--realisations", type=int, default=200)
    p.add_argument("--replicates", type=int, default=100)
    p.add_argument("--spaxels", type=int, default=40)
    p.add_argument("--components", type=int, default=2)
    p.add_argument("--populations", type=int, default=12)
    p.add_argument("--wavelengths", type=int, default=200)
    p.add_argument("--snr", type=float, default=20.0)
    p.add_argument("--regul", type=float, default=0.0)
    p.add_argument("--method", default="wild")
    p.add_argument("--block", default="spaxel")
    p.add_argument("--seed", type=int, default=4)
    p.add_argument("--json", default=None, help="write the results here (default: beside the figure)")
    p.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "bootstrap_coverage.png"))
    return p.parse_args(argv)


def truth_of(path: str, n_comp: int) -> dict:
    """Truth of the mock's weights, component totals and light-weighted means.  Local."""
    import h5py

    from cubefit_mpi.numerics import bootstrap as bs

    with h5py.File(path, "r") as f:
        x = np.asarray(f["/Truth/x"][...]).reshape(1, -1)
        out = {"weights": x[0], "totals": bs.component_totals(x, n_comp)[0]}
        for name in ("log_age", "metallicity"):
            out[f"mean_{name}"] = bs.weighted_means(x, n_comp, np.asarray(f[f"/Populations/{name}"][...]))[0]
    return out


def realisation(clean: str, work: str, k: int, args) -> dict:
    """One noisy copy, its fit and its bootstrap: the fit's values and the intervals.  Local."""
    import h5py
    from mpi4py import MPI

    from cubefit_mpi.numerics import bootstrap as bs
    from cubefit_mpi.solvers.exact import solve_exact
    from cubefit_mpi.solvers.uncertainty import bootstrap_uncertainty

    shutil.copy(clean, work)
    with h5py.File(work, "r+") as f:
        y = np.asarray(f["/DataCube"][...])
        mask = np.asarray(f["/Mask"][...], dtype=bool)
        sigma = np.array([np.median(np.abs(row[mask])) / args.snr for row in y])
        z = np.vstack([np.random.default_rng([args.seed, 1000 + k, s]).standard_normal(y.shape[1])
                       for s in range(y.shape[0])])
        f["/DataCube"][...] = np.where(mask, y + sigma[:, None] * z, np.nan)
        f.create_dataset("/DataVar", data=np.repeat((sigma ** 2)[:, None], y.shape[1], axis=1))
    t0 = time.perf_counter()
    x, stats = solve_exact(work, operator="factored", regul=args.regul, ridge=0.0, use_weights=False, comm=MPI.COMM_SELF)
    t1 = time.perf_counter()
    boot = bootstrap_uncertainty(work, replicates=args.replicates, method=args.method, block=args.block, seed=k,
                                 comm=MPI.COMM_SELF)
    C = args.components
    with h5py.File(work, "r") as f:
        g = f["/Uncertainty"]
        pops = {name: np.asarray(f[f"/Populations/{name}"][...]) for name in ("log_age", "metallicity")}
        out = {"x": x, "fit_seconds": t1 - t0, "boot_seconds": boot["seconds"],
               "fit": {"weights": x, "totals": bs.component_totals(x[None, :], C)[0],
                       **{f"mean_{n}": bs.weighted_means(x[None, :], C, v)[0] for n, v in pops.items()}}}
        for q in ("weights",) + QUANTITIES:
            out[q] = {s: np.asarray(g[f"{q}_{s}"][...]) for s in ("p16", "p50", "p84", "std", "mean")}
    return out


def summarise(results: list, truth: dict) -> dict:
    """Coverage and spread calibration over the realisations.  Local."""
    summary = {}
    for q in ("weights",) + QUANTITIES:
        lo = np.array([r[q]["p16"] for r in results])
        hi = np.array([r[q]["p84"] for r in results])
        fits = np.array([r["fit"][q] for r in results])
        boot_std = np.array([r[q]["std"] for r in results])
        covered = (truth[q] >= lo) & (truth[q] <= hi)
        basic = (truth[q] >= 2 * fits - hi) & (truth[q] <= 2 * fits - lo)     # the "basic" bootstrap interval
        mean = np.array([r[q]["mean"] for r in results])
        centre = 2 * fits - mean                                              # bias-corrected estimate
        corrected = np.abs(truth[q] - centre) <= boot_std
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.nanmedian(boot_std, axis=0) / np.nanstd(fits, axis=0, ddof=1)
        summary[q] = {"coverage": covered.mean(axis=0).tolist(), "coverage_basic": basic.mean(axis=0).tolist(),
                      "coverage_corrected": corrected.mean(axis=0).tolist(),
                      "spread_ratio": ratio.tolist(),
                      "bias": (np.nanmean(fits, axis=0) - truth[q]).tolist(),
                      "fit_std": np.nanstd(fits, axis=0, ddof=1).tolist()}
    w = np.asarray(summary["weights"]["coverage"])
    positive = truth["weights"] > 0
    summary["weights_positive"] = float(w[positive].mean())
    summary["weights_zero"] = float(w[~positive].mean())
    wb = np.asarray(summary["weights"]["coverage_basic"])
    summary["weights_positive_basic"] = float(wb[positive].mean())
    summary["weights_zero_basic"] = float(wb[~positive].mean())
    wc = np.asarray(summary["weights"]["coverage_corrected"])
    summary["weights_positive_corrected"] = float(wc[positive].mean())
    summary["weights_zero_corrected"] = float(wc[~positive].mean())
    return summary


def figure(summary: dict, truth: dict, args, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 3, 1)
    labels, cover, ratio = [], [], []
    for q in QUANTITIES:
        for c, (v, r) in enumerate(zip(summary[q]["coverage"], summary[q]["spread_ratio"])):
            labels.append(f"{q.replace('mean_', '')}\nc={c}")
            cover.append(v)
            ratio.append(r)
    pos = np.arange(len(labels))
    ax.axhspan(0.60, 0.76, color="g", alpha=0.15, label="target 60-76 %")
    ax.axhline(0.68, color="g", lw=0.8)
    ax.bar(pos, cover, 0.6)
    ax.set_xticks(pos)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("coverage of the 16-84 % interval")
    ax.legend(fontsize=7)
    ax.set_title("derived quantities", fontsize=9)
    ax = fig.add_subplot(1, 3, 2)
    ax.axhline(1.0, color="g", lw=0.8)
    ax.bar(pos, ratio, 0.6, color="tab:orange")
    ax.set_xticks(pos)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("bootstrap std / std of the fits")
    ax.set_title("spread calibration", fontsize=9)
    ax = fig.add_subplot(1, 3, 3)
    w = np.asarray(summary["weights"]["coverage"])
    positive = truth["weights"] > 0
    ax.hist([w[positive], w[~positive]], bins=np.linspace(0, 1, 21), label=["truth > 0", "truth = 0 (bound)"],
            stacked=True)
    ax.axvspan(0.60, 0.76, color="g", alpha=0.15)
    ax.set_xlabel("coverage of one weight")
    ax.set_ylabel("weights")
    ax.legend(fontsize=7)
    ax.set_title("individual weights", fontsize=9)
    fig.suptitle(f"bootstrap coverage: {args.realisations} realisations x {args.replicates} replicates "
                 f"({args.method}, {args.block}); S={args.spaxels} C={args.components} P={args.populations} "
                 f"L={args.wavelengths}, S/N {args.snr:g}, regul {args.regul:g}", fontsize=9)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    from mpi4py import MPI

    from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
    from cubefit_mpi.stages.mock import make_mock

    args = parse(argv)
    comm = MPI.COMM_WORLD
    tmp = Path(comm.bcast(tempfile.mkdtemp(prefix="cubefit-coverage-") if comm.rank == 0 else None))
    clean = str(tmp / "clean.h5")
    if comm.rank == 0:
        make_mock(clean, MockSpec(spaxels=args.spaxels, components=args.components, populations=args.populations,
                                  wavelengths=args.wavelengths, seed=args.seed, masked_pixels=args.wavelengths // 20),
                  MPI.COMM_SELF)
    comm.Barrier()
    t0 = time.perf_counter()
    mine = [realisation(clean, str(tmp / f"work{comm.rank}.h5"), k, args)
            for k in range(comm.rank, args.realisations, comm.size)]
    everything = comm.gather(mine, root=0)
    if comm.rank == 0:
        results = [r for part in everything for r in part]
        truth = truth_of(clean, args.components)
        summary = summarise(results, truth)
        summary["config"] = vars(args)
        summary["seconds"] = time.perf_counter() - t0
        summary["fit_seconds_median"] = float(np.median([r["fit_seconds"] for r in results]))
        summary["boot_seconds_median"] = float(np.median([r["boot_seconds"] for r in results]))
        figure(summary, truth, args, args.figure)
        out = args.json or os.path.splitext(args.figure)[0] + ".json"
        Path(out).write_text(json.dumps(summary, indent=1))
        print(f"bootstrap coverage: {args.realisations} realisations x {args.replicates} replicates, "
              f"{summary['seconds']:.0f}s on {comm.size} rank(s); figure {args.figure}")
        print("| quantity | component | coverage (16-84 %) | basic interval | bias-corrected ± std | "
              "bootstrap std / fits' std | fits' bias / fits' std |")
        print("|---|---|---|---|---|---|---|")
        for q in QUANTITIES:
            for c in range(args.components):
                s = summary[q]
                print(f"| {q} | {c} | {s['coverage'][c]:.3f} | {s['coverage_basic'][c]:.3f} | "
                      f"{s['coverage_corrected'][c]:.3f} | "
                      f"{s['spread_ratio'][c]:.2f} | {s['bias'][c] / s['fit_std'][c]:+.2f} |")
        for kind, label in (("positive", "truth > 0"), ("zero", "truth = 0")):
            print(f"| weights, {label} | all | {summary[f'weights_{kind}']:.3f} | "
                  f"{summary[f'weights_{kind}_basic']:.3f} | {summary[f'weights_{kind}_corrected']:.3f} | | |")
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
