"""Tests for cubefit_mpi.numerics.nnls (local NNLS solvers and KKT certificate)."""

import itertools

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize

from cubefit_mpi.numerics.certificate import KKTCertificate, kkt_certificate
from cubefit_mpi.numerics.nnls import NNLSResult, _PassiveCholesky, nnls_gram
from cubefit_mpi.numerics.nnls_dense import nnls_dense


# ---------------------------------------------------------------------------
# helpers (independent of the solver)
# ---------------------------------------------------------------------------
def gram_objective(gram, rhs, x):
    return 0.5 * x @ gram @ x - rhs @ x


def residual_objective(design, target, x):
    """0.5 ||A x - y||^2 - 0.5 ||y||^2 (= 0.5 x^T G x - b^T x)."""
    residual = design @ x - target
    return 0.5 * residual @ residual - 0.5 * target @ target


def scipy_objective(design, target):
    x_ref, _ = scipy.optimize.nnls(design, target, maxiter=50 * design.shape[1])
    return residual_objective(design, target, x_ref), x_ref


def normal_equations(design, target):
    return design.T @ design, design.T @ target


def assert_rel_close(value, reference, rtol):
    assert abs(value - reference) <= rtol * max(abs(reference), 1e-300), (value, reference)


def random_problem(rng, rows, cols, noise=0.3):
    design = rng.standard_normal((rows, cols))
    x_true = np.abs(rng.standard_normal(cols)) * (rng.random(cols) < 0.5)
    target = design @ x_true + noise * rng.standard_normal(rows)
    return design, target


def template_design(rng, rows=2000, cols=60):
    """Smoothly varying Gaussian-line 'spectral templates' (strongly collinear columns)."""
    wave = np.linspace(0.0, 1.0, rows)
    design = np.empty((rows, cols))
    for j in range(cols):
        frac = j / (cols - 1)
        centres = (0.2 + 0.05 * frac, 0.5 + 0.03 * frac, 0.8 - 0.04 * frac)
        widths = (0.02 + 0.01 * frac, 0.03, 0.015 + 0.005 * frac)
        depths = (0.5, 0.3 + 0.2 * frac, 0.4 - 0.1 * frac)
        spectrum = 1.0 + 0.3 * frac * wave
        for centre, width, depth in zip(centres, widths, depths):
            spectrum -= depth * np.exp(-0.5 * ((wave - centre) / width) ** 2)
        design[:, j] = spectrum
    return design


def check_against_scipy(design, target, rtol=1e-9):
    gram, rhs = normal_equations(design, target)
    result = nnls_gram(gram, rhs)
    assert result.converged
    assert np.all(result.x >= 0)
    reference, x_ref = scipy_objective(design, target)
    assert_rel_close(residual_objective(design, target, result.x), reference, rtol)
    assert_rel_close(gram_objective(gram, rhs, result.x), reference, 1e-8)
    return result, x_ref


# ---------------------------------------------------------------------------
# nnls_gram vs scipy.optimize.nnls
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_well_posed_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    design, target = random_problem(rng, 120, 40)
    result, x_ref = check_against_scipy(design, target)
    np.testing.assert_allclose(result.x, x_ref, rtol=1e-7, atol=1e-9)
    assert isinstance(result, NNLSResult)
    assert result.passive_size == np.count_nonzero(result.x > 0)
    assert 0 < result.passive_size < 40


def test_collinear_templates_match_scipy():
    rng = np.random.default_rng(11)
    design = template_design(rng)
    x_true = np.zeros(design.shape[1])
    x_true[[3, 17, 18, 40, 55]] = [0.4, 1.0, 0.5, 0.7, 0.2]
    target = design @ x_true + 0.01 * rng.standard_normal(design.shape[0])
    assert np.linalg.cond(design) > 1e6  # genuinely ill-conditioned
    check_against_scipy(design, target)


def test_duplicate_columns():
    rng = np.random.default_rng(3)
    base, target = random_problem(rng, 80, 15)
    design = np.hstack([base, base[:, [2, 5, 7]], 2.0 * base[:, [0]]])
    result, _ = check_against_scipy(design, target)
    x_base, _ = scipy.optimize.nnls(base, target)
    assert_rel_close(
        residual_objective(design, target, result.x), residual_objective(base, target, x_base), 1e-9
    )


def test_zero_columns():
    rng = np.random.default_rng(4)
    design, target = random_problem(rng, 60, 12)
    design[:, [0, 5, 11]] = 0.0
    result, _ = check_against_scipy(design, target)
    assert np.all(result.x[[0, 5, 11]] == 0.0)


def test_all_rhs_nonpositive_gives_zero():
    rng = np.random.default_rng(5)
    design = np.abs(rng.standard_normal((50, 10)))
    target = -np.abs(rng.standard_normal(50))
    gram, rhs = normal_equations(design, target)
    assert np.all(rhs <= 0)
    result = nnls_gram(gram, rhs)
    assert result.converged and result.iterations == 0 and result.passive_size == 0
    assert np.all(result.x == 0.0)


def test_tiny_scale_design():
    rng = np.random.default_rng(6)
    design, target = random_problem(rng, 100, 30)
    reference, x_ref = scipy_objective(design, target)
    gram, rhs = normal_equations(1e-9 * design, target)
    assert np.max(np.abs(gram)) < 1e-14
    result = nnls_gram(gram, rhs)
    assert result.converged
    # objective is invariant under A -> s A, x -> x / s
    assert_rel_close(residual_objective(1e-9 * design, target, result.x), reference, 1e-9)
    np.testing.assert_allclose(1e-9 * result.x, x_ref, rtol=1e-7, atol=1e-9)


def test_permuted_columns():
    rng = np.random.default_rng(7)
    design, target = random_problem(rng, 90, 25)
    gram, rhs = normal_equations(design, target)
    x_plain = nnls_gram(gram, rhs).x
    perm = rng.permutation(25)
    gram_p, rhs_p = normal_equations(design[:, perm], target)
    x_perm = nnls_gram(gram_p, rhs_p).x
    assert_rel_close(gram_objective(gram_p, rhs_p, x_perm), gram_objective(gram, rhs, x_plain), 1e-12)
    np.testing.assert_allclose(x_perm, x_plain[perm], rtol=1e-9, atol=1e-12)


def test_unconstrained_optimum_has_negative_entries():
    rng = np.random.default_rng(8)
    design = rng.standard_normal((70, 20))
    coeffs = rng.standard_normal(20)
    coeffs[:8] = -np.abs(coeffs[:8]) - 0.5
    target = design @ coeffs + 0.1 * rng.standard_normal(70)
    unconstrained = np.linalg.lstsq(design, target, rcond=None)[0]
    assert np.sum(unconstrained < 0) >= 5
    result, _ = check_against_scipy(design, target)
    assert result.passive_size < 20


def test_single_variable():
    assert np.allclose(nnls_gram(np.array([[4.0]]), np.array([2.0])).x, [0.5])
    result = nnls_gram(np.array([[4.0]]), np.array([-2.0]))
    assert result.x[0] == 0.0 and result.iterations == 0
    assert nnls_gram(np.array([[0.0]]), np.array([0.0])).x[0] == 0.0


# ---------------------------------------------------------------------------
# brute force and exact recovery
# ---------------------------------------------------------------------------
def brute_force_objective(design, target):
    cols = design.shape[1]
    best = 0.0  # empty support
    for size in range(1, cols + 1):
        for support in itertools.combinations(range(cols), size):
            sub = list(support)
            coef = np.linalg.lstsq(design[:, sub], target, rcond=None)[0]
            if np.all(coef >= 0):
                x = np.zeros(cols)
                x[sub] = coef
                best = min(best, residual_objective(design, target, x))
    return best


@pytest.mark.parametrize("seed", [10, 11, 12, 13])
def test_brute_force_small(seed):
    rng = np.random.default_rng(seed)
    cols = 6 + seed % 5  # 6..10
    design = rng.standard_normal((cols + 5, cols))
    target = rng.standard_normal(cols + 5)
    gram, rhs = normal_equations(design, target)
    result = nnls_gram(gram, rhs)
    assert result.converged
    assert_rel_close(residual_objective(design, target, result.x), brute_force_objective(design, target), 1e-9)


def test_noise_free_exact_recovery():
    rng = np.random.default_rng(20)
    design = rng.standard_normal((200, 50))
    x_true = np.zeros(50)
    support = rng.choice(50, 10, replace=False)
    x_true[support] = rng.uniform(0.5, 2.0, 10)
    gram, rhs = normal_equations(design, design @ x_true)
    result = nnls_gram(gram, rhs)
    assert result.converged
    np.testing.assert_allclose(result.x, x_true, rtol=1e-8, atol=1e-8 * np.max(x_true))
    assert result.passive_size == 10


# ---------------------------------------------------------------------------
# KKT certificate
# ---------------------------------------------------------------------------
def test_kkt_certificate_accepts_solution_and_rejects_perturbations():
    rng = np.random.default_rng(30)
    design, target = random_problem(rng, 100, 30)
    gram, rhs = normal_equations(design, target)
    x = nnls_gram(gram, rhs).x
    cert = kkt_certificate(gram, rhs, x)
    assert isinstance(cert, KKTCertificate)
    assert cert.ok and cert.primal_min >= 0 and cert.tol == 1e-8
    assert cert.passive_stationarity <= 1e-10 and cert.complementarity <= 1e-10
    assert_rel_close(cert.objective, gram_objective(gram, rhs, x), 1e-14)

    passive = np.flatnonzero(x > 0)
    active = np.flatnonzero(x == 0)
    negative = x.copy()
    negative[active[0]] = -1e-3
    cert_neg = kkt_certificate(gram, rhs, negative)
    assert not cert_neg.ok and cert_neg.primal_min == pytest.approx(-1e-3)

    shifted = x.copy()
    shifted[passive[0]] *= 1.01
    cert_shift = kkt_certificate(gram, rhs, shifted)
    assert not cert_shift.ok and cert_shift.passive_stationarity > 1e-8
    assert cert_shift.objective > cert.objective

    dropped = x.copy()
    dropped[passive[0]] = 0.0  # removes a needed variable: its dual becomes negative
    cert_drop = kkt_certificate(gram, rhs, dropped)
    assert not cert_drop.ok and cert_drop.dual_min < -1e-8


# ---------------------------------------------------------------------------
# warm start and iteration cap
# ---------------------------------------------------------------------------
def test_warm_start_from_optimum():
    rng = np.random.default_rng(40)
    design, target = random_problem(rng, 150, 60)
    gram, rhs = normal_equations(design, target)
    cold = nnls_gram(gram, rhs)
    assert cold.iterations > 5
    warm = nnls_gram(gram, rhs, x0=cold.x)
    assert warm.converged and warm.iterations <= 2
    np.testing.assert_allclose(warm.x, cold.x, rtol=1e-9, atol=1e-12)
    # a rough (infeasible-support) warm start still reaches the optimum
    rough = nnls_gram(gram, rhs, x0=np.full(60, 0.3))
    assert rough.converged
    assert_rel_close(gram_objective(gram, rhs, rough.x), gram_objective(gram, rhs, cold.x), 1e-10)
    with pytest.raises(ValueError):
        nnls_gram(gram, rhs, x0=-np.ones(60))


def test_max_iter_cap():
    rng = np.random.default_rng(41)
    design, target = random_problem(rng, 150, 60)
    gram, rhs = normal_equations(design, target)
    result = nnls_gram(gram, rhs, max_iter=1)
    assert not result.converged and result.iterations == 1
    assert "max_iter" in result.message
    assert np.all(result.x >= 0)


# ---------------------------------------------------------------------------
# Cholesky downdate (Givens path vs refactor)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["givens", "rebuild"])
def test_passive_cholesky_remove(method):
    rng = np.random.default_rng(50)
    design = rng.standard_normal((80, 40)) * rng.uniform(0.1, 10.0, 40)
    gram = design.T @ design
    scale = np.sqrt(np.diag(gram))
    rhs_scaled = rng.standard_normal(40)
    chol = _PassiveCholesky(gram, scale, rhs_scaled)
    for j in rng.permutation(40)[:30]:
        assert chol.try_append(j)
    chol.remove_positions([0, 7, 29, 15], method=method)
    rows = chol.index_array()
    assert rows.size == 26
    factor = chol._factor
    assert np.allclose(np.tril(factor, -1), 0.0) and np.all(np.diag(factor) > 0)
    block = chol.scaled_block(rows, rows)
    np.testing.assert_allclose(factor.T @ factor, block, atol=1e-12)
    # the maintained forward vector still gives the passive solution
    np.testing.assert_allclose(chol.solve(), np.linalg.solve(block, rhs_scaled[rows]), rtol=1e-9)
    # re-appending a passive column (exact duplicate) is refused, factor unchanged
    assert not chol.try_append(rows[3])


# ---------------------------------------------------------------------------
# nnls_dense
# ---------------------------------------------------------------------------
def test_nnls_dense_methods():
    rng = np.random.default_rng(60)
    design = np.abs(rng.standard_normal((120, 15))) + 2.0 * np.eye(120, 15)
    x_true = np.abs(rng.standard_normal(15))
    target = design @ x_true + 0.05 * np.abs(rng.standard_normal(120))
    reference, _ = scipy_objective(design, target)
    x0 = np.full(15, 0.5)
    start = residual_objective(design, target, x0)
    for method in ("nnls", "lsq", "mu", "fista"):
        x = nnls_dense(design, target, method=method, x0=x0)
        assert x.shape == (15,) and np.all(x >= 0)
        assert residual_objective(design, target, x) < start, method
    for method in ("nnls", "lsq"):
        x = nnls_dense(design, target, method=method)
        assert_rel_close(residual_objective(design, target, x), reference, 1e-6)
    for method in ("mu", "fista"):
        x = nnls_dense(design, target, method=method, max_iter=2000)
        assert_rel_close(residual_objective(design, target, x), reference, 1e-4)
    with pytest.raises(ValueError, match="fista"):
        nnls_dense(design, target, method="cg")


def test_nnls_dense_iterative_with_active_constraints():
    rng = np.random.default_rng(61)
    design = rng.standard_normal((100, 12)) + 3.0 * np.eye(100, 12)
    target = rng.standard_normal(100)
    reference, x_ref = scipy_objective(design, target)
    assert np.sum(x_ref == 0) >= 2
    for method in ("mu", "fista"):
        x = nnls_dense(design, target, method=method, max_iter=2000)
        assert_rel_close(residual_objective(design, target, x), reference, 1e-4)


# ---------------------------------------------------------------------------
# size check
# ---------------------------------------------------------------------------
def test_size_800(monkeypatch):
    """N=800 with a common-mode component: columns leave the passive set at k >= 256 (Givens path)."""
    removals = []
    original = _PassiveCholesky.remove_positions

    def counting_remove(self, positions, method=None):
        removals.append(self.size)
        return original(self, positions, method)

    monkeypatch.setattr(_PassiveCholesky, "remove_positions", counting_remove)
    rng = np.random.default_rng(70)
    design = rng.standard_normal((1000, 800)) + 2.0 * rng.standard_normal((1000, 1))
    target = rng.standard_normal(1000) + design @ np.abs(rng.standard_normal(800)) * 0.05
    gram, rhs = normal_equations(design, target)
    result = nnls_gram(gram, rhs)
    assert result.converged and result.passive_size > 100
    assert sum(size >= 256 for size in removals) >= 5
    cert = kkt_certificate(gram, rhs, result.x)
    assert cert.ok, cert
    reference, _ = scipy_objective(design, target)
    assert_rel_close(residual_objective(design, target, result.x), reference, 1e-9)
