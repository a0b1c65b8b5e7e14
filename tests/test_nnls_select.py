"""The exact-NNLS method choice (numerics.nnls_select), the quadratic terms in place, and the
MILES-based systems of benchmarks/nnls_problems.py (skipped without the shared library)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize

from cubefit_mpi.config.errors import KnobError
from cubefit_mpi.config.knobs import Knobs
from cubefit_mpi.numerics.certificate import certify
from cubefit_mpi.numerics.nnls import nnls_gram
from cubefit_mpi.numerics.nnls_select import (AUTO_MIN_N, GRAM_METHODS, add_quadratic_terms, expects_dense,
                                              factor_bytes, solve_gram)
from cubefit_mpi.numerics.regularization import Regularization

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import nnls_problems  # noqa: E402

needs_miles = pytest.mark.skipif(not nnls_problems.miles_available(), reason="no shared MILES library")


def objective(gram, rhs, x):
    return 0.5 * x @ gram @ x - rhs @ x


def sparse_and_dense(rng, n=300):
    """(G, b) with a sparse NNLS solution and one with a dense one, N = n >= AUTO_MIN_N."""
    design = rng.standard_normal((2 * n, n))
    sparse_target = design[:, :10] @ np.ones(10) + 0.1 * rng.standard_normal(2 * n)
    positive = np.abs(design)
    dense_target = positive @ rng.uniform(0.5, 1.5, n) + 0.01 * rng.standard_normal(2 * n)
    return ((design.T @ design, design.T @ sparse_target),
            (positive.T @ positive + 1e-3 * np.eye(n), positive.T @ dense_target))


def test_auto_takes_lawson_hanson_for_sparse_and_block_pivoting_for_dense():
    (gs, bs), (gd, bd) = sparse_and_dense(np.random.default_rng(0))
    sparse = solve_gram(gs, bs)
    assert sparse.method == "lawson-hanson" and sparse.factorizations == 0
    dense = solve_gram(gd, bd)
    assert dense.method == "lawson-hanson+block-pivoting" and dense.factorizations >= 1
    hinted = solve_gram(gd, bd, expect_dense=True)
    assert hinted.method == "block-pivoting" and [p[0] for p in hinted.phases] == ["block-pivoting"]
    for gram, rhs, sol in ((gs, bs, sparse), (gd, bd, dense), (gd, bd, hinted)):
        ref = nnls_gram(gram, rhs).x
        assert certify(gram, rhs, sol.result.x).ok
        assert np.abs(sol.result.x - ref).max() <= 1e-8 * ref.max()


def test_small_n_and_forced_methods():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((60, 30))
    gram, rhs = a.T @ a, a.T @ rng.standard_normal(60)
    assert 30 < AUTO_MIN_N and solve_gram(gram, rhs, expect_dense=True).method == "lawson-hanson"
    assert solve_gram(gram, rhs, method="block-pivoting").method == "block-pivoting"
    assert solve_gram(gram, rhs, method="lawson-hanson").method == "lawson-hanson"
    with pytest.raises(ValueError, match="expected one of auto, lawson-hanson, block-pivoting"):
        solve_gram(gram, rhs, method="simplex")


def test_dense_warm_start_goes_straight_to_block_pivoting():
    _, (gram, rhs) = sparse_and_dense(np.random.default_rng(2))
    cold = solve_gram(gram, rhs)
    warm = solve_gram(gram + 1e-3 * np.eye(rhs.size), rhs, x0=cold.result.x)
    assert warm.method == "block-pivoting" and warm.result.iterations <= 3
    assert certify(gram + 1e-3 * np.eye(rhs.size), rhs, warm.result.x).ok


def test_stall_hands_over_to_lawson_hanson():
    """Rank-deficient, dense hint: block pivoting cycles and Lawson-Hanson ends it, certified."""
    rng = np.random.default_rng(3)
    design = rng.standard_normal((600, 40)) @ rng.standard_normal((40, 300))      # rank 40 of 300
    target = design @ np.abs(rng.standard_normal(300)) + rng.standard_normal(600)
    gram, rhs = design.T @ design, design.T @ target
    sol = solve_gram(gram, rhs, method="block-pivoting")
    assert certify(gram, rhs, sol.result.x).ok and sol.result.converged
    ref, _ = scipy.optimize.nnls(design, target, maxiter=30000)
    assert abs(objective(gram, rhs, sol.result.x) - objective(gram, rhs, ref)) <= 1e-9 * abs(objective(gram, rhs, ref))
    if sol.method != "block-pivoting":
        assert sol.method == "block-pivoting+lawson-hanson" and "stalled" in sol.result.message


def test_knob_parses_the_methods():
    assert Knobs.from_env({}).nnls_gram_method == "auto"
    for name in GRAM_METHODS:
        assert Knobs.from_env({"CUBEFIT_NNLS_GRAM_METHOD": name}).nnls_gram_method == name
    with pytest.raises(KnobError, match="CUBEFIT_NNLS_GRAM_METHOD='ipm': expected one of auto, lawson-hanson"):
        Knobs.from_env({"CUBEFIT_NNLS_GRAM_METHOD": "ipm"})


def test_quadratic_terms_in_place_and_back():
    rng = np.random.default_rng(4)
    reg = Regularization.build(3, 12, ridge=0.5, regul=7.0, pop_shape=(4, 3), orbit_targets=[1, 2, 3],
                               orbit_strength=2.0)
    a = rng.standard_normal((50, 36))
    gram = a.T @ a
    original = gram.copy()
    add_quadratic_terms(gram, reg)
    assert np.allclose(gram, original + reg.dense(), rtol=0, atol=1e-12 * np.abs(original).max())
    add_quadratic_terms(gram, reg, -1.0)
    assert np.allclose(gram, original, rtol=0, atol=1e-12 * np.abs(original).max())
    assert expects_dense(reg) and not expects_dense(Regularization.build(3, 12, ridge=1.0))
    assert factor_bytes(1000) == 8_000_000


# ---------------------------------------------------------------------------------------------
# MILES-based systems (realistic: numerically singular template blocks)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def miles():
    if not nnls_problems.miles_available():
        pytest.skip("no shared MILES library")
    return nnls_problems.build_system(nnls_problems.ProblemSpec(components=6, ages=13, vmax=300, spaxels=100))


@needs_miles
@pytest.mark.parametrize("regul", [0.0, 1.0, 1e3])
@pytest.mark.parametrize("method", ["auto", "block-pivoting", "auto-dense"])
def test_miles_same_optimum_as_lawson_hanson(miles, regul, method):
    reg = nnls_problems.regularization(miles, regul)
    gram = miles.gram.copy()
    add_quadratic_terms(gram, reg)
    ref = nnls_gram(gram, miles.rhs)
    sol = solve_gram(gram, miles.rhs, method="auto" if method == "auto-dense" else method,
                     expect_dense=method == "auto-dense")
    x = sol.result.x
    cert = certify(gram, miles.rhs, x)
    assert cert.ok and certify(gram, miles.rhs, ref.x).ok
    f, f_ref = objective(gram, miles.rhs, x), objective(gram, miles.rhs, ref.x)
    assert abs(f - f_ref) <= 1e-9 * abs(f_ref)
    fitted, fitted_ref = gram @ x, gram @ ref.x
    assert np.abs(fitted - fitted_ref).max() <= 1e-6 * np.abs(fitted_ref).max()
    if regul > 0:                                   # positive definite: the solution is unique
        assert np.abs(x - ref.x).max() <= 1e-8 * ref.x.max()
        assert sol.result.passive_size > 0.4 * miles.rhs.size
