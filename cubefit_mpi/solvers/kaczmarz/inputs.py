"""What the Kaczmarz solve reads and writes besides the hypercube tiles: the weighted data cube,
the starting point, ``/X_global``, and the checks of its options.

Stage helpers of :mod:`cubefit_mpi.solvers.kaczmarz.solver` (collective over the communicator as noted).
"""
from __future__ import annotations

import logging

import numpy as np

from ...config.errors import InputError
from ...io import layout as lay
from ...io.blocks import read_block
from ...io.datasets import write_small
from ...io.h5file import open_h5
from ...parallel.collectives import allreduce_sum
from ...parallel.comm import mpi
from ...parallel.decomposition import block_range, padded_schedule

_LOG = logging.getLogger("cubefit_mpi.solve")
WARM_STARTS = ("zeros", "exact", "resume", "jacobi")


def load_data(f, inputs, comm) -> tuple[np.ndarray, np.ndarray, float]:
    """The weighted data cube on every rank, the weighted norm of each S-tile and ``‖Y‖``.  Collective over comm.

    Returns
    -------
    data_w : (S, L) float64, ``√w y`` on used pixels and 0 on masked ones (S·L·8 bytes per rank:
        the hypercube is C·P times larger, so this is never what limits a run)
    tile_norms : (n_tiles,) float64, ``Σ w y²`` per S-tile
    y_norm : float, the unweighted ``‖Y‖`` over used pixels
    """
    n_tiles, S, L = len(inputs.s_tiles), inputs.S, inputs.L
    lo, hi = block_range(n_tiles, comm.Get_size(), comm.Get_rank())
    sqrt_w = np.zeros(L)
    sqrt_w[inputs.mask] = inputs.sqrt_w
    norms = np.zeros((n_tiles, 2))
    row0 = inputs.s_tiles[lo][0] if lo < hi else 0
    row1 = inputs.s_tiles[hi - 1][1] if lo < hi else 0
    mine = np.zeros((row1 - row0, L))
    for t in padded_schedule(list(range(lo, hi)), comm):
        s0, s1 = inputs.s_tiles[t] if t is not None else (0, 0)
        y = read_block(f[lay.DATACUBE], (s0, 0), (s1 - s0, L) if t is not None else None, np.float64)
        if t is not None:
            y[:, ~inputs.mask] = 0.0
            mine[s0 - row0:s1 - row0] = y * sqrt_w
            norms[t] = (float(np.sum(mine[s0 - row0:s1 - row0] ** 2)), float(np.sum(y * y)))
    norms = allreduce_sum(norms, comm)
    data_w = np.empty((S, L))
    if comm.Get_size() == 1:
        data_w[:] = mine
    else:
        counts = np.array(comm.allgather(mine.size))
        comm.Allgatherv(mine, [data_w, counts, np.concatenate([[0], np.cumsum(counts)[:-1]]), mpi().DOUBLE])
    return data_w, norms[:, 0], float(np.sqrt(np.sum(norms[:, 1])))


def read_x_global(path, n, comm, *, require_exact: bool, provenance: dict | None = None):
    """The exact solution (N,) float64, or None (or an error with ``require_exact``).  Collective.

    ``/X_global`` when its attribute method is "exact"; else ``/Solve/x_exact``, the copy a
    Kaczmarz solve keeps when it overwrites an exact ``/X_global`` (:func:`write_solution`), when
    its provenance attributes equal ``provenance`` (same models, data, mask and λ-weights).
    """
    with open_h5(path, "r", comm) as f:
        if lay.X_GLOBAL in f and f[lay.X_GLOBAL].shape == (n,) and _is_exact(f[lay.X_GLOBAL]):
            return np.asarray(f[lay.X_GLOBAL][...], dtype=np.float64)
        if provenance is not None and lay.X_EXACT in f and f[lay.X_EXACT].shape == (n,):
            attrs = f[lay.X_EXACT].attrs
            if all(str(attrs.get(k, "")) == str(v) for k, v in provenance.items()):
                return np.asarray(f[lay.X_EXACT][...], dtype=np.float64)
    if require_exact:
        raise InputError(f"{lay.X_GLOBAL}: warm_start='exact' needs an exact solution of length {n} "
                         f"(attribute method='exact', no polynomials); run `cubefit_mpi solve {path}` first")
    return None


def _is_exact(dset) -> bool:
    """An exact solve's x without polynomials (the only one Kaczmarz's problem shares)."""
    method = dset.attrs.get("method", "")
    plain = int(dset.attrs.get("add_degree", -1)) < 0 and int(dset.attrs.get("mult_degree", 0)) == 0
    return (method.decode() if isinstance(method, bytes) else str(method)) == "exact" and plain


def initial_x(path, inputs, warm_start, x0, comm, eps: float) -> tuple[np.ndarray, str]:
    """The starting point (N,) float64 and a word saying where it came from.  Collective over comm."""
    n = inputs.n_params
    given = x0 if x0 is not None else (warm_start if not isinstance(warm_start, str) else None)
    if given is not None:
        x = np.asarray(given, dtype=np.float64).reshape(-1)
        if x.size != n or not np.all(np.isfinite(x)):
            raise InputError(f"x0: expected {n} finite values (C*P), got {x.size}")
        return x.copy(), "given"
    if warm_start not in WARM_STARTS:
        raise InputError(f"--warm-start {warm_start}: expected one of {', '.join(WARM_STARTS)}")
    if warm_start == "exact":
        return read_x_global(path, n, comm, require_exact=True, provenance=inputs.provenance), "exact"
    if warm_start == "resume":
        found = None
        if comm.Get_rank() == 0:
            from ...io.tracker_sidecar import latest_snapshot

            found = latest_snapshot(path, n_params=n)
        found = comm.bcast(found, root=0)
        if found is None:
            if comm.Get_rank() == 0:
                _LOG.warning("warm_start='resume': no snapshot of length %d next to %s; starting from zeros", n, path)
            return np.zeros(n), "zeros"
        _LOG.info("warm_start='resume': snapshot of epoch %d from %s", found[1], found[2])
        return np.asarray(found[0], dtype=np.float64).copy(), f"resume:{found[1]}"
    if warm_start == "jacobi":
        from ..gram import diagonal_pass, residual_chi2

        diag = diagonal_pass(inputs, comm)
        x = np.where(diag["diag"] > eps, np.maximum(diag["rhs"], 0.0) / np.maximum(diag["diag"], eps), 0.0)
        bx = float(diag["rhs"] @ x)
        curvature = residual_chi2(inputs, x, comm) - diag["yy"] + 2.0 * bx    # ‖√w A x‖²
        gamma = bx / curvature if curvature > 0 and bx > 0 else 0.0
        return gamma * x, "jacobi"
    return np.zeros(n), "zeros"


def write_solution(path, x, stats, knobs, comm, provenance: dict | None = None) -> None:
    """``/X_global`` with method and solver settings as attributes.  Collective over comm.

    An exact ``/X_global`` about to be overwritten is first kept as ``/Solve/x_exact`` with
    ``provenance`` as attributes, so that later Kaczmarz runs still report their gap to it; both
    datasets are replaced in one staged write (all or none).
    """
    attrs = {"method": "kaczmarz", "layout": "row-major (C, P)", "chi2": 2.0 * stats["objective"],
             "objective": stats["objective"], "epochs": stats["epochs"], "lr": stats["lr"],
             "c_bands": stats["c_bands"], "s_groups": stats["s_groups"], "warm_start": stats["warm_start"],
             "orbit_mode": stats["orbit_mode"], "orbit_totals": stats["orbit_totals"],
             "returned_epoch": stats["returned_epoch"], "epochs_rejected": stats["epochs_rejected"],
             "objective_source": stats["objective_source"]}
    for env, value in knobs.as_dict().items():
        if env.startswith(("CUBEFIT_BT_", "CUBEFIT_TRUST", "CUBEFIT_EPS", "CUBEFIT_ZERO_COL",
                           "CUBEFIT_NNLS_", "CUBEFIT_TILE_BT", "CUBEFIT_GLOBAL_", "CUBEFIT_EPOCH_")):
            attrs[env] = value
    with open_h5(path, "r+", comm) as f:
        items = []
        if provenance is not None and lay.X_GLOBAL in f and _is_exact(f[lay.X_GLOBAL]):
            items.append((lay.X_EXACT, np.asarray(f[lay.X_GLOBAL][...], dtype=np.float64), dict(provenance)))
        items.append((lay.X_GLOBAL, np.asarray(x, dtype=np.float64), attrs))
        write_small(f, items, comm, "the solution")


def solution_bytes(n: int) -> int:
    """Bytes a Kaczmarz solve writes: ``/X_global``, the exact copy and a sidecar (16 + 2 snapshots,
    history).  Local."""
    from ...io.tracker_sidecar import SNAPSHOT_HISTORY

    return 8 * n * (SNAPSHOT_HISTORY + 4) + 2**20


def check_options(epochs, lr, c_bands, n_comp, orbit_strength, decorrelate) -> None:
    if int(epochs) != epochs or epochs < 0:
        raise InputError(f"--epochs {epochs}: expected an integer >= 0")
    if not np.isfinite(lr) or lr <= 0:
        raise InputError(f"--lr {lr}: expected a positive number")
    if c_bands is not None and (int(c_bands) != c_bands or not 1 <= c_bands <= n_comp):
        raise InputError(f"c_bands={c_bands}: expected an integer in [1, {n_comp}] (C)")
    if orbit_strength is not None and not 0.0 <= orbit_strength <= 1.0:
        raise InputError(f"--orbit-strength {orbit_strength}: expected 0 <= value <= 1 for kaczmarz "
                         f"(fraction of the way to the targets per tile)")
    if not 0.0 <= decorrelate <= 1.0:
        raise InputError(f"decorrelate={decorrelate}: expected 0 <= value <= 1")

