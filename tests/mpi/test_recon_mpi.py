"""Reconstruction and plots under MPI: same numbers at any rank count, ranks with no tile,
errors on every rank.  Run as ``mpiexec -n 2|3 python -m pytest --with-mpi tests/mpi``."""
import os
import shutil

import h5py
import numpy as np
import pytest
from mpi4py import MPI
from test_recon_plots import add_fit, assert_png, dense_reference, write_sidecar

from cubefit_mpi.config.errors import InputError
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.stages.mock import make_mock
from cubefit_mpi.stages.plots import make_plots
from cubefit_mpi.stages.recon import reconstruct

pytestmark = pytest.mark.mpi
comm = MPI.COMM_WORLD


def _fit_file(folder, name, **fit_kwargs):
    """A mock galaxy with a hand-made hypercube, written by rank 0; returns (path, A, x) everywhere."""
    path = folder / name
    models = x = None
    if comm.rank == 0:
        make_mock(str(path), MockSpec(spaxels=37, components=3, populations=4, wavelengths=80, seed=5,
                                      masked_pixels=4), MPI.COMM_SELF)
        models, x = add_fit(path, **fit_kwargs)
    models, x = comm.bcast((models, x), root=0)
    return path, models, x


def _read(path, name):
    if comm.rank != 0:
        return None
    with h5py.File(path, "r") as f:
        return f[name][...]


@pytest.mark.parametrize("fit_kwargs, s_tile, n_tiles", [
    (dict(chunks=(5, 1, 2), compression="gzip"), None, 8),     # 8 tiles: uneven over 3 ranks
    (dict(chunks=(16, 3, 4), compression="lzf"), 20, 2),        # 2 tiles of 32: a rank with none
    (dict(chunks=None), 6, 7),                                  # unchunked, no filter
])
def test_recon_same_at_any_rank_count(mpi_tmp_path, fit_kwargs, s_tile, n_tiles):
    x = np.zeros((3, 4))
    x[0, 1], x[2, :] = 1.5, [0.2, 0.0, 0.7, 1.1]                # component 1 never read
    path, models, x = _fit_file(mpi_tmp_path, "par.h5", x=x, **fit_kwargs)
    if comm.rank == 0:
        shutil.copy(path, mpi_tmp_path / "ser.h5")
    comm.Barrier()
    result = reconstruct(path, s_tile=s_tile, comm=comm)
    assert result["n_tiles"] == n_tiles
    totals = comm.allgather((result["chi2_total"], result["rmse_global"]))
    assert all(t == totals[0] for t in totals)
    if comm.rank == 0:
        serial = reconstruct(mpi_tmp_path / "ser.h5", s_tile=s_tile, comm=MPI.COMM_SELF)
        assert (serial["chi2_total"], serial["rmse_global"]) == pytest.approx(totals[0], rel=1e-12)
        for name in ("/ReconCube", "/ReconCube_chi2", "/ReconCube_rmse"):
            np.testing.assert_array_equal(_read(path, name), _read(mpi_tmp_path / "ser.h5", name))
        ref = dense_reference(models, x)
        np.testing.assert_allclose(_read(path, "/ReconCube"), ref, rtol=1e-6)
        assert np.max(np.abs(_read(path, "/ReconCube") - ref) / np.abs(ref)) < 1e-12
    comm.Barrier()


def test_bad_x_raises_on_every_rank_and_leaves_file(mpi_tmp_path):
    path, _, _ = _fit_file(mpi_tmp_path, "bad.h5")
    if comm.rank == 0:
        with h5py.File(path, "r+") as f:
            f["/X_global"][2] = -1.0
    comm.Barrier()
    before = os.path.getmtime(path), os.path.getsize(path)
    with pytest.raises(InputError, match=r"/X_global: negative value -1 at \(c=0, p=2\)"):
        reconstruct(path, comm=comm)
    assert (os.path.getmtime(path), os.path.getsize(path)) == before
    with h5py.File(path, "r") as f:
        assert "/ReconCube" not in f


def test_plots_under_mpi(mpi_tmp_path):
    path, _, _ = _fit_file(mpi_tmp_path, "plot.h5", chunks=(8, 1, 4))
    reconstruct(path, comm=comm)
    if comm.rank == 0:
        write_sidecar(f"{path}.fit.7.20250101T000000.h5")
    comm.Barrier()
    written = make_plots(path, mpi_tmp_path / "plots", n_spaxels=2, comm=comm)
    assert comm.allgather(written) == [written] * comm.size
    assert [os.path.basename(p) for p in written] == ["spectra_best_worst.png", "population_weights.png",
                                                      "component_totals.png", "convergence.png", "rmse_map.png"]
    if comm.rank == 0:
        assert_png(written[3], 700, 400)
        assert_png(written[4], 600, 500)
    with pytest.raises(InputError, match="--n -1: expected a positive integer"):
        make_plots(path, mpi_tmp_path / "plots", n_spaxels=-1, comm=comm)
