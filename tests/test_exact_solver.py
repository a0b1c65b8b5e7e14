"""The exact solver: against scipy's NNLS on the dense weighted system, brute force, the truth,
its cache, its quadratic terms, the working-set variant and its input errors."""
import itertools
import shutil

import h5py
import numpy as np
import pytest
import scipy.optimize
from conftest import file_bytes, run_cli
from mpi4py import MPI

from cubefit_mpi.config import knobs as knobs_module
from cubefit_mpi.config.errors import ConsistencyError, InputError
from cubefit_mpi.numerics.regularization import difference_operator, orbit_factor
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.solvers.exact import solve_exact
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.mock import make_mock

SELF = MPI.COMM_SELF


@pytest.fixture(autouse=True)
def no_auto_weights(monkeypatch):
    """Unweighted unless a test asks (weights are tested in their own module)."""
    monkeypatch.setenv("CUBEFIT_LAMBDA_WEIGHTS_ENABLE", "0")
    yield


def make_case(tmp_path, name="case.h5", mutate=None, **spec):
    params = dict(spaxels=24, components=2, populations=6, wavelengths=120, seed=5, snr=40.0, masked_pixels=6)
    params.update(spec)
    path = tmp_path / name
    make_mock(str(path), MockSpec(**params), SELF)
    if mutate is not None:
        with h5py.File(path, "r+") as f:
            mutate(f)
    build_hypercube(str(path), S_chunk=5, comm=SELF)
    return path


def dense_system(path, weights=None):
    """The weighted dense design (rows = (s, λ used), columns = (c, p)) and target."""
    with h5py.File(path, "r") as f:
        A = f["/HyperCube/models"][...].astype(np.float64)
        y = f["/DataCube"][...]
        mask = f["/Mask"][...] if "/Mask" in f else np.ones(y.shape[1], bool)
    S, C, P, L = A.shape
    sw = np.ones(mask.sum()) if weights is None else np.sqrt(weights[mask])
    design = (A[..., mask] * sw).transpose(0, 3, 1, 2).reshape(-1, C * P)
    target = (y[:, mask] * sw).reshape(-1)
    return design, target


def objective(design, target, x, extra=None):
    r = target - design @ x
    value = 0.5 * float(r @ r)
    if extra is not None:
        value += 0.5 * float(np.sum((extra @ x) ** 2))
    return value


def scipy_objective(design, target, extra=None):
    if extra is not None:
        design = np.vstack([design, extra])
        target = np.concatenate([target, np.zeros(extra.shape[0])])
    x, _ = scipy.optimize.nnls(design, target, maxiter=50 * design.shape[1])
    return objective(design, target, x), x


def test_noise_free_well_posed_recovers_truth(tmp_path):
    path = make_case(tmp_path, snr=None, populations=4, components=2, spaxels=40)
    x, stats = solve_exact(str(path), operator="hypercube", comm=SELF)
    with h5py.File(path) as f:
        truth = f["/Truth/x"][...].ravel()
        assert np.array_equal(f["/X_global"][...], x)
        assert f["/Solve"].attrs["kkt.ok"] and f["/Solve"].attrs["method"] == "exact-gram"
    assert np.abs(x - truth).max() <= 1e-6 * truth.max()
    assert stats["kkt.ok"] and stats["converged"]


CASES = {
    "noisy": None,
    "duplicate_and_zero_columns": lambda f: (f["/Templates"].__setitem__(1, f["/Templates"][0]),
                                             f["/Templates"].__setitem__(4, np.zeros(f["/Templates"].shape[1]))),
    "b_nonpositive": lambda f: f["/DataCube"].__setitem__(Ellipsis, -np.abs(f["/DataCube"][...])),
    "scaled_1e-9": lambda f: f["/Templates"].__setitem__(Ellipsis, 1e-9 * f["/Templates"][...]),
    "permuted": lambda f: f["/Templates"].__setitem__(Ellipsis, f["/Templates"][...][[3, 0, 5, 1, 4, 2]]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_objective_equals_scipy_nnls_and_brute_force(tmp_path, case):
    path = make_case(tmp_path, mutate=CASES[case])
    x, stats = solve_exact(str(path), operator="hypercube", comm=SELF)
    design, target = dense_system(path)
    ours = objective(design, target, x)
    ref, _ = scipy_objective(design, target)
    scale = 0.5 * float(target @ target)
    assert ours <= ref + 1e-9 * scale, (ours, ref)
    assert abs(ours - ref) <= 1e-9 * scale
    assert abs(stats["objective"] - ours) <= 1e-9 * scale      # the reported value is the computed one
    assert stats["kkt.ok"] and stats["chi2_consistent"]
    assert stats["chi2"] == pytest.approx(2 * ours, rel=1e-9, abs=1e-12 * scale)
    # brute force over every support (N = 12)
    best = np.inf
    n = design.shape[1]
    for k in range(0, n + 1):
        for support in itertools.combinations(range(n), k):
            if not support:
                best = min(best, objective(design, target, np.zeros(n)))
                continue
            sub = design[:, support]
            coef, *_ = np.linalg.lstsq(sub, target, rcond=None)
            if np.all(coef >= -1e-12):
                full = np.zeros(n)
                full[list(support)] = np.maximum(coef, 0)
                best = min(best, objective(design, target, full))
    assert abs(ours - best) <= 1e-9 * scale
    if case == "b_nonpositive":
        assert np.all(x == 0)


def test_unconstrained_optimum_negative_is_handled(tmp_path):
    path = make_case(tmp_path, snr=8.0, populations=6, seed=11)
    design, target = dense_system(path)
    unconstrained, *_ = np.linalg.lstsq(design, target, rcond=None)
    assert unconstrained.min() < 0                      # the case is really constrained
    x, stats = solve_exact(str(path), operator="hypercube", comm=SELF)
    assert x.min() >= 0 and stats["kkt.ok"]
    ref, _ = scipy_objective(design, target)
    assert abs(objective(design, target, x) - ref) <= 1e-9 * 0.5 * float(target @ target)


def test_weights_ridge_smoothness_and_orbit_terms(tmp_path, monkeypatch):
    path = make_case(tmp_path, populations=6, components=2)
    with h5py.File(path, "r+") as f:
        L = f["/DataCube"].shape[1]
        w = np.linspace(0.2, 1.0, L)
        f["/HyperCube/lambda_weights"] = w
        pop_shape = tuple(f["/Templates"].attrs["pop_shape"])
    monkeypatch.setenv("CUBEFIT_LAMBDA_WEIGHTS_ENABLE", "1")
    design, target = dense_system(path, weights=w)
    n = design.shape[1]
    ridge, regul, mu = 50.0, 300.0, 2e4
    targets = np.array([0.7, 0.3])
    d = difference_operator(pop_shape, 2).toarray()
    extra = np.vstack([np.sqrt(ridge) * np.eye(n), np.sqrt(regul) * np.kron(np.eye(2), d),
                       orbit_factor(2, 6, targets, mu)])
    x, stats = solve_exact(str(path), operator="hypercube", ridge=ridge, regul=regul, orbit_weights=targets, orbit_strength=mu, comm=SELF)
    ref, _ = scipy_objective(design, target, extra)
    ours = objective(design, target, x, extra)
    assert abs(ours - ref) <= 1e-9 * 0.5 * float(target @ target)
    assert stats["objective"] == pytest.approx(ours, rel=1e-9)
    totals = x.reshape(2, 6).sum(1)
    with h5py.File(path) as f:
        np.testing.assert_allclose(f["/Solve/orbit_weights"][...], targets)
        assert f["/Solve"].attrs["orbit_mode"] == "penalty" and "/Solve/orbit_multipliers" not in f
    plain, _ = solve_exact(str(path), operator="hypercube", comm=SELF)
    frac_plain = plain.reshape(2, 6).sum(1) / plain.sum()
    assert abs(totals[0] / totals.sum() - 0.7) < abs(frac_plain[0] - 0.7)   # pulled toward the targets
    with h5py.File(path) as f:
        assert "/Solve/orbit_weights" not in f and f["/Solve"].attrs["orbit_mode"] == "none"   # not stale


def test_cache_reused_and_stale_cache_detected(tmp_path):
    path = make_case(tmp_path)
    x1, s1 = solve_exact(str(path), operator="hypercube", comm=SELF)
    assert not s1["from_cache"] and s1["passes"] == 1
    x2, s2 = solve_exact(str(path), operator="hypercube", ridge=10.0, verify=False, comm=SELF)
    assert s2["from_cache"] and s2["passes"] == 0 and not np.allclose(x1, x2)
    with h5py.File(path, "r+") as f:                    # change the data: the cache must not be used
        f["/DataCube"][0, 0] = f["/DataCube"][0, 0] + 1.0
    _, s3 = solve_exact(str(path), operator="hypercube", comm=SELF)
    assert not s3["from_cache"]
    from cubefit_mpi.stages.convert_norm import convert_hypercube_norm
    convert_hypercube_norm(str(path), "data", comm=SELF)   # other models: stale again
    _, s4 = solve_exact(str(path), operator="hypercube", comm=SELF)
    assert not s4["from_cache"]


def test_a_cache_that_disagrees_with_the_residual_pass_is_discarded(tmp_path):
    path = make_case(tmp_path)
    x1, s1 = solve_exact(str(path), operator="hypercube", comm=SELF)
    with h5py.File(path, "r+") as f:                    # the models changed behind the cache's back
        f["/Solve/gram"][0, 0] *= 3.0
        before = f["/X_global"][...]
    with pytest.raises(ConsistencyError, match=r"chi2 = .* but the normal equations give .*discarded"):
        solve_exact(str(path), operator="hypercube", comm=SELF)
    with h5py.File(path, "r") as f:
        assert "/Solve/gram" not in f and np.array_equal(f["/X_global"][...], before)
    x2, s2 = solve_exact(str(path), operator="hypercube", comm=SELF)
    assert not s2["from_cache"] and s2["chi2_consistent"]
    np.testing.assert_allclose(x2, x1, rtol=1e-9, atol=1e-12 * x1.max())


def test_working_set_equals_full_gram(tmp_path, monkeypatch):
    path = make_case(tmp_path, populations=12, components=3, snr=30.0)
    x_full, s_full = solve_exact(str(path), operator="hypercube", comm=SELF)
    monkeypatch.setenv("CUBEFIT_GRAM_MAX_BYTES", str(8 * 36 * 30))
    x_ws, s_ws = solve_exact(str(path), operator="hypercube", comm=SELF)
    assert s_ws["method"] == "exact-working-set" and s_ws["kkt.ok"] and s_ws["passes"] >= 2
    assert s_ws["objective"] == pytest.approx(s_full["objective"], rel=1e-9)
    assert s_ws["chi2"] == pytest.approx(s_full["chi2"], rel=1e-9)


def _short_weights(path):
    with h5py.File(path, "r+") as f:
        f["/HyperCube/lambda_weights"] = np.ones(7)


def _incomplete(path):
    from cubefit_mpi.stages.hypercube_maintenance import invalidate_tiles
    invalidate_tiles(str(path), "5:9", comm=SELF)


BAD = [
    ("incomplete", _incomplete, [], r"/HyperCube/models: the hypercube is incomplete \(missing spaxels 5:10\); "
                                    r"finish it with `cubefit_mpi build"),
    ("weights_length", _short_weights, ["--method", "exact"], "/HyperCube/lambda_weights: expected"),
    ("orbit_length", None, ["--orbit-weights", "1,2,3", "--orbit-strength", "1"], "--orbit-weights: expected 2 values"),
    ("orbit_negative", None, ["--orbit-weights", "1,-2", "--orbit-strength", "1"], "--orbit-weights: expected finite non-negative"),
    ("gram_too_small", None, ["--exact-method", "working-set"], "CUBEFIT_GRAM_MAX_BYTES=16: cannot hold even one Gram column"),
    ("method", None, ["--method", "newton"], "--method newton: expected one of exact, kaczmarz"),
]


@pytest.mark.parametrize("name,prepare,args,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input(tmp_path, name, prepare, args, message):
    path = make_case(tmp_path)
    if prepare is not None:
        prepare(path)
    before = file_bytes(path)
    env = {"CUBEFIT_LAMBDA_WEIGHTS_ENABLE": "1" if name == "weights_length" else "0",
           "CUBEFIT_GRAM_MAX_BYTES": "16" if name == "gram_too_small" else "0"}
    res = run_cli("solve", path, *args, env=env)
    assert res.returncode == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if " INFO " not in ln and ln.strip()]
    assert len(errors) == 1, res.stderr
    import re
    assert re.search(message, errors[0]), errors[0]
    assert file_bytes(path) == before


def test_cli_solve_at_4_ranks_same_chi2(tmp_path):
    path = make_case(tmp_path)
    _, serial = solve_exact(str(path), operator="hypercube", use_cache=False, comm=SELF)
    res = run_cli("solve", path, "--no-cache", "--operator", "hypercube", np_ranks=4,
                  env={"CUBEFIT_LAMBDA_WEIGHTS_ENABLE": "0"})
    assert res.returncode == 0, res.stderr
    assert "KKT certificate OK" in res.stdout
    with h5py.File(path) as f:
        assert f["/Solve"].attrs["n_ranks"] == 4
        assert f["/Solve"].attrs["chi2"] == pytest.approx(serial["chi2"], rel=1e-10)


def test_difference_operator_shapes():
    d1 = difference_operator((3, 4), 1).toarray()
    assert d1.shape == (2 * 4 + 3 * 3, 12)
    assert np.allclose(d1 @ np.ones(12), 0)
    d2 = difference_operator((5,), 2).toarray()
    np.testing.assert_allclose(d2 @ np.arange(5.0), 0, atol=1e-12)
    u = orbit_factor(2, 3, np.array([1.0, 3.0]), 4.0)
    x = np.array([1, 0, 0, 1, 1, 1.0])                  # totals 1, 3 -> fractions 0.25/0.75: no penalty
    np.testing.assert_allclose(u @ x, 0, atol=1e-12)


def test_regularization_matvec_equals_the_dense_matrix():
    from cubefit_mpi.numerics.regularization import Regularization

    reg = Regularization.build(2, 6, ridge=0.3, regul=0.7, regul_order=1, pop_shape=(2, 3),
                               orbit_targets=np.array([1.0, 3.0]), orbit_strength=2.0)
    x = np.random.default_rng(3).standard_normal(12)
    np.testing.assert_allclose(reg.matvec(x), reg.dense() @ x, rtol=1e-13, atol=1e-13)
    assert reg.penalty(x) == pytest.approx(0.5 * x @ reg.dense() @ x, rel=1e-13)
