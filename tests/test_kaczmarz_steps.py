"""The Kaczmarz numerics (pure functions, no MPI, no files)."""
import numpy as np
import pytest
import scipy.optimize

from cubefit_mpi.config.knobs import Knobs
from cubefit_mpi.solvers.kaczmarz import steps as ks
from cubefit_mpi.solvers.kaczmarz.band_design import BandDesign


def _problem(n=6, rows=200, seed=0, correlated=False):
    rng = np.random.default_rng(seed)
    design = rng.uniform(0.0, 1.0, size=(n, rows))
    if correlated:
        design = 1.0 + 0.01 * design            # nearly identical columns
    x_true = rng.uniform(0.5, 2.0, size=n)
    return design, x_true @ design, x_true


def test_sanitize_counts_and_zeroes():
    a = np.array([[1.0, np.nan], [np.inf, -np.inf], [2.0, 3.0]])
    assert ks.sanitize(a) == 3
    assert np.array_equal(a, [[1.0, 0.0], [0.0, 0.0], [2.0, 3.0]])
    assert ks.sanitize(a) == 0


def test_freeze_mask_relative_and_absolute():
    energy = np.array([1.0, 2.0, 3.0, 1e-9, 0.0])
    assert ks.freeze_mask(energy, 1e-12, 1e-24).tolist() == [False, False, False, False, True]
    assert ks.freeze_mask(energy, 0.6, 0.0).tolist() == [False, False, False, True, True]    # median 1
    assert ks.freeze_mask(energy, 1.5, 0.0).tolist() == [True, False, False, True, True]
    assert ks.freeze_mask(energy, 0.0, 2.5).tolist() == [True, True, False, True, True]
    assert ks.freeze_mask(np.zeros(0), 1.0, 1.0).size == 0


def test_blended_denominator():
    local, ref = np.array([4.0, 0.0, 1e-20]), np.array([2.0, 2.0, 0.0])
    assert np.allclose(ks.blended_denominator(local, ref, 0.0, 1e-12), [4.0, 1e-12, 1e-12])
    assert np.allclose(ks.blended_denominator(local, ref, 1.0, 1e-12), [2.0, 2.0, 1e-12])
    assert np.allclose(ks.blended_denominator(local, ref, 0.25, 0.0), [3.5, 0.5, 0.75e-20])


def test_backtrack_rules():
    # f(a) - f(0) = a (a q - 2 p): decreases iff a q < 2 p
    assert ks.backtrack(1.0, 1.0, steps=3, factor=0.5) == (1.0, 0)           # 1 < 2
    assert ks.backtrack(1.0, 4.0, steps=3, factor=0.5) == (0.25, 2)          # 4, 2 fail; 1 < 2
    assert ks.backtrack(1.0, 100.0, steps=3, factor=0.5) == (0.0, 3)         # 100, 50, 25, 12.5
    assert ks.backtrack(-1.0, 1.0, steps=5, factor=0.5) == (0.0, 5)          # ascent direction
    assert ks.backtrack(1.0, 4.0, steps=0, factor=0.5) == (0.0, 0)           # one trial only
    assert ks.backtrack(1.0, 4.0, steps=3, factor=0.9, alpha0=0.5) == (0.45, 1)


def test_trust_and_cap_scales():
    assert ks.trust_scale(1.0, 2.0, 0.7) == 1.0
    assert ks.trust_scale(2.0, 2.0, 0.5) == pytest.approx(0.5)
    assert ks.trust_scale(1.0, 0.0, 0.7) == 0.0
    assert ks.cap_scale(4.0, 10.0, 0.5) == 1.0                 # sqrt(4) = 2 <= 5
    assert ks.cap_scale(100.0, 10.0, 0.5) == pytest.approx(0.5)   # 10 -> 5
    assert ks.weighted_rmse(8.0, 2.0) == 2.0 and ks.weighted_rmse(1.0, 0.0) == 0.0


def test_step_config_from_knobs():
    knobs = Knobs.from_env({"CUBEFIT_BT_STEPS": "5", "CUBEFIT_GLOBAL_ENERGY_BLEND": "3",
                            "CUBEFIT_NNLS_PROP_PER_BAND": "2", "CUBEFIT_TRUST_TAU": "0.1"})
    cfg = ks.StepConfig.from_knobs(knobs, lr=0.5, decorrelate=0.2, project_nonneg=False, block=4)
    assert (cfg.bt_steps, cfg.energy_blend, cfg.n_candidates, cfg.trust_tau) == (5, 1.0, 2, 0.1)
    assert (cfg.lr, cfg.decorrelate, cfg.project_nonneg, cfg.block) == (0.5, 0.2, False, 4)


def test_band_step_projection_trust_and_decrease():
    design, y, _ = _problem()
    x = np.full(6, 3.0)                             # too large: the step pushes down
    r = y - x @ design
    cfg = ks.StepConfig(lr=5.0, trust_tau=0.3, block=6)
    st = ks.band_step(design, r, x, np.zeros(6), cfg)
    assert np.all(x + st.dx >= 0.0)
    assert np.allclose(st.dr_w, st.dx @ design)
    assert np.linalg.norm(st.dr_w) <= 0.3 * np.linalg.norm(r) * (1 + 1e-12)
    assert st.trust_ratio <= 0.3 * (1 + 1e-12) and st.trust_clipped
    assert np.linalg.norm(r - st.dr_w) < np.linalg.norm(r)


def test_band_step_backtracking_on_and_off():
    design, y, _ = _problem(correlated=True)
    x = np.zeros(6)
    r = y - x @ design
    wild = ks.StepConfig(lr=1.0, trust_tau=1e6, bt_steps=0, block=6)
    st0 = ks.band_step(design, r, x, np.zeros(6), wild)
    assert st0.shrinks == 0 and not st0.rejected and st0.alpha == 1.0
    assert np.linalg.norm(r - st0.dr_w) > np.linalg.norm(r)           # unchecked overshoot
    checked = ks.StepConfig(lr=1.0, trust_tau=1e6, bt_steps=4, bt_factor=0.5, block=6)
    st1 = ks.band_step(design, r, x, np.zeros(6), checked)
    assert st1.shrinks > 0 and st1.alpha == 0.5 ** st1.shrinks
    assert np.linalg.norm(r - st1.dr_w) < np.linalg.norm(r)
    hopeless = ks.StepConfig(lr=1.0, trust_tau=1e6, bt_steps=1, bt_factor=0.5, block=6)
    st2 = ks.band_step(design, r, x, np.zeros(6), hopeless)
    assert st2.rejected and not st2.dx.any() and not st2.dr_w.any()


def test_band_step_freezes_and_proposes_candidates():
    design, y, _ = _problem()
    design[2] *= 1e-9                               # near-zero column
    r = y.copy()
    cfg = ks.StepConfig(zero_col_rel=1e-6, n_candidates=3, block=6)
    st = ks.band_step(design, r, np.zeros(6), np.zeros(6), cfg)
    assert st.n_frozen == 1 and st.dx[2] == 0.0
    assert 2 not in st.candidates and st.candidates.size == 3
    grad = design @ r
    score = grad ** 2 / np.einsum("ij,ij->i", design, design)
    score[2] = -np.inf
    assert st.candidates.tolist() == np.argsort(-score)[:3].tolist()
    assert np.all(np.diff(st.scores) <= 0)
    none = ks.band_step(design, r, np.zeros(6), np.zeros(6), ks.StepConfig(n_candidates=0))
    assert none.candidates.size == 0


def test_band_step_lr_and_eps_scale_the_step():
    design, y, _ = _problem()
    r = y.copy()
    base = ks.band_step(design, r, np.zeros(6), np.zeros(6), ks.StepConfig(lr=0.01, trust_tau=1e6))
    double = ks.band_step(design, r, np.zeros(6), np.zeros(6), ks.StepConfig(lr=0.02, trust_tau=1e6))
    assert np.allclose(double.dx, 2 * base.dx)
    floored = ks.band_step(design, r, np.zeros(6), np.zeros(6), ks.StepConfig(lr=0.01, eps=1e12, trust_tau=1e6))
    den = np.einsum("ij,ij->i", design, design)
    assert np.allclose(floored.dx, base.dx * den / 1e12)


def test_decorrelation_nudge_removes_flat_part_only():
    rng = np.random.default_rng(4)
    col = rng.uniform(0.5, 1.0, 50)
    other = rng.uniform(0.5, 1.0, 50)
    design = np.vstack([col, 2.0 * col, other])     # columns 0 and 1 are collinear
    direction = np.array([1.0, 0.0, 0.3])
    active = np.ones(3, dtype=bool)
    assert np.array_equal(ks.decorrelation_nudge(design, direction, 0.0, active, 3), direction)
    full = ks.decorrelation_nudge(design, direction, 1.0, active, 3)
    # the model change is kept, the step along the null direction (2, -1) (in x) is gone
    assert np.allclose(full @ design, direction @ design)
    null_x = np.array([2.0, -1.0, 0.0])                      # design.T @ null_x == 0
    assert np.allclose(null_x @ design, 0.0)
    scale = np.sqrt(np.einsum("ij,ij->i", design, design))    # the nudge works in z = S x
    assert abs((scale * full) @ (scale * null_x)) < 1e-8 * np.linalg.norm(scale * direction)
    assert abs((scale * direction) @ (scale * null_x)) > 0.1
    half = ks.decorrelation_nudge(design, direction, 0.5, active, 3)
    assert np.allclose(half, 0.5 * (direction + full))
    # per-component blocks: with block=1 nothing is correlated within a block
    assert np.array_equal(ks.decorrelation_nudge(design, direction, 1.0, active, 1), direction)


def test_merge_candidates_and_caps():
    idx = np.array([5, 3, 5, 9, 1])
    score = np.array([1.0, 2.0, 1.0, 2.0, 0.5])
    assert ks.merge_candidates(idx, score, 10).tolist() == [3, 9, 5, 1]
    assert ks.merge_candidates(idx, score, 2).tolist() == [3, 9]
    assert ks.polish_width(10, 100, 128, 10**9) == 10
    assert ks.polish_width(10, 100, 4, 10**9) == 4
    assert ks.polish_width(10, 100, 128, 8 * 100 * 3) == 3
    assert ks.polish_width(10, 100, 128, 10) == 0
    assert ks.pixel_subsample(10, 0).tolist() == list(range(10))
    assert ks.pixel_subsample(10, 20).tolist() == list(range(10))
    sub = ks.pixel_subsample(100, 5)
    assert sub.tolist() == [0, 25, 50, 74, 99]


@pytest.mark.parametrize("method", ["nnls", "lsq", "mu", "fista"])
def test_polish_solve_backends(method):
    design, y, x_true = _problem(n=4, rows=80, seed=2)
    x_now = np.array([0.1, 3.0, 0.0, 1.0])
    others = np.random.default_rng(1).uniform(0, 1, 80)        # a fixed column outside the polish
    r = (y + others) - x_now @ design - others
    z = ks.polish_solve(design, r, x_now, method=method, max_iter=5000)
    ref, _ = scipy.optimize.nnls(design.T, y)
    tol = 1e-8 if method in ("nnls", "lsq") else 1e-3
    assert np.all(z >= 0) and np.allclose(z, ref, atol=tol * 10, rtol=tol)


def test_ratio_step():
    x = np.array([[1.0, 3.0], [2.0, 2.0], [0.0, 0.0]])
    targets = np.array([0.5, 0.25, 0.25])
    assert np.array_equal(ks.ratio_step(x, targets, 0.0), x)
    full = ks.ratio_step(x, targets, 1.0)
    assert np.allclose(full.sum(axis=1), targets * 8.0)
    assert np.isclose(full.sum(), 8.0) and np.all(full >= 0)
    assert np.allclose(full[0] / full[0].sum(), [0.25, 0.75])          # the mix is kept
    assert np.allclose(full[2], [1.0, 1.0])                             # empty component filled
    half = ks.ratio_step(x, targets, 0.5)
    assert np.allclose(half.sum(axis=1), 0.5 * x.sum(axis=1) + 0.5 * targets * 8.0)
    assert np.array_equal(ks.ratio_step(np.zeros((2, 2)), targets[:2] * 2, 1.0), np.zeros((2, 2)))


# --- the band design kept as the blocks read ---------------------------------------------------
def _blocks(dtype, seed=3):
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(0.0, 2.0, size=(3, 5, 7)).astype(dtype)      # ns=3 spaxels, n=5 columns, L=7
    sqrt_w = rng.uniform(0.5, 1.5, size=7)
    sqrt_w[[1, 4]] = 0.0                                                # masked pixels
    dense = (blocks.astype(np.float64) * sqrt_w).transpose(1, 0, 2).reshape(5, -1)   # (n, ns*L)
    return blocks, sqrt_w, dense


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-13), (np.float32, 1e-6)])
def test_band_design_products_equal_the_dense_weighted_design(dtype, rtol):
    blocks, sqrt_w, dense = _blocks(dtype)
    d = BandDesign(blocks, sqrt_w)
    rng = np.random.default_rng(4)
    v, dx, xs = rng.normal(size=21), rng.normal(size=5), rng.normal(size=(2, 5))
    assert d.n == 5 and d.rows == 21
    np.testing.assert_allclose(d.energy(), np.einsum("ij,ij->i", dense, dense), rtol=rtol)
    np.testing.assert_allclose(d.rmatvec(v), dense @ (v * np.tile(sqrt_w > 0, 3)), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(d.matvec(dx), dx @ dense, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(d.matmat(xs), xs @ dense, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(d.matmat(xs, precise=True), xs @ dense, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(d.matmat(xs[:1]), xs[:1] @ dense, rtol=rtol, atol=rtol)
    cols, pixels = np.array([3, 0]), np.array([0, 2, 6])
    rows = (np.arange(3)[:, None] * 7 + pixels).reshape(-1)
    np.testing.assert_allclose(d.take(cols), dense[cols], rtol=1e-13)
    np.testing.assert_allclose(d.take(cols, pixels), dense[cols][:, rows], rtol=1e-13)
    np.testing.assert_allclose(d.gram(cols), dense[cols] @ dense[cols].T, rtol=1e-12)
    assert d.matvec(dx)[np.tile(sqrt_w == 0, 3)].tolist() == [0.0] * 6      # masked rows stay zero


def test_band_design_sanitize_counts_used_pixels_and_shows_in_energy():
    blocks, sqrt_w, _ = _blocks(np.float32)
    blocks[0, 1, 2] = np.nan                       # a used pixel
    blocks[2, 3, 4] = np.inf                       # a masked pixel: zeroed, not counted
    d = BandDesign(blocks, sqrt_w)
    assert not np.all(np.isfinite(d.energy()))     # the stage's first-visit check
    assert d.sanitize(sqrt_w > 0) == 1 and np.all(np.isfinite(blocks))
    assert blocks[0, 1, 2] == 0 and blocks[2, 3, 4] == 0 and np.all(np.isfinite(d.energy()))
    with pytest.raises(ValueError):
        BandDesign(blocks, sqrt_w[:5])


def test_band_step_same_on_blocks_and_dense():
    blocks, sqrt_w, dense = _blocks(np.float64)
    rng = np.random.default_rng(5)
    r, x = rng.normal(size=21) * np.tile(sqrt_w > 0, 3), rng.uniform(0.0, 0.2, size=5)
    cfg = ks.StepConfig(n_candidates=3, decorrelate=0.5, block=5)
    a = ks.band_step(BandDesign(blocks, sqrt_w), r, x, np.ones(5), cfg)
    b = ks.band_step(dense, r, x, np.ones(5), cfg)
    given = ks.band_step(dense, r, x, np.ones(5), cfg, energy=np.einsum("ij,ij->i", dense, dense),
                         frozen=np.array([False, True, False, False, False]))
    np.testing.assert_allclose(a.dx, b.dx, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(a.dr_w, b.dr_w, rtol=1e-12, atol=1e-15)
    assert a.candidates.tolist() == b.candidates.tolist()
    assert given.dx[1] == 0.0 and given.n_frozen == 1          # a given frozen mask is used as is


def test_top_k_equals_a_full_sort_with_ties():
    rng = np.random.default_rng(6)
    for _ in range(200):
        score = rng.integers(0, 5, size=rng.integers(1, 30)).astype(float)
        score[rng.uniform(size=score.size) < 0.2] = -np.inf
        k = int(rng.integers(0, 35))
        full = np.lexsort((np.arange(score.size), -score))[:k]
        assert ks.top_k(score, k).tolist() == full.tolist()
