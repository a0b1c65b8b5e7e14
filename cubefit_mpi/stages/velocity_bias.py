"""Stage ``velocity-bias``: the global velocity offset between the data and the mean model, and
(on request) its correction of ``/VelPix``.

The measurement is :mod:`cubefit_mpi.numerics.velocity_bias`: each rank builds the mean model of
its own spaxels from the inputs (the mixtures of ``/X_global`` when present, else one optimal
template fitted to the integrated spectrum -- a first pass whose sums over spaxels are reduced
-- convolved with the spaxel's LOSVD kernels; no hypercube is needed), cross-correlates it with
the data over the trial velocities and adds its partial sums; one reduction gives the global
correlation and its Poisson-bootstrap replicates (the template is held fixed in them).  The answer does not depend on the number of
ranks (to the rounding of the reduction).

``apply`` adds the offset to ``/VelPix`` (so the LOSVDs are read at the velocities the data
show) and records it as ``/VelPix`` attributes ``velocity_bias.offset_kms``,
``velocity_bias.sigma_kms``, ``velocity_bias.applied_at`` (ISO time), ``velocity_bias.range_kms``,
``velocity_bias.step_kms``, ``velocity_bias.template``.  A file whose ``/VelPix`` already carries
an applied offset is not shifted again (the residual is reported) unless ``force``; then the
residual is added and the recorded offset becomes the total.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ..config.errors import InputError
from ..io import layout as lay
from ..io.blocks import read_block, write_block
from ..io.h5file import open_h5
from ..io.validation import validate_inputs
from ..numerics import velocity_bias as vb
from ..numerics.kernels import interpolation_matrix, losvd_amplitude, unit_kernels
from ..numerics.rebin import rebin_sparse
from ..parallel.collectives import agree, allreduce_sum
from ..parallel.comm import get_comm
from ..parallel.decomposition import block_range, padded_schedule, tile_bounds

_LOG = logging.getLogger("cubefit_mpi.velocity_bias")
ATTR = "velocity_bias."


TEMPLATES = ("auto", "optimal", "mean", "x")


def _solution_mixtures(f, templates: np.ndarray, n_comp: int) -> np.ndarray:
    """``(C, T)`` mixtures ``Σ_p x_cp T_p`` of ``/X_global``.  Local."""
    if lay.X_GLOBAL not in f:
        raise InputError(f"{lay.X_GLOBAL}: dataset missing from {f.filename}; use --template optimal or mean")
    x = np.asarray(f[lay.X_GLOBAL][...], dtype=np.float64).reshape(-1)
    if x.size != n_comp * templates.shape[0] or not np.all(np.isfinite(x)) or x.sum() <= 0:
        raise InputError(f"{lay.X_GLOBAL}: expected C*P = {n_comp * templates.shape[0]} finite weights with "
                         f"a positive sum, got {x.size} values")
    mix = x.reshape(n_comp, -1) @ templates
    mix[mix.sum(axis=1) == 0] = templates.mean(axis=0)       # a component without weight: the mean template
    return mix


def _tiles(f, dims, rows_per_round: int, comm):
    """This rank's ``(s0, s1, losvd, data)`` in collective rounds (None: nothing this round).  Collective."""
    start, stop = block_range(dims.S, comm.Get_size(), comm.Get_rank())
    mine = [(start + a, start + b) for a, b in tile_bounds(stop - start, rows_per_round)]
    losvd_dset, data_dset = f[lay.LOSVD], f[lay.DATACUBE]
    for tile in padded_schedule(mine, comm):
        if tile is None:
            read_block(losvd_dset, None, None)
            read_block(data_dset, None, None)
            yield None
            continue
        s0, s1 = tile
        yield (s0, s1, read_block(losvd_dset, (s0, 0, 0), (s1 - s0, dims.V, dims.C), dtype=np.float64),
               read_block(data_dset, (s0, 0), (s1 - s0, dims.L), dtype=np.float64))


def estimate_velocity_bias(path: str, *, v_range: float = 500.0, step: float = 10.0, degree: int = 4,
                           n_boot: int = 200, seed: int = 0, template: str = "auto",
                           rows_per_round: int = 128, comm=None) -> dict:
    """Measure the global velocity offset of the data against the mean model.  Collective over comm.

    Parameters
    ----------
    path : str, a cube file with the inputs (``/Templates``, grids, ``/LOSVD``, ``/DataCube``, ``/R_T``)
    v_range, step : float, km/s: trial offsets ``−v_range … v_range`` every ``step``
    degree : int, Legendre degree of the continuum projected out (``-1``: none)
    n_boot : int, Poisson-bootstrap replicates over spaxels for the uncertainty (``>= 2``)
    seed : int, of the bootstrap weights
    template : {"auto", "optimal", "mean", "x"}
        The model's templates: ``x`` the mixtures of ``/X_global``; ``optimal`` one template
        fitted to the integrated spectrum (:func:`~cubefit_mpi.numerics.velocity_bias.optimal_template`);
        ``mean`` the library's mean; ``auto``: ``x`` when ``/X_global`` exists, else ``optimal``.

    Returns
    -------
    dict: ``offset_kms``, ``sigma_kms``, ``velocities (nv,)``, ``correlation (nv,)``,
    ``template``, ``pixels_used``, ``spaxels``, ``n_boot``, ``boot_failed`` (replicates whose
    peak was at the range edge), ``seconds``, plus the options; with the optimal template also
    ``template_weights (P,)`` and ``integrated_offset_kms`` (the best shift of that fit).

    Raises
    ------
    InputError
        Invalid inputs or options, no pixel valid at every trial shift, or a correlation peak at
        the edge of the range (widen ``--range``).
    """
    comm = get_comm(comm)
    t0 = time.perf_counter()
    try:
        velocities = vb.trial_velocities(float(v_range), float(step))
    except ValueError as exc:
        raise InputError(f"--range/--step: {exc}") from None
    if int(n_boot) < 2:
        raise InputError(f"--bootstrap {n_boot}: expected at least 2 replicates")
    if int(degree) < -1:
        raise InputError(f"--degree {degree}: expected -1 (no continuum) or more")
    if template not in TEMPLATES:
        raise InputError(f"--template {template}: expected one of {', '.join(TEMPLATES)}")
    extra = {}
    with open_h5(path, "r", comm) as f:
        info = validate_inputs(f, check_data=True, comm=comm)
        d = info["dims"]
        if lay.R_T not in f:
            raise InputError(f"{lay.R_T}: dataset missing from {f.filename}; create it with "
                             f"H5Manager(path).ensure_rebin_and_resample()")
        templates = np.asarray(f[lay.TEMPLATES][...], dtype=np.float64)
        rebin_lt = rebin_sparse(np.asarray(f[lay.R_T][...], dtype=np.float64), d.T, d.L)
        if template == "auto":
            template = "x" if lay.X_GLOBAL in f else "optimal"
        dln = float(info["tem_pix"][1] - info["tem_pix"][0])
        interp, shifts = interpolation_matrix(info["vel_pix"], dln)
        deltas = vb.pixel_deltas(velocities, dln)
        good = vb.valid_pixels(rebin_lt, d.T, shifts, deltas, info["mask"])
        pixels = np.flatnonzero(good)
        if pixels.size <= int(degree) + 2:
            raise InputError(f"--range {v_range}: only {pixels.size} observed pixels stay clear of the template "
                             f"edges at every trial shift; use a smaller --range (or templates covering more)")
        basis = vb.continuum_basis(d.L, pixels, int(degree))

        def kernels_of(losvd):
            return unit_kernels(losvd, interp)[0], losvd_amplitude(losvd, info["vel_pix"], "sum")

        if template == "x":
            templates_c, which = _solution_mixtures(f, templates, d.C), f"{lay.X_GLOBAL} mixtures"
        elif template == "mean":
            templates_c, which = templates.mean(axis=0, keepdims=True), "mean template"
        else:                           # pass 1: the integrated spectrum and LOSVD, then the fit
            sums = np.zeros(d.L + shifts.size)
            for tile in _tiles(f, d, rows_per_round, comm):
                if tile is not None:
                    kernels, amp = kernels_of(tile[2])
                    sums[:d.L] += np.where(good, tile[3], 0.0).sum(axis=0)
                    sums[d.L:] += np.einsum("sck,sc->k", kernels, amp)
            sums = allreduce_sum(sums, comm)
            weights = None
            if comm.Get_rank() == 0:
                weights, r2 = vb.optimal_template(templates, sums[:d.L], sums[d.L:], shifts, rebin_lt, deltas,
                                                  pixels, basis)
                extra = {"template_weights": weights, "integrated_offset_kms": vb.peak_offset(velocities, r2)[0]}
            extra = agree(extra, comm)
            templates_c = (extra["template_weights"] @ templates)[None]
            which = "optimal template"
        sums = np.zeros((1 + int(n_boot), 2 * velocities.size + 1))
        for tile in _tiles(f, d, rows_per_round, comm):   # pass 2: the per-spaxel correlation
            if tile is None:
                continue
            s0, s1, losvd, data = tile
            kernels, amp = kernels_of(losvd)
            model0 = vb.mean_model(templates_c, kernels, amp, shifts)
            sums += vb.correlation_sums(data, model0, rebin_lt, deltas, pixels, basis,
                                        vb.bootstrap_weights(np.arange(s0, s1), int(n_boot), int(seed)))
    total = allreduce_sum(sums, comm)
    result, error = None, None
    if comm.Get_rank() == 0:            # rank 0 decides, every rank gets the same numbers
        corr = vb.correlation(total)
        offset, at_edge = vb.peak_offset(velocities, corr[0])
        boots = [vb.peak_offset(velocities, c) for c in corr[1:]]
        ok = np.array([v for v, edge in boots if not edge])
        if at_edge:
            error = (f"--range {v_range}: the correlation peaks at the edge of the search range "
                     f"({offset:g} km/s) or is undefined; widen --range")
        elif ok.size < 2:
            error = "--bootstrap: fewer than 2 bootstrap replicates have a peak inside the range"
        result = {"offset_kms": offset, "sigma_kms": float(np.std(ok, ddof=1)) if ok.size >= 2 else float("nan"),
                  "velocities": velocities, "correlation": corr[0], "template": which,
                  "pixels_used": int(pixels.size), "spaxels": d.S, "n_boot": int(n_boot),
                  "boot_failed": int(len(boots) - ok.size), "range_kms": float(v_range), "step_kms": float(step),
                  "degree": int(degree), "seed": int(seed), **extra}
    error = agree(error, comm)
    if error is not None:
        raise InputError(error)
    result = agree(result, comm)
    result["seconds"] = time.perf_counter() - t0
    _LOG.info("velocity bias of %s: %+.3f +- %.3f km/s (%s, %d spaxels, %d pixels, %d bootstrap replicates, "
              "%.1fs on %d rank(s))", path, result["offset_kms"], result["sigma_kms"], which, d.S,
              pixels.size, int(n_boot), result["seconds"], comm.Get_size())
    return result


def applied_offset(path: str, comm=None) -> dict | None:
    """The ``velocity_bias.*`` attributes of ``/VelPix`` when an offset was applied, else None.  Collective."""
    with open_h5(path, "r", get_comm(comm)) as f:
        if lay.VEL_PIX not in f:
            raise InputError(f"{lay.VEL_PIX}: dataset missing from {f.filename}")
        attrs = f[lay.VEL_PIX].attrs
        if ATTR + "applied_at" not in attrs:
            return None
        return {k[len(ATTR):]: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()
                if k.startswith(ATTR)}


def apply_velocity_bias(path: str, result: dict, *, force: bool = False, comm=None) -> dict:
    """Add ``result["offset_kms"]`` to ``/VelPix`` and record it.  Collective over comm.

    Returns ``{"applied": bool, "offset_kms": total recorded offset, "previous": attrs or None}``.
    A ``/VelPix`` with an applied offset is left as it is unless ``force`` (then the new offset,
    a residual, is added and the recorded offset is the sum).
    """
    comm = get_comm(comm)
    previous = applied_offset(path, comm)
    if previous is not None and not force:
        _LOG.warning("%s: %s already carries an applied offset of %+.3f km/s (%s); the residual %+.3f +- %.3f "
                     "km/s is not applied again (--force applies it)", path, lay.VEL_PIX,
                     float(previous["offset_kms"]), previous["applied_at"], result["offset_kms"], result["sigma_kms"])
        return {"applied": False, "offset_kms": float(previous["offset_kms"]), "previous": previous}
    total = result["offset_kms"] + (float(previous["offset_kms"]) if previous is not None else 0.0)
    sigma = result["sigma_kms"] if previous is None else float(np.hypot(result["sigma_kms"],
                                                                       float(previous["sigma_kms"])))
    stamp = agree(time.strftime("%Y-%m-%dT%H:%M:%S%z"), comm)
    root = comm.Get_rank() == 0
    with open_h5(path, "r+", comm) as f:
        dset = f[lay.VEL_PIX]
        vel = np.asarray(dset[...], dtype=np.float64) + result["offset_kms"]
        write_block(dset, (0,) if root else None, vel if root else None)
        attrs = {"offset_kms": float(total), "sigma_kms": float(sigma), "applied_at": stamp,
                 "range_kms": float(result["range_kms"]), "step_kms": float(result["step_kms"]),
                 "template": str(result["template"])}
        for key, value in attrs.items():
            dset.attrs[ATTR + key] = value
        built = lay.MODELS in f
    if built:
        _LOG.warning("%s: %s changed, so %s no longer matches the inputs; rebuild it with "
                     "`cubefit_mpi build %s --force`", path, lay.VEL_PIX, lay.MODELS, path)
    _LOG.info("%s: added %+.3f km/s to %s (recorded offset %+.3f +- %.3f km/s)", path, result["offset_kms"],
              lay.VEL_PIX, total, sigma)
    return {"applied": True, "offset_kms": float(total), "previous": previous}
