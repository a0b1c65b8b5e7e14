"""Strict orbit weights: the equality-constrained NNLS against SLSQP, its certificate and exact
totals, the exact solve and the CLI (options, infeasible targets), and the bootstrap under the
constraints."""
import h5py
import numpy as np
import pytest
import scipy.optimize
from conftest import file_bytes, run_cli
from mpi4py import MPI

from cubefit_mpi.config.errors import InputError
from cubefit_mpi.numerics.certificate import certify
from cubefit_mpi.numerics.nnls import nnls_gram
from cubefit_mpi.numerics.nnls_equality import InfeasibleConstraints, constraint_residual, nnls_equality
from cubefit_mpi.numerics.regularization import orbit_factor
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.solvers.exact import solve_exact
from cubefit_mpi.solvers.orbit import orbit_spec
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.mock import make_mock

SELF = MPI.COMM_SELF


def slsqp(gram, rhs, M, d):
    """Dense reference: SLSQP with bounds and the (independent) equality rows."""
    n = rhs.size
    res = scipy.optimize.minimize(lambda x: 0.5 * x @ gram @ x - rhs @ x, np.full(n, 1.0 / n),
                                  jac=lambda x: gram @ x - rhs, method="SLSQP", bounds=[(0, None)] * n,
                                  constraints=[{"type": "eq", "fun": lambda x: M @ x - d, "jac": lambda x: M}],
                                  options={"ftol": 1e-14, "maxiter": 5000})
    assert res.success, res.message
    return res.fun


def random_problem(seed, C=3, P=8, rows=60):
    rng = np.random.default_rng(seed)
    n = C * P
    A = rng.random((rows, n))
    y = A @ (rng.random(n) * (rng.random(n) < 0.4)) + 0.05 * rng.standard_normal(rows)
    return A.T @ A, A.T @ y


def objective(gram, rhs, x):
    return 0.5 * x @ gram @ x - rhs @ x


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fractions_match_slsqp_and_certify(seed):
    gram, rhs = random_problem(seed)
    t = np.array([0.5, 0.3, 0.2])
    M = orbit_factor(3, 8, t, 1.0)                     # rank 2: its rows sum to 0
    calls = []

    def solver(g, b, *, tol, x0):
        calls.append(1)
        return nnls_gram(g, b, tol=tol, x0=x0)

    res = nnls_equality(gram, rhs, M, np.zeros(3), solver=solver)
    x = res.x
    assert calls and res.converged and np.all(x >= 0)
    totals = x.reshape(3, 8).sum(axis=1)
    np.testing.assert_allclose(totals, t * x.sum(), rtol=1e-10, atol=0)
    assert res.constraint_residual <= 1e-10
    assert certify(gram, rhs - M.T @ res.multipliers, x).ok
    assert abs(res.multipliers.sum()) <= 1e-10 * np.abs(res.multipliers).max()   # minimum-norm (1ᵀM = 0)
    ref = slsqp(gram, rhs, M[:-1], np.zeros(2))
    assert objective(gram, rhs, x) == pytest.approx(ref, rel=1e-8)
    plain = nnls_gram(gram, rhs).x
    assert objective(gram, rhs, x) >= objective(gram, rhs, plain) - 1e-12 * abs(objective(gram, rhs, plain))


def test_absolute_totals_match_slsqp():
    gram, rhs = random_problem(7)
    E = np.kron(np.eye(3), np.ones((1, 8)))
    m = np.array([1.0, 2.0, 0.5])
    res = nnls_equality(gram, rhs, E, m)
    np.testing.assert_allclose(res.x.reshape(3, 8).sum(axis=1), m, rtol=1e-10, atol=0)
    assert certify(gram, rhs - E.T @ res.multipliers, res.x).ok
    assert objective(gram, rhs, res.x) == pytest.approx(slsqp(gram, rhs, E, m), rel=1e-8)


def test_semidefinite_gram_and_zero_target():
    """Smooth, nearly identical templates (cond(G) ~ 1e18); a target 0 forces a component to 0."""
    rng = np.random.default_rng(3)
    C, P = 3, 40
    lam = np.linspace(0, 1, 80)
    T = np.array([np.exp(-((lam - c) / 0.2) ** 2) for c in np.linspace(0, 1, P)])
    A = np.hstack([T.T * (1 + 0.1 * c) for c in range(C)])
    A = np.vstack([A * rng.uniform(0.5, 1.5, (1, C * P)) for _ in range(3)])
    y = A @ rng.random(C * P) + 0.01 * rng.standard_normal(A.shape[0])
    gram, rhs = A.T @ A, A.T @ y
    assert np.linalg.cond(gram) > 1e14
    for t in (np.array([0.2, 0.3, 0.5]), np.array([0.6, 0.4, 0.0])):
        M = orbit_factor(C, P, t, 1.0)
        res = nnls_equality(gram, rhs, M, np.zeros(C))
        np.testing.assert_allclose(res.x.reshape(C, P).sum(axis=1), t * res.x.sum(), rtol=1e-10, atol=1e-14)
        assert certify(gram, rhs - M.T @ res.multipliers, res.x).ok


def test_infeasible_constraints_raise():
    gram, rhs = random_problem(4)
    gram[8:16, :] = 0.0
    gram[:, 8:16] = 0.0                                # component 1 has no light
    E = np.kron(np.eye(3), np.ones((1, 8)))
    with pytest.raises(InfeasibleConstraints):
        nnls_equality(gram, rhs, E, np.array([1.0, 1.0, 1.0]))
    with pytest.raises(InfeasibleConstraints):         # x >= 0 cannot give a negative total
        nnls_equality(*random_problem(4), E, np.array([1.0, -1.0, 1.0]))
    assert constraint_residual(E, np.zeros(3), np.zeros(24)) == 0.0


def test_orbit_spec_rules():
    assert orbit_spec("1,3", 2).mode == "strict"
    assert orbit_spec("1,3", 2, strength=5.0).mode == "penalty"
    assert orbit_spec(None, 2).mode == "none"
    np.testing.assert_allclose(orbit_spec("1,3", 2, totals="absolute").targets, [1.0, 3.0])
    np.testing.assert_allclose(orbit_spec("1,3", 2).targets, [0.25, 0.75])
    for kwargs, text in [({"mode": "strict", "strength": 1.0}, "--orbit-strength: not used"),
                         ({"mode": "penalty", "totals": "absolute", "strength": 1.0}, "--orbit-totals absolute"),
                         ({"mode": "hard"}, "--orbit-mode hard"), ({"totals": "mass"}, "--orbit-totals mass")]:
        with pytest.raises(InputError, match=text):
            orbit_spec("1,3", 2, **kwargs)
    with pytest.raises(InputError, match="need --orbit-weights"):
        orbit_spec(None, 2, mode="strict")


# --- the exact solve on a cube -------------------------------------------------------------------
@pytest.fixture
def cube(tmp_path, monkeypatch):
    monkeypatch.setenv("CUBEFIT_LAMBDA_WEIGHTS_ENABLE", "0")
    path = tmp_path / "g.h5"
    make_mock(str(path), MockSpec(spaxels=24, components=2, populations=6, wavelengths=120, seed=5, snr=40.0,
                                  masked_pixels=6), SELF)
    build_hypercube(str(path), S_chunk=5, comm=SELF)
    return path


def dense_gram(path):
    with h5py.File(path, "r") as f:
        A = f["/HyperCube/models"][...].astype(np.float64)
        y = f["/DataCube"][...]
        mask = f["/Mask"][...] if "/Mask" in f else np.ones(y.shape[1], bool)
    S, C, P, L = A.shape
    design = A[..., mask].transpose(0, 3, 1, 2).reshape(-1, C * P)
    target = y[:, mask].reshape(-1)
    return design.T @ design, design.T @ target, float(target @ target)


def test_exact_strict_fractions(cube):
    t = np.array([0.3, 0.7])
    x, stats = solve_exact(str(cube), operator="hypercube", orbit_weights=t, comm=SELF)
    assert stats["orbit_mode"] == "strict" and stats["kkt.ok"] and stats["chi2_consistent"]
    np.testing.assert_allclose(x.reshape(2, 6).sum(axis=1), t * x.sum(), rtol=1e-10, atol=0)
    gram, rhs, yy = dense_gram(cube)
    M = orbit_factor(2, 6, t, 1.0)
    ref = slsqp(gram / yy, rhs / yy, M[:1], np.zeros(1)) * yy
    assert stats["objective"] - 0.5 * yy == pytest.approx(ref, rel=1e-8)
    assert certify(gram, rhs - M.T @ stats["orbit_multipliers"], x).ok
    with h5py.File(cube) as f:
        np.testing.assert_allclose(f["/Solve/orbit_multipliers"][...], stats["orbit_multipliers"])
        np.testing.assert_allclose(f["/Solve/orbit_weights"][...], t)
        assert f["/Solve"].attrs["orbit_mode"] == "strict" and f["/Solve"].attrs["orbit_totals"] == "fractions"
        assert f["/Solve"].attrs["orbit_constraint_residual"] <= 1e-10
    solve_exact(str(cube), operator="hypercube", comm=SELF)
    with h5py.File(cube) as f:
        assert "/Solve/orbit_multipliers" not in f                  # a later solve leaves nothing stale


def test_cli_absolute_totals_and_bootstrap(cube):
    res = run_cli("solve", cube, "--orbit-weights", "2.5,0.5", "--orbit-totals", "absolute", "--bootstrap", "3",
                  env={"CUBEFIT_LAMBDA_WEIGHTS_ENABLE": "0"})
    assert res.returncode == 0, res.stderr
    assert "KKT certificate OK" in res.stdout
    with h5py.File(cube) as f:
        x = f["/X_global"][...]
        np.testing.assert_allclose(x.reshape(2, 6).sum(axis=1), [2.5, 0.5], rtol=1e-10)
        np.testing.assert_allclose(f["/Solve/orbit_masses"][...], [2.5, 0.5])
        reps = f["/Uncertainty/replicates"][...]
    np.testing.assert_allclose(reps.reshape(-1, 2, 6).sum(axis=2), np.tile([2.5, 0.5], (reps.shape[0], 1)),
                               rtol=1e-10)


def _dark(path):
    with h5py.File(path, "r+") as f:
        models = f["/HyperCube/models"]
        models[:, 1] = 0.0


BAD = [
    ("dark", _dark, ["--orbit-weights", "0.5,0.5", "--operator", "hypercube"], "--orbit-weights: component 1 has no light"),
    ("dark_absolute", _dark, ["--orbit-weights", "1,1", "--orbit-totals", "absolute", "--operator", "hypercube"],
     "--orbit-weights: component 1 has no light"),
    ("strength_with_strict", None, ["--orbit-weights", "1,1", "--orbit-mode", "strict", "--orbit-strength", "3"],
     "--orbit-strength: not used by --orbit-mode strict"),
    ("absolute_penalty", None, ["--orbit-weights", "1,1", "--orbit-totals", "absolute", "--orbit-strength", "3"],
     "--orbit-totals absolute: needs --orbit-mode strict"),
    ("penalty_no_mu", None, ["--orbit-weights", "1,1", "--orbit-mode", "penalty"],
     "--orbit-mode penalty: the exact method needs --orbit-strength > 0"),
    ("working_set", None, ["--orbit-weights", "1,1", "--exact-method", "working-set"],
     "--orbit-mode strict: needs the Gram method"),
    ("polynomials", None, ["--orbit-weights", "1,1", "--add-degree", "2"],
     "--orbit-mode strict: not available with --add-degree"),
]


@pytest.mark.parametrize("name,prepare,args,message", BAD, ids=[b[0] for b in BAD])
def test_bad_orbit_input_exits_2_with_one_line(cube, name, prepare, args, message):
    if prepare is not None:
        prepare(cube)
    before = file_bytes(cube)
    res = run_cli("solve", cube, *args, env={"CUBEFIT_LAMBDA_WEIGHTS_ENABLE": "0"})
    assert res.returncode == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if " INFO " not in ln and ln.strip()]
    assert len(errors) == 1 and message in errors[0], res.stderr
    if name.startswith("dark"):                    # found after the Gram pass (cached), before any result
        with h5py.File(cube) as f:
            assert "/X_global" not in f and "/Solve/orbit_weights" not in f
    else:
        assert file_bytes(cube) == before
