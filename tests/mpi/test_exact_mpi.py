"""The exact solver under MPI: the same chi2 and x as one rank, for both methods."""

import h5py
import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import built_mock

from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.solvers.exact import solve_exact

pytestmark = pytest.mark.mpi
comm = MPI.COMM_WORLD


@pytest.fixture
def built(mpi_tmp_path, monkeypatch):
    monkeypatch.setenv("CUBEFIT_LAMBDA_WEIGHTS_ENABLE", "0")
    yield built_mock(mpi_tmp_path, MockSpec(spaxels=50, components=3, populations=8, wavelengths=150, seed=21, snr=25, masked_pixels=9), comm)


@pytest.mark.parametrize("method", ["gram", "working-set"])
def test_parallel_equals_serial(built, method, monkeypatch):
    path, ref = built
    if method == "working-set":
        monkeypatch.setenv("CUBEFIT_GRAM_MAX_BYTES", str(8 * 24 * 20))
    x, stats = solve_exact(str(path), exact_method=method, comm=comm)
    assert stats["kkt.ok"] and stats["n_ranks"] == comm.size
    everywhere = comm.allgather(x)
    assert all(np.array_equal(everywhere[0], other) for other in everywhere)
    if comm.rank == 0:
        x_ser, s_ser = solve_exact(str(ref), exact_method=method, comm=MPI.COMM_SELF)
        assert stats["chi2"] == pytest.approx(s_ser["chi2"], rel=1e-10)
        assert stats["objective"] == pytest.approx(s_ser["objective"], rel=1e-10)
        np.testing.assert_allclose(x, x_ser, rtol=1e-7, atol=1e-9 * x_ser.max())
        with h5py.File(path, "r") as f:
            np.testing.assert_array_equal(f["/X_global"][...], x)
    comm.Barrier()
