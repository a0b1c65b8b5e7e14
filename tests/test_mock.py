import numpy as np
import pytest
import scipy.sparse as sp

from cubefit_mpi.io.validation import check_grids
from cubefit_mpi.numerics.rebin import rebin_operator
from cubefit_mpi.numerics.synthetic_galaxy import MockModel, MockSpec, make_grids, pop_grid_shape


def model(**kw):
    spec = MockSpec(**{**dict(spaxels=30, components=3, populations=12, wavelengths=200, seed=5), **kw})
    obs, tem, vel = make_grids(spec)
    return MockModel.create(spec, rebin_operator(tem, obs))


def test_grids_pass_validation_with_velocity_guard():
    obs, tem, vel = make_grids(MockSpec(spaxels=1, components=1, populations=1, wavelengths=500))
    check_grids(tem, obs, vel)
    assert np.allclose(np.diff(tem), np.diff(tem)[0])


def test_reproducible_by_seed_and_different_across_seeds():
    a, b, c = model(seed=5, snr=30), model(seed=5, snr=30), model(seed=6, snr=30)
    ya, _ = a.spectra(0, 30)
    yb, _ = b.spectra(0, 30)
    yc, _ = c.spectra(0, 30)
    assert np.array_equal(ya, yb, equal_nan=True)
    assert not np.allclose(ya, yc)
    assert np.array_equal(a.x_true, b.x_true)


def test_spaxel_values_do_not_depend_on_the_split():
    m = model(snr=20, masked_pixels=7)
    whole, sig = m.spectra(0, 30)
    parts = np.vstack([m.spectra(0, 11)[0], m.spectra(11, 30)[0]])
    assert np.array_equal(whole, parts, equal_nan=True)


def test_truth_sparse_nonnegative_and_templates_correlated():
    m = model(populations=20)
    assert np.all(m.x_true >= 0) and 1 <= (m.x_true > 0).sum(axis=1).max() <= 3
    t = m.templates
    assert np.all(t > 0)
    corr = np.corrcoef(t[0], t[1])[0, 1]
    assert corr > 0.9                                   # neighbouring populations strongly correlated
    assert pop_grid_shape(20) == (5, 4) and m.pop_info["pop_shape"] == (5, 4)


def test_masked_pixels_are_nan_and_counted():
    m = model(masked_pixels=9)
    y, _ = m.spectra(0, 5)
    assert (~m.mask).sum() == 9
    assert np.all(np.isnan(y[:, ~m.mask])) and np.all(np.isfinite(y[:, m.mask]))


def test_noise_level_matches_snr():
    clean, _ = model().spectra(0, 30)
    noisy, sigma = model(snr=25).spectra(0, 30)
    resid = (noisy - clean)[:, model().mask]
    ratio = resid.std(axis=1) / sigma
    assert 0.85 < np.median(ratio) < 1.15


def test_kinematics_distinct():
    m = model(spaxels=100)
    losvd = m.losvd(0, 100)
    vel = m.vel_pix
    mean_v = (losvd * vel[None, :, None]).sum(1) / losvd.sum(1)
    disc, counter = mean_v[:, 0], mean_v[:, 1]
    assert np.corrcoef(disc, counter)[0, 1] < -0.5      # counter-rotating
    width = np.sqrt((losvd * (vel[None, :, None] - mean_v[:, None, :]) ** 2).sum(1) / losvd.sum(1))
    assert np.median(width[:, 2]) > 2 * np.median(width[:, 0])   # hot bulge


@pytest.mark.parametrize("kw,match", [(dict(spaxels=0), "--spaxels"), (dict(snr=-1), "--noise"),
                                      (dict(masked_pixels=500), "--masked-pixels")])
def test_bad_spec(kw, match):
    with pytest.raises(ValueError, match=match):
        MockSpec(**{**dict(spaxels=3, components=1, populations=2, wavelengths=100), **kw})
