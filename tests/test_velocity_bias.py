"""Velocity bias: the numerics of the cross-correlation, the stage on a mock with a known offset,
``--apply`` (once), and the command line."""
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import run_cli
from mpi4py import MPI

from cubefit_mpi.config.errors import InputError
from cubefit_mpi.numerics import velocity_bias as vb
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.stages.mock import make_mock
from cubefit_mpi.stages.velocity_bias import apply_velocity_bias, applied_offset, estimate_velocity_bias

SELF = MPI.COMM_SELF
INJECTED = 35.0      # km/s


def offset_mock(path, *, snr=None, seed=2, spaxels=80, path_only=False):
    """A mock whose data are 35 km/s redward of what its /VelPix says.

    The mock's data are made from the true LOSVDs on the true velocity grid; subtracting 35 km/s
    from the stored /VelPix afterwards makes every LOSVD bin claim a velocity 35 km/s too low, so
    a model built from the file is 35 km/s blueward of the data -- exactly a mis-set redshift.
    The estimate must be +35 km/s, and --apply must put /VelPix back on the true grid.
    """
    make_mock(str(path), MockSpec(spaxels=spaxels, components=3, populations=12, wavelengths=300, seed=seed,
                                  snr=snr, masked_pixels=10), SELF)
    with h5py.File(path, "r+") as f:
        true_vel = f["/VelPix"][...].copy()
        f["/VelPix"][...] = true_vel - INJECTED
    return path if path_only else true_vel


# ---------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------
def test_shift_spectra_integer_and_fractional():
    s = np.arange(1.0, 11.0)
    np.testing.assert_array_equal(vb.shift_spectra(s, 2.0), np.r_[0, 0, s[:-2]])
    np.testing.assert_array_equal(vb.shift_spectra(s, -3.0), np.r_[s[3:], 0, 0, 0])
    half = vb.shift_spectra(s, 0.25)                 # a ramp moved right by 0.25 pixel: value - 0.25
    np.testing.assert_allclose(half[1:], s[1:] - 0.25)
    np.testing.assert_allclose(vb.shift_spectra(np.vstack([s, 2 * s]), 1.5)[1], 2 * vb.shift_spectra(s, 1.5))


def test_peak_offset_is_the_parabola_vertex():
    v = np.arange(-50.0, 51.0, 10.0)
    corr = 1.0 - (v - 12.5) ** 2 / 1e4
    peak, edge = vb.peak_offset(v, corr)
    assert not edge and peak == pytest.approx(12.5, abs=1e-9)
    assert vb.peak_offset(v, v)[1] and vb.peak_offset(v, np.full(v.size, np.nan))[1]


def test_trial_velocities_and_bad_options():
    np.testing.assert_array_equal(vb.trial_velocities(30, 10), [-30, -20, -10, 0, 10, 20, 30])
    with pytest.raises(ValueError):
        vb.trial_velocities(10, 10)


def test_bootstrap_weights_depend_on_the_spaxel_only():
    whole = vb.bootstrap_weights(np.arange(10), 50, 3)
    parts = np.hstack([vb.bootstrap_weights(np.arange(0, 4), 50, 3), vb.bootstrap_weights(np.arange(4, 10), 50, 3)])
    np.testing.assert_array_equal(whole, parts)
    assert np.all(whole[0] == 1) and abs(whole[1:].mean() - 1.0) < 0.1


def test_sums_add_over_spaxel_blocks_and_continuum_is_removed():
    rng = np.random.default_rng(0)
    T, L, n = 60, 28, 7
    rebin = sp.random(L, T, density=0.1, random_state=1, format="csr")
    data, model = rng.normal(size=(n, L)), rng.normal(size=(n, T))
    pixels = np.arange(3, L - 3)
    basis = vb.continuum_basis(L, pixels, 2)
    np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-12)
    deltas = np.array([-1.5, 0.0, 0.7])
    w = vb.bootstrap_weights(np.arange(n), 4, 1)
    whole = vb.correlation_sums(data, model, rebin, deltas, pixels, basis, w)
    split = (vb.correlation_sums(data[:3], model[:3], rebin, deltas, pixels, basis, w[:, :3]) +
             vb.correlation_sums(data[3:], model[3:], rebin, deltas, pixels, basis, w[:, 3:]))
    np.testing.assert_allclose(whole, split, rtol=1e-12)
    poly = 3.0 + 0.2 * pixels                      # a pure continuum correlates with nothing
    flat = np.zeros((1, L))
    flat[0, pixels] = poly
    assert np.allclose(vb.correlation_sums(flat, model[:1], rebin, deltas, pixels, basis, w[:1, :1])[0, -1], 0.0)


def test_valid_pixels_drop_the_template_edges():
    T, L = 40, 20
    rebin = sp.csr_matrix(np.kron(np.eye(L), [0.5, 0.5]))        # 2 template pixels per observed one
    shifts = np.arange(-3, 4)
    none = vb.valid_pixels(rebin, T, shifts, np.array([0.0]), None)
    wide = vb.valid_pixels(rebin, T, shifts, np.array([-4.5, 0.0, 4.5]), None)
    assert none[2:-2].all() and not none[:1].any() and not none[-1:].any()
    assert wide.sum() < none.sum() and not wide[:4].any() and wide[L // 2]


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed, snr", [(0, None), (1, None), (2, None), (2, 40.0), (3, 25.0)])
def test_injected_35_kms_is_recovered(tmp_path, seed, snr):
    result = estimate_velocity_bias(str(offset_mock(tmp_path / "o.h5", snr=snr, seed=seed, path_only=True)),
                                    n_boot=50, comm=SELF)
    assert abs(result["offset_kms"] - INJECTED) <= 3.0, result["offset_kms"]
    assert 0 < result["sigma_kms"] < 3.0 and result["template"] == "optimal template"
    assert abs(result["integrated_offset_kms"] - INJECTED) <= 3.0
    assert np.all(result["template_weights"] >= 0) and result["template_weights"].shape == (12,)


def test_applied_once(tmp_path):
    path = tmp_path / "offset.h5"
    true_vel = offset_mock(path)
    result = estimate_velocity_bias(str(path), comm=SELF)
    assert abs(result["offset_kms"] - INJECTED) <= 3.0, result["offset_kms"]
    assert applied_offset(str(path), SELF) is None
    out = apply_velocity_bias(str(path), result, comm=SELF)
    assert out["applied"] and out["offset_kms"] == result["offset_kms"]
    with h5py.File(path) as f:
        vel = f["/VelPix"][...]
        attrs = dict(f["/VelPix"].attrs)
    np.testing.assert_allclose(vel, true_vel - INJECTED + result["offset_kms"], atol=1e-9)
    assert np.max(np.abs(vel - true_vel)) <= 3.0
    assert attrs["velocity_bias.offset_kms"] == result["offset_kms"]
    assert attrs["velocity_bias.sigma_kms"] == result["sigma_kms"] and attrs["velocity_bias.applied_at"][:2] == "20"
    again = estimate_velocity_bias(str(path), comm=SELF)          # measured against the corrected grid
    assert abs(again["offset_kms"]) <= 3.0
    second = apply_velocity_bias(str(path), again, comm=SELF)     # a second --apply does not double it
    assert not second["applied"] and second["offset_kms"] == result["offset_kms"]
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["/VelPix"][...], vel)
    forced = apply_velocity_bias(str(path), again, force=True, comm=SELF)
    assert forced["applied"] and forced["offset_kms"] == pytest.approx(result["offset_kms"] + again["offset_kms"])


def test_solution_mixtures_give_a_sharper_estimate(tmp_path):
    path = tmp_path / "x.h5"
    offset_mock(path, spaxels=40, seed=4)
    mean = estimate_velocity_bias(str(path), template="mean", comm=SELF)     # template mismatch: biased
    optimal = estimate_velocity_bias(str(path), template="optimal", comm=SELF)
    assert mean["template"] == "mean template" and abs(mean["offset_kms"] - INJECTED) > 5.0
    assert abs(optimal["offset_kms"] - INJECTED) <= 3.0
    with h5py.File(path, "r+") as f:
        f["/X_global"] = f["/Truth/x"][...].reshape(-1)
    result = estimate_velocity_bias(str(path), comm=SELF)
    assert result["template"] == "/X_global mixtures"
    assert abs(result["offset_kms"] - INJECTED) <= 0.5 and result["sigma_kms"] < 0.5


def test_errors(tmp_path):
    path = tmp_path / "e.h5"
    offset_mock(path, spaxels=20)
    with pytest.raises(InputError, match="peaks at the edge of the search range.*widen --range"):
        estimate_velocity_bias(str(path), v_range=20.0, step=10.0, comm=SELF)
    with pytest.raises(InputError, match="--range/--step"):
        estimate_velocity_bias(str(path), v_range=5.0, step=10.0, comm=SELF)
    with pytest.raises(InputError, match="only .* observed pixels stay clear"):
        estimate_velocity_bias(str(path), v_range=20000.0, step=1000.0, comm=SELF)
    with pytest.raises(InputError, match="/X_global: dataset missing"):
        estimate_velocity_bias(str(path), template="x", comm=SELF)
    with pytest.raises(InputError, match="--template best"):
        estimate_velocity_bias(str(path), template="best", comm=SELF)
    with pytest.raises(InputError, match="--bootstrap 1"):
        estimate_velocity_bias(str(path), n_boot=1, comm=SELF)


def test_cli_reports_and_applies(tmp_path):
    path = tmp_path / "cli.h5"
    offset_mock(path, spaxels=30)
    res = run_cli("velocity-bias", path, "--range", "20")
    assert res.returncode == 2 and "widen --range" in res.stderr
    res = run_cli("velocity-bias", path, "--apply", "--bootstrap", "50")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"{path}: velocity offset +3") and "km/s (data against the optimal template model" in lines[0]
    assert lines[1].startswith(f"{path}:/VelPix shifted; recorded offset +3")
    res = run_cli("velocity-bias", path, "--apply", "--bootstrap", "50")
    assert res.returncode == 0 and "unchanged: an offset of +3" in res.stdout
