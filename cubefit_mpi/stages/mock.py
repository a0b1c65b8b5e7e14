"""Stage ``mock``: write a synthetic galaxy with known truth in the spec's layout, under MPI.

The arrays come from :mod:`cubefit_mpi.numerics.synthetic_galaxy` (pure numerics); this stage creates the backbone
with :class:`~cubefit_mpi.io.h5file.H5Manager` and lets each rank compute and write its own
spaxels (LOSVD and data cube) in collective rounds.  Per-spaxel values depend only on the seed
and the spaxel index, so the file is byte-identical at any number of ranks.

Templates: synthetic (``MockSpec.templates="synthetic"``) or a real library shipped with the
package (``"miles"``: ``cubefit_mpi/data/miles_ssp_subset.npz``, 53 ages × 4 [M/H] of MILES,
read by every rank with :func:`~cubefit_mpi.io.ingest_readers.read_templates`).

Extra datasets: ``/Truth/x (C, P)``, ``/Truth/noise_sigma (S,)`` and the generating parameters
as ``/Truth`` attributes; ``/Spaxels/xy (S, 2)``; ``/Populations/log_age`` and
``/Populations/metallicity (P,)``; ``/Templates`` attribute ``pop_shape``.  With a library also
``/Populations/norm (P,)`` (each template's mean before normalisation, library units) and
``/Templates`` attributes ``library``, ``library.fwhm``, ``library.citation``, ``normalisation``.
A noisy mock (``snr``) also has the data variance ``/DataVar (S, L)`` (``noise_sigma²`` on every
pixel), as an ingested cube with a STAT extension.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import numpy as np

from ..io import layout as lay
from ..io.blocks import write_block, write_owned_rows
from ..io.h5file import open_h5
from ..io.space import require_free_space
from ..io.ingest_readers import read_templates
from ..io.layout import H5Dims
from ..io.manager import H5Manager
from ..numerics.rebin import rebin_operator
from ..numerics.synthetic_galaxy import DEFAULT_POPULATIONS, MockModel, MockSpec, make_grids, spaxel_xy
from ..parallel.comm import forget_on_abort, get_comm, on_abort
from ..parallel.decomposition import block_range, padded_schedule, tile_bounds

_LOG = logging.getLogger("cubefit_mpi.numerics.synthetic_galaxy")
DATA_DIR = Path(__file__).resolve().parents[1] / "data"
LIBRARIES = {"miles": "miles_ssp_subset.npz"}      # name -> file in DATA_DIR (package data)


def library_path(name: str) -> Path:
    """The shipped template library ``name`` (see ``cubefit_mpi/data/README.md``).  Local."""
    return DATA_DIR / LIBRARIES[name]


@functools.lru_cache(maxsize=4)
def load_library(name: str) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """``lam (T0,)`` Å, ``flux (P, T0)`` per Å, ``pop_info`` and the ``/Templates`` attributes
    (``library``, ``library.fwhm``, ``library.citation``) of a shipped library.  Local."""
    path = library_path(name)
    lam, flux, pop_info = read_templates(str(path))
    with np.load(path) as z:
        attrs = {"library": f"{name} ({path.name}, shipped with cubefit_mpi)",
                 "library.fwhm": float(z["fwhm"]), "library.citation": str(z["citation"])}
    return lam, flux, pop_info, attrs


def default_populations(templates: str) -> int:
    """P when ``--populations`` is not given: 24 synthetic ones, else all of the library.  Local."""
    if templates == "synthetic":
        return DEFAULT_POPULATIONS
    return int(load_library(templates)[1].shape[0])


def make_mock(path: str, spec: MockSpec, comm=None, *, rows_per_round: int = 256) -> dict:
    """Write the synthetic galaxy ``spec`` to ``path`` (an existing file is replaced once the new one is
    complete: it is written as ``path.partial`` and renamed).  Collective over comm.

    Returns a summary dict (dims, elapsed seconds, x_true).
    """
    comm = get_comm(comm)
    t0 = time.perf_counter()
    obs_pix, tem_pix, vel_pix = make_grids(spec)
    op = rebin_operator(tem_pix, obs_pix, "overlap")
    library, library_attrs = None, {}
    if spec.templates != "synthetic":
        *library, library_attrs = load_library(spec.templates)
    model = MockModel.create(spec, op, library)
    dims = H5Dims(nSpat=spec.spaxels, nLSpec=obs_pix.size, nTSpec=tem_pix.size, nVel=vel_pix.size,
                  nComp=spec.components, nPop=spec.populations)
    final, path = path, os.fspath(path) + ".partial"    # an existing file stays until the new one is complete
    require_free_space(path, mock_bytes(dims), "mock", comm)

    def drop_partial():
        try:
            os.remove(path)
        except FileNotFoundError:
            pass

    on_abort(drop_partial)             # a rank that aborts the job removes it too
    try:
        _write_mock(path, spec, dims, tem_pix, obs_pix, vel_pix, model, library_attrs, rows_per_round, comm)
    except BaseException:              # a full disk, a crash: no half-written file is left
        drop_partial()
        raise
    finally:
        forget_on_abort(drop_partial)
    comm.Barrier()
    if comm.Get_rank() == 0:
        os.replace(path, final)
    comm.Barrier()
    elapsed = time.perf_counter() - t0
    _LOG.info("mock galaxy: S=%d C=%d P=%d L=%d T=%d V=%d -> %s (%.1fs on %d ranks)",
              dims.S, dims.C, dims.P, dims.L, dims.T, dims.V, final, elapsed, comm.Get_size())
    return {"dims": dims, "seconds": elapsed, "x_true": model.x_true}


def mock_bytes(dims: H5Dims) -> int:
    """Bytes of a mock file of these dimensions (datasets and /R_T).  Local."""
    from ..io.space import dataset_bytes

    d = dims
    return (dataset_bytes((d.S, d.L), "f8") + dataset_bytes((d.S, d.V, d.C), "f8") + dataset_bytes((d.P + d.L, d.T), "f8")
            + dataset_bytes((d.S, 4), "f8") + 8 * (d.C * d.P + 3 * d.P + d.L + d.T + d.V))


def _write_mock(path, spec, dims, tem_pix, obs_pix, vel_pix, model, library_attrs, rows_per_round, comm) -> None:
    """Every dataset of the mock file ``path``.  Collective over comm."""
    mgr = H5Manager(path, tem_pix=tem_pix, obs_pix=obs_pix, comm=comm)
    mgr.init_base(dims, overwrite=True)
    mgr.populate_from_arrays(templates=model.templates, vel_pix=vel_pix, mask=model.mask,
                             pop_shape=model.pop_info["pop_shape"])
    mgr.ensure_rebin_and_resample("overlap")
    start, stop = block_range(spec.spaxels, comm.Get_size(), comm.Get_rank())
    my_tiles = [(start + a, start + b) for a, b in tile_bounds(stop - start, rows_per_round)]
    with open_h5(path, "r+", comm) as f:
        losvd_dset, data_dset = f[lay.LOSVD], f[lay.DATACUBE]
        sigma_dset = f.create_dataset(f"{lay.TRUTH}/noise_sigma", shape=(spec.spaxels,), dtype="f8")
        var_dset = None
        if spec.snr is not None:
            var_dset = f.create_dataset(lay.DATA_VAR, shape=(spec.spaxels, obs_pix.size), dtype="f8")
            var_dset.attrs["definition"] = "variance of /DataCube: /Truth/noise_sigma**2 on every pixel (mock)"
        dsets = (losvd_dset, data_dset, sigma_dset) + ((var_dset,) if var_dset is not None else ())
        for tile in padded_schedule(my_tiles, comm):
            if tile is None:
                for dset in dsets:
                    write_block(dset, None, None)
                continue
            s0, s1 = tile
            losvd = model.losvd(s0, s1)
            data, sigma = model.spectra(s0, s1, losvd)
            write_block(losvd_dset, (s0, 0, 0), losvd)
            write_block(data_dset, (s0, 0), data)
            write_block(sigma_dset, (s0,), sigma)
            if var_dset is not None:
                write_block(var_dset, (s0, 0), np.repeat((sigma ** 2)[:, None], obs_pix.size, axis=1))
        truth = f.create_dataset(lay.TRUTH_X, shape=model.x_true.shape, dtype="f8")
        write_owned_rows(truth, model.x_true, comm)
        xy = f.create_dataset(lay.SPAXEL_XY, shape=(spec.spaxels, 2), dtype="f8")
        write_owned_rows(xy, spaxel_xy(spec.spaxels), comm)
        for name in ("log_age", "metallicity", "norm"):
            if name in model.pop_info:
                d = f.create_dataset(f"/Populations/{name}", shape=(spec.populations,), dtype="f8")
                write_owned_rows(d, model.pop_info[name], comm)
        if library_attrs:
            f[lay.TEMPLATES].attrs.update({**library_attrs, "normalisation": (
                "each template divided by its mean over /TemPix (/Populations/norm): /Truth/x and /X_global are "
                "light weights; x / norm are the library's (mass) weights")})
        group = f[lay.TRUTH]
        for key, value in spec.attrs().items():
            group.attrs[key] = value
        group.attrs["norm.mode"] = "model"
        group.attrs["amp.mode"] = "sum"
        group.attrs["components"] = ",".join(c["kind"] for c in model.comps)
        group.attrs["generator"] = "cubefit_mpi.numerics.synthetic_galaxy (direct shift-and-add convolution, float64)"


def read_truth(path: str, comm=None) -> np.ndarray:
    """``/Truth/x`` as (C, P) float64.  Collective over comm."""
    with open_h5(path, "r", comm) as f:
        return np.asarray(f[lay.TRUTH_X][...])
