"""Input validation shared by every command that reads a cube file.

Each check raises :class:`~cubefit_mpi.config.errors.InputError` with one line naming the dataset and
what was expected.  The array checks are local; :func:`validate_inputs` reads a file's inputs
(big datasets in per-rank slabs) and raises the same error on every rank.  Validation never
writes: a rejected file is left exactly as it was.
"""
from __future__ import annotations

import numpy as np

from ..config.errors import InputError
from ..numerics.kernels import velocity_to_shift
from ..numerics.wavelength_grids import pixel_edges
from ..parallel.collectives import raise_if_any
from ..parallel.comm import get_comm, mpi
from ..parallel.decomposition import block_range
from . import layout as lay

UNIFORM_RTOL = 1e-6


def _first_bad(bad: np.ndarray) -> str:
    idx = np.unravel_index(int(np.flatnonzero(bad)[0]), bad.shape)
    return "index " + ",".join(str(int(i)) for i in idx)


def check_grid(grid: np.ndarray, name: str, *, uniform: bool = False) -> None:
    """A 1-D grid: finite, strictly increasing, at least 2 points; uniform if asked.  Local."""
    grid = np.asarray(grid)
    if grid.ndim != 1 or grid.size < 2:
        raise InputError(f"{name}: expected a 1-D grid of at least 2 values, got shape {grid.shape}")
    if not np.issubdtype(grid.dtype, np.number):
        raise InputError(f"{name}: expected a numeric grid, got dtype {grid.dtype}")
    if not np.all(np.isfinite(grid)):
        raise InputError(f"{name}: contains NaN/Inf at {_first_bad(~np.isfinite(grid))}; expected finite values")
    step = np.diff(grid.astype(np.float64))
    if np.any(step <= 0):
        raise InputError(f"{name}: not strictly increasing at {_first_bad(step <= 0)}")
    if uniform and np.max(np.abs(step - step.mean())) > UNIFORM_RTOL * abs(step.mean()):
        raise InputError(f"{name}: expected a grid uniform in ln(lambda) (relative spacing "
                         f"variation <= {UNIFORM_RTOL:g}), got spacings from {step.min():.6g} to {step.max():.6g}")


def guard_range(tem_pix: np.ndarray, vel_pix: np.ndarray | None) -> tuple[float, float]:
    """ln λ range the observed pixel edges must lie in: template edges shrunk by the velocity guard.  Local."""
    edges = pixel_edges(tem_pix)
    if vel_pix is None or np.asarray(vel_pix).size == 0:
        return float(edges[0]), float(edges[-1])
    dln = float(tem_pix[1] - tem_pix[0])
    vmax = float(np.max(np.abs(vel_pix)))
    guard = abs(float(velocity_to_shift(-vmax, dln))) * dln     # blue side is the wider one
    return float(edges[0] + guard), float(edges[-1] - guard)


def check_grids(tem_pix: np.ndarray, obs_pix: np.ndarray, vel_pix: np.ndarray | None) -> None:
    """Template grid uniform; observed grid inside it with room for the largest |v|.  Local."""
    check_grid(tem_pix, lay.TEM_PIX, uniform=True)
    check_grid(obs_pix, lay.OBS_PIX)
    if vel_pix is not None:
        check_grid(vel_pix, lay.VEL_PIX)
    lo, hi = guard_range(tem_pix, vel_pix)
    obs_edges = pixel_edges(obs_pix)
    if obs_edges[0] < lo - 1e-12 or obs_edges[-1] > hi + 1e-12:
        vmax = float(np.max(np.abs(vel_pix))) if vel_pix is not None else 0.0
        raise InputError(
            f"{lay.OBS_PIX}: observed range [{np.exp(obs_edges[0]):.2f}, {np.exp(obs_edges[-1]):.2f}] A must lie "
            f"inside the template range shrunk by the {vmax:g} km/s velocity guard, "
            f"[{np.exp(lo):.2f}, {np.exp(hi):.2f}] A; extend {lay.TEMPLATES}/{lay.TEM_PIX}")


def check_finite(arr: np.ndarray, name: str, offset: int = 0) -> None:
    """No NaN/Inf; ``offset`` shifts reported row indices (for slabs).  Local."""
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{name}: expected a floating-point array, got dtype {arr.dtype}")
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = list(np.unravel_index(int(np.flatnonzero(bad)[0]), bad.shape))
        idx[0] += offset
        raise InputError(f"{name}: contains NaN/Inf (first at index {','.join(map(str, idx))}); expected finite values")


def check_losvd_values(losvd: np.ndarray, name: str = lay.LOSVD, offset: int = 0) -> None:
    """Finite and non-negative.  Local."""
    check_finite(losvd, name, offset)
    neg = losvd < 0
    if neg.any():
        first = int(np.flatnonzero(neg)[0])
        idx = list(np.unravel_index(first, neg.shape))
        idx[0] += offset
        raise InputError(f"{name}: negative value {losvd.flat[first]:.3g} at index {','.join(map(str, idx))}; "
                         f"expected LOSVD >= 0")


def check_mask(mask: np.ndarray, name: str = lay.MASK) -> np.ndarray:
    """A boolean (or 0/1) mask with at least one used pixel; returns it as bool.  Local."""
    mask = np.asarray(mask)
    if mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.number) or not np.all(np.isin(mask, (0, 1))):
            raise InputError(f"{name}: expected a boolean mask (True = pixel used), got dtype {mask.dtype}")
        mask = mask.astype(bool)
    if not mask.any():
        raise InputError(f"{name}: every pixel is masked; expected at least one unmasked (True) pixel")
    return mask


def check_data_values(data: np.ndarray, mask: np.ndarray | None, name: str = lay.DATACUBE,
                      offset: int = 0) -> None:
    """NaN/Inf allowed only where the mask is False.  Local."""
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(f"{name}: expected a floating-point array, got dtype {data.dtype}")
    bad = ~np.isfinite(data)
    if mask is not None:
        bad &= np.asarray(mask, dtype=bool)[None, :]
    if bad.any():
        s, l = np.unravel_index(int(np.flatnonzero(bad)[0]), bad.shape)
        raise InputError(f"{name}: NaN/Inf at spaxel {int(s) + offset}, pixel {int(l)} where {lay.MASK} is True "
                         f"(or absent); mask the pixel or fix the data")


# ---------------------------------------------------------------------------------------------
# whole files
# ---------------------------------------------------------------------------------------------
INPUTS_FOR_BUILD = (lay.TEMPLATES, lay.TEM_PIX, lay.OBS_PIX, lay.LOSVD, lay.VEL_PIX)


def _require(f, names) -> None:
    for name in names:
        if name not in f:
            raise InputError(f"{name}: dataset missing from {f.filename}")


def validate_inputs(f, *, need=INPUTS_FOR_BUILD, check_data: bool = True, comm=None,
                    slab_rows: int = 4096) -> dict:
    """Validate a file's inputs; returns the small arrays read.  Collective over comm.

    Checks: required datasets present; grids finite and strictly increasing, template grid
    uniform; observed grid inside the template grid with room for max |VelPix|; shapes
    consistent (``/Templates (P,T)``, ``/LOSVD (S,V,C)``, ``/DataCube (S,L)``, ``/Mask (L,)``,
    ``/R_T (T,L)`` or ``(L,T)``); templates and LOSVD finite, LOSVD >= 0; data NaN only where
    masked; at least one unmasked pixel.  Each rank checks a slab of the big datasets and the
    first error found (by rank) is raised on every rank.

    Returns ``{"tem_pix", "obs_pix", "vel_pix", "mask", "dims": H5Dims}``.
    """
    comm = get_comm(comm)
    error, info = None, None
    try:
        info = _validate_small(f, need, check_data)
    except InputError as exc:
        error = exc
    raise_if_any(error, comm)
    any_nonzero = False
    try:
        dims = info["dims"]
        start, stop = block_range(dims.S, comm.Get_size(), comm.Get_rank())
        for lo in range(start, stop, slab_rows):
            hi = min(lo + slab_rows, stop)
            losvd = np.asarray(f[lay.LOSVD][lo:hi])
            check_losvd_values(losvd, lay.LOSVD, offset=lo)
            any_nonzero = any_nonzero or bool(np.any(losvd != 0))
            if check_data and lay.DATACUBE in f:
                check_data_values(np.asarray(f[lay.DATACUBE][lo:hi]), info["mask"], lay.DATACUBE, offset=lo)
    except InputError as exc:
        error = exc
    raise_if_any(error, comm)
    if not (comm.allreduce(any_nonzero, op=mpi().LOR) if comm.Get_size() > 1 else any_nonzero):
        raise InputError(f"{lay.LOSVD}: every value is zero, so every model spectrum would be zero (the fit "
                         f"would be x = 0); expected at least one non-zero LOSVD")
    return info


def _validate_small(f, need, check_data) -> dict:
    _require(f, need)
    if check_data:
        _require(f, (lay.DATACUBE,))
    tem = np.asarray(f[lay.TEM_PIX][...], dtype=np.float64)
    obs = np.asarray(f[lay.OBS_PIX][...], dtype=np.float64)
    vel = np.asarray(f[lay.VEL_PIX][...], dtype=np.float64)
    check_grids(tem, obs, vel)
    P, T = _shape2(f, lay.TEMPLATES)
    if T != tem.size:
        raise InputError(f"{lay.TEMPLATES}: expected shape (P, {tem.size}) to match {lay.TEM_PIX}, got {(P, T)}")
    losvd_shape = f[lay.LOSVD].shape
    if len(losvd_shape) != 3 or losvd_shape[1] != vel.size:
        raise InputError(f"{lay.LOSVD}: expected shape (S, {vel.size}, C) to match {lay.VEL_PIX}, got {losvd_shape}")
    S, _, C = losvd_shape
    if lay.DATACUBE in f and f[lay.DATACUBE].shape != (S, obs.size):
        raise InputError(f"{lay.DATACUBE}: expected shape ({S}, {obs.size}) from {lay.LOSVD} and {lay.OBS_PIX}, "
                         f"got {f[lay.DATACUBE].shape}")
    if lay.R_T in f and f[lay.R_T].shape not in ((tem.size, obs.size), (obs.size, tem.size)):
        raise InputError(f"{lay.R_T}: expected shape ({tem.size}, {obs.size}), got {f[lay.R_T].shape}")
    mask = None
    if lay.MASK in f:
        if f[lay.MASK].shape != (obs.size,):
            raise InputError(f"{lay.MASK}: expected shape ({obs.size},), got {f[lay.MASK].shape}")
        mask = check_mask(np.asarray(f[lay.MASK][...]))
    if "dims" in f.attrs:
        stored = tuple(int(v) for v in f.attrs["dims"])
        actual = (S, obs.size, tem.size, vel.size, C, P)
        if stored != actual:
            raise InputError(f"{f.filename}: attribute dims={stored} disagrees with the datasets {actual} "
                             f"(nSpat, nLSpec, nTSpec, nVel, nComp, nPop)")
    check_finite(np.asarray(f[lay.TEMPLATES][...]), lay.TEMPLATES)
    return {"tem_pix": tem, "obs_pix": obs, "vel_pix": vel, "mask": mask,
            "dims": lay.H5Dims(S, obs.size, tem.size, vel.size, C, P)}


def _shape2(f, name):
    shape = f[name].shape
    if len(shape) != 2:
        raise InputError(f"{name}: expected a 2-D dataset, got shape {shape}")
    return shape
