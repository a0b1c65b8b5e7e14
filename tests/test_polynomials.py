"""Additive and multiplicative Legendre polynomials: the numerics, the operators' weighted normal
equations against dense ones, the projected additive solve against the joint solve with explicit
polynomial columns, truth recovered from mocks with known polynomials (both operators), a
monotone objective, recon/plots/CLI/config and the refusals."""
import os
import shutil

import h5py
import numpy as np
import pytest
import scipy.optimize
from conftest import run_cli
from mpi4py import MPI
from test_factored_operator import dense_models

from cubefit_mpi.config.errors import InputError
from cubefit_mpi.numerics import polynomials as pl
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.operators import factored as factored_module
from cubefit_mpi.operators.base import Weighting
from cubefit_mpi.operators.select import open_operator
from cubefit_mpi.pipeline.runner import PipelineRunner
from cubefit_mpi.solvers.exact import solve_exact
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.mock import make_mock
from cubefit_mpi.stages.plots import make_plots
from cubefit_mpi.stages.recon import reconstruct

SELF = MPI.COMM_SELF


@pytest.fixture(autouse=True)
def no_auto_weights(monkeypatch):
    monkeypatch.setenv("CUBEFIT_LAMBDA_WEIGHTS_ENABLE", "0")


def mock(path, *, build=False, **spec):
    base = dict(spaxels=14, components=2, populations=4, wavelengths=90, seed=7, snr=None, masked_pixels=5)
    base.update(spec)
    make_mock(str(path), MockSpec(**base), SELF)
    if build:
        build_hypercube(str(path), S_chunk=4, comm=SELF)
    return path


def add_polynomials(path, add_degree=-1, mult_degree=0, seed=0, scale=(0.03, 0.05)):
    """Give every spectrum known polynomials: y ← g ⊙ y + Q a.  Returns (add, mult)."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "r+") as f:
        y = f["/DataCube"][...]
        S = y.shape[0]
        add = scale[0] * np.nanmedian(y) * rng.standard_normal((S, add_degree + 1)) if add_degree >= 0 else None
        mult = scale[1] * rng.standard_normal((S, mult_degree)) if mult_degree else None
        f["/DataCube"][...] = pl.with_polynomials(y, add, mult)
    return add, mult


def models_of(path, kind):
    if kind == "hypercube":
        with h5py.File(path, "r") as f:
            return f["/HyperCube/models"][...].astype(np.float64)
    return dense_models(path)


def data_of(path):
    with h5py.File(path, "r") as f:
        y = f["/DataCube"][...]
        mask = f["/Mask"][...].astype(bool)
    return y, mask


# --- numerics -----------------------------------------------------------------------------------
def test_square_coefficients_and_models():
    rng = np.random.default_rng(1)
    coeffs = rng.standard_normal((5, 3))
    L = 37
    g = pl.mult_factor(coeffs, pl.legendre_basis(L, 3, first=1))
    h = pl.square_coefficients(coeffs)
    np.testing.assert_allclose(h @ pl.legendre_basis(L, 6).T, g * g, rtol=1e-13, atol=1e-13)
    model = rng.uniform(1, 2, (5, L))
    add = rng.standard_normal((5, 3))
    expect = g * model + add @ np.polynomial.legendre.legvander(np.linspace(-1, 1, L), 2).T
    np.testing.assert_allclose(pl.with_polynomials(model, add, coeffs), expect, rtol=1e-14)


def test_additive_basis_projects_and_recovers():
    rng = np.random.default_rng(2)
    L, used = 50, np.flatnonzero(rng.uniform(size=50) > 0.2)
    sw = rng.uniform(0.5, 1.0, used.size)
    basis = pl.AdditiveBasis.make(L, 4, used, sw)
    q_w = pl.legendre_basis(L, 4)[used] * sw[:, None]
    np.testing.assert_allclose(basis.project(q_w.T), 0, atol=1e-13)
    a = rng.standard_normal((3, 5))
    other = rng.standard_normal((3, used.size))
    resid_w = a @ q_w.T + basis.project(other)
    np.testing.assert_allclose(basis.coefficients(resid_w), a, rtol=1e-11, atol=1e-12)
    with pytest.raises(ValueError, match="at least 5 used pixels"):
        pl.AdditiveBasis.make(L, 4, used[:4], sw[:4])


def test_fit_spectra_recovers_known_coefficients_and_never_worsens():
    rng = np.random.default_rng(3)
    L = 60
    used = np.arange(L)
    sw = rng.uniform(0.5, 1.0, L)
    mb = pl.legendre_basis(L, 3, first=1)
    additive = pl.AdditiveBasis.make(L, 2, used, sw)
    model = rng.uniform(1, 2, (4, L))
    mult, add = 0.1 * rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    y = pl.with_polynomials(model, add, mult)
    fit = pl.fit_spectra(model * sw, y * sw, mb, additive)
    np.testing.assert_allclose(fit["mult"], mult, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fit["add"], add, rtol=1e-10, atol=1e-12)
    assert np.all(fit["chi2"] <= fit["chi2_before"]) and fit["chi2"].max() < 1e-20
    again = pl.fit_spectra(model * sw, y * sw, mb, additive, old=fit["mult"])       # at the optimum: kept or equal
    assert np.all(again["chi2"] <= fit["chi2"] + 1e-30)


# --- the operators' weighted normal equations ----------------------------------------------------
def dense_normal_equations(models, y, mask, w, add_degree, mult, tangent):
    S, C, P, L = models.shape
    used = np.flatnonzero(mask)
    sw = np.sqrt(w[used])
    G, b, yy = np.zeros((C * P, C * P)), np.zeros(C * P), 0.0
    for s in range(S):
        design = models[s].reshape(C * P, L)[:, used] * sw
        if mult is not None:
            design = design * pl.mult_factor(mult[s:s + 1], pl.legendre_basis(L, mult.shape[1], 1)[used])
        z = y[s, used] * sw
        cols = []
        if add_degree >= 0:
            cols.append(pl.legendre_basis(L, add_degree)[used] * sw[:, None])
        if tangent is not None:
            cols.append(pl.legendre_basis(L, mult.shape[1], 1)[used] * tangent[s][:, None])
        if cols:
            z_cols = np.hstack(cols)
            proj = np.eye(used.size) - z_cols @ np.linalg.pinv(z_cols)         # independent of the QR/SVD
            design, z = design @ proj, proj @ z
        G += design @ design.T
        b += design @ z
        yy += z @ z
    return G, b, yy


@pytest.mark.parametrize("kind,route", [("factored", "factored"), ("factored", "spaxel"), ("hypercube", None)])
def test_weighted_normal_equations_equal_dense_ones(tmp_path, monkeypatch, kind, route):
    path = mock(tmp_path / "g.h5", snr=30, build=kind == "hypercube", spaxels=11)
    if route is not None:
        monkeypatch.setattr(factored_module, "MULT_ROUTE", route)
    models = models_of(path, kind)
    y, mask = data_of(path)
    S, C, P, L = models.shape
    rng = np.random.default_rng(4)
    w = rng.uniform(0.3, 1.0, L)
    mult = 0.1 * rng.standard_normal((S, 2))
    x = rng.uniform(0, 1, C * P)
    tangent = np.einsum("scpl,cp->sl", models, x.reshape(C, P))[:, mask] * np.sqrt(w[mask])
    op = open_operator(str(path), kind, comm=SELF)
    for add_degree, m, t in [(3, None, None), (-1, mult, None), (3, mult, None), (3, mult, tangent), (-1, mult, tangent)]:
        weighting = Weighting(mask, w, add_degree, m, t)
        G, b, yy = dense_normal_equations(models, y, mask, w, add_degree, m, t)
        scale = np.abs(G).max()
        ne = op.normal_equations(weighting, SELF)
        what = f"{kind}/{route}: add {add_degree}, mult {m is not None}, tangent {t is not None}"
        np.testing.assert_allclose(ne["gram"], G, rtol=0, atol=1e-11 * scale, err_msg=what)
        np.testing.assert_allclose(ne["rhs"], b, rtol=0, atol=1e-11 * np.abs(b).max(), err_msg=what)
        assert ne["yy"] == pytest.approx(yy, rel=1e-12), what
        np.testing.assert_allclose(ne["diag"], np.diag(G), rtol=0, atol=1e-11 * scale, err_msg=what)
        diag = op.diagonal_pass(weighting, SELF)
        np.testing.assert_allclose(diag["diag"], np.diag(G), rtol=0, atol=1e-11 * scale, err_msg=what)
        cols = np.array([0, C * P - 1])
        np.testing.assert_allclose(op.gram_columns(weighting, cols, SELF), G[:, cols], rtol=0, atol=1e-11 * scale)
        chi2 = yy - 2 * b @ x + x @ G @ x
        assert op.residual_chi2(weighting, x, SELF) == pytest.approx(chi2, rel=1e-9), what


# --- additive: the projected solve is the joint solve ---------------------------------------------
@pytest.mark.parametrize("kind", ["factored", "hypercube"])
def test_projected_additive_solve_equals_the_joint_solve(tmp_path, monkeypatch, kind):
    from cubefit_mpi.stages.weights import read_lambda_weights

    path = mock(tmp_path / "g.h5", snr=25, build=kind == "hypercube", spaxels=10, wavelengths=70)
    add_polynomials(path, add_degree=3, seed=5)
    with h5py.File(path, "r+") as f:
        f["/HyperCube/lambda_weights"] = np.random.default_rng(6).uniform(0.4, 1.0, 70)
    monkeypatch.setenv("CUBEFIT_LAMBDA_WEIGHTS_ENABLE", "1")
    weights = read_lambda_weights(str(path), comm=SELF)                         # as the solver reads them
    x, stats = solve_exact(str(path), add_degree=3, operator=kind, comm=SELF)
    assert stats["kkt.ok"] and stats["chi2_consistent"] and stats["poly.add_degree"] == 3
    models = models_of(path, kind)
    y, mask = data_of(path)
    S, C, P, L = models.shape
    sw = np.sqrt(weights[mask])
    q = pl.legendre_basis(L, 3)[mask] * sw[:, None]                               # (L_used, 4)
    design = (models[..., mask] * sw).transpose(0, 3, 1, 2).reshape(S * mask.sum(), C * P)
    poly_cols = np.kron(np.eye(S), q)                                             # signs free, per spectrum
    joint = np.hstack([design, poly_cols])
    target = (y[:, mask] * sw).reshape(-1)
    lower = np.concatenate([np.zeros(C * P), np.full(poly_cols.shape[1], -np.inf)])
    ref = scipy.optimize.lsq_linear(joint, target, bounds=(lower, np.inf), method="bvls", tol=1e-15)
    x_ref, a_ref = ref.x[:C * P], ref.x[C * P:].reshape(S, 4)
    chi2_ref = float(np.sum((target - joint @ ref.x) ** 2))
    assert stats["chi2"] == pytest.approx(chi2_ref, rel=1e-8)
    np.testing.assert_allclose(x, x_ref, rtol=0, atol=1e-8 * x_ref.max())
    with h5py.File(path, "r") as f:
        add = f["/Solve/add_poly"][...]
        assert f["/Solve/add_poly"].attrs["degree"] == 3 and "Legendre" in f["/Solve/add_poly"].attrs["basis"]
        assert "/Solve/mult_poly" not in f and f["/X_global"].attrs["add_degree"] == 3
    np.testing.assert_allclose(add, a_ref, rtol=0, atol=1e-8 * np.abs(a_ref).max())


@pytest.mark.parametrize("kind", ["factored", "hypercube"])
def test_additive_mock_recovers_the_truth_and_the_plain_fit_does_not(tmp_path, kind):
    path = mock(tmp_path / "g.h5", build=kind == "hypercube", spaxels=24)
    add_true, _ = add_polynomials(path, add_degree=4, seed=8)
    with h5py.File(path, "r") as f:
        truth = f["/Truth/x"][...].reshape(-1)
    x_plain, _ = solve_exact(str(path), operator=kind, comm=SELF)
    x, stats = solve_exact(str(path), add_degree=4, operator=kind, comm=SELF)
    assert stats["kkt.ok"]
    tol = 1e-6 if kind == "factored" else 1e-5                  # the stored hypercube is float32
    np.testing.assert_allclose(x, truth, rtol=0, atol=tol * truth.max())
    assert np.abs(x_plain - truth).max() > 1e-3 * truth.max()
    with h5py.File(path, "r") as f:
        np.testing.assert_allclose(f["/Solve/add_poly"][...], add_true, rtol=0, atol=tol * np.abs(add_true).max())


# --- multiplicative -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind,add_degree", [("factored", -1), ("factored", 2), ("hypercube", 2)])
def test_multiplicative_mock_recovers_x_and_g(tmp_path, kind, add_degree):
    path = mock(tmp_path / "g.h5", build=kind == "hypercube", spaxels=20)
    add_true, mult_true = add_polynomials(path, add_degree=add_degree, mult_degree=3, seed=9)
    with h5py.File(path, "r") as f:
        truth = f["/Truth/x"][...].reshape(-1)
    x, stats = solve_exact(str(path), add_degree=add_degree, mult_degree=3, operator=kind, comm=SELF)
    tol = 1e-6 if kind == "factored" else 1e-5                  # float32 models
    np.testing.assert_allclose(x, truth, rtol=0, atol=tol * truth.max())
    history = stats["poly.objective_history"]
    assert np.all(np.diff(history) <= 0), history               # never increases
    assert stats["poly.converged"] and stats["kkt.ok"]
    with h5py.File(path, "r") as f:
        mult = f["/Solve/mult_poly"][...]
        attrs = dict(f["/Solve/mult_poly"].attrs)
        add = f["/Solve/add_poly"][...] if add_degree >= 0 else None
    np.testing.assert_allclose(mult, mult_true, rtol=0, atol=tol)
    assert attrs["degree"] == 3 and attrs["iterations"] == stats["poly.iterations"]
    np.testing.assert_allclose(attrs["objective_history"], history)
    if add_degree >= 0:
        np.testing.assert_allclose(add, add_true, rtol=0, atol=10 * tol * np.abs(add_true).max())
    # the reconstruction includes them: it reproduces the (noise-free) data
    reconstruct(str(path), operator=kind, comm=SELF)
    y, mask = data_of(path)
    with h5py.File(path, "r") as f:
        recon = f["/ReconCube"][...]
        assert "mult_poly" in f["/ReconCube"].attrs["recon.polynomials"]
    assert np.abs(recon - y)[:, mask].max() < 10 * tol * np.nanmax(np.abs(y))


@pytest.mark.parametrize("ridge", [0.0, 0.05])
def test_noisy_multiplicative_fit_is_a_stationary_point_of_the_joint_problem(tmp_path, ridge):
    """With noise (and a ridge): the objective is monotone, the KKT certificate holds, and no joint
    (x >= 0, m, a) local solver lowers it."""
    path = mock(tmp_path / "g.h5", snr=30, spaxels=8, wavelengths=60, populations=3)
    add_polynomials(path, add_degree=1, mult_degree=2, seed=10)
    x, stats = solve_exact(str(path), add_degree=1, mult_degree=2, ridge=ridge, comm=SELF)
    assert np.all(np.diff(stats["poly.objective_history"]) <= 0) and stats["poly.converged"] and stats["kkt.ok"]
    models = dense_models(path)
    y, mask = data_of(path)
    S, C, P, L = models.shape
    with h5py.File(path, "r") as f:
        mult, add = f["/Solve/mult_poly"][...], f["/Solve/add_poly"][...]
    n = C * P

    def residual(theta):
        xs, m, a = theta[:n], theta[n:n + 2 * S].reshape(S, 2), theta[n + 2 * S:].reshape(S, 2)
        model = pl.with_polynomials(np.einsum("scpl,cp->sl", models, xs.reshape(C, P)), a, m)
        return np.concatenate([(y - model)[:, mask].reshape(-1), np.sqrt(ridge) * xs])

    theta = np.concatenate([x, mult.reshape(-1), add.reshape(-1)])
    ours = 0.5 * float(np.sum(residual(theta) ** 2))
    assert ours == pytest.approx(stats["objective"], rel=1e-10)
    lower = np.concatenate([np.zeros(n), np.full(4 * S, -np.inf)])
    start = theta + 0.01 * np.abs(theta).max() * np.random.default_rng(0).standard_normal(theta.size)
    ref = scipy.optimize.least_squares(residual, np.maximum(start, lower + 1e-12), bounds=(lower, np.inf),
                                       xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=2000)
    assert ours <= ref.cost * (1 + 1e-8)


def test_a_poor_frozen_hessian_is_refreshed(tmp_path, monkeypatch):
    """A frozen Hessian far too stiff (G + 10 max(diag G) I: tiny steps) makes slow progress: the fit
    takes the fresh Gauss-Newton Hessian instead and still recovers the truth."""
    from cubefit_mpi.solvers import polynomials as sp

    path = mock(tmp_path / "g.h5", spaxels=12)
    _, mult_true = add_polynomials(path, mult_degree=2, seed=11)
    real = sp.spectra_pass

    def stiff(inputs, weighting, x, **kwargs):
        out = real(inputs, weighting, x, **kwargs)
        if out["correction"] is not None:
            diag = inputs.operator.diagonal_pass(inputs.weighting, SELF)["diag"]
            out["correction"] = out["correction"] - 10 * diag.max() * np.eye(diag.size)
        return out

    monkeypatch.setattr(sp, "spectra_pass", stiff)
    x, stats = solve_exact(str(path), mult_degree=2, comm=SELF)
    steps = stats["poly.x_steps"].split(",")
    assert steps[:2] == ["frozen", "frozen"] and "fresh" in steps and stats["poly.converged"]
    assert np.all(np.diff(stats["poly.objective_history"]) <= 0) and stats["poly.gram_passes"] >= 1
    with h5py.File(path, "r") as f:
        truth = f["/Truth/x"][...].reshape(-1)
        np.testing.assert_allclose(f["/Solve/mult_poly"][...], mult_true, rtol=0, atol=1e-6)
    np.testing.assert_allclose(x, truth, rtol=0, atol=1e-6 * truth.max())


def test_useless_gauss_newton_steps_fall_back_to_the_exact_alternation(tmp_path, monkeypatch):
    """Gauss-Newton candidates that raise F (here x = 0) are refused: the exact x-step given g carries on."""
    from cubefit_mpi.solvers import polynomials as sp

    path = mock(tmp_path / "g.h5", spaxels=10)
    add_polynomials(path, mult_degree=2, seed=12)
    real = sp._Fit.step

    def spoiled(self, kind, x, state, hessian):
        if kind == "alternation":
            return real(self, kind, x, state, hessian)
        zero = np.zeros_like(x)
        return zero, sp.spectra_pass(self.inputs, self.weighting(state["mult"]), zero, fit_mult=True, gradient=True,
                                     comm=self.comm), hessian

    monkeypatch.setattr(sp._Fit, "step", spoiled)
    monkeypatch.setattr(sp, "MAX_ITERATIONS", 4)
    x, stats = solve_exact(str(path), mult_degree=2, comm=SELF)
    history = stats["poly.objective_history"]
    assert stats["poly.x_steps"] == "alternation,alternation,alternation,alternation"
    assert np.all(np.diff(history) <= 0) and history[-1] < history[1] and not stats["poly.converged"]
    assert stats["poly.gram_passes"] == 4                    # one g-weighted normal-equation pass per x-step


# --- caches, refusals, the command line, recon and plots ------------------------------------------
def test_the_cache_keys_on_the_additive_degree(tmp_path):
    path = mock(tmp_path / "g.h5", snr=30)
    _, s0 = solve_exact(str(path), comm=SELF)
    _, s1 = solve_exact(str(path), add_degree=2, comm=SELF)
    _, s2 = solve_exact(str(path), add_degree=2, comm=SELF)
    _, s3 = solve_exact(str(path), add_degree=3, comm=SELF)
    _, s4 = solve_exact(str(path), add_degree=3, mult_degree=1, comm=SELF)      # its g = 1 start is cached
    _, s5 = solve_exact(str(path), comm=SELF)
    assert [s["from_cache"] for s in (s0, s1, s2, s3, s4, s5)] == [False, False, True, False, True, False]
    with h5py.File(path, "r") as f:                                   # a plain solve removes stale polynomials
        assert "/Solve/add_poly" not in f and "/Solve/mult_poly" not in f
        assert f["/Solve/gram"].attrs["add.degree"] == "-1"


def test_working_set_handles_additive_and_refuses_multiplicative(tmp_path, monkeypatch):
    path = mock(tmp_path / "g.h5", snr=30, populations=6)
    x_g, s_g = solve_exact(str(path), add_degree=2, comm=SELF)
    monkeypatch.setenv("CUBEFIT_GRAM_MAX_BYTES", str(8 * 12 * 10))
    x_w, s_w = solve_exact(str(path), add_degree=2, comm=SELF)
    assert s_w["method"] == "exact-working-set" and s_w["kkt.ok"]
    assert s_w["chi2"] == pytest.approx(s_g["chi2"], rel=1e-9)
    np.testing.assert_allclose(x_w, x_g, rtol=1e-6, atol=1e-9 * x_g.max())
    with pytest.raises(InputError, match="--mult-degree 2: needs the Gram method"):
        solve_exact(str(path), mult_degree=2, comm=SELF)


def test_bad_degrees_and_kaczmarz_are_refused(tmp_path):
    path = mock(tmp_path / "g.h5")
    for kwargs, message in (({"add_degree": -2}, "--add-degree -2: expected an integer >= -1"),
                            ({"mult_degree": -1}, "--mult-degree -1: expected an integer >= 0"),
                            ({"add_degree": 2.5}, "--add-degree 2.5"),
                            ({"add_degree": 200}, "--add-degree 200: degree 200 needs at least 201 used pixels")):
        with pytest.raises(InputError, match=message):
            solve_exact(str(path), comm=SELF, **kwargs)
    with pytest.raises(InputError, match="--mult-degree 2: polynomials are fitted by the exact method only"):
        PipelineRunner(str(path), comm=SELF).solve("kaczmarz", mult_degree=2, add_degree=None)
    with h5py.File(path, "r") as f:
        assert "/X_global" not in f


def test_cli_solve_recon_plot_with_polynomials(tmp_path):
    path = mock(tmp_path / "g.h5", snr=40, spaxels=12)
    add_polynomials(path, add_degree=2, mult_degree=2, seed=12)
    out = run_cli("solve", path, "--add-degree", "2", "--mult-degree", "2", env={"CUBEFIT_LAMBDA_WEIGHTS_ENABLE": "0"})
    assert out.returncode == 0, out.stderr
    assert "polynomials (additive degree 2, multiplicative degree 2) in" in out.stdout
    assert run_cli("recon", path).returncode == 0
    written = make_plots(str(path), tmp_path / "plots", n_spaxels=1, comm=SELF)
    assert os.path.basename(written[-1]) == "polynomials.png" and os.path.getsize(written[-1]) > 1000
    with h5py.File(path, "r") as f:
        x, recon = f["/X_global"][...], f["/ReconCube"][...]
        add, mult = f["/Solve/add_poly"][...], f["/Solve/mult_poly"][...]
        chi2 = float(f["/Solve"].attrs["chi2"])
        chi2_recon = float(np.sum(f["/ReconCube_chi2"][...]))
    model = np.einsum("scpl,cp->sl", dense_models(path), x.reshape(2, 4))
    np.testing.assert_allclose(recon, pl.with_polynomials(model, add, mult), rtol=1e-10, atol=1e-12)
    assert chi2_recon == pytest.approx(chi2, rel=1e-8)
    bad = run_cli("solve", path, "--method", "kaczmarz", "--add-degree", "3")
    assert bad.returncode == 2 and "exact method only" in bad.stderr
    bad = run_cli("solve", path, "--mult-degree", "-1")
    assert bad.returncode == 2 and "--mult-degree -1" in bad.stderr


@pytest.mark.parametrize("degrees", [("--add-degree", "2"), ("--mult-degree", "1")])
def test_bootstrap_refuses_a_fit_with_polynomials(tmp_path, degrees):
    """`uncertainty` after a polynomial fit and `solve --bootstrap` with polynomials: exit 2, one
    line, the file unchanged (the bootstrap would refit only x on the plain normal equations)."""
    from conftest import file_bytes

    path = mock(tmp_path / "g.h5", snr=40)
    add = int(degrees[1]) if degrees[0] == "--add-degree" else None
    mult = int(degrees[1]) if degrees[0] == "--mult-degree" else None
    solve_exact(str(path), add_degree=add, mult_degree=mult, comm=SELF)
    before = file_bytes(path)
    for args in (("uncertainty", path, "--replicates", "2"), ("solve", path, *degrees, "--bootstrap", "2")):
        bad = run_cli(*args, env={"CUBEFIT_LAMBDA_WEIGHTS_ENABLE": "0"})
        assert bad.returncode == 2 and "the fit has polynomials" in bad.stderr, bad.stderr
        assert [line for line in bad.stderr.splitlines() if "error" in line.lower()] == [
            line for line in bad.stderr.splitlines() if "the fit has polynomials" in line], bad.stderr
        assert file_bytes(path) == before
    with pytest.raises(InputError, match="/X_global: the fit has polynomials"):
        from cubefit_mpi.solvers.uncertainty import bootstrap_uncertainty

        bootstrap_uncertainty(str(path), replicates=2, comm=SELF)


def test_recon_ignores_polynomials_of_another_x(tmp_path):
    path = mock(tmp_path / "g.h5", snr=40)
    solve_exact(str(path), add_degree=2, comm=SELF)
    with h5py.File(path, "r+") as f:
        f["/X_other"] = f["/X_global"][...] * 1.01
    result = reconstruct(str(path), x_dataset="/X_other", comm=SELF)
    assert "belongs to another x" in result["polynomials"]


def test_config_solve_section_takes_the_degrees(tmp_path):
    from cubefit_mpi.pipeline.config import SCHEMA, init_config_text, validate_config

    assert SCHEMA["solve"]["add_degree"].default is None and SCHEMA["solve"]["mult_degree"].default is None
    cfg = validate_config({"file": "g.h5", "steps": ["solve"], "solve": {"add_degree": 4, "mult_degree": 2}})
    assert cfg["solve"]["add_degree"] == 4 and cfg["solve"]["mult_degree"] == 2
    with pytest.raises(InputError, match="solve.mult_degree"):
        validate_config({"file": "g.h5", "solve": {"mult_degree": -1}})
    assert "add_degree: null" in init_config_text()
