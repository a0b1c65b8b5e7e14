"""Stage ``recon``: the model cube ``Ŷ = A·x`` and per-spaxel residual statistics.

``Ŷ[s, :] = Σ_{c,p} x[c, p] · A[s, c, p, :]`` with ``A = /HyperCube/models (S, C, P, L)``, computed
in S-tiles dealt to the ranks.  Each rank reads, per tile, only the (c, p) blocks of ``A`` whose
weights are not all zero (blocks aligned to the dataset's chunks), converts them to float64 and
contracts them against ``x`` into a ``(S_tile, L)`` float64 accumulator: at most one tile and
one block are in memory per rank.  Reads and writes are collective rounds (every rank makes the
same calls, empty selections on ranks with no tile left).  When the solve fitted polynomials
(``/Solve/add_poly``, ``/Solve/mult_poly`` of this x), the model is ``g_s ⊙ (A·x) + Q a_s``
(:mod:`cubefit_mpi.numerics.polynomials`).

Written datasets (``out`` defaults to ``/ReconCube``)::

    out            (S, L) float64   the reconstruction
    out + "_chi2"  (S,)   float64   Σ_λ w_λ (y − ŷ)²  over used pixels (w = 1 without λ-weights)
    out + "_rmse"  (S,)   float64   sqrt(mean (y − ŷ)²) over used pixels (never weighted)

"Used pixels" are those where ``/Mask`` is True (all when absent) and the data are finite.
Attributes on ``out`` say from which x dataset and when the reconstruction was made, and how
χ² was weighted.

The numerics (:func:`active_blocks`, :func:`contract_block`, :func:`residual_stats`) are pure
functions of arrays; :func:`model_rows` lets the plots compute a few rows without a stored
reconstruction.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from ..config.errors import InputError
from ..config.knobs import get_knobs
from ..io import layout as lay
from ..io.blocks import read_block, write_block
from ..io.h5file import open_h5
from ..operators.select import open_operator
from ..io.polynomials import read_polynomials
from ..numerics.lambda_weights import finalize_weights
from ..numerics.polynomials import with_polynomials
from ..numerics.reconstruction import active_blocks, residual_stats, x_checksum
from ..parallel.collectives import agree, allreduce_sum, check_all_ranks
from ..parallel.comm import get_comm
from ..parallel.decomposition import owned_tiles, padded_schedule, tile_bounds

_LOG = logging.getLogger("cubefit_mpi.stages.recon")

RECON_DEFAULT = "/ReconCube"
CHI2_SUFFIX = "_chi2"
RMSE_SUFFIX = "_rmse"
TILE_BUDGET_BYTES = 64 * 2**20      # float64 bytes of one models block when the dataset is unchunked
RECON_MARKER = "recon.x_dataset"    # attribute that identifies a dataset written by this stage

# datasets that recon must never overwrite
_PROTECTED = (lay.TEMPLATES, lay.TEM_PIX, lay.OBS_PIX, lay.R_T, lay.LOSVD, lay.VEL_PIX, lay.DATACUBE,
              lay.MASK, lay.DATA_FLUX, lay.MODELS, lay.DONE, lay.COL_ENERGY, lay.LOSVD_AMP,
              lay.LOSVD_AMP_SUM, lay.LAMBDA_WEIGHTS, lay.X_GLOBAL, lay.TRUTH_X, lay.SPAXEL_XY)


# ---------------------------------------------------------------------------------------------
# numerics (local, no I/O)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# reading the inputs (local per rank; InputError on bad input)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReconInputs:
    """What a reconstruction needs besides ``A`` itself (all small).

    Attributes
    ----------
    shape : (S, C, P, L) of the models
    chunks : (S_chunk, C_chunk, P_chunk) block shape used to read ``A`` (a stored hypercube), or None
    x_cp : (C, P) float64, the weights
    used : (L,) bool or None, ``/Mask``
    weights : (L,) float64 or None, λ-weights (floored) used in χ²
    weighting : str, how χ² is weighted (stored as an attribute)
    """

    shape: tuple[int, int, int, int]
    chunks: tuple[int, int, int]
    x_cp: np.ndarray
    used: np.ndarray | None
    weights: np.ndarray | None
    weighting: str
    operator: object = None          # the operator A comes from (cubefit_mpi.operators)
    add: np.ndarray | None = None    # (S, D_a + 1) additive Legendre coefficients of the solve
    mult: np.ndarray | None = None   # (S, D_m) multiplicative ones
    polynomials: str = "no polynomials"


def normalise_name(name: str) -> str:
    """Absolute HDF5 path (``ReconCube`` -> ``/ReconCube``).  Local."""
    name = str(name).strip()
    return name if name.startswith("/") else "/" + name


def read_x(f, x_dataset: str, n_comp: int, n_pop: int) -> np.ndarray:
    """The weights as (C, P) float64 after checking size, finiteness and sign.  Local."""
    if x_dataset not in f:
        raise InputError(f"{x_dataset}: dataset missing from {f.filename}; run `cubefit_mpi solve` first")
    x = np.asarray(f[x_dataset][...], dtype=np.float64)
    if x.size != n_comp * n_pop:
        raise InputError(f"{x_dataset}: expected C*P = {n_comp}*{n_pop} = {n_comp * n_pop} values "
                         f"(row-major over (C, P)), got shape {x.shape}")
    x = x.reshape(n_comp, n_pop)
    bad = ~np.isfinite(x)
    if bad.any():
        c, p = np.argwhere(bad)[0]
        raise InputError(f"{x_dataset}: non-finite value at (c={c}, p={p}); expected finite x >= 0")
    if (x < 0).any():
        c, p = np.argwhere(x < 0)[0]
        raise InputError(f"{x_dataset}: negative value {x[c, p]:.3g} at (c={c}, p={p}); expected x >= 0")
    return x


def read_mask_and_weights(f, n_lam: int) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """``/Mask`` and the λ-weights used for χ², with a description of the weighting.  Local.

    The weights come from ``CUBEFIT_LAMBDA_WEIGHTS_DSET`` (default ``/HyperCube/lambda_weights``)
    when it exists and ``CUBEFIT_LAMBDA_WEIGHTS_ENABLE`` is on, floored at
    ``CUBEFIT_LAMBDA_MIN_W`` (``lambda_weights.finalize_weights``, as the solvers do).  Missing
    weights are not generated here.
    """
    used = None
    if lay.MASK in f:
        used = np.asarray(f[lay.MASK][...])
        if used.shape != (n_lam,):
            raise InputError(f"{lay.MASK}: expected shape ({n_lam},), got {used.shape}")
        used = used.astype(bool)
        if not used.any():
            raise InputError(f"{lay.MASK}: every pixel is masked; expected at least one True pixel")
    knobs = get_knobs()
    name = knobs.lambda_weights_dset
    if not knobs.lambda_weights_enable or name not in f:
        why = "disabled by CUBEFIT_LAMBDA_WEIGHTS_ENABLE" if name in f else f"{name} absent"
        return used, None, f"unweighted ({why})"
    if f[name].shape != (n_lam,):
        raise InputError(f"{name}: expected shape ({n_lam},), got {f[name].shape}")
    floor = knobs.lambda_min_w
    try:
        weights = finalize_weights(np.asarray(f[name][...], dtype=np.float64), used, floor)
    except ValueError as exc:
        raise InputError(f"{name}: {exc}") from None
    return used, weights, f"lambda-weighted ({name}, floor {floor:g})"


def read_inputs(f, path: str, x_dataset: str, operator) -> ReconInputs:
    """Validate and read everything small a reconstruction needs, for ``operator``.  Local."""
    n_s, n_c, n_p, n_l = operator.S, operator.C, operator.P, operator.L
    if lay.DATACUBE not in f:
        raise InputError(f"{lay.DATACUBE}: dataset missing from {path}; it is needed for chi2/rmse")
    if f[lay.DATACUBE].shape != (n_s, n_l):
        raise InputError(f"{lay.DATACUBE}: expected shape ({n_s}, {n_l}) to match the models, "
                         f"got {f[lay.DATACUBE].shape}")
    x_cp = read_x(f, x_dataset, n_c, n_p)
    used, weights, weighting = read_mask_and_weights(f, n_l)
    chunks = getattr(operator, "chunks", None)
    add, mult, note = read_polynomials(f, n_s, x_cp)
    return ReconInputs((n_s, n_c, n_p, n_l), chunks, x_cp, used, weights, weighting, operator, add, mult, note)


def _check_out(f, out: str, x_dataset: str) -> None:
    for name in (out, out + CHI2_SUFFIX, out + RMSE_SUFFIX):
        if name in _PROTECTED or name == x_dataset:
            raise InputError(f"--out {out}: {name} is an input or solver dataset; choose another name")
        if name in f:
            obj = f[name]
            if not hasattr(obj, "shape") or RECON_MARKER not in obj.attrs:
                raise InputError(f"--out {out}: {name} exists and was not written by `cubefit_mpi recon`; "
                                 f"choose another name or delete it")


def plan_tiles(inputs: ReconInputs, s_tile: int | None) -> tuple[int, list[tuple[int, int, int, int]]]:
    """S-tile length and the (c, p) blocks to read.  Local.

    With a chunked ``models`` the tile is a multiple of ``S_chunk`` (``s_tile`` rounded up; the
    chunk itself by default) and the blocks are whole (C_chunk, P_chunk) chunks.  Unchunked, a
    block is one component over all P and the default tile keeps it under 64 MiB in float64.
    From the factors there is nothing to read: the operator's tile by default, no blocks.
    """
    n_s, _, n_p, n_l = inputs.shape
    if s_tile is not None and (int(s_tile) != s_tile or s_tile < 1):
        raise InputError(f"--s-tile {s_tile}: expected a positive integer")
    if inputs.operator is not None and inputs.operator.kind == "factored":
        tile = inputs.operator.s_tiles[0][1] if s_tile is None else int(s_tile)
        return min(tile, n_s), []
    if inputs.chunks is not None:
        s_chunk, c_chunk, p_chunk = inputs.chunks
        tile = s_chunk if s_tile is None else -(-int(s_tile) // s_chunk) * s_chunk
    else:
        c_chunk, p_chunk = 1, n_p
        tile = max(1, TILE_BUDGET_BYTES // (8 * n_p * n_l)) if s_tile is None else int(s_tile)
    return min(tile, n_s), active_blocks(inputs.x_cp, c_chunk, p_chunk)


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def reconstruct(path, *, out: str = RECON_DEFAULT, x_dataset: str = lay.X_GLOBAL,
                s_tile: int | None = None, comm=None, operator: str = "auto", norm_mode: str | None = None,
                amp_mode: str | None = None) -> dict:
    """Write ``out = A·x`` (S, L) float64 and per-spaxel ``out_chi2``, ``out_rmse``.  Collective over comm.

    Parameters
    ----------
    path : str
        The cube file; ``/HyperCube/models (S, C, P, L)`` must be complete.
    out : str
        Dataset to write (an earlier reconstruction there is replaced after validation).
    x_dataset : str
        The weights, (C*P,) row-major over (C, P), >= 0.
    s_tile : int, optional
        Spaxels per tile (rounded up to whole chunks).  Default: the chunk's ``S_chunk``.
    comm : MPI communicator, default ``MPI.COMM_WORLD``
    operator : {"auto", "factored", "hypercube"}, where A comes from
        (:func:`~cubefit_mpi.operators.select.open_operator`; no hypercube needed with the factors)
    norm_mode, amp_mode : the normalisation of factored models of a file without a hypercube

    Returns
    -------
    dict with ``out``, ``chi2``/``rmse`` dataset names, ``x_dataset``, ``shape`` (S, L),
    ``s_tile``, ``n_tiles``, ``blocks_read`` (reads of ``A`` per tile), ``components_read``
    (components with a non-zero weight) and ``components_total`` (C), ``chi2_total``
    (Σ_s χ²), ``rmse_global`` (over all used pixels), ``weighting``, ``polynomials`` (what of
    the solve's polynomials the model includes), ``seconds``.

    Raises
    ------
    InputError
        On every rank, before anything is written: models missing or incomplete, data missing
        or mis-shaped, x of the wrong length / negative / non-finite, bad mask or weights, an
        ``out`` that would overwrite an input.
    """
    comm = get_comm(comm)
    t0 = time.perf_counter()
    path = os.fspath(path)
    out, x_dataset = normalise_name(out), normalise_name(x_dataset)

    def _validate():
        op = open_operator(path, operator, norm_mode=norm_mode, amp_mode=amp_mode, comm=comm)
        with open_h5(path, "r", comm) as f:
            inputs = read_inputs(f, path, x_dataset, op)
            _check_out(f, out, x_dataset)
        return inputs, plan_tiles(inputs, s_tile)

    inputs, (tile, blocks) = check_all_ranks(_validate, comm=comm)
    n_s, _, _, n_l = inputs.shape
    tiles = tile_bounds(n_s, tile)
    mine = [tiles[i] for i in owned_tiles(len(tiles), comm)]
    attrs = _provenance(inputs, x_dataset, comm)
    with open_h5(path, "r+", comm) as f:
        outputs = [_output_dataset(f, name, shape, attrs) for name, shape in
                   ((out, (n_s, n_l)), (out + CHI2_SUFFIX, (n_s,)), (out + RMSE_SUFFIX, (n_s,)))]
        sums = _reconstruct_tiles(f, inputs, mine, blocks, outputs, comm)
    chi2_total, sq_total, n_total = allreduce_sum(sums, comm)
    result = {"out": out, "chi2": out + CHI2_SUFFIX, "rmse": out + RMSE_SUFFIX, "x_dataset": x_dataset,
              "shape": (n_s, n_l), "s_tile": tile, "n_tiles": len(tiles), "blocks_read": len(blocks),
              "components_read": int(np.count_nonzero(inputs.x_cp.any(axis=1))),
              "components_total": int(inputs.x_cp.shape[0]),
              "chi2_total": float(chi2_total),
              "rmse_global": float(np.sqrt(sq_total / n_total)) if n_total else float("nan"),
              "weighting": inputs.weighting, "polynomials": inputs.polynomials, "seconds": time.perf_counter() - t0}
    _LOG.info("recon: %s from %s, S=%d L=%d, %d tiles of %d spaxels on %d rank(s), %d/%d components "
              "read in %d block(s) per tile, polynomials: %s, chi2 total %.6g (%s), rmse %.6g, %.1fs", out,
              x_dataset, n_s, n_l, len(tiles), tile, comm.Get_size(), result["components_read"],
              result["components_total"], result["blocks_read"], inputs.polynomials, result["chi2_total"],
              inputs.weighting, result["rmse_global"], result["seconds"])
    return result


def _provenance(inputs: ReconInputs, x_dataset: str, comm) -> dict:
    """Attributes of the written datasets: what they were made from, when, how χ² is weighted.  Collective."""
    created = agree(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), comm)
    return {RECON_MARKER: x_dataset, "recon.created": created, "recon.x_crc32": x_checksum(inputs.x_cp),
            "recon.models": lay.MODELS if inputs.operator.kind == "hypercube" else "factors (/LOSVD, /Templates, /R_T)",
            "recon.formula": "Y[s,l] = g_s(l) sum_{c,p} x[c,p] A[s,c,p,l] + sum_j a[s,j] P_j(l) (the solve's "
                             "polynomials, when it fitted them)", "recon.polynomials": inputs.polynomials,
            "chi2.weighting": inputs.weighting,
            "chi2.definition": "sum over used pixels of w_l (y - yhat)^2 (w = 1 when unweighted)",
            "rmse.definition": "sqrt(mean over used pixels of (y - yhat)^2), unweighted",
            "used_pixels": "Mask True (all if no /Mask) and finite data"}


def _reconstruct_tiles(f, inputs: ReconInputs, mine: list, blocks: list, outputs: list, comm) -> np.ndarray:
    """This rank's tiles, in collective rounds: ``A·x`` from the non-zero blocks, the residual
    statistics, the three outputs written.  Returns this rank's ``[Σχ², Σ(y−ŷ)², n_used]``.  Collective."""
    recon_d, chi2_d, rmse_d = outputs
    n_l = inputs.shape[3]
    data_d = f[lay.DATACUBE]
    sums = np.zeros(3)
    for item in padded_schedule(mine, comm):
        have = item is not None
        s0, s1 = item if have else (0, 0)
        n_rows = s1 - s0
        acc = inputs.operator.spectra(f, item, inputs.x_cp, blocks=blocks)
        if have:
            acc = with_polynomials(acc, _rows(inputs.add, s0, s1), _rows(inputs.mult, s0, s1))
        data = read_block(data_d, (s0, 0) if have else None, (n_rows, n_l) if have else None, dtype=np.float64)
        chi2 = rmse = None
        if have:
            chi2, rmse, n_used = residual_stats(data, acc, inputs.used, inputs.weights)
            sums += (float(chi2.sum()), float(np.nansum(rmse ** 2 * n_used)), int(n_used.sum()))
        write_block(recon_d, (s0, 0) if have else None, acc)
        write_block(chi2_d, (s0,) if have else None, chi2)
        write_block(rmse_d, (s0,) if have else None, rmse)
    return sums


def _rows(values: np.ndarray | None, s0: int, s1: int) -> np.ndarray | None:
    return None if values is None else values[s0:s1]


def _output_dataset(f, name: str, shape: tuple[int, ...], attrs: dict):
    """An earlier reconstruction of the same shape is overwritten in place (HDF5 does not reclaim
    the space of deleted datasets); otherwise the dataset is (re)created.  Collective."""
    if name in f and (f[name].shape != shape or f[name].dtype != np.float64):
        del f[name]
    dset = f[name] if name in f else f.create_dataset(name, shape=shape, dtype="f8")
    for key, value in attrs.items():
        dset.attrs[key] = value
    return dset


def model_rows(f, operator, x_cp: np.ndarray, rows) -> np.ndarray:
    """``A[rows]·x`` for a few spaxels of a file opened on one rank, from ``operator``.  Local.

    Parameters
    ----------
    f : h5py.File opened on one rank (``MPI.COMM_SELF``)
    operator : :class:`~cubefit_mpi.operators.base.Operator` of the file (for that communicator)
    x_cp : (C, P) float64
    rows : sequence of int, spaxel indices

    Returns
    -------
    (len(rows), L) float64 (a stored hypercube: only the non-zero (c, p) blocks are read), with
    the solve's polynomials when they belong to ``x_cp``
    """
    blocks = operator.read_blocks(x_cp)
    add, mult, _ = read_polynomials(f, operator.S, x_cp)
    result = np.zeros((len(rows), operator.L))
    for i, s in enumerate(rows):
        model = operator.spectra(f, (int(s), int(s) + 1), x_cp, blocks=blocks)
        result[i] = with_polynomials(model, _rows(add, s, s + 1), _rows(mult, s, s + 1))[0]
    return result
