"""Stage ``status``: what a cube file holds and how complete it is, as a compact table.

Read-only, run on one rank (``comm=MPI.COMM_SELF``): it opens the file serially and reads only
small datasets and attributes (never ``/HyperCube/models``).
"""
from __future__ import annotations

import os

import numpy as np

from ..config.errors import InputError
from ..io import layout as lay
from ..io.h5file import open_h5
from ..io.lock import describe, read_holder
from ..numerics.support import summary, support_map
from ..solvers.uncertainty import bootstrap_is_current


def _fmt_shape(dset) -> str:
    return "x".join(str(n) for n in dset.shape) + f" {dset.dtype}"


def file_status(path: str) -> list[tuple[str, str]]:
    """Rows ``(key, value)`` describing ``path``.  Local (opens the file serially)."""
    from mpi4py import MPI

    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    rows: list[tuple[str, str]] = [("file", f"{path} ({os.path.getsize(path) / 2**20:.1f} MiB)")]
    holder = read_holder(path)
    if holder is not None:
        rows.append(("writer", f"being written by {describe(holder)}"))
    with open_h5(path, "r", MPI.COMM_SELF) as f:
        if "dims" in f.attrs:
            S, L, T, V, C, P = (int(v) for v in f.attrs["dims"])
            rows.append(("dims", f"S={S} L={L} T={T} V={V} C={C} P={P}  (N = C*P = {C * P})"))
        for name in (lay.TEMPLATES, lay.TEM_PIX, lay.OBS_PIX, lay.VEL_PIX, lay.LOSVD, lay.DATACUBE,
                     lay.R_T, lay.MASK):
            rows.append((name, _fmt_shape(f[name]) if name in f else "missing"))
        if lay.OBS_PIX in f:
            obs = np.exp(f[lay.OBS_PIX][[0, -1]])
            rows.append(("observed range", f"{obs[0]:.2f} - {obs[1]:.2f} A"))
        if lay.MASK in f:
            mask = np.asarray(f[lay.MASK][...], dtype=bool)
            rows.append(("mask", f"{int(mask.sum())}/{mask.size} pixels used"))
        if lay.R_T in f:
            rows.append(("rebin.mode", str(f[lay.R_T].attrs.get("rebin.mode", "unknown (external)"))))
        if lay.TEMPLATES in f and "pop_shape" in f[lay.TEMPLATES].attrs:
            rows.append(("pop_shape", str(tuple(int(v) for v in f[lay.TEMPLATES].attrs["pop_shape"]))))
        rows.extend(_hypercube_rows(f))
        if lay.X_GLOBAL in f:
            x = np.asarray(f[lay.X_GLOBAL][...])
            rows.append((lay.X_GLOBAL, f"{x.size} values, {int((x > 0).sum())} non-zero, sum {x.sum():.6g}"))
        else:
            rows.append((lay.X_GLOBAL, "missing (no solve yet)"))
        if lay.SOLVE in f:
            attrs = dict(f[lay.SOLVE].attrs)
            keys = [k for k in ("method", "chi2", "kkt.ok", "active_set", "iterations") if k in attrs]
            rows.append((lay.SOLVE, ", ".join(f"{k}={attrs[k]}" for k in keys) or "present"))
        if lay.UNCERTAINTY_DONE in f:
            rows.append((lay.UNCERTAINTY, _uncertainty_row(f)))
        if lay.TRUTH_X in f:
            truth = f[lay.TRUTH].attrs
            rows.append((lay.TRUTH, f"mock galaxy ({truth.get('templates', 'synthetic')} templates), "
                                    f"seed={truth.get('seed', '?')}"))
    return rows


def _uncertainty_row(f) -> str:
    """Replicates done, how they were drawn, the component totals with their spread.  Local."""
    done = np.asarray(f[lay.UNCERTAINTY_DONE][...], dtype=bool)
    a = f[lay.UNCERTAINTY_REPLICATES].attrs
    line = "" if bootstrap_is_current(f) else "STALE (made for an earlier /X_global; rerun `uncertainty`): "
    line += f"{int(done.sum())}/{done.size} replicates ({a.get('method', '?')}, seed {a.get('seed', '?')})"
    group = f[lay.UNCERTAINTY]
    if "totals_mean" in group and "totals_std" in group:
        totals = ", ".join(f"{m:.4g} +- {s:.2g}" for m, s in zip(group["totals_mean"][...], group["totals_std"][...]))
        line += f"; component totals {totals}"
    return line


def _hypercube_rows(f) -> list[tuple[str, str]]:
    rows = []
    if lay.LAMBDA_WEIGHTS in f:
        w = np.asarray(f[lay.LAMBDA_WEIGHTS][...])
        rows.append((lay.LAMBDA_WEIGHTS, f"min {w.min():.3g} max {w.max():.3g} mean {w.mean():.3g}"))
    if lay.MODELS not in f:
        return rows + [(lay.MODELS, "missing (run `cubefit_mpi build`)")]
    models = f[lay.MODELS]
    hc = f[lay.HYPERCUBE].attrs
    rows.append((lay.MODELS, f"{_fmt_shape(models)}, chunks {models.chunks}, "
                 f"compression {models.compression or 'none'}"))
    if lay.DONE in f:
        done = np.asarray(f[lay.DONE][...])
        rows.append(("build", f"{int(done.sum())}/{done.size} tiles done "
                     f"({100.0 * done.sum() / max(done.size, 1):.1f}%), complete={bool(hc.get('complete', False))}"))
    for key in ("norm.mode", "amp.mode", "rebin.mode", "build.method"):
        if key in hc:
            rows.append((key, str(hc[key])))
    if lay.LOSVD_AMP in f:
        rows.append(("component support", summary(support_map(np.asarray(f[lay.LOSVD_AMP][...])))))
    return rows


def format_table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns.  Local."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
