"""Block principal pivoting (numerics.nnls_pivot) against Lawson-Hanson, scipy and brute force."""
import itertools

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize

from cubefit_mpi.numerics import nnls_pivot as pivot_module
from cubefit_mpi.numerics.certificate import certify
from cubefit_mpi.numerics.nnls import nnls_gram
from cubefit_mpi.numerics.nnls_pivot import PassiveSolver, ScaledSystem, cholesky_in_place, nnls_pivot
from cubefit_mpi.numerics.nnls_select import solve_gram

METHODS = ["pivot", "block-pivoting", "auto-dense"]


def solve(method, gram, rhs, **kw):
    """One of the new paths: block pivoting alone (Murty's safeguard), as ``CUBEFIT_NNLS_GRAM_METHOD
    =block-pivoting`` runs it (Lawson-Hanson finishes if it stalls), and ``auto`` told 'dense'
    (Lawson-Hanson alone below AUTO_MIN_N)."""
    if method == "pivot":
        result = nnls_pivot(gram, rhs, **kw)
        assert result.converged, result.message
        return result
    name = "auto" if method == "auto-dense" else method
    solution = solve_gram(gram, rhs, method=name, expect_dense=True, **kw)
    assert solution.result.converged, solution.result.message
    return solution.result


def objective(gram, rhs, x):
    return 0.5 * x @ gram @ x - rhs @ x


def scipy_reference(design, target):
    x, _ = scipy.optimize.nnls(design, target, maxiter=50 * design.shape[1])
    return x


def random_design(rng, rows, cols, density=0.5, noise=0.3):
    design = rng.standard_normal((rows, cols))
    x_true = np.abs(rng.standard_normal(cols)) * (rng.random(cols) < density)
    return design, design @ x_true + noise * rng.standard_normal(rows)


def check_same_optimum(gram, rhs, x, x_ref, unique=True, rtol=1e-8):
    """Certified, the same objective, the same fitted G x, and the same x where it is unique."""
    cert = certify(gram, rhs, x)
    assert cert.ok, cert
    ref = objective(gram, rhs, x_ref)
    assert abs(objective(gram, rhs, x) - ref) <= 1e-9 * max(abs(ref), 1.0)
    fitted, fitted_ref = gram @ x, gram @ x_ref
    assert np.abs(fitted - fitted_ref).max() <= 1e-6 * np.abs(fitted_ref).max() + 1e-12
    if unique:
        assert np.abs(x - x_ref).max() <= rtol * np.abs(x_ref).max()


# ---------------------------------------------------------------------------------------------
# against Lawson-Hanson and scipy on the dense system
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed,density", [(0, 0.3), (1, 0.9), (2, 1.0)])
def test_random_matches_lawson_hanson_and_scipy(method, seed, density):
    rng = np.random.default_rng(seed)
    design, target = random_design(rng, 400, 120, density=density, noise=0.05)
    gram, rhs = design.T @ design, design.T @ target
    result = solve(method, gram, rhs)
    check_same_optimum(gram, rhs, result.x, nnls_gram(gram, rhs).x)
    check_same_optimum(gram, rhs, result.x, scipy_reference(design, target))


@pytest.mark.parametrize("method", METHODS)
def test_dense_solution_with_a_ridge(method):
    rng = np.random.default_rng(3)
    design = np.abs(rng.standard_normal((300, 150)))
    target = design @ rng.uniform(0.5, 1.5, 150) + 0.01 * rng.standard_normal(300)
    gram, rhs = design.T @ design + 1e-2 * np.eye(150), design.T @ target
    result = solve(method, gram, rhs)
    assert result.passive_size > 100
    check_same_optimum(gram, rhs, result.x, nnls_gram(gram, rhs).x)


@pytest.mark.parametrize("method", ["block-pivoting", "auto-dense"])
def test_rank_deficient(method):
    rng = np.random.default_rng(4)
    design = rng.standard_normal((200, 15)) @ rng.standard_normal((15, 60))     # rank 15 of 60
    target = design @ np.abs(rng.standard_normal(60)) + 0.1 * rng.standard_normal(200)
    gram, rhs = design.T @ design, design.T @ target
    result = solve(method, gram, rhs)
    check_same_optimum(gram, rhs, result.x, scipy_reference(design, target), unique=False)
    check_same_optimum(gram, rhs, result.x, nnls_gram(gram, rhs).x, unique=False)


@pytest.mark.parametrize("method", ["block-pivoting", "auto-dense"])
def test_duplicate_columns(method):
    rng = np.random.default_rng(5)
    base = rng.standard_normal((150, 30))
    design = np.hstack([base, base[:, :12], 2.0 * base[:, 3:9]])               # exact duplicates, scaled too
    target = base @ np.abs(rng.standard_normal(30)) + 0.05 * rng.standard_normal(150)
    gram, rhs = design.T @ design, design.T @ target
    result = solve(method, gram, rhs)
    check_same_optimum(gram, rhs, result.x, scipy_reference(design, target), unique=False)


@pytest.mark.parametrize("method", METHODS)
def test_rhs_not_positive_gives_zero(method):
    rng = np.random.default_rng(6)
    design = np.abs(rng.standard_normal((80, 20)))
    target = -np.abs(rng.standard_normal(80))                                    # b = Aᵀy <= 0
    gram, rhs = design.T @ design, design.T @ target
    assert np.all(rhs <= 0)
    result = solve(method, gram, rhs)
    assert np.array_equal(result.x, np.zeros(20)) and certify(gram, rhs, result.x).ok


def test_zero_columns_stay_zero():
    rng = np.random.default_rng(7)
    design, target = random_design(rng, 100, 25)
    design[:, [3, 11]] = 0.0
    gram, rhs = design.T @ design, design.T @ target
    result = nnls_pivot(gram, rhs)
    assert result.x[3] == 0 and result.x[11] == 0 and certify(gram, rhs, result.x).ok
    check_same_optimum(gram, rhs, result.x, nnls_gram(gram, rhs).x)


def test_trivial_rhs_zero():
    result = nnls_pivot(np.eye(4), np.zeros(4))
    assert result.converged and np.array_equal(result.x, np.zeros(4)) and result.iterations == 0


# ---------------------------------------------------------------------------------------------
# brute force over all supports
# ---------------------------------------------------------------------------------------------
def brute_force(gram, rhs):
    """min over every support S of the (least-squares) minimiser on S when it is >= 0."""
    n = rhs.size
    best, best_x = 0.0, np.zeros(n)
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            idx = list(support)
            sol = scipy.linalg.lstsq(gram[np.ix_(idx, idx)], rhs[idx])[0]
            if np.all(sol >= -1e-12):
                x = np.zeros(n)
                x[idx] = np.maximum(sol, 0.0)
                value = objective(gram, rhs, x)
                if value < best:
                    best, best_x = value, x
    return best, best_x


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("method", ["block-pivoting", "auto-dense"])
def test_brute_force_small(seed, method):
    rng = np.random.default_rng(100 + seed)
    n = 12 if seed < 3 else 8
    rows = 30 if seed % 2 == 0 else 6                                            # odd seeds: rank 6 < n
    design, target = random_design(rng, rows, n, density=0.6)
    gram, rhs = design.T @ design, design.T @ target
    best, _ = brute_force(gram, rhs)
    result = solve(method, gram, rhs)
    assert certify(gram, rhs, result.x).ok
    assert objective(gram, rhs, result.x) <= best + 1e-9 * max(abs(best), 1.0)


# ---------------------------------------------------------------------------------------------
# warm starts, safeguards, linear algebra
# ---------------------------------------------------------------------------------------------
def test_warm_start_from_another_ridge():
    rng = np.random.default_rng(8)
    design, target = random_design(rng, 300, 200, density=0.6, noise=0.5)
    base, rhs = design.T @ design, design.T @ target
    first = nnls_pivot(base + 1.0 * np.eye(200), rhs)
    cold = nnls_pivot(base + 1.2 * np.eye(200), rhs)
    warm = nnls_pivot(base + 1.2 * np.eye(200), rhs, x0=first.x)
    assert warm.converged and warm.iterations < cold.iterations
    check_same_optimum(base + 1.2 * np.eye(200), rhs, warm.x, cold.x)
    exact = nnls_pivot(base + 1.2 * np.eye(200), rhs, x0=cold.x)
    assert exact.iterations == 1 and np.array_equal(exact.x > 0, cold.x > 0)


def test_warm_start_validation():
    with pytest.raises(ValueError, match="non-negative"):
        nnls_pivot(np.eye(3), np.ones(3), x0=np.array([1.0, -1.0, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        nnls_pivot(np.eye(3), np.ones(3), x0=np.ones(2))
    with pytest.raises(ValueError, match="safeguard"):
        nnls_pivot(np.eye(3), np.ones(3), safeguard="none")


def test_stop_safeguard_reports_a_stall():
    """A cycling problem for full exchanges (Murty's rule needed): 'stop' says so, 'murty' solves it."""
    gram = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 2.0], [2.0, 0.0, 1.0]])
    gram = 0.5 * (gram + gram.T) + 2.5 * np.eye(3)
    rng = np.random.default_rng(9)
    stalled = None
    for _ in range(200):                                    # search a right-hand side that stalls
        rhs = rng.standard_normal(3) * 3
        stop = nnls_pivot(gram, rhs, safeguard="stop", max_iter=50)
        if stop.stalled:
            stalled = rhs
            break
    murty = nnls_pivot(gram, stalled if stalled is not None else rhs, max_iter=50)
    assert murty.converged and certify(gram, stalled if stalled is not None else rhs, murty.x).ok
    if stalled is not None:
        assert not stop.converged and "stalled" in stop.message


def test_max_iter_is_reported():
    rng = np.random.default_rng(10)
    design, target = random_design(rng, 200, 80, density=0.5)
    result = nnls_pivot(design.T @ design, design.T @ target, max_iter=1)
    assert not result.converged and "max_iter" in result.message


def test_schur_updates_match_direct_solves():
    """A sequence of passive sets through one factor and Schur complements = fresh solves."""
    rng = np.random.default_rng(11)
    a = rng.standard_normal((400, 150))
    gram, rhs = a.T @ a, a.T @ rng.standard_normal(400)
    solver = PassiveSolver(ScaledSystem(gram, rhs, 1e-10))
    passive = np.zeros(150, dtype=bool)
    passive[:100] = True
    for step in range(6):
        if step:
            flip = rng.choice(150, size=2, replace=False)
            passive[flip] = ~passive[flip]
        x, grad, dependent = solver.solve(passive)
        assert not dependent.any()
        direct = np.zeros(150)
        direct[passive] = np.linalg.solve(gram[np.ix_(passive, passive)], rhs[passive])
        assert np.abs(x - direct).max() <= 1e-9 * np.abs(direct).max()
        assert np.all(x[~passive] == 0)
    assert solver.factorizations == 1                     # 10 changes < SCHUR_FRACTION x 100: no refactor
    passive[:40] = False
    solver.solve(passive)
    assert solver.factorizations == 2


def test_dependent_columns_are_detected_and_factor_bounded():
    rng = np.random.default_rng(12)
    base = rng.standard_normal((100, 20))
    a = np.hstack([base, base[:, :5]])
    gram, rhs = a.T @ a, a.T @ rng.standard_normal(100)
    solver = PassiveSolver(ScaledSystem(gram, rhs, 1e-10))
    passive = np.ones(25, dtype=bool)
    x, grad, dependent = solver.solve(passive)
    assert dependent.sum() == 5 and passive.sum() == 20
    assert np.abs(grad[passive]).max() <= 1e-10 * np.abs(rhs / np.sqrt(np.diag(gram))).max()
    assert solver.work_bytes <= 8 * 25 * 25


@pytest.mark.parametrize("n,limit", [(300, 10**9), (300, 64), (257, 64)])
def test_cholesky_in_place_blocked_and_direct(n, limit, monkeypatch):
    monkeypatch.setattr(pivot_module, "POTRF_MAX_N", limit)
    rng = np.random.default_rng(13)
    a = rng.standard_normal((n, n + 5))
    h = a @ a.T
    work = h.copy()
    assert cholesky_in_place(work) == 0 if limit > n else cholesky_in_place(work, block=64, rows=40) == 0
    upper = np.triu(work)
    assert np.abs(upper.T @ upper - h).max() <= 1e-12 * np.abs(h).max()
    h[40, 40] = -1.0
    assert cholesky_in_place(h.copy(), block=64, rows=40) == 41


def test_blocked_factor_path_in_the_solver(monkeypatch):
    monkeypatch.setattr(pivot_module, "POTRF_MAX_N", 32)
    rng = np.random.default_rng(14)
    design, target = random_design(rng, 300, 120, density=0.8, noise=0.05)
    gram, rhs = design.T @ design, design.T @ target
    check_same_optimum(gram, rhs, nnls_pivot(gram, rhs).x, nnls_gram(gram, rhs).x)
