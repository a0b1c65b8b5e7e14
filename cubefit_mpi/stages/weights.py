"""Stage ``weights``: build, store and read the λ-weights of a cube file, under MPI.

* :func:`ensure_lambda_weights` computes the median spectrum of ``/DataCube`` in parallel
  (exact, bit-identical at any number of ranks), turns it into weights with
  :mod:`cubefit_mpi.numerics.lambda_weights` and stores them at ``CUBEFIT_LAMBDA_WEIGHTS_DSET``
  (default ``/HyperCube/lambda_weights``) with their parameters as attributes.
* :func:`read_lambda_weights` is what the solvers call: it honours
  ``CUBEFIT_LAMBDA_WEIGHTS_ENABLE`` / ``_AUTO`` / ``CUBEFIT_LAMBDA_MIN_W`` and the mask.
* :func:`weights_banner` is the one-line summary every solver logs at start.

Median spectrum, in two collective passes over ``/DataCube (S, L)``:

1. each rank reads its own spaxels (whole rows, in blocks) and computes each spaxel's masked
   mean flux; the per-spaxel values are combined with a sum over ranks in which every entry
   has exactly one non-zero contribution, so the means are the serial ones bit for bit;
   spaxels without usable data or with a mean <= 0 are skipped;
2. the λ axis is split over ranks; each rank reads ``DataCube[:, l0:l1]`` (in S-row blocks and
   λ sub-slabs that bound its memory), divides each spaxel by its mean and takes the exact
   per-pixel median over the used spaxels; the slabs are gathered on every rank.
"""
from __future__ import annotations

import datetime as _dt
import logging
import zlib

import numpy as np

from ..config.errors import InputError
from ..config.knobs import get_knobs
from ..config.version import VERSION as __version__
from ..io import layout as lay
from ..io.blocks import read_block
from ..io.datasets import write_small
from ..io.h5file import open_h5
from ..io.validation import check_mask
from ..numerics import lambda_weights as lw
from ..numerics.lambda_weights import weights_banner  # noqa: F401  (re-exported for the solvers)
from ..parallel.collectives import agree, allreduce_sum
from ..parallel.comm import get_comm
from ..parallel.decomposition import block_range, padded_schedule, tile_bounds

_LOG = logging.getLogger("cubefit_mpi.weights")
ROWS_PER_BLOCK = 1024                 # spaxel rows per collective read
MAX_SLAB_BYTES = 256 * 2**20          # per-rank memory for the values of one λ sub-slab

__all__ = ["ensure_lambda_weights", "read_lambda_weights", "weights_banner", "median_spectrum"]


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def _cube_info(f) -> tuple[int, int, np.ndarray | None]:
    """``(S, L, mask)`` of the data cube, checked.  Local (reads small datasets)."""
    if lay.DATACUBE not in f:
        raise InputError(f"{lay.DATACUBE}: dataset missing from {f.filename}; lambda-weights are built from it")
    shape = f[lay.DATACUBE].shape
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise InputError(f"{lay.DATACUBE}: expected a non-empty 2-D dataset (S, L), got shape {shape}")
    n_spax, n_lam = shape
    if lay.OBS_PIX in f and f[lay.OBS_PIX].shape != (n_lam,):
        raise InputError(f"{lay.OBS_PIX}: expected shape ({n_lam},) to match {lay.DATACUBE}, "
                         f"got {f[lay.OBS_PIX].shape}")
    mask = None
    if lay.MASK in f:
        if f[lay.MASK].shape != (n_lam,):
            raise InputError(f"{lay.MASK}: expected shape ({n_lam},), got {f[lay.MASK].shape}")
        mask = check_mask(np.asarray(f[lay.MASK][...]))
    return int(n_spax), int(n_lam), mask


def _n_lambda(f) -> int:
    """Expected length L of the weights: from ``/ObsPix``, else ``/DataCube``, else ``/Mask``."""
    for name, axis in ((lay.OBS_PIX, 0), (lay.DATACUBE, 1), (lay.MASK, 0)):
        if name in f and len(f[name].shape) > axis:
            return int(f[name].shape[axis])
    raise InputError(f"{lay.OBS_PIX}: dataset missing from {f.filename}; cannot tell the number of "
                     f"wavelength pixels the lambda-weights must have")


def _mask_crc(mask: np.ndarray | None, n_lam: int) -> int:
    used = np.ones(n_lam, dtype=np.uint8) if mask is None else mask.astype(np.uint8)
    return int(zlib.crc32(used.tobytes()))


# ---------------------------------------------------------------------------------------------
# the median spectrum
# ---------------------------------------------------------------------------------------------
def median_spectrum(dset, mask: np.ndarray | None, *, comm=None, rows_per_block: int = ROWS_PER_BLOCK,
                    max_slab_bytes: int = MAX_SLAB_BYTES) -> tuple[np.ndarray, int]:
    """Per-pixel median over spaxels of the spectra normalised by their masked mean.  Collective over comm.

    Parameters
    ----------
    dset : h5py.Dataset ``(S, L)``, the data cube of a file opened with ``comm``
    mask : (L,) bool or None, True = pixel used
    comm : MPI communicator, default ``MPI.COMM_WORLD``
    rows_per_block : spaxel rows per collective read
    max_slab_bytes : bound on this rank's buffer for one λ sub-slab of all spaxels

    Returns
    -------
    median : (L,) float64 on every rank, NaN at masked pixels and where no used spaxel has a
        finite value
    n_used : int, the number of spaxels that entered the median

    The result is bit-identical for any number of ranks.
    """
    comm = get_comm(comm)
    size, rank = comm.Get_size(), comm.Get_rank()
    n_spax, n_lam = (int(n) for n in dset.shape)
    rows = max(1, min(int(rows_per_block), max_slab_bytes // (8 * n_lam)))
    # pass 1: masked mean of each spaxel, from whole rows owned by this rank
    s0, s1 = block_range(n_spax, size, rank)
    sums, counts = np.zeros(n_spax), np.zeros(n_spax)
    for block in padded_schedule([(s0 + a, s0 + b) for a, b in tile_bounds(s1 - s0, rows)], comm):
        if block is None:
            read_block(dset, None, None)
            continue
        a, b = block
        sums[a:b], counts[a:b] = lw.masked_row_sums(read_block(dset, (a, 0), (b - a, n_lam), np.float64), mask)
    norms = lw.spaxel_norms(allreduce_sum(sums, comm), allreduce_sum(counts, comm).astype(np.int64))
    n_used = int(np.isfinite(norms).sum())
    # pass 2: exact per-pixel median over the used spaxels, λ split over ranks
    l0, l1 = block_range(n_lam, size, rank)
    width = max(1, max_slab_bytes // (16 * n_spax))       # the values and their sorted copy
    row_blocks = tile_bounds(n_spax, rows)
    local = np.full(max(l1 - l0, 0), np.nan)
    for slab in padded_schedule([(l0 + a, l0 + b) for a, b in tile_bounds(l1 - l0, width)], comm):
        if slab is None:
            for _ in row_blocks:
                read_block(dset, None, None)
            continue
        c0, c1 = slab
        values = np.empty((n_spax, c1 - c0))
        for a, b in row_blocks:
            values[a:b] = read_block(dset, (a, c0), (b - a, c1 - c0), np.float64)
        values /= norms[:, None]                             # unused spaxels become NaN rows
        if mask is not None:
            values[:, ~mask[c0:c1]] = np.nan
        local[c0 - l0:c1 - l0] = lw.column_median(values)
    median = np.full(n_lam, np.nan)
    for lo, hi, part in comm.allgather((l0, l1, local)):
        median[lo:hi] = part
    return median, n_used


# ---------------------------------------------------------------------------------------------
# build / reuse
# ---------------------------------------------------------------------------------------------
def _wanted_params(small, large, min_w, features, floor) -> dict:
    min_w = lw.DEFAULT_MIN_W if min_w is None else float(min_w)
    checks = ((small, "--small"), (large, "--large"))
    for value, opt in checks:
        if int(value) != value or value < 1 or int(value) % 2 == 0:
            raise InputError(f"{opt}={value!r}: expected an odd number of pixels >= 1")
    if not small < large:
        raise InputError(f"--small={small}, --large={large}: expected small < large")
    if not 0.0 < min_w <= 1.0:
        raise InputError(f"--min-w={min_w!r}: expected 0 < min_w <= 1")
    if features not in lw.FEATURES:
        raise InputError(f"features={features!r}: expected one of {', '.join(lw.FEATURES)}")
    return {"method": lw.METHOD, "small": int(small), "large": int(large),
            "min_w": max(min_w, float(floor)), "passes": lw.DEFAULT_PASSES, "features": features,
            "ref_quantile": lw.DEFAULT_REF_QUANTILE}


def _reusable(attrs, params: dict, source_shape, mask_crc: int) -> bool:
    try:
        same = all(_same(attrs[k], v) for k, v in params.items())
        return same and tuple(int(v) for v in attrs["source_shape"]) == tuple(source_shape) \
            and int(attrs["mask_crc32"]) == mask_crc
    except KeyError:
        return False


def _same(stored, wanted) -> bool:
    if isinstance(wanted, str):
        return (stored.decode() if isinstance(stored, bytes) else str(stored)) == wanted
    return float(stored) == float(wanted)


def ensure_lambda_weights(path, *, small: int = lw.DEFAULT_SMALL, large: int = lw.DEFAULT_LARGE,
                          min_w: float = lw.DEFAULT_MIN_W, force: bool = False, comm=None,
                          features: str = "absorption") -> np.ndarray:
    """Build (or reuse) the λ-weights of ``path`` and return them on every rank.  Collective over comm.

    Parameters
    ----------
    path : str, the cube file (needs ``/DataCube (S, L)``; ``/Mask (L,)`` is honoured)
    small, large : odd window lengths in pixels of the two boxcar smoothings
    min_w : weight of featureless continuum, default 0.1; raised to ``CUBEFIT_LAMBDA_MIN_W``
    force : recompute even when weights with the same parameters exist
    comm : MPI communicator, default ``MPI.COMM_WORLD``
    features : ``"absorption"`` (default) or ``"all"`` (emission counts too)

    Returns
    -------
    weights : (L,) float64 in ``[min_w, 1]`` (``min_w`` at masked pixels), as stored.

    The dataset is ``CUBEFIT_LAMBDA_WEIGHTS_DSET`` (default ``/HyperCube/lambda_weights``), with
    attributes ``method, small, large, passes, min_w, features, ref_quantile, source,
    source_shape, mask_crc32, n_spaxels_used, created, cubefit_mpi``.  Existing weights made
    with the same parameters from a cube of the same shape and mask are reused unless
    ``force``.  Weights that carry no ``method`` attribute came from elsewhere (the user's
    own): they are kept and returned unless ``force``.
    """
    comm = get_comm(comm)
    knobs = get_knobs()
    name = knobs.lambda_weights_dset
    params = _wanted_params(small, large, min_w, features, knobs.lambda_min_w)
    with open_h5(path, "r", comm) as f:               # validate and decide before writing anything
        n_spax, n_lam, mask = _cube_info(f)
        if params["large"] > n_lam:
            raise InputError(f"--large={large}: the window is longer than the spectrum ({n_lam} pixels of "
                             f"{lay.DATACUBE}); expected an odd number of pixels <= {n_lam}")
        crc = _mask_crc(mask, n_lam)
        if name in f and not force and f[name].shape == (n_lam,):
            attrs = f[name].attrs
            if "method" not in attrs:
                _LOG.warning("%s: kept the existing weights (no 'method' attribute: not made by "
                             "cubefit_mpi); use --force to rebuild them", name)
                return np.asarray(f[name][...], dtype=np.float64)
            if _reusable(attrs, params, (n_spax, n_lam), crc):
                _LOG.info("%s: reused (same parameters and cube shape; --force rebuilds)", name)
                return np.asarray(f[name][...], dtype=np.float64)
        median, n_used = median_spectrum(f[lay.DATACUBE], mask, comm=comm)
    if n_used == 0:
        raise InputError(f"{lay.DATACUBE}: no spaxel has finite unmasked data with a positive mean flux; "
                         f"cannot build lambda-weights")
    valid = np.isfinite(median) if mask is None else mask & np.isfinite(median)
    weights = lw.lambda_weights_from_spectrum(median, valid, small=params["small"], large=params["large"],
                                              min_w=params["min_w"], passes=params["passes"],
                                              features=params["features"],
                                              ref_quantile=params["ref_quantile"])
    created = agree(_dt.datetime.now().isoformat(timespec="seconds"), comm)
    attrs = dict(params, source=lay.DATACUBE, source_shape=np.array([n_spax, n_lam], dtype=np.int64),
                 mask_crc32=np.int64(crc), n_spaxels_used=np.int64(n_used), created=created,
                 cubefit_mpi=__version__)
    with open_h5(path, "r+", comm) as f:
        write_small(f, [(name, weights, attrs)], comm, "the lambda-weights")
    _LOG.info("%s: built from the median of %d/%d spaxels (boxcars %d/%d px, min_w %g)",
              name, n_used, n_spax, params["small"], params["large"], params["min_w"])
    return weights


def read_lambda_weights(path, *, comm=None, auto: bool | None = None) -> np.ndarray | None:
    """The λ-weights the solvers use, or None when they are disabled.  Collective over comm.

    Parameters
    ----------
    path : str, the cube file
    comm : MPI communicator, default ``MPI.COMM_WORLD``
    auto : build missing weights (:func:`ensure_lambda_weights` with default parameters); None
        means ``CUBEFIT_LAMBDA_WEIGHTS_AUTO``

    Returns
    -------
    weights : (L,) float64 or None.  None when ``CUBEFIT_LAMBDA_WEIGHTS_ENABLE=0``, or when the
        dataset is missing and not auto-built.  Values below ``CUBEFIT_LAMBDA_MIN_W`` are raised
        to it; masked pixels get the floor.

    Raises
    ------
    InputError
        The dataset has the wrong shape (the message names it and the expected length), or a
        non-finite / negative weight at an unmasked pixel.
    """
    knobs = get_knobs()
    if not knobs.lambda_weights_enable:
        return None
    comm = get_comm(comm)
    name = knobs.lambda_weights_dset
    with open_h5(path, "r", comm) as f:
        n_lam = _n_lambda(f)
        mask = None
        if lay.MASK in f:
            if f[lay.MASK].shape != (n_lam,):
                raise InputError(f"{lay.MASK}: expected shape ({n_lam},), got {f[lay.MASK].shape}")
            mask = check_mask(np.asarray(f[lay.MASK][...]))
        stored = None
        if name in f:
            if f[name].shape != (n_lam,):
                raise InputError(f"{name}: expected shape ({n_lam},) (one weight per pixel of "
                                 f"{lay.OBS_PIX}), got {f[name].shape}")
            stored = np.asarray(f[name][...], dtype=np.float64)
    if stored is None:
        if not (knobs.lambda_weights_auto if auto is None else auto):
            return None
        stored = ensure_lambda_weights(path, comm=comm)
    try:
        return lw.finalize_weights(stored, mask, knobs.lambda_min_w)
    except ValueError as exc:
        raise InputError(f"{name}: {exc}") from None
