"""Components without light on part of the cube: build, the Gram passes (hypercube and factors),
recon and Kaczmarz skip them and give the same results as the full work."""
import shutil

import h5py
import numpy as np
import pytest
from conftest import run_cli
from mpi4py import MPI

from cubefit_mpi.numerics import factored as fa
from cubefit_mpi.numerics.support import lit_columns, summary, support_map, tile_support
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.operators import select
from cubefit_mpi.solvers.exact import solve_exact
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.mock import make_mock
from cubefit_mpi.stages.recon import reconstruct

SELF = MPI.COMM_SELF


@pytest.fixture(scope="module")
def dark_half(tmp_path_factory):
    """Component 1 is dark in the spaxels of every other S-tile (S-tiles of 4)."""
    path = tmp_path_factory.mktemp("support") / "g.h5"
    make_mock(str(path), MockSpec(spaxels=32, components=3, populations=6, wavelengths=90, seed=2, snr=40,
                                  masked_pixels=5), SELF)
    with h5py.File(path, "r+") as f:
        losvd = f["/LOSVD"][...]
        for s0 in range(0, 32, 8):
            losvd[s0:s0 + 4, :, 1] = 0.0
        f["/LOSVD"][...] = losvd
    build_hypercube(str(path), S_chunk=4, comm=SELF)
    return path


def test_support_numerics():
    support = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 1]], dtype=float) > 0
    np.testing.assert_array_equal(tile_support(support, [(0, 2), (2, 3)]), [[1, 0, 1], [0, 0, 1]])
    np.testing.assert_array_equal(lit_columns(np.array([True, False, True]), 2), [0, 1, 4, 5])
    assert summary(support).startswith("44.4% of (s, c) lit; spaxels lit per component: c0=2/3, c1=0/3, c2=2/3")
    kappa = np.random.default_rng(0).uniform(size=(3, 2, 4))
    kappa[1, 0] = 0.0
    basis = np.random.default_rng(1).uniform(size=(4, 5, 7))
    assert fa.lit_model_tile(kappa, basis).tobytes() == fa.model_tile(kappa, basis).tobytes()


def test_skipping_dark_components_gives_the_same_solve_and_recon(dark_half, tmp_path, monkeypatch):
    with h5py.File(dark_half, "r") as f:
        models = f["/HyperCube/models"][...]
        assert not np.any(models[0:4, 1]) and np.any(models[4:8, 1])      # the builder left them zero
        assert f["/HyperCube"].attrs["build.method"] == "gemm"
    full = tmp_path / "full.h5"
    shutil.copy(dark_half, full)
    x_skip, s_skip = solve_exact(str(dark_half), operator="hypercube", use_weights=False, comm=SELF)
    monkeypatch.setattr(select, "stored_support", lambda f, models: None)          # every pair as lit
    x_full, s_full = solve_exact(str(full), operator="hypercube", use_weights=False, comm=SELF)
    assert s_skip["kkt.ok"] and s_full["kkt.ok"]
    np.testing.assert_allclose(x_skip, x_full, rtol=1e-8, atol=1e-10 * x_full.max())   # G summed in another order
    assert s_skip["chi2"] == pytest.approx(s_full["chi2"], rel=1e-12)
    reconstruct(str(full), operator="hypercube", comm=SELF)
    monkeypatch.undo()
    reconstruct(str(dark_half), operator="hypercube", comm=SELF)
    with h5py.File(dark_half, "r") as f, h5py.File(full, "r") as g:
        np.testing.assert_allclose(f["/ReconCube"][...], g["/ReconCube"][...], rtol=1e-9, atol=1e-12)  # x to 1e-10
    x_f, s_f = solve_exact(str(dark_half), operator="factored", use_weights=False, comm=SELF)
    assert s_f["objective"] == pytest.approx(s_skip["objective"], rel=1e-5)     # float32 hypercube vs float64


def test_the_factors_skip_dark_rows_with_the_same_normal_equations(dark_half, monkeypatch):
    from cubefit_mpi.operators.base import Weighting

    with h5py.File(dark_half, "r") as f:
        mask = f["/Mask"][...].astype(bool)
    op = select.open_operator(str(dark_half), "factored", comm=SELF)
    skip = op.normal_equations(Weighting(mask, None), SELF)
    op = select.open_operator(str(dark_half), "factored", comm=SELF)
    op.support[:] = True
    full = op.normal_equations(Weighting(mask, None), SELF)
    np.testing.assert_allclose(skip["gram"], full["gram"], rtol=1e-13, atol=1e-13 * np.abs(full["gram"]).max())
    np.testing.assert_allclose(skip["rhs"], full["rhs"], rtol=1e-13, atol=1e-15)


def test_status_shows_the_support_map(dark_half):
    res = run_cli("status", dark_half)
    assert res.returncode == 0 and "component support" in res.stdout and "c1=16/32" in res.stdout
    assert support_map(np.array([[0.0, 1.0]])).tolist() == [[False, True]]
