"""Utilities on a built hypercube: column energy, the done bitmap, recompression (the
normalisation flip is :mod:`.convert_norm`).

All are chunk-aligned passes over S-tiles distributed over ranks, with collective reads and
writes; none runs an FFT.  ``recompress`` copies into a new dataset, verifies it tile by tile,
then swaps the links: a crash before the swap leaves the old dataset untouched, and a crash
between the two renames of the swap is finished by running it again.
"""
from __future__ import annotations

import logging

import numpy as np

from ..config.errors import InputError
from ..io import layout as lay
from ..io.blocks import read_block, write_block
from ..io.datasets import parse_compression, write_small
from ..io.h5file import open_h5
from ..io.space import dataset_bytes, require_free_space
from ..io.hypercube_state import (ENERGY_STALE, RECOMPRESS_OLD, RECOMPRESS_TMP, interrupted_recompress, missing_spaxel_ranges,
                                  require_usable_models)
from ..numerics.column_energy import pixel_weights, tile_energy
from ..parallel.collectives import allreduce_sum
from ..parallel.comm import get_comm
from ..parallel.decomposition import block_range, padded_schedule, tile_bounds

_LOG = logging.getLogger("cubefit_mpi.build")


def _require_models(f):
    """The models of a build that may be unfinished (for ``done``).  Local."""
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


# ---------------------------------------------------------------------------------------------
def recompute_col_energy(path: str, *, weighted: bool = False, comm=None) -> np.ndarray:
    """Recompute ``/HyperCube/col_energy = Σ_{s, λ∈mask} w_λ A²``; returns it.  Collective over comm.

    ``weighted=True`` uses ``/HyperCube/lambda_weights`` (an :class:`InputError` if absent) and
    records ``weighted=True`` as an attribute.
    """
    comm = get_comm(comm)
    with open_h5(path, "r", comm) as f:
        models = require_usable_models(f, comm, check_inputs=False)
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
        write_small(f, [(lay.COL_ENERGY, energy, {"weighted": bool(weighted), ENERGY_STALE: False,
                                                  "masked": mask is not None})], comm, "the column energy")
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
    """Rewrite ``/HyperCube/models`` with other filters: copy, verify, swap.  Collective over comm.

    The copy goes to ``/HyperCube/models__recompress``; only once every tile has been read back
    equal is it marked verified and swapped in by two renames.  A kill before the swap leaves the
    original as it was (the next run starts the copy over); a kill between the renames is
    finished by the next run (or named by every reader: the usable-hypercube check).
    """
    comm = get_comm(comm)
    filt, opt = parse_compression(compression, comm.Get_size())
    label = f"{filt}:{opt}" if filt else "none"
    finished = False
    with open_h5(path, "r", comm) as f:
        interrupted = interrupted_recompress(f) is not None or (lay.MODELS in f and RECOMPRESS_OLD in f)
    if interrupted:                        # opened for writing only when there is a swap to finish
        with open_h5(path, "r+", comm) as f:
            finished = _finish_interrupted_swap(f)
    with open_h5(path, "r", comm) as f:
        models = require_usable_models(f, comm, check_inputs=False)
        current = str(f[lay.HYPERCUBE].attrs.get("compression", "none"))
        shape, chunks = models.shape, models.chunks or (1,) + models.shape[1:]
        tiles = _s_tiles(models)
    if finished and current == label:
        _LOG.info("recompress %s: finished the swap of an interrupted run (%s)", path, label)
        return {"compression": compression, "tiles": len(tiles), "finished_interrupted": True}
    require_free_space(path, dataset_bytes(shape, "f4"), f"recompress (the copy of {lay.MODELS}, counted at its "
                       f"uncompressed size)", comm)
    with open_h5(path, "r+", comm) as f:
        if RECOMPRESS_TMP in f:                # an unverified copy of a killed run: start over
            del f[RECOMPRESS_TMP]
        new = f.create_dataset(RECOMPRESS_TMP, shape=shape, dtype="f4", chunks=chunks, compression=filt,
                               compression_opts=opt)
        f.flush()                              # the copy's metadata on disk before its chunks: a full disk costs the copy only
        mine = _my_tiles(tiles, comm)
        _copy_tiles(f[lay.MODELS], new, tiles, mine, comm)
        f.flush()
        mismatch = _count_differing_tiles(f[lay.MODELS], new, tiles, mine, comm)
        if mismatch:
            del f[RECOMPRESS_TMP]
            raise RuntimeError(f"recompress: {mismatch} tile(s) differ after the copy; the original is kept")
        new.attrs["compression"] = label
        new.attrs["verified"] = True
        f.flush()
        _swap_in(f)
    _LOG.info("recompress %s: %s (the old dataset's space stays in the file; h5repack returns it)", path, compression)
    return {"compression": compression, "tiles": len(tiles), "finished_interrupted": finished}


def _copy_tiles(old, new, tiles, mine, comm) -> None:
    """Copy this rank's S-tiles of ``old`` into ``new``.  Collective over comm."""
    shape = old.shape
    for ti in padded_schedule(mine, comm):
        if ti is None:
            read_block(old, None, None)
            write_block(new, None, None)
            continue
        s0, s1 = tiles[ti]
        write_block(new, (s0, 0, 0, 0), read_block(old, (s0, 0, 0, 0), (s1 - s0,) + shape[1:]))


def _count_differing_tiles(old, new, tiles, mine, comm) -> int:
    """S-tiles whose stored bytes differ between ``old`` and ``new`` (all ranks).  Collective over comm."""
    shape, mismatch = old.shape, 0
    for ti in padded_schedule(mine, comm):
        if ti is None:
            read_block(old, None, None)
            read_block(new, None, None)
            continue
        s0, s1 = tiles[ti]
        a = read_block(old, (s0, 0, 0, 0), (s1 - s0,) + shape[1:])
        b = read_block(new, (s0, 0, 0, 0), (s1 - s0,) + shape[1:])
        mismatch += int(not np.array_equal(a, b))
    return comm.allreduce(mismatch)


def _swap_in(f) -> None:
    """``models`` -> ``models__old``, the verified copy -> ``models``, the old one deleted.  Collective."""
    f.move(lay.MODELS, RECOMPRESS_OLD)
    f.move(RECOMPRESS_TMP, lay.MODELS)
    f.flush()
    _drop_old(f)


def _drop_old(f) -> None:
    """After the renames: the copy's compression onto ``/HyperCube``, the old dataset deleted.  Collective."""
    if "compression" in f[lay.MODELS].attrs:
        f[lay.HYPERCUBE].attrs["compression"] = str(f[lay.MODELS].attrs["compression"])
    for key in ("compression", "verified"):
        if key in f[lay.MODELS].attrs:
            del f[lay.MODELS].attrs[key]
    if RECOMPRESS_OLD in f:
        del f[RECOMPRESS_OLD]
    f.flush()


def _finish_interrupted_swap(f) -> bool:
    """Complete a swap that a kill interrupted; True if there was one.  Collective."""
    if interrupted_recompress(f) is not None and bool(f[RECOMPRESS_TMP].attrs.get("verified", False)):
        f.move(RECOMPRESS_TMP, lay.MODELS)
        _drop_old(f)
        return True
    if lay.MODELS in f and RECOMPRESS_OLD in f:          # killed after the renames: only the delete is left
        _drop_old(f)
        return True
    return False
