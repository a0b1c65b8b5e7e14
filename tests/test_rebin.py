import numpy as np
import pytest

from cubefit_mpi.numerics.rebin import rebin_operator
from cubefit_mpi.numerics.wavelength_grids import pixel_edges


def grids(oversample=3, n_obs=50, offset=0.37):
    dln = 1e-4
    obs = 8.5 + dln * np.arange(n_obs)
    tem = obs[0] - 10 * dln + (dln / oversample) * (np.arange(n_obs * oversample + 20 * oversample) + offset)
    return tem, obs


def test_edges_half_way():
    e = pixel_edges(np.array([1.0, 2.0, 4.0]))
    np.testing.assert_allclose(e, [0.5, 1.5, 3.0, 5.0])


@pytest.mark.parametrize("oversample", [1, 2, 3, 7])
def test_flat_stays_flat(oversample):
    tem, obs = grids(oversample)
    R = rebin_operator(tem, obs).toarray()
    np.testing.assert_allclose(np.ones(tem.size) @ R, 1.0, rtol=1e-12)


def test_integral_preserved_on_covered_range():
    tem, obs = grids(3)
    rng = np.random.default_rng(1)
    f = rng.uniform(0.5, 2.0, tem.size)
    R = rebin_operator(tem, obs).toarray()
    o_edges, t_edges = pixel_edges(obs), pixel_edges(tem)
    lhs = (f @ R) @ np.diff(o_edges)
    # template flux inside [o_edges[0], o_edges[-1]] computed by explicit overlap
    lo = np.maximum(t_edges[:-1], o_edges[0])
    hi = np.minimum(t_edges[1:], o_edges[-1])
    rhs = np.sum(f * np.clip(hi - lo, 0, None))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)


def test_each_template_pixel_weights_sum_to_covered_width():
    tem, obs = grids(2)
    R = rebin_operator(tem, obs).toarray()
    o_edges, t_edges = pixel_edges(obs), pixel_edges(tem)
    contrib = R @ np.diff(o_edges)                    # sum_l R[t, l] |bin_l|
    lo = np.maximum(t_edges[:-1], o_edges[0])
    hi = np.minimum(t_edges[1:], o_edges[-1])
    np.testing.assert_allclose(contrib, np.clip(hi - lo, 0, None), atol=1e-18)
    assert np.all(R >= 0)


def test_identical_grids_give_identity():
    g = 8.0 + 1e-4 * np.arange(30)
    np.testing.assert_allclose(rebin_operator(g, g).toarray(), np.eye(30), atol=1e-12)


def test_interp_mode_two_taps_linear():
    tem, obs = grids(3)
    R = rebin_operator(tem, obs, "interp").toarray()
    assert np.all((R != 0).sum(axis=0) <= 2)
    line = 3.0 + 2.0 * tem
    np.testing.assert_allclose(line @ R, 3.0 + 2.0 * obs, rtol=1e-12)


def test_overlap_differs_from_interp_for_coarser_output():
    tem, obs = grids(3)
    spiky = np.zeros(tem.size)
    spiky[::3] = 3.0                                   # mean density 1
    flux = spiky @ rebin_operator(tem, obs).toarray()
    np.testing.assert_allclose(flux.mean(), 1.0, rtol=0.05)


def test_bad_mode():
    tem, obs = grids()
    with pytest.raises(ValueError, match="rebin mode"):
        rebin_operator(tem, obs, "cubic")
