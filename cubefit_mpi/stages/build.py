"""Stage ``build``: fill ``/HyperCube/models (S, C, P, L) float32`` under MPI, resumably.

For every spaxel s and component c: the unit-area kernel from ``/LOSVD[s, :, c]``, one FFT
convolution with all P templates (template FFTs once per rank, one batched inverse FFT per
(s, c)), the sparse rebin ``@ /R_T``, ``max(0, ·)``, the normalisation scale, float32.

Work comes in *units*: one S-tile × one C-tile of the chunk grid, all populations (so every
(s, c) is computed with the same FFT plan whatever the chunk shape: the bytes do not depend on
chunks or ranks).  Units are dealt to ranks in contiguous balanced blocks; each round every rank
writes its unit collectively (an empty selection when it has none left), the file is flushed,
then the units' bits in ``/HyperCube/_done (nS_tiles, nC_tiles, nP_tiles)`` are set.  A killed
build restarts from the bitmap; ``col_energy`` is then completed from the stored tiles of the
earlier runs, so it always covers all tiles.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from ..config.errors import InputError, WriteFailure
from ..config.knobs import get_knobs
from ..config.options import keyword_checked
from ..io import layout as lay
from ..io.blocks import read_block, write_block
from ..io.datasets import allocated_now, default_chunks, parse_compression, replace_dataset
from ..io.h5file import open_h5, open_uncached
from ..io.hypercube_state import CONVERTING_ATTR, RECOMPRESS_OLD, RECOMPRESS_TMP, mark_models_changed
from ..io.manager import H5Manager
from ..io.model_inputs import ModelInputs, check_modes
from ..io.validation import validate_inputs
from ..numerics.column_energy import pixel_weights, tile_energy
from ..numerics.convolve import FFTConvolver
from ..numerics.factored import factors_are_exact, kernel_weights, lit_model_tile, template_basis

from ..numerics.kernels import DEFAULT_AMP, unit_kernels
from ..numerics.normalization import DEFAULT_NORM
from ..parallel.collectives import agree, allreduce_sum
from ..parallel.comm import get_comm
from ..parallel.decomposition import block_range, padded_schedule, tile_bounds
from ..parallel.output import Progress
from ..parallel.threads import limit_blas_threads
from ..parallel.timers import PhaseTimer

_LOG = logging.getLogger("cubefit_mpi.build")



def build_method(inp: ModelInputs, resuming: str | None = None) -> str:
    """``gemm`` or ``fft`` for these inputs (``CUBEFIT_BUILD_METHOD``; ``auto``: gemm when the
    factors are exact, or the method of the build being resumed, so its bytes stay one method's).  Local.

    The GEMM fills a unit with one product of the kernel weights and the template basis
    (:func:`~cubefit_mpi.numerics.factored.model_tile`); measured faster than the FFTs here
    (``benchmarks/build.py``).  It is not used where the builder's ``max(0, ·)`` could act
    (negative templates or ``/R_T`` weights): there only the FFT path is the spec's hypercube.
    """
    method = get_knobs().build_method
    exact = factors_are_exact(inp.templates, inp.rebin_lt) is None
    if method == "gemm" and not exact:
        raise InputError(f"CUBEFIT_BUILD_METHOD=gemm: {factors_are_exact(inp.templates, inp.rebin_lt)}; use fft or auto")
    if method == "auto" and resuming is not None:
        return resuming
    return "gemm" if method == "gemm" or (method == "auto" and exact) else "fft"


def _unit_filler(inp: ModelInputs, method: str, knobs):
    """``fill(kernels (n, C, K), s0, s1, c0, c1) -> (n, c1-c0, P, L) float32``.  Local."""
    if method == "gemm":
        basis = template_basis(inp.templates, inp.shifts, inp.rebin_lt)

        def fill(kernels, s0, s1, c0, c1):            # (s, c) without light: zeros, no product
            return lit_model_tile(kernel_weights(kernels[:, c0:c1], inp.scale[s0:s1, c0:c1]), basis)
    else:
        conv = FFTConvolver(inp.templates, inp.shifts, threads=knobs.fft_threads)

        def fill(kernels, s0, s1, c0, c1):
            return compute_unit(conv, inp, kernels, s0, s1, c0, c1)
    return fill


def compute_unit(conv: FFTConvolver, inp: ModelInputs, kernels: np.ndarray, s0: int, s1: int,
                 c0: int, c1: int) -> np.ndarray:
    """Models ``(s1-s0, c1-c0, P, L)`` float32 of one unit.  Local.

    ``kernels`` are the unit-area kernels ``(s1-s0, C, K)`` of the unit's spaxels.
    """
    P, L = inp.dims.P, inp.dims.L
    out = np.empty((s1 - s0, c1 - c0, P, L), dtype=np.float32)
    for i, s in enumerate(range(s0, s1)):
        for j, c in enumerate(range(c0, c1)):
            scale = inp.scale[s, c]
            if scale == 0.0:
                out[i, j] = 0.0
                continue
            on_template_grid = conv.convolve(kernels[i, c])                 # (P, T)
            rebinned = inp.rebin_lt @ on_template_grid.T                     # (L, P)
            target = out[i, j]                                               # (P, L) float32
            np.multiply(rebinned.T, scale, out=target, casting="same_kind")  # scale > 0: clip after
            np.maximum(target, 0.0, out=target)
    return out


@keyword_checked
def build_hypercube(path: str, norm_mode: str = DEFAULT_NORM, amp_mode: str = DEFAULT_AMP, S_chunk: int | None = None,
                    C_chunk: int | None = None, P_chunk: int | None = None, compression: str | None = None,
                    comm=None, *, force: bool = False, rebin_mode: str = "overlap") -> dict:
    """Build (or finish) ``/HyperCube/models``.  Collective over comm.

    Parameters
    ----------
    path : str
        Cube file with the spec's inputs (``/Templates``, ``/TemPix``, ``/ObsPix``, ``/LOSVD``,
        ``/VelPix``; ``/DataCube`` or ``/HyperCube/data_flux`` for ``norm="data"``).  A missing
        ``/R_T`` is created first (``rebin_mode``, logged).
    norm_mode : {"model", "data"}
    amp_mode : {"sum", "trapz"}
    S_chunk, C_chunk, P_chunk : int, optional
        Chunk shape of ``/HyperCube/models`` (default: about 8 MiB chunks over all P).
    compression : {"gzip[:level]", "lzf", "none"}, optional
    force : bool
        Discard an existing hypercube (any parameters) and build anew.
    rebin_mode : {"overlap", "interp"}
        How ``/R_T`` is made when the file has none (an existing ``/R_T`` is used as stored).

    Returns
    -------
    dict with ``units_total``, ``units_built``, ``units_skipped``, ``seconds``, ``chunks``,
    ``complete``, ``phases``, ``phases_by_rank``.

    An existing, unfinished hypercube with the same parameters and inputs is resumed; one with
    other parameters, or one left half-way through ``convert-norm``, is an :class:`InputError`
    unless ``force``.
    """
    comm = get_comm(comm)
    t_start = time.perf_counter()
    limit_blas_threads(comm, get_knobs().blas_threads)
    check_modes(norm_mode, amp_mode)
    with open_h5(path, "r", comm) as f:
        needs_rebin = lay.R_T not in f
        if needs_rebin:                      # bad inputs are refused before /R_T is written
            validate_inputs(f, check_data=(norm_mode == "data"), comm=comm)
    if needs_rebin:
        H5Manager(path, comm=comm).ensure_rebin_and_resample(rebin_mode, create_only=True)
    with open_h5(path, "r", comm) as f:
        inp = ModelInputs.read(f, norm_mode, amp_mode, comm)
        plan = _plan(f, inp, (S_chunk, C_chunk, P_chunk), compression, force, comm)
    if inp.crop_note and comm.Get_rank() == 0:
        _LOG.info(inp.crop_note)
    with open_h5(path, "r+", comm) as f:
        if not plan.resume:
            _create_datasets(f, inp.dims, plan)
        _write_norm_datasets(f, inp, comm)
        f[lay.HYPERCUBE].attrs["templates.range"] = np.asarray(inp.template_range + (inp.dims.T,), dtype=np.int64)
    # closed once: an uncompressed hypercube is now allocated in full, so writing tiles changes
    # no HDF5 metadata and a crash or a full disk mid-build cannot corrupt the file
    timer = PhaseTimer()
    with open_h5(path, "r+", comm) as f:
        done = np.asarray(f[lay.DONE][...], dtype=bool)
        units = [(si, ci) for si in range(plan.grid[0]) for ci in range(plan.grid[1])]
        pending = [u for u in units if not done[u].all()]
        finished = [u for u in units if done[u].all()]
        if plan.resume and comm.Get_rank() == 0:
            _LOG.info("resuming %s: %d of %d units already built", path, len(finished), len(units))
        energy = _fill_units(f, inp, plan, pending, done, timer, comm)
        energy += _stored_energy(f, inp, plan, finished, comm)
        all_done = _finish(f, inp, energy, bool(pending), timer, comm)
    seconds = time.perf_counter() - t_start
    _LOG.info("build %s: %d units built, %d skipped, complete=%s, %.1fs on %d ranks",
              path, len(pending), len(finished), all_done, seconds, comm.Get_size())
    return {"units_total": len(units), "units_built": len(pending), "units_skipped": len(finished),
            "seconds": seconds, "chunks": plan.chunks, "complete": all_done, "phases": dict(timer.seconds),
            "phases_by_rank": timer.by_rank(comm)}


@dataclass
class _Plan:
    """The layout of the build: chunks, tile grid, filter, the parameters stored as attributes."""

    chunks: tuple
    grid: tuple
    filt: str | None
    filt_opt: int | None
    params: dict
    resume: bool


def _plan(f, inp: ModelInputs, chunks_given, compression, force: bool, comm) -> _Plan:
    """Chunks, filter and parameters; whether an existing build is resumed.  Collective (reads only)."""
    existing = None if force else _existing_build(f)
    if existing is not None and existing.get("converting"):
        raise InputError(f"{lay.HYPERCUBE}: an interrupted conversion to norm {existing['converting']!r} must be "
                         f"finished first: `cubefit_mpi convert-norm {f.filename} --to {existing['converting']}` "
                         f"(or rebuild with --force)")
    S_chunk, C_chunk, P_chunk = chunks_given
    if existing is not None:           # unspecified layout options follow the existing build
        if S_chunk is None and C_chunk is None and P_chunk is None and existing["chunks"]:
            S_chunk, C_chunk, P_chunk = existing["chunks"]
        if compression is None:
            compression = (existing["compression"] or "none").replace(":None", "")
    filt, filt_opt = parse_compression(compression, comm.Get_size())
    d = inp.dims
    chunks = _resolve_chunks(d, S_chunk, C_chunk, P_chunk)
    params = {"norm.mode": inp.norm_mode, "amp.mode": inp.amp_mode, "rebin.mode": inp.rebin_mode,
              "build.method": build_method(inp, existing["build.method"] if existing is not None else None),
              "chunks": list(chunks), "compression": f"{filt}:{filt_opt}" if filt else "none",
              "inputs.fingerprint": inp.fingerprint}
    if existing is not None:
        stored = {k: existing.get(k) for k in params}
        if stored != params:
            diff = {k: (stored.get(k), v) for k, v in params.items() if stored.get(k) != v}
            raise InputError(f"{lay.MODELS}: exists with other parameters {diff} (stored, requested); "
                             f"use `cubefit_mpi convert-norm` for a norm flip, or --force to rebuild")
    grid = tuple(-(-n // k) for n, k in zip((d.S, d.C, d.P), chunks))
    return _Plan(chunks, grid, filt, filt_opt, params, resume=existing is not None)


def _fill_units(f, inp: ModelInputs, plan: _Plan, pending: list, done: np.ndarray, timer: PhaseTimer,
                comm) -> np.ndarray:
    """Compute and write this rank's share of ``pending`` units in collective rounds, with
    checkpoints (tiles flushed, then their done bits); returns this rank's column energy
    ``(C, P)``.  Collective over comm."""
    d = inp.dims
    models, done_dset = open_uncached(f, lay.MODELS), f[lay.DONE]
    s_tiles, c_tiles = tile_bounds(d.S, plan.chunks[0]), tile_bounds(d.C, plan.chunks[1])
    lo, hi = block_range(len(pending), comm.Get_size(), comm.Get_rank())
    mine = pending[lo:hi]
    knobs = get_knobs()
    fill = _unit_filler(inp, plan.params["build.method"], knobs) if mine else None
    energy = np.zeros((d.C, d.P))
    used = pixel_weights(d.L, inp.mask)
    progress = Progress(len(pending), "build", comm)
    checkpoint = _Checkpoint(f, done_dset, done, knobs.build_checkpoint_sec, comm)
    schedule = padded_schedule(mine, comm)
    for round_no, unit in enumerate(schedule):
        tile, offset = None, None
        if unit is not None:
            (s0, s1), (c0, c1) = s_tiles[unit[0]], c_tiles[unit[1]]
            offset = (s0, c0, 0, 0)
            with timer.phase("io"):
                losvd = np.asarray(f[lay.LOSVD][s0:s1], dtype=np.float64)
            with timer.phase("compute"):
                kernels, _ = unit_kernels(losvd, inp.interp)                 # (s, C, K)
                tile = fill(kernels, s0, s1, c0, c1)
                energy[c0:c1] += tile_energy(tile, used)
            checkpoint.unsynced.append(unit)
        with timer.phase("comm"):
            n_done = progress.update(0 if unit is None else 1)
            due = checkpoint.due() or round_no == len(schedule) - 1
        try:
            with timer.phase("io"):
                write_block(models, offset, tile)
                if due:
                    checkpoint.commit()
        except (OSError, RuntimeError) as exc:
            raise WriteFailure(f"{f.filename}: writing {lay.MODELS} failed ({str(exc).splitlines()[0]}); "
                               f"is the disk full? Tiles already marked in {lay.DONE} are valid: "
                               f"rerun `cubefit_mpi build {f.filename}` to resume") from exc
        _LOG.debug("build round: %d/%d units written%s", n_done, len(pending), ", checkpoint" if due else "")
    f.flush()
    return energy


class _Checkpoint:
    """The done bits follow the tiles: when due (every ``CUBEFIT_BUILD_CHECKPOINT_SEC``, and after
    the last round) the file is flushed, so the tiles written so far are on disk, and only then
    are their units' bits set and flushed.  A kill loses at most the work since the last one."""

    def __init__(self, f, done_dset, done: np.ndarray, interval: float, comm):
        self.f, self.dset, self.comm, self.interval = f, done_dset, comm, interval
        self.done_map = done.copy()                       # rank 0 writes the whole bitmap
        self.unsynced: list = []                          # my units written since the last commit
        self.last = time.perf_counter()

    def due(self) -> bool:
        """Rank 0's clock decides for everybody.  Collective over comm."""
        rank0 = self.comm.Get_rank() == 0
        return bool(agree(time.perf_counter() - self.last >= self.interval if rank0 else None, self.comm))

    def commit(self) -> None:
        """Flush the tiles, then set and flush the bits of every rank's units.  Collective over comm."""
        self.f.flush()
        for units in self.comm.allgather(self.unsynced):
            for unit in units:
                self.done_map[unit] = True
        root = self.comm.Get_rank() == 0
        write_block(self.dset, (0, 0, 0) if root else None, self.done_map.astype(np.uint8) if root else None)
        self.f.flush()
        self.unsynced, self.last = [], time.perf_counter()


def _stored_energy(f, inp: ModelInputs, plan: _Plan, finished: list, comm) -> np.ndarray:
    """Column energy ``(C, P)`` of the units built by earlier runs, read back from the stored
    tiles (this rank's share).  Collective over comm."""
    d = inp.dims
    models = open_uncached(f, lay.MODELS)
    s_tiles, c_tiles = tile_bounds(d.S, plan.chunks[0]), tile_bounds(d.C, plan.chunks[1])
    used = pixel_weights(d.L, inp.mask)
    energy = np.zeros((d.C, d.P))
    lo, hi = block_range(len(finished), comm.Get_size(), comm.Get_rank())
    for unit in padded_schedule(finished[lo:hi], comm):
        if unit is None:
            read_block(models, None, None)
            continue
        (s0, s1), (c0, c1) = s_tiles[unit[0]], c_tiles[unit[1]]
        tile = read_block(models, (s0, c0, 0, 0), (s1 - s0, c1 - c0, d.P, d.L))
        energy[c0:c1] += tile_energy(tile, used)
    return energy


def _finish(f, inp: ModelInputs, energy: np.ndarray, changed: bool, timer: PhaseTimer, comm) -> bool:
    """Store ``col_energy`` (summed over ranks) and ``complete``; a new ``models.version`` when
    tiles were written.  Returns ``complete``.  Collective over comm."""
    with timer.phase("comm"):
        col_energy = allreduce_sum(energy, comm)
    root = comm.Get_rank() == 0
    write_block(f[lay.COL_ENERGY], (0, 0) if root else None, col_energy if root else None)
    f[lay.COL_ENERGY].attrs["weighted"] = False
    f[lay.COL_ENERGY].attrs["masked"] = inp.mask is not None
    all_done = bool(np.asarray(f[lay.DONE][...]).all())
    f[lay.HYPERCUBE].attrs["complete"] = all_done
    if changed:
        mark_models_changed(f, comm)
    return all_done


def _resolve_chunks(d, S_chunk, C_chunk, P_chunk) -> tuple[int, int, int]:
    auto = default_chunks(d.S, d.C, d.P, d.L)
    chunks = []
    for name, given, n, default in (("S_chunk", S_chunk, d.S, auto[0]), ("C_chunk", C_chunk, d.C, auto[1]),
                                    ("P_chunk", P_chunk, d.P, auto[2])):
        if given is None:
            chunks.append(default)
        elif int(given) < 1:
            raise InputError(f"--chunks: {name}={given}, expected a positive integer")
        else:
            chunks.append(int(min(int(given), n)))
    if chunks[0] * chunks[1] * chunks[2] * d.L * 4 >= 2**32:
        raise InputError(f"--chunks {chunks}: a chunk must be smaller than 4 GiB (HDF5 limit)")
    return tuple(chunks)


def _existing_build(f) -> dict | None:
    if lay.MODELS not in f or lay.DONE not in f:
        return None
    a = f[lay.HYPERCUBE].attrs
    out = {k: (list(int(v) for v in a[k]) if k == "chunks" else str(a[k])) if k in a else None
           for k in ("norm.mode", "amp.mode", "rebin.mode", "chunks", "compression", "inputs.fingerprint")}
    out["build.method"] = str(a.get("build.method", "fft"))        # builds before the GEMM path used FFTs
    out["converting"] = str(a.get(CONVERTING_ATTR, "")) or None
    return out


def _create_datasets(f, d, plan: _Plan) -> None:
    """(Re)create the hypercube datasets and attributes.  Collective over the file's comm."""
    chunks, grid, filt, filt_opt, params = plan.chunks, plan.grid, plan.filt, plan.filt_opt, plan.params
    if lay.HYPERCUBE in f:
        for name in (lay.MODELS, lay.DONE, lay.COL_ENERGY, RECOMPRESS_TMP, RECOMPRESS_OLD):
            if name in f:
                del f[name]
        if CONVERTING_ATTR in f[lay.HYPERCUBE].attrs:
            del f[lay.HYPERCUBE].attrs[CONVERTING_ATTR]
    group = f.require_group(lay.HYPERCUBE)
    # uncompressed: allocate everything now; never write fill values (1 TB of zeros)
    dcpl = allocated_now() if filt is None else None
    f.create_dataset(lay.MODELS, shape=(d.S, d.C, d.P, d.L), dtype="f4", chunks=chunks + (d.L,),
                     compression=filt, compression_opts=filt_opt, dcpl=dcpl, fill_time="never")
    f.create_dataset(lay.DONE, shape=grid, dtype="u1", fillvalue=0)
    f.create_dataset(lay.COL_ENERGY, shape=(d.C, d.P), dtype="f8", fillvalue=0.0)
    for key, value in params.items():
        group.attrs[key] = np.asarray(value, dtype=np.int64) if key == "chunks" else value
    group.attrs["complete"] = False
    group.attrs["tile_grid"] = np.asarray(grid, dtype=np.int64)


def _write_norm_datasets(f, inp: ModelInputs, comm) -> None:
    """``/HyperCube/norm/losvd_amp (S, C)``, ``losvd_amp_sum (S,)`` and (if computed) ``data_flux``."""
    d = inp.dims
    targets = [(lay.LOSVD_AMP, inp.amp), (lay.LOSVD_AMP_SUM, inp.amp.sum(axis=1))]
    if inp.flux_computed:
        targets.append((lay.DATA_FLUX, inp.data_flux))
    for name, values in targets:
        dset = replace_dataset(f, name, values.shape, "f8")
        lo, hi = block_range(d.S, comm.Get_size(), comm.Get_rank())
        offset = (lo,) + (0,) * (values.ndim - 1)
        write_block(dset, offset if hi > lo else None, values[lo:hi] if hi > lo else None)
    f[lay.LOSVD_AMP].attrs["amp.mode"] = f[lay.HYPERCUBE].attrs["amp.mode"]
