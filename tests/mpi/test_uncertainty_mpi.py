"""The bootstrap under MPI: the same replicate matrix and statistics at any rank count as one
rank, for both operators, with ranks that own no S-tile and batches not a multiple of the ranks."""
import shutil

import h5py
import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import assert_all, same_everywhere

from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.solvers.exact import solve_exact
from cubefit_mpi.solvers.uncertainty import DONE, REPLICATES, bootstrap_uncertainty
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.mock import make_mock

pytestmark = pytest.mark.mpi
comm = MPI.COMM_WORLD


@pytest.fixture
def fitted(mpi_tmp_path, monkeypatch, request):
    monkeypatch.setenv("CUBEFIT_LAMBDA_WEIGHTS_ENABLE", "0")
    operator = request.param
    path = mpi_tmp_path / "g.h5"
    make_mock(str(path), MockSpec(spaxels=27, components=3, populations=4, wavelengths=80, seed=8, snr=25,
                                  masked_pixels=4), comm)
    if operator == "hypercube":
        build_hypercube(str(path), S_chunk=5, comm=comm)
    solve_exact(str(path), operator=operator, regul=0.1, comm=comm)
    if comm.rank == 0:
        shutil.copy(path, mpi_tmp_path / "ref.h5")
    comm.Barrier()
    return path, mpi_tmp_path / "ref.h5"


@pytest.mark.parametrize("fitted", ["factored", "hypercube"], indirect=True)
@pytest.mark.parametrize("method", ["wild", "parametric"])
def test_same_replicates_at_any_rank_count(fitted, method):
    path, ref = fitted
    out = bootstrap_uncertainty(str(path), replicates=7, method=method, seed=3, batch=5, comm=comm)
    assert_all(out["computed"] == 7 and same_everywhere(out["summary"]["std"]), "summary differs between ranks")
    ok, message = True, ""
    if comm.rank == 0:
        bootstrap_uncertainty(str(ref), replicates=7, method=method, seed=3, batch=7, comm=MPI.COMM_SELF)
        with h5py.File(path, "r") as f, h5py.File(ref, "r") as g:
            rows, expected = f[REPLICATES][...], g[REPLICATES][...]
            ok = bool(np.all(f[DONE][...] == 1)) and np.allclose(rows, expected, rtol=1e-5, atol=1e-6 * expected.max())
            ok = ok and np.allclose(f["/Uncertainty/totals_std"][...], g["/Uncertainty/totals_std"][...], rtol=1e-4)
            message = f"max |diff| {np.abs(rows - expected).max():.3g}"
    assert_all(ok, message)


@pytest.mark.parametrize("fitted", ["factored"], indirect=True)
def test_extend_at_another_rank_count(fitted):
    path, ref = fitted
    if comm.rank == 0:
        bootstrap_uncertainty(str(path), replicates=3, seed=2, comm=MPI.COMM_SELF)
    comm.Barrier()
    out = bootstrap_uncertainty(str(path), replicates=6, seed=2, batch=2, comm=comm)
    ok = out["computed"] == 3
    if comm.rank == 0:
        bootstrap_uncertainty(str(ref), replicates=6, seed=2, comm=MPI.COMM_SELF)
        with h5py.File(path, "r") as f, h5py.File(ref, "r") as g:
            ok = ok and np.allclose(f[REPLICATES][...], g[REPLICATES][...], rtol=1e-5, atol=1e-7)
    assert_all(ok, "an extension at another rank count differs from one run")
