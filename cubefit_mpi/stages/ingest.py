"""Stage ``ingest``: from an astronomer's files (FITS cube, template library, LOSVDs) to the layout.

Inputs (exact formats in ``docs/ingest.md``): a MUSE-like FITS cube (``DATA`` and optional
``STAT`` extensions, NAXIS3 = wavelength, spectral WCS in Å or nm), an optional bin map, a
template library (pPXF-style ``.npz`` or a directory of 1-D FITS spectra) and LOSVDs
(``.npz``/``.h5`` with ``losvd (n_bins, V, C)`` and ``vel (V,)``).

What it does (all collective over ``comm``):

1. Reads headers and small inputs, builds the observed grid (uniform in ln λ; a cube linear in λ
   is log-rebinned by exact overlap, :mod:`cubefit_mpi.numerics.rebin`) and the template grid
   (``oversample`` times finer, aligned, plus the LOSVD velocity guard); with ``data_fwhm`` and
   ``template_fwhm`` broadens the templates to the data's resolution on their own grid
   (:mod:`cubefit_mpi.numerics.resolution`), then log-rebins them.
2. Pass 1 over the cube: which spaxels have any usable value (finite data, finite variance >= 0).
3. Checks every input against the others (units, ranges, bin map shape and ids, LOSVD count);
   nothing is written before these checks pass.
4. Pass 2 into ``OUT.partial``: each spectrum (spaxel or bin) is owned by the rank whose block of
   cube row-slices holds its first member; the rank reads its slices (and any slices a bin of it
   reaches into), sums members in row-major order, log-rebins and writes its spectra in
   collective rounds.  Sums run in the same order at any rank count: the same bytes.
5. ``/Mask`` from ``--mask-ranges`` and bad pixels; validation; ``OUT.partial`` renamed to ``OUT``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..config.errors import InputError
from ..config.options import parse_ranges
from ..io import layout as lay
from ..io.blocks import write_block, write_owned_rows
from ..io.h5file import open_h5
from ..io.space import require_free_space
from ..io.ingest_readers import (
    CubeInfo, file_provenance, read_bin_map, read_cube_header, read_fwhm, read_losvd_meta, read_losvd_rows,
    read_templates
)
from ..io.layout import DATA_VAR, SPAXELS_BIN_MAP, SPAXELS_DROPPED, SPAXELS_N_MEMBERS, SPAXELS_YX, H5Dims
from ..io.manager import H5Manager
from ..numerics.constants import SPEED_OF_LIGHT_KMS
from ..numerics.rebin import BandedRebin, overlap_rebin, per_lnlambda_factor
from ..numerics.resolution import broaden, complete_range, fwhm_on_grid, sigma_difference
from ..numerics.wavelength_grids import centres, edges_from_centres, range_mask, template_edges, uniform_log_edges
from ..parallel.collectives import agree, allreduce_sum, check_all_ranks, raise_if_any
from ..parallel.comm import forget_on_abort, get_comm, mpi, on_abort
from ..parallel.decomposition import block_range, padded_schedule

_LOG = logging.getLogger("cubefit_mpi.stages.ingest")
READ_BUDGET_BYTES = 256 * 2**20


@dataclass(frozen=True)
class IngestOptions:
    """Options of ``ingest`` (the ``ingest`` section of the config file; see docs/ingest.md)."""

    cube: str
    templates: str
    losvd: str
    bins: str | None = None
    mask_ranges: tuple = ()
    velscale: float | None = None
    oversample: int = 2
    bin_combine: str = "sum"
    flux_density: str = "angstrom"
    rows_per_read: int = 0
    data_fwhm: float | str | None = None        # Å, or a two-column file (λ, FWHM); None = no matching
    template_fwhm: float | str | None = None

    @classmethod
    def from_config(cls, section: dict) -> "IngestOptions":
        """From the validated ``ingest`` section of :func:`~cubefit_mpi.pipeline.config.load_config`."""
        kwargs = {k: section[k] for k in ("cube", "templates", "losvd", "bins", "velscale", "oversample",
                                          "bin_combine", "flux_density", "rows_per_read", "data_fwhm",
                                          "template_fwhm")}
        return cls(mask_ranges=tuple(tuple(r) for r in parse_ranges(section.get("mask_ranges"))), **kwargs)


# ---------------------------------------------------------------------------------------------
# the cube, by row slices
# ---------------------------------------------------------------------------------------------
class _CubeRows:
    """Reads rows ``[y0, y1)`` of the cube as spectra ``(n_spaxels, L_lin)`` float64.  Local."""

    def __init__(self, info: CubeInfo):
        from astropy.io import fits

        self.info = info
        self.hdul = fits.open(info.path, memmap=True)

    def read(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Spectra of the spaxels of rows ``[y0, y1)`` (row-major) and their variances (or None).

        Unusable values (non-finite data, non-finite or negative variance) are NaN in both.
        """
        n_lam = self.info.shape[0]
        data = np.asarray(self.hdul[self.info.data_ext].section[:, y0:y1, :], dtype=np.float64)
        data = np.ascontiguousarray(data.reshape(n_lam, -1).T)
        bad = ~np.isfinite(data)
        var = None
        if self.info.stat_ext is not None:
            var = np.asarray(self.hdul[self.info.stat_ext].section[:, y0:y1, :], dtype=np.float64)
            var = np.ascontiguousarray(var.reshape(n_lam, -1).T)
            ok = np.isfinite(var)
            ok[ok] = var[ok] >= 0.0
            bad |= ~ok
            var[bad] = np.nan
        data[bad] = np.nan
        return data, var

    def close(self):
        self.hdul.close()


def _row_chunks(info: CubeInfo, rows_per_read: int) -> list[tuple[int, int]]:
    n_lam, ny, nx = info.shape
    if rows_per_read <= 0:
        per_row = n_lam * nx * 8 * (2 if info.stat_ext is not None else 1)
        rows_per_read = max(1, READ_BUDGET_BYTES // max(per_row, 1))
    return [(y, min(y + rows_per_read, ny)) for y in range(0, ny, rows_per_read)]


def _usable_spaxels(reader: _CubeRows, chunks, comm) -> np.ndarray:
    """``(ny*nx,) bool``: spaxels with at least one usable value (pass 1).  Collective over comm."""
    c0, c1 = block_range(len(chunks), comm.Get_size(), comm.Get_rank())
    parts = []
    for y0, y1 in chunks[c0:c1]:
        data, _ = reader.read(y0, y1)
        parts.append(np.isfinite(data).any(axis=1))
    mine = np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
    return np.concatenate(comm.allgather(mine))


# ---------------------------------------------------------------------------------------------
# the plan: everything checked before anything is written
# ---------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    info: CubeInfo
    obs_edges: np.ndarray
    cube_op: BandedRebin
    log_rebinned: bool
    tem_edges: np.ndarray
    templates: np.ndarray
    pop: dict
    vel: np.ndarray
    chunks: list
    target: np.ndarray          # (ny*nx,) int64 spectrum index of each spaxel, -1 unused
    n_targets: int
    n_members: np.ndarray       # (S,)
    dropped: np.ndarray         # (n, 2) int64 (y, x)
    ranges: list
    losvd_block: np.ndarray     # this rank's rows of the LOSVD
    provenance: list = field(default_factory=list)
    resolution: dict = field(default_factory=dict)   # /Templates attributes: what resolution matching did


def _observed_grid(info: CubeInfo, opts: IngestOptions) -> tuple[np.ndarray, BandedRebin, bool]:
    in_edges, kind = edges_from_centres(info.lam)
    native = (in_edges[-1] - in_edges[0]) / info.lam.size * SPEED_OF_LIGHT_KMS
    keep = kind == "log" and (opts.velscale is None or abs(opts.velscale / native - 1.0) < 1e-6)
    if keep:
        obs_edges = in_edges
    else:
        dln = (opts.velscale if opts.velscale is not None else native) / SPEED_OF_LIGHT_KMS
        try:
            obs_edges = uniform_log_edges(in_edges[0], in_edges[-1], dln)
        except ValueError as exc:
            raise InputError(f"--velscale: {exc}") from None
    op = overlap_rebin(in_edges, obs_edges, measure="lambda")
    if opts.flux_density == "lnlambda":
        op = op.scaled(per_lnlambda_factor(obs_edges))
    return obs_edges, op, not keep


def _fwhm_description(value, fwhm) -> str:
    if not isinstance(fwhm, tuple):
        return f"{fwhm:g}"
    lam, width = fwhm
    return (f"table {os.path.basename(os.fspath(value))} ({lam.size} rows, {lam[0]:.1f}-{lam[-1]:.1f} A, "
            f"FWHM {width.min():.4g}-{width.max():.4g} A)")


def _match_resolution(opts: IngestOptions, lam: np.ndarray, tem: np.ndarray, obs_lam: np.ndarray,
                      need: np.ndarray) -> tuple[np.ndarray, tuple[float, float], dict]:
    """Broaden the library ``tem (P, T0)`` on its grid ``lam (T0,)`` to the data's resolution.  Local.

    Returns the broadened templates, the range (Å) where they are complete and the
    ``/Templates`` attributes that record what was applied.
    """
    widths = {}
    for option, value in (("--data-fwhm", opts.data_fwhm), ("--template-fwhm", opts.template_fwhm)):
        fwhm = widths[option] = read_fwhm(value, option)
        if isinstance(fwhm, tuple) and (fwhm[0][0] > obs_lam[0] * (1 + 1e-9)
                                        or fwhm[0][-1] < obs_lam[1] * (1 - 1e-9)):
            raise InputError(f"{option} {value}: the table covers {fwhm[0][0]:.2f}-{fwhm[0][-1]:.2f} A but the "
                             f"observed pixels span {obs_lam[0]:.2f}-{obs_lam[1]:.2f} A")
    needed = (lam >= need[0]) & (lam <= need[1])
    try:
        sigma = sigma_difference(lam, fwhm_on_grid(lam, widths["--data-fwhm"]),
                                 fwhm_on_grid(lam, widths["--template-fwhm"]), check=needed)
    except ValueError as exc:
        raise InputError(f"--data-fwhm {opts.data_fwhm}: {exc} (--template-fwhm {opts.template_fwhm})") from None
    used = sigma[needed] if needed.any() else sigma
    attrs = {"resolution.matched": True,
             "resolution.data_fwhm": _fwhm_description(opts.data_fwhm, widths["--data-fwhm"]),
             "resolution.template_fwhm": _fwhm_description(opts.template_fwhm, widths["--template-fwhm"]),
             "resolution.sigma_min": float(used.min()), "resolution.sigma_max": float(used.max()),
             "resolution.method": "Gaussian of sigma^2 = (FWHM_data^2 - FWHM_tem^2) / (8 ln 2) A^2 at the source "
                                  "wavelength, on the library's grid before log-rebinning, flux-conserving "
                                  "(cubefit_mpi.numerics.resolution)"}
    return broaden(lam, tem, sigma), complete_range(lam, sigma), attrs


def _templates_on_grid(opts: IngestOptions, obs_edges: np.ndarray, tem_edges: np.ndarray,
                       vmax: float) -> tuple[np.ndarray, dict, dict]:
    lam, tem, pop = read_templates(opts.templates)
    try:
        in_edges, _ = edges_from_centres(lam)
    except ValueError as exc:
        raise InputError(f"--templates {opts.templates}: lam: {exc}") from None
    have, need = np.exp(in_edges[[0, -1]]), np.exp(tem_edges[[0, -1]])
    resolution, broadened = {"resolution.matched": False}, ""
    if opts.data_fwhm is not None:
        tem, complete, resolution = _match_resolution(opts, lam, tem, np.exp(centres(obs_edges)[[0, -1]]), need)
        have = np.array([max(have[0], complete[0]), min(have[1], complete[1])])
        broadened = " once broadened to --data-fwhm"
    if need[0] < have[0] * (1 - 1e-12) or need[1] > have[1] * (1 + 1e-12):
        raise InputError(f"--templates {opts.templates}: the templates cover {have[0]:.2f}-{have[1]:.2f} A"
                         f"{broadened} but {need[0]:.2f}-{need[1]:.2f} A is needed (the observed range plus the "
                         f"{vmax:g} km/s LOSVD velocity guard); use a wider library or trim the cube")
    op = overlap_rebin(in_edges, tem_edges, measure="lambda")
    if opts.flux_density == "lnlambda":
        op = op.scaled(per_lnlambda_factor(tem_edges))
    out = op.apply(tem)
    if not np.all(np.isfinite(out)):
        raise InputError(f"--templates {opts.templates}: NaN/Inf inside the needed wavelength range")
    pop = dict(pop, library_range=(float(have[0]), float(have[1])))
    return out, pop, resolution


def _targets(info: CubeInfo, usable: np.ndarray, bin_map: np.ndarray | None, opts: IngestOptions):
    """Spectrum index per spaxel, member counts and dropped spaxels.  Local."""
    _, ny, nx = info.shape
    if bin_map is None:
        target = np.where(usable, np.cumsum(usable) - 1, -1).astype(np.int64)
        dropped_flat = np.flatnonzero(~usable)
        n_targets = int(usable.sum())
    else:
        flat = bin_map.reshape(-1)
        dropped_flat = np.flatnonzero((flat >= 0) & ~usable)
        target = np.where(usable, flat, -1).astype(np.int64)
        n_targets = int(flat.max()) + 1
    n_members = np.bincount(target[target >= 0], minlength=n_targets).astype(np.int64)
    if n_targets == 0:
        raise InputError(f"--cube {info.path}: no spaxel has a finite value")
    if bin_map is not None and np.any(n_members == 0):
        empty = int(np.flatnonzero(n_members == 0)[0])
        raise InputError(f"--bins {opts.bins}: bin ids must run over 0..{n_targets - 1} with every id used; "
                         f"bin {empty} has no spaxel with finite data")
    dropped = np.column_stack(np.divmod(dropped_flat, nx)).astype(np.int64).reshape(-1, 2)
    return target, n_targets, n_members, dropped


def make_plan(opts: IngestOptions, comm) -> _Plan:
    """Read and cross-check all inputs; write nothing.  Collective over comm."""
    if opts.bin_combine not in ("sum", "mean"):
        raise InputError(f"--bin-combine {opts.bin_combine!r}: expected sum or mean")
    if opts.flux_density not in ("angstrom", "lnlambda"):
        raise InputError(f"--flux-density {opts.flux_density!r}: expected angstrom or lnlambda")
    if int(opts.oversample) < 1:
        raise InputError(f"--oversample {opts.oversample}: expected an integer >= 1")
    if opts.velscale is not None and not opts.velscale > 0:
        raise InputError(f"--velscale {opts.velscale}: expected a positive number of km/s")
    if (opts.data_fwhm is None) != (opts.template_fwhm is None):
        given, missing = ("--data-fwhm", "--template-fwhm") if opts.template_fwhm is None else \
            ("--template-fwhm", "--data-fwhm")
        raise InputError(f"{missing}: required with {given} (resolution matching needs both FWHM; MILES: 2.51 A)")
    info = check_all_ranks(read_cube_header, opts.cube, comm=comm)
    vel, losvd_shape = read_losvd_meta(opts.losvd, comm)
    bin_map = check_all_ranks(read_bin_map, opts.bins, info.shape[1:], comm=comm) if opts.bins else None
    obs_edges, cube_op, log_rebinned = check_all_ranks(_observed_grid, info, opts, comm=comm)
    vmax = float(np.max(np.abs(vel)))
    tem_edges = template_edges(obs_edges, int(opts.oversample), vmax)
    result, error = None, None
    if comm.Get_rank() == 0:
        try:
            result = _templates_on_grid(opts, obs_edges, tem_edges, vmax)
        except InputError as exc:
            error = exc
    raise_if_any(error, comm)
    templates, pop, resolution = agree(result, comm)
    from ..io.validation import check_grids

    check_grids(centres(tem_edges), centres(obs_edges), vel)
    chunks = _row_chunks(info, int(opts.rows_per_read))
    reader = _CubeRows(info)
    try:
        usable = _usable_spaxels(reader, chunks, comm)
    finally:
        reader.close()
    target, n_targets, n_members, dropped = check_all_ranks(_targets, info, usable, bin_map, opts, comm=comm)
    if losvd_shape[0] != n_targets:
        source = f"bins of {opts.bins}" if opts.bins else "spaxels with finite data"
        raise InputError(f"--losvd {opts.losvd}: holds LOSVDs for {losvd_shape[0]} bins, but the cube gives "
                         f"{n_targets} spectra ({source})")
    s0, s1 = block_range(n_targets, comm.Get_size(), comm.Get_rank())
    block = read_losvd_rows(opts.losvd, s0, s1, losvd_shape, comm)
    from ..io.validation import check_losvd_values

    check_all_ranks(check_losvd_values, block, lay.LOSVD, s0, comm=comm)
    ranges = [list(r) for r in opts.mask_ranges]
    provenance = None
    if comm.Get_rank() == 0:
        tables = [(role, p) for role, p in (("data_fwhm", opts.data_fwhm), ("template_fwhm", opts.template_fwhm))
                  if isinstance(p, str) and os.path.isfile(p)]
        provenance = [file_provenance(role, p) for role, p in
                      (("cube", opts.cube), ("bins", opts.bins), ("templates", opts.templates),
                       ("losvd", opts.losvd), *tables) if p]
    if comm.Get_rank() == 0:          # the checks passed: say how much of the library is kept
        lib, need = pop.pop("library_range"), np.exp(tem_edges[[0, -1]])
        _LOG.info("templates: the library covers %.2f-%.2f A; only %.2f-%.2f A (the observed range plus the %g km/s "
                  "velocity guard) is kept", lib[0], lib[1], need[0], need[1], vmax)
    else:
        pop.pop("library_range")
    return _Plan(info, obs_edges, cube_op, log_rebinned, tem_edges, templates, pop, vel, chunks, target,
                 n_targets, n_members, dropped, ranges, block, agree(provenance, comm), resolution)


# ---------------------------------------------------------------------------------------------
# pass 2: spectra
# ---------------------------------------------------------------------------------------------
def _write_spectra(f, plan: _Plan, opts: IngestOptions, comm) -> tuple[np.ndarray, list]:
    """Combine, log-rebin and write every spectrum; returns the finite count per pixel and
    the spectra with no finite pixel (global).  Collective over comm."""
    nx = plan.info.shape[2]
    n_chunks = len(plan.chunks)
    rank, size = comm.Get_rank(), comm.Get_size()
    used = np.flatnonzero(plan.target >= 0)
    chunk_of = np.searchsorted([y0 for y0, _ in plan.chunks], used // nx, side="right") - 1
    first_chunk = np.full(plan.n_targets, n_chunks, dtype=np.int64)
    last_chunk = np.full(plan.n_targets, -1, dtype=np.int64)
    np.minimum.at(first_chunk, plan.target[used], chunk_of)
    np.maximum.at(last_chunk, plan.target[used], chunk_of)
    starts = [block_range(n_chunks, size, r)[0] for r in range(size)]
    owner = np.searchsorted(starts, first_chunk, side="right") - 1     # the rank holding the anchor slice
    mine = owner == rank
    my_chunks = sorted(set(chunk_of[mine[plan.target[used]]].tolist()))
    data_dset, var_dset = f[lay.DATACUBE], f[DATA_VAR] if DATA_VAR in f else None
    n_finite = np.zeros(plan.cube_op.n_out)
    empty_targets = []
    acc_data, acc_var = {}, {}
    reader = _CubeRows(plan.info)
    try:
        for k in padded_schedule(my_chunks, comm):
            done = []
            if k is not None:
                y0, y1 = plan.chunks[k]
                data, var = reader.read(y0, y1)
                ids = plan.target[y0 * nx:y1 * nx]
                for i in np.flatnonzero((ids >= 0) & mine[np.maximum(ids, 0)]):
                    t = int(ids[i])
                    if t not in acc_data:
                        acc_data[t] = np.zeros(data.shape[1])
                        acc_var[t] = np.zeros(data.shape[1]) if var is not None else None
                    acc_data[t] += data[i]
                    if var is not None:
                        acc_var[t] += var[i]
                done = sorted(t for t in acc_data if last_chunk[t] == k)
            runs = _finish(done, acc_data, acc_var, plan, opts, n_finite, empty_targets)
            for run in padded_schedule(runs, comm):
                write_block(data_dset, None if run is None else (run[0], 0), None if run is None else run[1])
                if var_dset is not None:
                    write_block(var_dset, None if run is None else (run[0], 0), None if run is None else run[2])
    finally:
        reader.close()
    empty = sorted(t for part in comm.allgather(empty_targets) for t in part)
    return allreduce_sum(n_finite, comm), empty


def _finish(done, acc_data, acc_var, plan, opts, n_finite, empty_targets) -> list:
    """Rebin the completed spectra ``done``; returns ``[(first_id, data, var), ...]`` runs.  Local."""
    if not done:
        return []
    ids = np.asarray(done)
    data = np.stack([acc_data.pop(t) for t in done])
    var_list = [acc_var.pop(t) for t in done]
    var = None if var_list[0] is None else np.stack(var_list)
    if opts.bin_combine == "mean" and opts.bins:
        n = plan.n_members[ids].astype(np.float64)[:, None]
        data = data / n
        var = None if var is None else var / (n * n)
    data_l = plan.cube_op.apply(data)
    var_l = None if var is None else plan.cube_op.apply(var, variance=True)
    finite = np.isfinite(data_l)
    n_finite += finite.sum(axis=0)
    empty_targets.extend(ids[~finite.any(axis=1)].tolist())
    cuts = np.flatnonzero(np.diff(ids) != 1) + 1
    return [(int(seg[0]), data_l[a:b], None if var_l is None else var_l[a:b])
            for seg, a, b in zip(np.split(ids, cuts), np.r_[0, cuts], np.r_[cuts, ids.size])]


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def _spaxel_xy(plan: _Plan) -> np.ndarray:
    _, ny, nx = plan.info.shape
    sx, sy, xref, yref, _unit = plan.info.xy_scale
    used = np.flatnonzero(plan.target >= 0)
    y, x = np.divmod(used, nx)
    t = plan.target[used]
    n = plan.n_members.astype(np.float64)
    xs = np.bincount(t, weights=(x - xref) * sx, minlength=plan.n_targets) / n
    ys = np.bincount(t, weights=(y - yref) * sy, minlength=plan.n_targets) / n
    return np.column_stack((xs, ys))


def _write_all(path: str, plan: _Plan, opts: IngestOptions, comm) -> dict:
    info = plan.info
    tem_pix, obs_pix = centres(plan.tem_edges), centres(plan.obs_edges)
    S, L, P = plan.n_targets, obs_pix.size, plan.templates.shape[0]
    dims = H5Dims(nSpat=S, nLSpec=L, nTSpec=tem_pix.size, nVel=plan.vel.size,
                  nComp=plan.losvd_block.shape[2], nPop=P)
    mgr = H5Manager(path, tem_pix=tem_pix, obs_pix=obs_pix, comm=comm)
    mgr.init_base(dims, overwrite=True)
    mgr.populate_from_arrays(templates=plan.templates, vel_pix=plan.vel, pop_shape=plan.pop["pop_shape"])
    s0, _ = block_range(S, comm.Get_size(), comm.Get_rank())
    with open_h5(path, "r+", comm) as f:
        for item in padded_schedule([s0] if plan.losvd_block.shape[0] else [], comm):
            write_block(f[lay.LOSVD], None if item is None else (item, 0, 0),
                        None if item is None else plan.losvd_block)
        if info.stat_ext is not None:
            f.create_dataset(DATA_VAR, shape=(S, L), dtype="f8")
        n_finite, empty = _write_spectra(f, plan, opts, comm)
        if empty:
            _, nx = info.shape[1:]
            where = f"bin {empty[0]}" if opts.bins else \
                f"spaxel (y, x) = {tuple(int(v) for v in divmod(int(np.flatnonzero(plan.target == empty[0])[0]), nx))}"
            raise InputError(f"--cube {info.path}: {where} has no finite pixel after log-rebinning "
                             f"({len(empty)} spectra like it)")
        in_range = range_mask(plan.obs_edges, plan.ranges)
        mask = ~in_range & (n_finite == S)
        if not mask.any():
            raise InputError(f"{lay.MASK}: every pixel is masked (mask ranges {plan.ranges}, bad pixels); "
                             f"expected at least one usable pixel")
        dset = f.create_dataset(lay.MASK, shape=(L,), dtype=bool)
        write_owned_rows(dset, mask, comm)
        counts = {"masked.ranges": int(in_range.sum()), "masked.bad_all": int(((n_finite == 0) & ~in_range).sum()),
                  "masked.bad_some": int(((n_finite > 0) & (n_finite < S) & ~in_range).sum())}
        for key, value in counts.items():
            dset.attrs[key] = value
        if counts["masked.bad_some"] and comm.Get_rank() == 0:
            _LOG.warning("%d pixels masked because they are NaN in some (not all) spectra", counts["masked.bad_some"])
        _write_small(f, plan, opts, comm)
    mgr.ensure_rebin_and_resample("overlap")
    return {"dims": dims, "mask_counts": counts}


def _write_small(f, plan: _Plan, opts: IngestOptions, comm) -> None:
    info = plan.info
    for name, arr in (("/Populations/log_age", plan.pop["log_age"]),
                      ("/Populations/metallicity", plan.pop["metallicity"]),
                      (lay.SPAXEL_XY, _spaxel_xy(plan)), (SPAXELS_N_MEMBERS, plan.n_members),
                      (SPAXELS_DROPPED, plan.dropped)):
        write_owned_rows(f.create_dataset(name, shape=arr.shape, dtype=arr.dtype), arr, comm)
    f[lay.SPAXEL_XY].attrs["units"] = info.xy_scale[4]
    if opts.bins:
        bin_map = plan.target.reshape(info.shape[1:])
        write_owned_rows(f.create_dataset(SPAXELS_BIN_MAP, shape=bin_map.shape, dtype="i8"), bin_map, comm)
    else:
        yx = np.column_stack(np.divmod(np.flatnonzero(plan.target >= 0), info.shape[2])).astype(np.int64)
        write_owned_rows(f.create_dataset(SPAXELS_YX, shape=yx.shape, dtype="i8"), yx, comm)
    density = "per_angstrom" if opts.flux_density == "angstrom" else "per_lnlambda"
    combine = opts.bin_combine if opts.bins else "none"
    f[lay.DATACUBE].attrs.update({"units": info.bunit, "flux_density": density, "bin_combine": combine})
    f[lay.TEMPLATES].attrs.update({"flux_density": density, **plan.resolution})
    if DATA_VAR in f:
        f[DATA_VAR].attrs.update({"units": info.stat_bunit, "bin_combine": combine,
                                  "propagation": "var_out = sum_i w_i^2 var_i (rebin); sum or mean/n^2 (bins)"})
    options = {k: v for k, v in asdict(opts).items()}
    options["mask_ranges"] = [list(r) for r in opts.mask_ranges]
    f.attrs.update({"wcs_header": info.wcs_header, "provenance": json.dumps(plan.provenance, sort_keys=True),
                    "ingest.options": json.dumps(options, sort_keys=True), "ingest.bin_combine": combine,
                    "ingest.flux_density": density, "ingest.spectral_ctype": info.ctype,
                    "ingest.log_rebinned": bool(plan.log_rebinned),
                    "ingest.velscale": float((plan.obs_edges[-1] - plan.obs_edges[0]) / (plan.obs_edges.size - 1)
                                             * SPEED_OF_LIGHT_KMS)})


def run_ingest(out_path, opts: IngestOptions, comm=None, *, replace: bool = False) -> dict:
    """Ingest ``opts``' inputs into a new cube file ``out_path``.  Collective over comm.

    Everything is checked before anything is written; the file is written as
    ``out_path + ".partial"``, validated (:func:`~cubefit_mpi.io.validation.validate_inputs`) and
    renamed by rank 0.  On any failure (an :class:`InputError`, a full disk, a crash) the partial
    file is removed and an existing ``out_path`` is left as it was.  An existing ``out_path`` that
    holds results (a hypercube or a solution) is only replaced with ``replace``.  Returns
    ``{"dims", "seconds", "mask_counts", "dropped"}``.
    """
    from ..io.validation import validate_inputs

    comm = get_comm(comm)
    rank = comm.Get_rank()
    out_path = os.fspath(out_path)
    partial = out_path + ".partial"
    t0 = time.perf_counter()
    if not replace:
        check_all_ranks(refuse_replacing_results, out_path, comm=comm)
    plan = make_plan(opts, comm)
    require_free_space(partial, planned_bytes(plan), "ingest", comm)
    if rank == 0 and os.path.exists(partial):
        os.remove(partial)
    comm.Barrier()

    def drop_partial():
        try:
            os.remove(partial)
        except FileNotFoundError:
            pass

    on_abort(drop_partial)             # a rank that aborts the job removes it too
    try:
        summary = _write_all(partial, plan, opts, comm)
        with open_h5(partial, "r", comm) as f:
            validate_inputs(f, comm=comm)
    except BaseException:              # bad input, a full disk, a crash: no half-written file is left
        drop_partial()
        raise
    finally:
        forget_on_abort(drop_partial)
    comm.Barrier()
    if rank == 0:
        os.replace(partial, out_path)
    comm.Barrier()
    seconds = time.perf_counter() - t0
    d = summary["dims"]
    _LOG.info("ingest: S=%d L=%d T=%d V=%d C=%d P=%d (%d spaxels dropped, %d pixels masked) -> %s "
              "(%.1fs on %d ranks)", d.S, d.L, d.T, d.V, d.C, d.P, len(plan.dropped),
              sum(summary["mask_counts"].values()), out_path, seconds, comm.Get_size())
    return {**summary, "seconds": seconds, "dropped": len(plan.dropped)}


def refuse_replacing_results(out_path: str) -> None:
    """An existing ``out_path`` with a hypercube or a solution is not replaced silently.  Local."""
    if not os.path.exists(out_path):
        return
    try:
        with open_h5(out_path, "r", mpi().COMM_SELF) as f:
            kept = [name for name in (lay.MODELS, lay.X_GLOBAL) if name in f]
    except InputError:
        return                         # not a readable cube file: nothing of ours to lose
    if kept:
        raise InputError(f"{out_path}: exists and holds {' and '.join(kept)}; ingest would replace it with a file "
                         f"without them: choose another output or pass --force")


def planned_bytes(plan: _Plan) -> int:
    """Bytes the output of ``plan`` takes (datasets, /R_T, a margin per spectrum).  Local."""
    from ..io.space import dataset_bytes

    S, L, T = plan.n_targets, plan.obs_edges.size - 1, plan.tem_edges.size - 1
    V, C, P = plan.vel.size, plan.losvd_block.shape[2], plan.templates.shape[0]
    spectra = (2 if plan.info.stat_ext is not None else 1) * dataset_bytes((S, L), "f8")
    return spectra + dataset_bytes((S, V, C), "f8") + dataset_bytes((P + L, T), "f8") + 64 * S + 16 * L
