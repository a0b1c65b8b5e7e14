"""Utilities on a built hypercube: normalisation flip, column energy, the done bitmap, recompression.

All are chunk-aligned passes over S-tiles distributed over ranks, with collective reads and
writes; none runs an FFT.  Each is resumable or atomic:

* ``convert_hypercube_norm`` records the target in ``/HyperCube`` attribute
  ``norm.converting_to`` and a per-S-tile bitmap ``/HyperCube/_convert_done``; a killed
  conversion restarted with the same target finishes the remaining tiles;
* ``recompress`` copies into a new dataset, verifies it tile by tile, then swaps the links: a
  crash before the swap leaves the old dataset untouched.
"""
from __future__ import annotations

import logging

import numpy as np

from ..config.errors import InputError
from ..io import layout as lay
from ..io.blocks import read_block, write_block
from ..io.datasets import parse_compression
from ..io.h5file import open_h5
from ..io.hypercube_state import mark_models_changed, missing_spaxel_ranges
from ..numerics.column_energy import pixel_weights, tile_energy
from ..numerics.normalization import NORM_MODES, norm_factor
from ..parallel.collectives import allreduce_sum
from ..parallel.comm import get_comm
from ..parallel.decomposition import block_range, padded_schedule, tile_bounds

_LOG = logging.getLogger("cubefit_mpi.build")
CONVERT_DONE = "/HyperCube/_convert_done"


def _require_models(f):
    if lay.MODELS not in f:
        raise InputError(f"{lay.MODELS}: dataset missing from {f.filename}; run `cubefit_mpi build {f.filename}`")
    return f[lay.MODELS]


def _s_tiles(models) -> list[tuple[int, int]]:
    s_chunk = models.chunks[0] if models.chunks else max(1, models.shape[0])
    return tile_bounds(models.shape[0], s_chunk)


def _my_tiles(tiles, comm, skip=None):
    todo = [i for i in range(len(tiles)) if skip is None or not skip[i]]
    lo, hi = block_range(len(todo), comm.Get_size(), comm.Get_rank())
    return todo[lo:hi]


def _read_mask(f):
    return np.asarray(f[lay.MASK][...], dtype=bool) if lay.MASK in f else None


# ---------------------------------------------------------------------------------------------


def convert_hypercube_norm(path: str, to_mode: str, recompute_energy: bool = True, comm=None) -> dict:
    """Flip ``/HyperCube/models`` between ``norm="model"`` and ``norm="data"``.  Collective over comm.

    Scales ``models[s] *= F[s]`` (see :func:`norm_factor`) in S-tiles, mask-aware (the flux is the
    masked mean, computed from ``/DataCube`` if ``/HyperCube/data_flux`` is absent), then
    updates ``col_energy`` (if asked) and the ``norm.mode`` attribute.  Resumable.
    """
    from ..numerics.normalization import masked_mean_flux

    comm = get_comm(comm)
    if to_mode not in NORM_MODES:
        raise InputError(f"--to {to_mode}: expected one of {', '.join(NORM_MODES)}")
    with open_h5(path, "r", comm) as f:
        models = _require_models(f)
        attrs = f[lay.HYPERCUBE].attrs
        current = str(attrs.get("norm.mode", ""))
        converting = str(attrs.get("norm.converting_to", ""))
        if not bool(attrs.get("complete", False)):
            raise InputError(f"{lay.MODELS}: the build is incomplete; finish it with `cubefit_mpi build {path}` first")
        if current == to_mode and not converting:
            return {"converted": False, "norm.mode": current}
        if lay.LOSVD_AMP_SUM not in f:
            raise InputError(f"{lay.LOSVD_AMP_SUM}: dataset missing; rebuild with `cubefit_mpi build --force`")
        amp_sum = np.asarray(f[lay.LOSVD_AMP_SUM][...], dtype=np.float64)
        mask = _read_mask(f)
        if lay.DATA_FLUX in f:
            flux = np.asarray(f[lay.DATA_FLUX][...], dtype=np.float64)
            flux_computed = False
        elif lay.DATACUBE in f:
            flux = np.zeros(amp_sum.size)
            lo, hi = block_range(amp_sum.size, comm.Get_size(), comm.Get_rank())
            if hi > lo:
                flux[lo:hi] = masked_mean_flux(np.asarray(f[lay.DATACUBE][lo:hi]), mask)
            flux = allreduce_sum(flux, comm)
            flux_computed = True
        else:
            raise InputError(f"{lay.DATA_FLUX}: missing and no {lay.DATACUBE} to compute it from")
        try:
            factor = norm_factor(to_mode, amp_sum, flux)
        except ValueError as exc:
            raise InputError(f"{lay.DATA_FLUX}: {exc}; cannot convert between norm modes") from None
        tiles = _s_tiles(models)
        shape = models.shape
    if converting and converting != to_mode:
        raise InputError(f"{lay.HYPERCUBE}: an interrupted conversion to {converting!r} must be finished first "
                         f"(`cubefit_mpi convert-norm {path} --to {converting}`)")
    with open_h5(path, "r+", comm) as f:
        models = f[lay.MODELS]
        if not converting:
            if CONVERT_DONE in f:
                del f[CONVERT_DONE]
            f.create_dataset(CONVERT_DONE, shape=(len(tiles),), dtype="u1", fillvalue=0)
            if flux_computed:
                if lay.DATA_FLUX in f:
                    del f[lay.DATA_FLUX]
                f.create_dataset(lay.DATA_FLUX, data=flux)
            f[lay.HYPERCUBE].attrs["norm.converting_to"] = to_mode
            f.flush()
        done = np.asarray(f[CONVERT_DONE][...], dtype=bool)
        done_dset = f[CONVERT_DONE]
        for ti in padded_schedule(_my_tiles(tiles, comm, skip=done), comm):
            if ti is None:
                read_block(models, None, None)
                write_block(models, None, None)
                f.flush()
                write_block(done_dset, None, None)
                continue
            s0, s1 = tiles[ti]
            block = read_block(models, (s0, 0, 0, 0), (s1 - s0,) + shape[1:])
            block *= factor[s0:s1, None, None, None].astype(np.float32)
            write_block(models, (s0, 0, 0, 0), block)
            f.flush()
            write_block(done_dset, (ti,), np.ones(1, dtype=np.uint8))
        f.flush()
        f[lay.HYPERCUBE].attrs["norm.mode"] = to_mode
        del f[lay.HYPERCUBE].attrs["norm.converting_to"]
        mark_models_changed(f, comm)
        del f[CONVERT_DONE]
    energy = recompute_col_energy(path, comm=comm) if recompute_energy else None
    _LOG.info("convert-norm %s: %s -> %s over %d S-tiles", path, current, to_mode, len(tiles))
    return {"converted": True, "norm.mode": to_mode, "col_energy": energy}


# ---------------------------------------------------------------------------------------------
def recompute_col_energy(path: str, *, weighted: bool = False, comm=None) -> np.ndarray:
    """Recompute ``/HyperCube/col_energy = Σ_{s, λ∈mask} w_λ A²``; returns it.  Collective over comm.

    ``weighted=True`` uses ``/HyperCube/lambda_weights`` (an :class:`InputError` if absent) and
    records ``weighted=True`` as an attribute.
    """
    comm = get_comm(comm)
    with open_h5(path, "r", comm) as f:
        models = _require_models(f)
        mask = _read_mask(f)
        weights = None
        if weighted:
            if lay.LAMBDA_WEIGHTS not in f:
                raise InputError(f"{lay.LAMBDA_WEIGHTS}: missing; run `cubefit_mpi weights {path}` first")
            weights = np.asarray(f[lay.LAMBDA_WEIGHTS][...], dtype=np.float64)
            if weights.shape != (models.shape[3],):
                raise InputError(f"{lay.LAMBDA_WEIGHTS}: expected shape ({models.shape[3]},), got {weights.shape}")
        tiles = _s_tiles(models)
        S, C, P, L = models.shape
        used = pixel_weights(L, mask, weights)
        energy = np.zeros((C, P))
        for ti in padded_schedule(_my_tiles(tiles, comm), comm):
            if ti is None:
                read_block(models, None, None)
                continue
            s0, s1 = tiles[ti]
            energy += tile_energy(read_block(models, (s0, 0, 0, 0), (s1 - s0, C, P, L)), used)
        energy = allreduce_sum(energy, comm)
    with open_h5(path, "r+", comm) as f:
        if lay.COL_ENERGY not in f:
            f.create_dataset(lay.COL_ENERGY, shape=energy.shape, dtype="f8")
        write_block(f[lay.COL_ENERGY], (0, 0) if comm.Get_rank() == 0 else None,
                    energy if comm.Get_rank() == 0 else None)
        f[lay.COL_ENERGY].attrs["weighted"] = bool(weighted)
        f[lay.COL_ENERGY].attrs["masked"] = mask is not None
    return energy


# ---------------------------------------------------------------------------------------------
def done_map(path: str, comm=None) -> dict:
    """The done bitmap and completion summary.  Collective over comm (read-only)."""
    with open_h5(path, "r", comm) as f:
        models = _require_models(f)
        if lay.DONE not in f:
            raise InputError(f"{lay.DONE}: missing; this hypercube was not built by cubefit_mpi")
        done = np.asarray(f[lay.DONE][...], dtype=bool)
        chunks = models.chunks or models.shape
        n_spaxels = models.shape[0]
    per_s = done.all(axis=(1, 2))
    return {"done": done, "chunks": chunks[:3], "tiles_done": int(done.sum()), "tiles_total": int(done.size),
            "s_tiles_done": int(per_s.sum()), "s_tiles_total": int(per_s.size),
            "missing_spaxels": missing_spaxel_ranges(np.flatnonzero(~per_s), chunks[0], n_spaxels)}


def parse_spaxel_range(text: str, n_spaxels: int) -> tuple[int, int]:
    """``"S0:S1"`` or ``"all"`` -> half-open spaxel range.  Local."""
    if text == "all":
        return 0, n_spaxels
    try:
        a, b = text.split(":")
        lo, hi = int(a or 0), int(b or n_spaxels)
    except ValueError:
        raise InputError(f"--invalidate {text}: expected S0:S1 or all") from None
    if not 0 <= lo < hi <= n_spaxels:
        raise InputError(f"--invalidate {text}: expected 0 <= S0 < S1 <= {n_spaxels}")
    return lo, hi


def invalidate_tiles(path: str, spaxels: str, comm=None) -> int:
    """Reset the done bits of every S-tile overlapping the spaxel range; returns tiles reset.  Collective.

    The next ``build`` recomputes exactly those tiles (and ``complete`` becomes False).
    """
    comm = get_comm(comm)
    with open_h5(path, "r", comm) as f:
        models = _require_models(f)
        if lay.DONE not in f:
            raise InputError(f"{lay.DONE}: missing; this hypercube was not built by cubefit_mpi")
        lo, hi = parse_spaxel_range(spaxels, models.shape[0])
        s_chunk = (models.chunks or models.shape)[0]
    t0, t1 = lo // s_chunk, -(-hi // s_chunk)
    with open_h5(path, "r+", comm) as f:
        dset = f[lay.DONE]
        reset = int(np.asarray(dset[t0:t1]).sum())
        block = np.zeros((t1 - t0,) + dset.shape[1:], dtype=np.uint8)
        write_block(dset, (t0, 0, 0) if comm.Get_rank() == 0 else None, block if comm.Get_rank() == 0 else None)
        f[lay.HYPERCUBE].attrs["complete"] = False
    return reset


# ---------------------------------------------------------------------------------------------
def recompress(path: str, compression: str | None, comm=None) -> dict:
    """Rewrite ``/HyperCube/models`` with other filters: copy, verify, swap.  Collective over comm."""
    comm = get_comm(comm)
    filt, opt = parse_compression(compression, comm.Get_size())
    tmp_name = lay.MODELS + "__recompress"
    with open_h5(path, "r", comm) as f:
        models = _require_models(f)
        if not bool(f[lay.HYPERCUBE].attrs.get("complete", False)):
            raise InputError(f"{lay.MODELS}: the build is incomplete; finish it with `cubefit_mpi build {path}` first")
        shape, chunks = models.shape, models.chunks or (1,) + models.shape[1:]
        tiles = _s_tiles(models)
    with open_h5(path, "r+", comm) as f:
        if tmp_name in f:                      # leftover of a crashed recompress: start over
            del f[tmp_name]
        old = f[lay.MODELS]
        new = f.create_dataset(tmp_name, shape=shape, dtype="f4", chunks=chunks, compression=filt,
                               compression_opts=opt)
        mismatch = 0
        mine = _my_tiles(tiles, comm)
        for ti in padded_schedule(mine, comm):
            if ti is None:
                read_block(old, None, None)
                write_block(new, None, None)
                continue
            s0, s1 = tiles[ti]
            block = read_block(old, (s0, 0, 0, 0), (s1 - s0,) + shape[1:])
            write_block(new, (s0, 0, 0, 0), block)
        f.flush()
        for ti in padded_schedule(mine, comm):      # verify what is on disk
            if ti is None:
                read_block(old, None, None)
                read_block(new, None, None)
                continue
            s0, s1 = tiles[ti]
            a = read_block(old, (s0, 0, 0, 0), (s1 - s0,) + shape[1:])
            b = read_block(new, (s0, 0, 0, 0), (s1 - s0,) + shape[1:])
            mismatch += int(not np.array_equal(a, b))
        mismatch = comm.allreduce(mismatch)
        if mismatch:
            del f[tmp_name]
            raise RuntimeError(f"recompress: {mismatch} tile(s) differ after the copy; the original is kept")
        f.move(lay.MODELS, lay.MODELS + "__old")
        f.move(tmp_name, lay.MODELS)
        del f[lay.MODELS + "__old"]
        f[lay.HYPERCUBE].attrs["compression"] = f"{filt}:{opt}" if filt else "none"
    _LOG.info("recompress %s: %s (space of the old dataset is reusable by HDF5; h5repack reclaims it)",
              path, compression)
    return {"compression": compression, "tiles": len(tiles)}
