"""The bootstrap's draws and statistics (numerics.bootstrap): keyed by (seed, replicate, spaxel),
the wild signs, resampling and parametric noise have the stated law; the statistics are right."""
import numpy as np
import pytest

from cubefit_mpi.numerics import bootstrap as bs


def residuals(n=7, L=40, seed=1):
    r = np.random.default_rng(seed).normal(size=(n, L))
    used = np.ones(L, bool)
    used[[0, 5, 6, 30]] = False
    return r, used


@pytest.mark.parametrize("method", bs.METHODS)
def test_draws_do_not_depend_on_how_spaxels_are_split(method):
    r, used = residuals()
    var = np.abs(r) + 0.5
    whole = bs.draw_errors(method, r, used, seed=4, replicate=3, first=10, variance=var)
    parts = np.vstack([bs.draw_errors(method, r[a:b], used, seed=4, replicate=3, first=10 + a, variance=var[a:b])
                       for a, b in ((0, 2), (2, 3), (3, 7))])
    np.testing.assert_array_equal(whole, parts)
    assert np.all(whole[:, ~used] == 0.0)
    other = bs.draw_errors(method, r, used, seed=4, replicate=4, first=10, variance=var)
    assert not np.array_equal(whole, other)
    again = bs.draw_errors(method, r, used, seed=5, replicate=3, first=10, variance=var)
    assert not np.array_equal(whole, again)


def test_wild_signs_per_spaxel_and_per_pixel():
    r, used = residuals(n=200)
    spax = bs.draw_errors("wild", r, used, seed=0, replicate=0, first=0, block="spaxel")
    ratio = spax[:, used] / r[:, used]
    assert np.all(np.abs(ratio) == 1.0)
    assert np.all(ratio == ratio[:, :1])                 # one sign per spectrum
    assert 0.4 < np.mean(ratio[:, 0] > 0) < 0.6
    pix = bs.draw_errors("wild", r, used, seed=0, replicate=0, first=0, block="pixel")
    ratio = pix[:, used] / r[:, used]
    assert np.all(np.abs(ratio) == 1.0)
    assert 0.45 < np.mean(ratio > 0) < 0.55 and not np.all(ratio == ratio[:, :1])


def test_residual_resampling_draws_a_spectrums_own_used_values():
    r, used = residuals(n=3)
    e = bs.draw_errors("residual", r, used, seed=2, replicate=1, first=0)
    for i in range(3):
        assert set(e[i, used]) <= set(r[i, used])
        assert len(set(e[i, used])) < used.sum()          # with replacement: some repeat


def test_parametric_noise_has_the_variance():
    L = 20000
    var = np.tile(np.linspace(0.5, 4.0, L), (2, 1))
    e = bs.draw_errors("parametric", np.zeros((2, L)), np.ones(L, bool), seed=0, replicate=0, first=0, variance=var)
    z = e / np.sqrt(var)
    assert abs(z.mean()) < 0.03 and z.std() == pytest.approx(1.0, abs=0.02)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="bootstrap method"):
        bs.draw_errors("jackknife", np.zeros((1, 3)), np.ones(3, bool), seed=0, replicate=0, first=0)


def test_statistics_totals_means_and_coverage():
    reps = np.array([[1.0, 0.0, 2.0, 2.0], [3.0, 0.0, 0.0, 4.0], [2.0, 0.0, 1.0, 3.0]])   # R=3, C=2, P=2
    st = bs.weight_statistics(reps)
    np.testing.assert_allclose(st["mean"], [2.0, 0.0, 1.0, 3.0])
    np.testing.assert_allclose(st["std"], [1.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(st["p50"], [2.0, 0.0, 1.0, 3.0])
    totals = bs.component_totals(reps, 2)
    np.testing.assert_allclose(totals, [[1.0, 4.0], [3.0, 4.0], [2.0, 4.0]])
    means = bs.weighted_means(reps, 2, np.array([8.0, 10.0]))
    np.testing.assert_allclose(means[:, 0], [8.0, 8.0, 8.0])
    np.testing.assert_allclose(means[:, 1], [9.0, 10.0, 9.5])
    assert np.isnan(bs.weighted_means(np.zeros((1, 4)), 2, np.array([1.0, 2.0]))).all()
    draws = np.random.default_rng(0).normal(size=(4000, 3))
    covered = bs.interval_covers(draws, np.array([0.0, 0.9, 1.1]))
    np.testing.assert_array_equal(covered, [True, True, False])


def test_wild_signs_are_the_signs_draw_errors_applies():
    residual = np.arange(1.0, 13.0).reshape(4, 3)
    used = np.array([True, False, True])
    signs = bs.wild_signs(7, [0, 3], 10, 4)
    assert signs.shape == (2, 4) and set(np.unique(signs)) <= {-1.0, 1.0}
    for j, r in enumerate([0, 3]):
        e = bs.draw_errors("wild", residual, used, seed=7, replicate=r, first=10, block="spaxel")
        np.testing.assert_array_equal(e, np.where(used, residual * signs[j][:, None], 0.0))
    assert bs.wild_signs(7, [3], 12, 2)[0].tolist() == signs[1, 2:].tolist()     # keyed by spectrum, not position
