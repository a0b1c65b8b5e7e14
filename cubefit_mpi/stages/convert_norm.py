"""Stage ``convert-norm``: flip a built hypercube between ``norm="model"`` and ``norm="data"`` in
place, with no FFT, resumable and idempotent per tile.  A compressed cube is refused (exit 2, with
the ``recompress`` commands that make it convertible): its chunks cannot be rewritten in place
without changing HDF5 metadata, which no journal protects from a kill.

``models[s] *= F[s]`` (:func:`~cubefit_mpi.numerics.normalization.norm_factor`) over S-tiles
dealt to the ranks.  A kill at any moment must neither scale a tile twice nor leave one half
written, so every tile goes through a journal kept in the file:

1. its original bytes are copied to this rank's slot of ``/HyperCube/_convert_backup``, flushed;
2. ``_convert_state[t] = 1`` and ``_convert_slot[t] = slot``, flushed;
3. the scaled tile is written over the original, flushed;
4. ``_convert_state[t] = 2``, flushed.

A rerun first restores every tile left in state 1 from its backup (scaling the original bytes
again gives the very same result), then converts the tiles still in state 0.  From the first
write until the last the ``/HyperCube`` attribute ``norm.converting_to`` is set, and every
reader refuses the cube (:func:`~cubefit_mpi.io.hypercube_state.require_usable_models`) with
the command that finishes the conversion.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..config.errors import InputError
from ..io import layout as lay
from ..io.blocks import read_block, write_block
from ..io.datasets import allocated_now, replace_dataset
from ..io.h5file import open_h5
from ..io.space import dataset_bytes, file_size, require_free_space, reserved_flush
from ..io.hypercube_state import CONVERTING_ATTR, ENERGY_STALE, mark_models_changed, require_usable_models
from ..numerics.normalization import NORM_MODES, masked_mean_flux, norm_factor
from ..parallel.collectives import agree, allreduce_sum
from ..parallel.comm import get_comm
from ..parallel.decomposition import block_range, padded_schedule, tile_bounds

_LOG = logging.getLogger("cubefit_mpi.build")
STATE = "/HyperCube/_convert_state"      # (n_tiles,) uint8: 0 original, 1 saved in its backup slot, 2 converted
SLOT = "/HyperCube/_convert_slot"        # (n_tiles,) int32: backup slot of a tile in state 1
BACKUP = "/HyperCube/_convert_backup"    # (n_slots, S_chunk, C, P, L) float32: original bytes of tiles in state 1
JOURNAL = (STATE, SLOT, BACKUP)


@dataclass
class _Conversion:
    """What a conversion needs on every rank (small arrays and the tile plan)."""

    path: str
    current: str
    target: str
    resuming: bool
    factor: np.ndarray            # (S,) float64
    flux: np.ndarray | None       # (S,) to store as /HyperCube/data_flux (computed here), else None
    tiles: list                   # [(s0, s1), ...] S-tiles of the models' chunks
    shape: tuple                  # (S, C, P, L)

    def scaled(self, block: np.ndarray, s0: int, s1: int) -> np.ndarray:
        """The tile ``block`` (original bytes) in the target normalisation, float32.  Local."""
        return block * self.factor[s0:s1, None, None, None].astype(np.float32)


def convert_hypercube_norm(path: str, to_mode: str, recompute_energy: bool = True, comm=None) -> dict:
    """Flip ``/HyperCube/models`` between ``norm="model"`` and ``norm="data"``.  Collective over comm.

    Scales ``models[s] *= F[s]`` in S-tiles, mask-aware (the flux is the masked mean, computed
    from ``/DataCube`` if ``/HyperCube/data_flux`` is absent), then updates ``col_energy`` (if
    asked) and the ``norm.mode`` attribute.  A conversion killed at any moment is finished by
    running the same command again, with the same bytes as an uninterrupted one.

    Returns
    -------
    dict with ``converted`` (False when the cube already has ``to_mode``), ``norm.mode``,
    ``col_energy`` (recomputed or None), ``tiles``, ``recovered`` (tiles restored from a backup).
    """
    comm = get_comm(comm)
    if to_mode not in NORM_MODES:
        raise InputError(f"--to {to_mode}: expected one of {', '.join(NORM_MODES)}")
    with open_h5(path, "r", comm) as f:
        plan = _plan(f, path, to_mode, comm)
        have_backup = BACKUP in f and f[BACKUP].shape[0] >= comm.Get_size()
    if plan is None:
        with open_h5(path, "r", comm) as f:
            mode = str(f[lay.HYPERCUBE].attrs.get("norm.mode", ""))
            stale = lay.COL_ENERGY in f and bool(f[lay.COL_ENERGY].attrs.get(ENERGY_STALE, False))
            leftover = any(name in f for name in JOURNAL)
        if leftover:                              # a conversion stopped after flipping norm.mode
            with open_h5(path, "r+", comm) as f:
                _drop_journal(f)
        energy = None
        if stale and recompute_energy:             # a conversion stopped after its last tile
            from .hypercube_maintenance import recompute_col_energy

            energy = recompute_col_energy(path, comm=comm)
        return {"converted": False, "norm.mode": mode, "col_energy": energy, "tiles": 0, "recovered": 0}
    journal = 0 if have_backup else dataset_bytes((comm.Get_size(), max(b - a for a, b in plan.tiles)) + plan.shape[1:], "f4")
    require_free_space(path, journal, "convert-norm (its per-rank tile backups)", comm)
    start = agree(file_size(path) if comm.Get_rank() == 0 else None, comm)
    with open_h5(path, "r+", comm) as f:
        _start(f, plan, comm, start)
        recovered = _restore_interrupted(f, plan, comm)
        _ensure_slots(f, plan, comm, start)
        _convert_tiles(f, plan, comm)
        _finish(f, plan, comm)
    energy = None
    if recompute_energy:
        from .hypercube_maintenance import recompute_col_energy

        energy = recompute_col_energy(path, comm=comm)
    _LOG.info("convert-norm %s: %s -> %s over %d S-tiles%s", path, plan.current, to_mode, len(plan.tiles),
              f" (resumed, {recovered} tile(s) restored from their backup)" if plan.resuming else "")
    return {"converted": True, "norm.mode": to_mode, "col_energy": energy, "tiles": len(plan.tiles),
            "recovered": recovered}


def _plan(f, path: str, to_mode: str, comm) -> _Conversion | None:
    """Check the cube and compute the factor; None when there is nothing to do.  Collective (read-only)."""
    models = require_usable_models(f, comm, allow_converting=True)
    attrs = f[lay.HYPERCUBE].attrs
    current = str(attrs.get("norm.mode", ""))
    converting = str(attrs.get(CONVERTING_ATTR, ""))
    if converting and converting != to_mode:
        raise InputError(f"{lay.HYPERCUBE}: an interrupted conversion to norm {converting!r} must be finished first: "
                         f"`cubefit_mpi convert-norm {path} --to {converting}`")
    if current == to_mode and not converting:
        return None
    if not converting:
        _refuse_filtered(models, path, to_mode)
    if lay.LOSVD_AMP_SUM not in f:
        raise InputError(f"{lay.LOSVD_AMP_SUM}: dataset missing; rebuild with `cubefit_mpi build {path} --force`")
    amp_sum = np.asarray(f[lay.LOSVD_AMP_SUM][...], dtype=np.float64)
    computed = None
    if lay.DATA_FLUX in f:
        flux = np.asarray(f[lay.DATA_FLUX][...], dtype=np.float64)
    elif lay.DATACUBE in f:
        mask = np.asarray(f[lay.MASK][...], dtype=bool) if lay.MASK in f else None
        part = np.zeros(amp_sum.size)
        lo, hi = block_range(amp_sum.size, comm.Get_size(), comm.Get_rank())
        if hi > lo:
            part[lo:hi] = masked_mean_flux(np.asarray(f[lay.DATACUBE][lo:hi]), mask)
        flux = computed = allreduce_sum(part, comm)
    else:
        raise InputError(f"{lay.DATA_FLUX}: missing and no {lay.DATACUBE} to compute it from")
    try:
        factor = norm_factor(to_mode, amp_sum, flux)
    except ValueError as exc:
        raise InputError(f"{lay.DATA_FLUX}: {exc}; cannot convert between norm modes") from None
    s_chunk = models.chunks[0] if models.chunks else max(1, models.shape[0])
    return _Conversion(path, current, to_mode, bool(converting), factor, computed,
                       tile_bounds(models.shape[0], s_chunk), tuple(models.shape))


def _refuse_filtered(models, path: str, to_mode: str) -> None:
    """Refuse a compressed (filtered) hypercube.  Local.

    Rewriting a compressed chunk in place makes HDF5 allocate it anew and update the chunk index
    and the file's free space: metadata that a kill or a full disk can leave half-written, which
    the tile journal cannot undo.  Only an uncompressed cube (chunks allocated once, rewritten in
    place: raw data only) is converted in place.
    """
    filters = models.id.get_create_plist().get_nfilters()
    if filters:
        label = str(models.file[lay.HYPERCUBE].attrs.get("compression", models.compression or "filtered"))
        raise InputError(f"{lay.MODELS}: compressed ({label}); convert-norm rewrites the cube in place, which is "
                         f"crash-safe only uncompressed: run `cubefit_mpi recompress {path} --compression none`, "
                         f"`cubefit_mpi convert-norm {path} --to {to_mode}`, then `cubefit_mpi recompress {path} "
                         f"--compression {label}`")


def _start(f, plan: _Conversion, comm, start: int) -> None:
    """Create the journal and set ``norm.converting_to``, flushed, before any tile is touched.  Collective.

    A resumed conversion keeps its journal.  A journal without ``_convert_state`` means the kill
    came before the first flush, so no tile was touched: the conversion starts afresh.  Every
    journal dataset is allocated and written in full here, so the tile loop changes no HDF5
    metadata and a kill during it cannot damage the file's structure.
    """
    if plan.resuming and STATE in f and SLOT in f:
        return
    for name in JOURNAL:
        if name in f:
            del f[name]
    root = comm.Get_rank() == 0
    n_tiles = len(plan.tiles)
    for name, dtype, value in ((STATE, np.uint8, 0), (SLOT, np.int32, -1)):
        dset = replace_dataset(f, name, (n_tiles,), dtype)
        write_block(dset, (0,) if root else None, np.full(n_tiles, value, dtype=dtype) if root else None)
    if plan.flux is not None:
        dset = replace_dataset(f, lay.DATA_FLUX, plan.flux.shape, "f8")
        write_block(dset, (0,) if root else None, plan.flux if root else None)
    _make_backup(f, plan, comm)
    f[lay.HYPERCUBE].attrs[CONVERTING_ATTR] = plan.target
    reserved_flush(f, "the convert-norm journal", comm, start, [f[BACKUP]])   # no room: nothing written yet


def _make_backup(f, plan: _Conversion, comm) -> None:
    """``_convert_backup`` with one slot per rank, contiguous and allocated now.  Collective."""
    if BACKUP in f:
        del f[BACKUP]
    s_chunk = max(s1 - s0 for s0, s1 in plan.tiles)
    f.create_dataset(BACKUP, shape=(comm.Get_size(), s_chunk) + plan.shape[1:], dtype="f4", dcpl=allocated_now(),
                     fill_time="never")


def _ensure_slots(f, plan: _Conversion, comm, start: int) -> None:
    """A backup with a slot for every rank of this run (after the restore, no backup is needed).  Collective."""
    if BACKUP not in f or f[BACKUP].shape[0] < comm.Get_size():
        reserved_flush(f, "the convert-norm backups", comm)
        start = agree(file_size(f.filename) if comm.Get_rank() == 0 else None, comm)
        _make_backup(f, plan, comm)
        reserved_flush(f, "the convert-norm backups", comm, start, [f[BACKUP]])


def _deal(indices: list, comm) -> list:
    lo, hi = block_range(len(indices), comm.Get_size(), comm.Get_rank())
    return padded_schedule(indices[lo:hi], comm)


def _one_element(dset, index: int | None, value, dtype) -> None:
    write_block(dset, None if index is None else (index,), None if index is None else np.array([value], dtype=dtype))


def _restore_interrupted(f, plan: _Conversion, comm) -> int:
    """Tiles in state 1 (a kill hit them mid-way): scaled again from their backup.  Collective."""
    state = np.asarray(f[STATE][...])
    slot = np.asarray(f[SLOT][...])
    models, backup = f[lay.MODELS], f[BACKUP]
    todo = [int(t) for t in np.flatnonzero(state == 1)]
    for t in _deal(todo, comm):
        block = None
        if t is not None:
            s0, s1 = plan.tiles[t]
            block = read_block(backup, (int(slot[t]), 0, 0, 0, 0), (1, s1 - s0) + plan.shape[1:])[0]
            block = plan.scaled(block, s0, s1)
        else:
            read_block(backup, None, None)
        write_block(models, None if t is None else (plan.tiles[t][0], 0, 0, 0), block)
        f.flush()
        _one_element(f[STATE], t, 2, np.uint8)
        f.flush()
    return len(todo)


def _convert_tiles(f, plan: _Conversion, comm) -> None:
    """Tiles in state 0 through the four journal steps, one tile per rank and round.  Collective."""
    state = np.asarray(f[STATE][...])
    models, backup = f[lay.MODELS], f[BACKUP]
    slot = comm.Get_rank()
    todo = [int(t) for t in np.flatnonzero(state == 0)]
    schedule = _deal(todo, comm)
    for round_no, t in enumerate(schedule):
        block = offset = None
        if t is not None:
            s0, s1 = plan.tiles[t]
            offset = (s0, 0, 0, 0)
            block = read_block(models, offset, (s1 - s0,) + plan.shape[1:])
        else:
            read_block(models, None, None)
        write_block(backup, None if t is None else (slot, 0, 0, 0, 0), None if t is None else block[None])
        f.flush()
        _one_element(f[SLOT], t, slot, np.int32)
        _one_element(f[STATE], t, 1, np.uint8)
        f.flush()
        write_block(models, offset, None if t is None else plan.scaled(block, *plan.tiles[t]))
        f.flush()
        _one_element(f[STATE], t, 2, np.uint8)
        f.flush()
        _LOG.debug("convert round: %d/%d", round_no + 1, len(schedule))


def _finish(f, plan: _Conversion, comm) -> None:
    """Flip ``norm.mode``, give the models a new version, drop the journal.  Collective."""
    if not np.all(np.asarray(f[STATE][...]) == 2):
        raise RuntimeError(f"convert-norm {plan.path}: some tiles are not converted; run it again")
    attrs = f[lay.HYPERCUBE].attrs
    attrs["norm.mode"] = plan.target
    if lay.COL_ENERGY in f:
        f[lay.COL_ENERGY].attrs[ENERGY_STALE] = True
    mark_models_changed(f, comm)
    del attrs[CONVERTING_ATTR]
    _drop_journal(f)
    f.flush()


def _drop_journal(f) -> None:
    for name in JOURNAL:
        if name in f:
            del f[name]
