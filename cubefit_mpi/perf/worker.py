"""The scaling study's worker, run under MPI: probe, then time each stage on a fresh copy of the
input, and print one JSON line with every rank's phase timings (``scaling-worker``)."""
from __future__ import annotations

import numpy as np

from ..io import layout as lay
from .probe import probe, stage_kernels, timed_collectively

PHASES = ("compute", "io", "comm")


RESULT_TAG = "CUBEFIT_SCALING_RESULT "


def problem_of(path: str, chunks, comm) -> dict:
    """The model's sizes of a built file: S, C, P, L, T, K, chunks, unmasked pixels.  Collective."""
    from ..io.h5file import open_h5
    from ..numerics.kernels import kernel_shifts

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

    from ..io.datasets import default_chunks

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

    from ..solvers.exact import solve_exact
    from ..stages.build import build_hypercube

    sizes = comm.bcast(stage_blocks(path) if comm.Get_rank() == 0 else None)
    kernels = stage_kernels(sizes["P"], sizes["L"], sizes["N"], sizes["l_used"])
    out = {"ranks": comm.Get_size(), "probe": probe(scratch, comm, write_block_bytes=sizes["unit"],
                                                    read_block_bytes=sizes["tile"], kernels=kernels)}
    if "build" in what or "solve" in what:
        wall, built = timed_collectively(comm, lambda: build_hypercube(path, force=True, comm=comm))
        if "build" in what:
            out["build"] = {"wall": wall, "phases": _phase_lists(built["phases_by_rank"])}
        out["problem"] = problem_of(path, built["chunks"], comm)
    if "solve" in what:
        wall, (_, stats) = timed_collectively(comm, lambda: solve_exact(path, use_cache=False, verify=False, use_weights=False,
                                                           comm=comm))
        out["solve"] = {"wall": wall, "phases": _phase_lists(stats.get("phases_by_rank") or [{}] * comm.Get_size()),
                        "serial": float(stats.get("solve_seconds", 0.0)), "active_set": int(stats["active_set"]),
                        "method": stats["method"]}
    return out
