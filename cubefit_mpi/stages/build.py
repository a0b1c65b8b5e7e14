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

import numpy as np

from ..config.errors import InputError, WriteFailure
from ..config.knobs import get_knobs
from ..io import layout as lay
from ..io.blocks import read_block, write_block
from ..io.datasets import default_chunks, parse_compression
from ..io.h5file import open_h5, open_uncached
from ..io.hypercube_state import mark_models_changed
from ..io.validation import validate_inputs
from ..numerics.column_energy import pixel_weights, tile_energy
from ..numerics.convolve import FFTConvolver, needed_template_range
from ..numerics.digest import array_digest, rows_digest
from ..numerics.kernels import AMP_MODES, interpolation_matrix, losvd_amplitude, unit_kernels
from ..numerics.normalization import NORM_MODES, masked_mean_flux, spaxel_scale
from ..numerics.rebin import rebin_sparse
from ..parallel.collectives import agree, allreduce_sum, raise_if_any
from ..parallel.comm import get_comm, mpi
from ..parallel.decomposition import block_range, padded_schedule, tile_bounds
from ..parallel.output import Progress
from ..parallel.threads import limit_blas_threads
from ..parallel.timers import PhaseTimer

_LOG = logging.getLogger("cubefit_mpi.build")


# ---------------------------------------------------------------------------------------------
# small helpers (local)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# the build
# ---------------------------------------------------------------------------------------------
class _Inputs:
    """Everything every rank needs (small arrays) plus this rank's amplitudes and scales."""

    def __init__(self, f, norm_mode: str, amp_mode: str, comm):
        info = validate_inputs(f, check_data=(norm_mode == "data"), comm=comm)
        self.dims = info["dims"]
        self.mask = info["mask"]
        S, L, T = self.dims.S, self.dims.L, self.dims.T
        if lay.R_T not in f:
            raise InputError(f"{lay.R_T}: dataset missing from {f.filename}; create it with "
                             f"H5Manager(path).ensure_rebin_and_resample()")
        self.templates = np.asarray(f[lay.TEMPLATES][...], dtype=np.float64)
        rebin_dense = np.asarray(f[lay.R_T][...], dtype=np.float64)
        self.rebin_mode = str(f[lay.R_T].attrs.get("rebin.mode", "external"))
        try:
            self.rebin_lt = rebin_sparse(rebin_dense, T, L)
        except ValueError as exc:
            raise InputError(f"{lay.R_T}: {exc}") from None
        vel = info["vel_pix"]
        self.vel_pix = vel
        self.interp, self.shifts = interpolation_matrix(vel, float(info["tem_pix"][1] - info["tem_pix"][0]))
        self.fingerprint = array_digest(self.templates, rebin_dense, info["tem_pix"], info["obs_pix"], vel, self.mask)
        # only the template pixels the observed grid and the velocity guard need are convolved
        self.template_range = needed_template_range(self.rebin_lt, self.shifts, T)
        lo, hi = self.template_range
        self.crop_note = None
        if (lo, hi) != (0, T):
            self.templates = np.ascontiguousarray(self.templates[:, lo:hi])
            self.rebin_lt = self.rebin_lt[:, lo:hi].tocsr()
            lam = np.exp(info["tem_pix"])
            self.crop_note = (f"templates cropped to pixels {lo}:{hi} of {T} ({lam[lo]:.2f}-{lam[hi - 1]:.2f} A of "
                              f"{lam[0]:.2f}-{lam[-1]:.2f} A): all the observed grid and the "
                              f"{float(np.max(np.abs(vel))):g} km/s velocity guard need")
        # amplitudes (and data flux) for all spaxels: read by rank slabs, combined with Allreduce
        amp = np.zeros((S, self.dims.C))
        flux = np.zeros(S) if norm_mode == "data" else None
        start, stop = block_range(S, comm.Get_size(), comm.Get_rank())
        error, digest = None, 0
        try:
            for lo, hi in tile_bounds(stop - start, 2048):
                lo, hi = lo + start, hi + start
                losvd = np.asarray(f[lay.LOSVD][lo:hi], dtype=np.float64)
                digest ^= rows_digest(losvd, lo)
                amp[lo:hi] = losvd_amplitude(losvd, vel, amp_mode)
                _, empty = unit_kernels(losvd, self.interp)
                bad = empty & (amp[lo:hi] != 0)
                if bad.any():
                    s, c = np.argwhere(bad)[0]
                    raise InputError(f"{lay.LOSVD}: row [{lo + s}, :, {c}] gives an all-zero kernel on the template "
                                     f"grid but its amplitude is {amp[lo + s, c]:.3g}; expected a LOSVD resolved by "
                                     f"{lay.VEL_PIX} (or an all-zero row)")
                if flux is not None and lay.DATA_FLUX not in f:
                    flux[lo:hi] = masked_mean_flux(np.asarray(f[lay.DATACUBE][lo:hi]), self.mask)
        except InputError as exc:
            error = exc
        raise_if_any(error, comm)
        self.amp = allreduce_sum(amp, comm)
        self.fingerprint += "-" + format(comm.allreduce(digest, op=mpi().BXOR), "x")
        self.data_flux = None
        self.flux_computed = False
        if norm_mode == "data":
            if lay.DATA_FLUX in f:
                self.data_flux = np.asarray(f[lay.DATA_FLUX][...], dtype=np.float64)
                if self.data_flux.shape != (S,):
                    raise InputError(f"{lay.DATA_FLUX}: expected shape ({S},), got {self.data_flux.shape}")
            else:
                self.data_flux = allreduce_sum(flux, comm)
                self.flux_computed = True
            bad = ~np.isfinite(self.data_flux) | ((self.data_flux <= 0) & (self.amp.sum(axis=1) > 0))
            if bad.any():
                raise InputError(f"{lay.DATA_FLUX}: {int(bad.sum())} spaxel(s) (first {int(np.argmax(bad))}) have a "
                                 f"non-positive or non-finite masked mean flux; norm='data' needs flux > 0")
        self.scale = spaxel_scale(self.amp, norm_mode, self.data_flux)


def compute_unit(conv: FFTConvolver, inp: _Inputs, kernels: np.ndarray, s0: int, s1: int,
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


def build_hypercube(path: str, norm_mode: str = "model", amp_mode: str = "sum", S_chunk: int | None = None,
                    C_chunk: int | None = None, P_chunk: int | None = None, compression: str | None = None,
                    comm=None, *, force: bool = False) -> dict:
    """Build (or finish) ``/HyperCube/models``.  Collective over comm.

    Parameters
    ----------
    path : str
        Cube file with the spec's inputs (``/Templates``, ``/TemPix``, ``/ObsPix``, ``/R_T``,
        ``/LOSVD``, ``/VelPix``; ``/DataCube`` or ``/HyperCube/data_flux`` for ``norm="data"``).
    norm_mode : {"model", "data"}
    amp_mode : {"sum", "trapz"}
    S_chunk, C_chunk, P_chunk : int, optional
        Chunk shape of ``/HyperCube/models`` (default: about 8 MiB chunks over all P).
    compression : {"gzip[:level]", "lzf", "none"}, optional
    force : bool
        Discard an existing hypercube (any parameters) and build anew.

    Returns
    -------
    dict with ``units_total``, ``units_built``, ``units_skipped``, ``seconds``, ``chunks``.

    An existing, unfinished hypercube with the same parameters and inputs is resumed; one with
    other parameters is an :class:`InputError` unless ``force``.
    """
    comm = get_comm(comm)
    t_start = time.perf_counter()
    limit_blas_threads(comm, get_knobs().blas_threads)
    if norm_mode not in NORM_MODES:
        raise InputError(f"--norm {norm_mode}: expected one of {', '.join(NORM_MODES)}")
    if amp_mode not in AMP_MODES:
        raise InputError(f"--amp {amp_mode}: expected one of {', '.join(AMP_MODES)}")
    with open_h5(path, "r", comm) as f:
        inp = _Inputs(f, norm_mode, amp_mode, comm)
        existing = None if force else _existing_build(f)
    d = inp.dims
    if existing is not None:           # unspecified layout options follow the existing build
        if S_chunk is None and C_chunk is None and P_chunk is None and existing["chunks"]:
            S_chunk, C_chunk, P_chunk = existing["chunks"]
        if compression is None:
            compression = (existing["compression"] or "none").replace(":None", "")
    filt, filt_opt = parse_compression(compression, comm.Get_size())
    chunks = _resolve_chunks(d, S_chunk, C_chunk, P_chunk)
    params = {"norm.mode": norm_mode, "amp.mode": amp_mode, "rebin.mode": inp.rebin_mode,
              "chunks": list(chunks), "compression": f"{filt}:{filt_opt}" if filt else "none",
              "inputs.fingerprint": inp.fingerprint}
    resume = False
    if existing is not None:
        if existing != params:
            diff = {k: (existing.get(k), v) for k, v in params.items() if existing.get(k) != v}
            raise InputError(f"{lay.MODELS}: exists with other parameters {diff} (stored, requested); "
                             f"use `cubefit_mpi convert-norm` for a norm flip, or --force to rebuild")
        resume = True
    grid = tuple(-(-n // k) for n, k in zip((d.S, d.C, d.P), chunks))
    with open_h5(path, "r+", comm) as f:
        if not resume:
            _create_datasets(f, d, chunks, grid, filt, filt_opt, params)
        _write_norm_datasets(f, inp, comm)
        f[lay.HYPERCUBE].attrs["templates.range"] = np.asarray(inp.template_range + (d.T,), dtype=np.int64)
    if inp.crop_note and comm.Get_rank() == 0:
        _LOG.info(inp.crop_note)
    # closed once: an uncompressed hypercube is now allocated in full, so writing tiles changes
    # no HDF5 metadata and a crash or a full disk mid-build cannot corrupt the file
    with open_h5(path, "r+", comm) as f:
        done = np.asarray(f[lay.DONE][...], dtype=bool)
        models, done_dset = open_uncached(f, lay.MODELS), f[lay.DONE]
        s_tiles = tile_bounds(d.S, chunks[0])
        c_tiles = tile_bounds(d.C, chunks[1])
        units = [(si, ci) for si in range(grid[0]) for ci in range(grid[1])]
        pending = [u for u in units if not done[u].all()]
        finished = [u for u in units if done[u].all()]
        if resume and comm.Get_rank() == 0:
            _LOG.info("resuming %s: %d of %d units already built", path, len(finished), len(units))
        lo, hi = block_range(len(pending), comm.Get_size(), comm.Get_rank())
        mine = pending[lo:hi]
        knobs = get_knobs()
        conv = FFTConvolver(inp.templates, inp.shifts, threads=knobs.fft_threads) if mine else None
        energy = np.zeros((d.C, d.P))
        used = pixel_weights(d.L, inp.mask)
        progress = Progress(len(pending), "build", comm)
        timer = PhaseTimer()
        done_map = done.copy()                          # rank 0 keeps the bitmap it writes
        unsynced: list = []                             # my units written since the last checkpoint
        last_checkpoint = time.perf_counter()
        schedule = padded_schedule(mine, comm)
        for round_no, unit in enumerate(schedule):
            tile = None
            if unit is not None:
                (s0, s1), (c0, c1) = s_tiles[unit[0]], c_tiles[unit[1]]
                with timer.phase("io"):
                    losvd = np.asarray(f[lay.LOSVD][s0:s1], dtype=np.float64)
                with timer.phase("compute"):
                    kernels, _ = unit_kernels(losvd, inp.interp)                 # (s, C, K)
                    tile = compute_unit(conv, inp, kernels, s0, s1, c0, c1)
                    energy[c0:c1] += tile_energy(tile, used)
                unsynced.append(unit)
            with timer.phase("comm"):
                n_done = progress.update(0 if unit is None else 1)
                due = agree(time.perf_counter() - last_checkpoint >= knobs.build_checkpoint_sec
                            if comm.Get_rank() == 0 else None, comm) or round_no == len(schedule) - 1
            try:
                with timer.phase("io"):
                    write_block(models, None if tile is None else (s0, c0, 0, 0), tile)
                    if due:       # checkpoint: tiles on disk first, then their done bits
                        f.flush()
                        with timer.phase("comm"):
                            newly = comm.allgather(unsynced)
                        for units_of_rank in newly:
                            for u in units_of_rank:
                                done_map[u] = True
                        root = comm.Get_rank() == 0
                        write_block(done_dset, (0, 0, 0) if root else None,
                                    done_map.astype(np.uint8) if root else None)
                        f.flush()
                        unsynced, last_checkpoint = [], time.perf_counter()
            except (OSError, RuntimeError) as exc:
                raise WriteFailure(f"{path}: writing {lay.MODELS} failed ({str(exc).splitlines()[0]}); "
                                   f"is the disk full? Tiles already marked in {lay.DONE} are valid: "
                                   f"rerun `cubefit_mpi build {path}` to resume") from exc
            _LOG.debug("build round: %d/%d units written%s", n_done, len(pending), ", checkpoint" if due else "")
        f.flush()
        # energy of the units built by earlier runs: read back from the stored tiles
        lo, hi = block_range(len(finished), comm.Get_size(), comm.Get_rank())
        for unit in padded_schedule(finished[lo:hi], comm):
            if unit is None:
                read_block(models, None, None)
                continue
            (s0, s1), (c0, c1) = s_tiles[unit[0]], c_tiles[unit[1]]
            tile = read_block(models, (s0, c0, 0, 0), (s1 - s0, c1 - c0, d.P, d.L))
            energy[c0:c1] += tile_energy(tile, used)
        with timer.phase("comm"):
            col_energy = allreduce_sum(energy, comm)
        write_block(f[lay.COL_ENERGY], (0, 0) if comm.Get_rank() == 0 else None,
                    col_energy if comm.Get_rank() == 0 else None)
        f[lay.COL_ENERGY].attrs["weighted"] = False
        f[lay.COL_ENERGY].attrs["masked"] = inp.mask is not None
        all_done = bool(np.asarray(f[lay.DONE][...]).all())
        f[lay.HYPERCUBE].attrs["complete"] = all_done
        if pending:
            mark_models_changed(f, comm)
    seconds = time.perf_counter() - t_start
    _LOG.info("build %s: %d units built, %d skipped, complete=%s, %.1fs on %d ranks",
              path, len(pending), len(finished), all_done, seconds, comm.Get_size())
    return {"units_total": len(units), "units_built": len(pending), "units_skipped": len(finished),
            "seconds": seconds, "chunks": chunks, "complete": all_done, "phases": dict(timer.seconds),
            "phases_by_rank": timer.by_rank(comm)}


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
    return {k: (list(int(v) for v in a[k]) if k == "chunks" else str(a[k])) if k in a else None
            for k in ("norm.mode", "amp.mode", "rebin.mode", "chunks", "compression", "inputs.fingerprint")}


def _create_datasets(f, d, chunks, grid, filt, filt_opt, params) -> None:
    """(Re)create the hypercube datasets and attributes.  Collective over the file's comm."""
    if lay.HYPERCUBE in f:
        for name in (lay.MODELS, lay.DONE, lay.COL_ENERGY):
            if name in f:
                del f[name]
    group = f.require_group(lay.HYPERCUBE)
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    if filt is None:                     # allocate everything now; never write fill values (1 TB of zeros)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    f.create_dataset(lay.MODELS, shape=(d.S, d.C, d.P, d.L), dtype="f4", chunks=chunks + (d.L,),
                     compression=filt, compression_opts=filt_opt, dcpl=dcpl, fill_time="never")
    f.create_dataset(lay.DONE, shape=grid, dtype="u1", fillvalue=0)
    f.create_dataset(lay.COL_ENERGY, shape=(d.C, d.P), dtype="f8", fillvalue=0.0)
    for key, value in params.items():
        group.attrs[key] = np.asarray(value, dtype=np.int64) if key == "chunks" else value
    group.attrs["complete"] = False
    group.attrs["tile_grid"] = np.asarray(grid, dtype=np.int64)


def _write_norm_datasets(f, inp: _Inputs, comm) -> None:
    """``/HyperCube/norm/losvd_amp (S, C)``, ``losvd_amp_sum (S,)`` and (if computed) ``data_flux``."""
    d = inp.dims
    targets = [(lay.LOSVD_AMP, inp.amp), (lay.LOSVD_AMP_SUM, inp.amp.sum(axis=1))]
    if inp.flux_computed:
        targets.append((lay.DATA_FLUX, inp.data_flux))
    for name, values in targets:
        if name in f and f[name].shape != values.shape:
            del f[name]
        if name not in f:
            f.create_dataset(name, shape=values.shape, dtype="f8")
        lo, hi = block_range(d.S, comm.Get_size(), comm.Get_rank())
        offset = (lo,) + (0,) * (values.ndim - 1)
        write_block(f[name], offset if hi > lo else None, values[lo:hi] if hi > lo else None)
    f[lay.LOSVD_AMP].attrs["amp.mode"] = f[lay.HYPERCUBE].attrs["amp.mode"]
