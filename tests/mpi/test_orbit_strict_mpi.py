"""Strict orbit weights under MPI: the exact solve gives the same x, totals and multipliers on every
rank and as one rank; infeasible targets fail on every rank together; Kaczmarz strict holds the totals."""

import h5py
import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import assert_all, built_mock, same_everywhere

from cubefit_mpi.config.errors import InputError
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.solvers.exact import solve_exact
from cubefit_mpi.solvers.kaczmarz.solver import solve_kaczmarz

pytestmark = pytest.mark.mpi
comm = MPI.COMM_WORLD
TARGETS = np.array([0.5, 0.2, 0.3])


@pytest.fixture
def built(mpi_tmp_path, monkeypatch):
    monkeypatch.setenv("CUBEFIT_LAMBDA_WEIGHTS_ENABLE", "0")
    yield built_mock(mpi_tmp_path, MockSpec(spaxels=40, components=3, populations=6, wavelengths=120, seed=21, snr=25, masked_pixels=9), comm)


def test_strict_parallel_equals_serial(built):
    path, ref = built
    x, stats = solve_exact(str(path), orbit_weights=TARGETS, comm=comm)
    totals = x.reshape(3, 6).sum(axis=1)
    assert_all(stats["kkt.ok"] and stats["orbit_mode"] == "strict", "certificate")
    assert_all(np.allclose(totals, TARGETS * x.sum(), rtol=1e-10, atol=0), f"totals {totals}")
    assert_all(same_everywhere(x) and same_everywhere(stats["orbit_multipliers"]), "x differs between ranks")
    ok, text = True, ""
    if comm.rank == 0:
        x_ser, s_ser = solve_exact(str(ref), orbit_weights=TARGETS, comm=MPI.COMM_SELF)
        ok = (abs(stats["objective"] - s_ser["objective"]) <= 1e-10 * abs(s_ser["objective"])
              and np.allclose(x, x_ser, rtol=1e-7, atol=1e-9 * x_ser.max())
              and np.allclose(stats["orbit_multipliers"], s_ser["orbit_multipliers"], rtol=1e-6, atol=1e-9))
        text = f"objective {stats['objective']} vs {s_ser['objective']}"
        with h5py.File(path, "r") as f:
            ok = ok and np.array_equal(f["/Solve/orbit_multipliers"][...], stats["orbit_multipliers"])
    assert_all(ok, text)


def test_infeasible_fails_on_every_rank(built):
    path, _ = built
    with h5py.File(path, "r+", driver="mpio", comm=comm) as f:
        dset = f["/HyperCube/models"]
        if comm.rank == 0:
            dset[:, 2] = 0.0
    comm.Barrier()
    raised = ""
    try:
        solve_exact(str(path), orbit_weights=TARGETS, operator="hypercube", comm=comm)
    except InputError as exc:
        raised = str(exc)
    assert_all("component 2 has no light" in raised, raised or "no error")


def test_kaczmarz_strict_totals(built):
    path, _ = built
    x, stats = solve_kaczmarz(str(path), orbit_weights=TARGETS, epochs=2, comm=comm)
    totals = x.reshape(3, 6).sum(axis=1)
    assert_all(stats["orbit_mode"] == "strict" and np.allclose(totals, TARGETS * x.sum(), rtol=1e-12, atol=0),
               f"totals {totals}")
    assert_all(same_everywhere(x), "x differs between ranks")
