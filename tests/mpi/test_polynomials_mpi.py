"""Polynomials under MPI: the same x, coefficients and objective history as one rank, for both
operators (and both ways of making the factored normal equations), truth recovered."""
import shutil

import h5py
import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import assert_all, same_everywhere

from cubefit_mpi.numerics import polynomials as pl
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.operators import factored as factored_module
from cubefit_mpi.operators.base import Weighting
from cubefit_mpi.operators.select import open_operator
from cubefit_mpi.solvers.exact import solve_exact
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.mock import make_mock
from cubefit_mpi.stages.recon import reconstruct

pytestmark = pytest.mark.mpi
comm = MPI.COMM_WORLD


def make_pair(directory, build: bool):
    path = directory / "g.h5"
    make_mock(str(path), MockSpec(spaxels=23, components=2, populations=4, wavelengths=90, seed=13, masked_pixels=5),
              comm)
    if build:
        build_hypercube(str(path), S_chunk=3, comm=comm)
    if comm.rank == 0:
        rng = np.random.default_rng(14)
        with h5py.File(path, "r+") as f:
            y = f["/DataCube"][...]
            add = 0.03 * np.nanmedian(y) * rng.standard_normal((y.shape[0], 3))
            mult = 0.05 * rng.standard_normal((y.shape[0], 3))
            f["/DataCube"][...] = pl.with_polynomials(y, add, mult)
            f["/Truth/add_poly"], f["/Truth/mult_poly"] = add, mult
        shutil.copy(path, directory / "ref.h5")
    comm.Barrier()
    return path, directory / "ref.h5"


@pytest.mark.parametrize("refresh", [False, True])
@pytest.mark.parametrize("kind", ["factored", "hypercube"])
def test_polynomial_fit_at_any_rank_count(mpi_tmp_path, monkeypatch, kind, refresh):
    """``refresh``: the Hessian made afresh after every frozen step (the g-weighted normal equations)."""
    from cubefit_mpi.solvers import polynomials as sp

    monkeypatch.setenv("CUBEFIT_LAMBDA_WEIGHTS_ENABLE", "0")
    monkeypatch.setattr(factored_module, "TILE_BYTES", 20_000)            # several S-tiles: every rank owns some
    if refresh:
        monkeypatch.setattr(sp, "SLOW", -1.0)
    path, ref = make_pair(mpi_tmp_path, build=kind == "hypercube")
    x, stats = solve_exact(str(path), add_degree=2, mult_degree=3, operator=kind, comm=comm)
    steps = stats["poly.x_steps"].split(",")
    assert_all(not refresh or "fresh" in steps[:3], stats["poly.x_steps"])
    reconstruct(str(path), operator=kind, comm=comm)
    assert_all(same_everywhere(x) and same_everywhere(stats["poly.objective_history"]), "x differs between ranks")
    history = stats["poly.objective_history"]
    assert_all(np.all(np.diff(history) <= 0) and stats["poly.converged"], f"history {history}")
    ok, message = True, ""
    if comm.rank == 0:
        x_ser, s_ser = solve_exact(str(ref), add_degree=2, mult_degree=3, operator=kind, comm=MPI.COMM_SELF)
        with h5py.File(path, "r") as f, h5py.File(ref, "r") as g:
            truth = f["/Truth/x"][...].reshape(-1)
            mult, mult_ser, mult_true = f["/Solve/mult_poly"][...], g["/Solve/mult_poly"][...], f["/Truth/mult_poly"][...]
            add, add_true = f["/Solve/add_poly"][...], f["/Truth/add_poly"][...]
            y, recon, mask = f["/DataCube"][...], f["/ReconCube"][...], f["/Mask"][...].astype(bool)
        tol = 1e-6 if kind == "factored" else 1e-5             # the stored hypercube is float32
        checks = {
            "x as one rank": np.allclose(x, x_ser, rtol=0, atol=1e-9 * x_ser.max()),
            "mult as one rank": np.allclose(mult, mult_ser, rtol=0, atol=1e-9),
            "x_true": np.allclose(x, truth, rtol=0, atol=tol * truth.max()),
            "g_true": np.allclose(mult, mult_true, rtol=0, atol=tol),
            "a_true": np.allclose(add, add_true, rtol=0, atol=10 * tol * np.abs(add_true).max()),
            "recon": np.abs(recon - y)[:, mask].max() < 10 * tol * np.nanmax(np.abs(y)),
        }
        ok = all(checks.values())
        message = f"failed: {[k for k, v in checks.items() if not v]}; x err {np.abs(x - truth).max():.3g}"
    assert_all(ok, message)


@pytest.mark.parametrize("kind,route", [("factored", "spaxel"), ("factored", "factored"), ("hypercube", None)])
def test_weighted_normal_equations_at_any_rank_count(mpi_tmp_path, monkeypatch, kind, route):
    """The g-weighted, projected normal equations of the fallback x-steps: the same at any rank count."""
    if route is not None:
        monkeypatch.setattr(factored_module, "MULT_ROUTE", route)
        monkeypatch.setattr(factored_module, "TILE_BYTES", 20_000)
    path, ref = make_pair(mpi_tmp_path, build=kind == "hypercube")
    with h5py.File(path, "r", driver="mpio", comm=comm) as f:
        mask = f["/Mask"][...].astype(bool)
        S, L = f["/DataCube"].shape
    rng = np.random.default_rng(15)
    weights = rng.uniform(0.5, 1.0, L)
    mult = 0.05 * rng.standard_normal((S, 3))
    tangent = rng.uniform(0.5, 1.5, (S, int(mask.sum())))
    weighting = Weighting(mask, weights, 2, mult, tangent)
    ne = open_operator(str(path), kind, comm=comm).normal_equations(weighting, comm)
    assert_all(same_everywhere(ne["rhs"]) and same_everywhere(ne["diag"]))
    ok, message = True, ""
    if comm.rank == 0:
        serial = open_operator(str(ref), kind, comm=MPI.COMM_SELF).normal_equations(weighting, MPI.COMM_SELF)
        scale = np.abs(serial["gram"]).max()
        ok = (np.abs(ne["gram"] - serial["gram"]).max() <= 1e-12 * scale
              and np.allclose(ne["rhs"], serial["rhs"], rtol=1e-12, atol=1e-14 * np.abs(serial["rhs"]).max())
              and abs(ne["yy"] - serial["yy"]) <= 1e-12 * serial["yy"])
        message = f"G differs by {np.abs(ne['gram'] - serial['gram']).max() / scale:.3g} (relative)"
    assert_all(ok, message)
