"""λ-weights: numerics on synthetic spectra, the stage on mock files, the CLI, and a real galaxy."""
import argparse
import importlib.util
import math
import os
import warnings

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from cubefit_mpi.cli.weights import register
from cubefit_mpi.config.errors import InputError
from cubefit_mpi.numerics import lambda_weights as lw
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.stages.mock import make_mock
from cubefit_mpi.stages.weights import ensure_lambda_weights, median_spectrum, read_lambda_weights, weights_banner

SELF = MPI.COMM_SELF


def _lines_spectrum(n=800, lines=((200, 0.5), (420, 0.3), (600, 0.6)), width=3.0, slope=0.4, emission=None):
    x = np.arange(n, dtype=float)
    y = 1.0 + slope * x / n
    for centre, depth in lines:
        y *= 1.0 - depth * np.exp(-0.5 * ((x - centre) / width) ** 2)
    if emission is not None:
        y += 0.8 * np.exp(-0.5 * ((x - emission) / width) ** 2)
    return y


# ---------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------
def test_boxcar_keeps_constants_and_ramps_across_masked_gaps():
    n = 200
    valid = np.ones(n, dtype=bool)
    valid[50:60] = False
    const = np.full(n, 3.0)
    const[~valid] = 1e9                                     # must be ignored
    np.testing.assert_allclose(lw.boxcar_smooth(const, valid, 11, passes=3), 3.0, rtol=0, atol=1e-12)
    ramp = 0.5 * np.arange(n) + 2.0
    out = lw.boxcar_smooth(np.where(valid, ramp, np.nan), valid, 7, passes=2)
    inner = np.r_[10:40, 70:190]                           # away from the ends and the gap
    np.testing.assert_allclose(out[inner], ramp[inner], rtol=1e-12)
    assert np.all(np.isfinite(out))                        # the 10-pixel gap is bridged (window 7, 2 passes)
    np.testing.assert_allclose(out[55], ramp[55], rtol=0.05)
    assert np.isnan(lw.boxcar_smooth(ramp, np.zeros(n, bool), 5)).all()


def test_boxcar_rejects_even_windows():
    with pytest.raises(ValueError, match="odd"):
        lw.boxcar_smooth(np.ones(10), np.ones(10, bool), 4)


def test_column_median_exact_with_missing_values():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(9, 40))
    values[rng.uniform(size=values.shape) < 0.3] = np.nan
    values[:, 5] = np.nan                                  # a column without data
    values[:, 6] = np.inf                                  # non-finite counts as missing
    values[:8, 7] = np.nan                                 # exactly one value
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = lw.column_median(values)
    for j in range(values.shape[1]):
        col = values[:, j][np.isfinite(values[:, j])]
        if col.size:
            assert got[j] == np.median(col), j
        else:
            assert np.isnan(got[j])
    # any split of the columns gives the same bits
    split = np.concatenate([lw.column_median(values[:, a:b]) for a, b in ((0, 7), (7, 23), (23, 40))])
    assert split.tobytes() == got.tobytes()


def test_spaxel_norms_skip_unusable_spaxels():
    block = np.array([[1.0, 3.0, np.nan], [np.nan, np.nan, np.nan], [-1.0, -2.0, 5.0], [2.0, 2.0, 100.0]])
    mask = np.array([True, True, False])
    sums, counts = lw.masked_row_sums(block, mask)
    np.testing.assert_array_equal(counts, [2, 0, 2, 2])
    norms = lw.spaxel_norms(sums, counts)
    np.testing.assert_array_equal(norms[[0, 3]], [2.0, 2.0])
    assert np.isnan(norms[1]) and np.isnan(norms[2])      # no data / negative mean


def test_weights_peak_on_absorption_lines_and_floor_on_continuum():
    y = _lines_spectrum(emission=320)
    valid = np.ones(y.size, bool)
    w = lw.lambda_weights_from_spectrum(y, valid, small=5, large=61, min_w=0.1)
    assert w.min() == pytest.approx(0.1) and w.max() == 1.0
    for centre in (200, 420, 600):
        assert w[centre] == 1.0                            # line cores saturate
    continuum = np.r_[60:150, 470:540, 680:740]
    assert w[continuum].max() < 0.2 and np.median(w[continuum]) == pytest.approx(0.1)
    assert w[320] == pytest.approx(0.1)                    # emission is not emphasised by default
    w_all = lw.lambda_weights_from_spectrum(y, valid, small=5, large=61, min_w=0.1, features="all")
    assert w_all[320] == 1.0


def test_masked_pixels_get_min_w_and_do_not_leak():
    y = _lines_spectrum()
    valid = np.ones(y.size, bool)
    valid[100:110] = False
    y_bad = y.copy()
    y_bad[100:110] = -50.0                                 # garbage where masked
    w = lw.lambda_weights_from_spectrum(y_bad, valid, min_w=0.2)
    np.testing.assert_array_equal(w[100:110], 0.2)
    assert w[60:150][valid[60:150]].max() < 0.3            # the garbage made no feature around the gap


def test_featureless_spectrum_gets_uniform_weights():
    y = 2.0 + 0.001 * np.arange(300)                       # a straight line: no feature
    w = lw.lambda_weights_from_spectrum(y, np.ones(300, bool), small=5, large=41)
    np.testing.assert_array_equal(w[30:-30], 1.0)


def test_finalize_weights_floor_mask_and_bad_values():
    w = np.array([0.0, 0.5, np.nan, 2.0])
    mask = np.array([True, True, False, True])
    np.testing.assert_array_equal(lw.finalize_weights(w, mask, 1e-3), [1e-3, 0.5, 1e-3, 2.0])
    with pytest.raises(ValueError, match="pixel 2"):
        lw.finalize_weights(w, None, 1e-3)
    with pytest.raises(ValueError, match="pixel 0"):
        lw.finalize_weights(np.array([-1.0, 1.0]), None, 0.0)


def test_banner_counts_unmasked_pixels_only():
    w = np.array([0.1, 1.0, 0.5, 99.0])
    text = weights_banner(w, np.array([True, True, True, False]))
    assert text == "lambda-weights: min 0.1 max 1 mean 0.533 over 3 unmasked pixels"


# ---------------------------------------------------------------------------------------------
# the stage on a mock galaxy
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def mock600(tmp_path):
    path = tmp_path / "g.h5"
    make_mock(str(path), MockSpec(spaxels=23, components=2, populations=4, wavelengths=600, seed=1, snr=50,
                                  masked_pixels=12), SELF)
    return path


def test_median_spectrum_normalises_spaxels(tmp_path):
    rng = np.random.default_rng(5)
    base = 1.0 + 0.3 * np.sin(np.arange(50) / 4.0)
    scales = np.array([1.0, 7.0, 0.01, 3.0, 0.0, 2.0, 5.0])
    cube = scales[:, None] * base[None, :] * (1 + 0.01 * rng.normal(size=(7, 50)))
    cube[4] = np.nan                                       # a spaxel without data is skipped
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["DataCube"] = cube
    mask = np.ones(50, bool)
    mask[10] = False
    with h5py.File(tmp_path / "c.h5", "r") as f:
        median, used = median_spectrum(f["DataCube"], mask, comm=SELF, rows_per_block=2, max_slab_bytes=8 * 7 * 2 * 3)
    assert used == 6
    normed = np.delete(cube, 4, axis=0)
    normed = normed / normed[:, mask].mean(axis=1, keepdims=True)
    expected = np.median(normed, axis=0)
    np.testing.assert_allclose(median[mask], expected[mask], rtol=1e-14)
    assert np.isnan(median[10])


def test_ensure_writes_reuses_and_forces(mock600):
    w = ensure_lambda_weights(str(mock600), comm=SELF)
    with h5py.File(mock600, "r") as f:
        d = f["/HyperCube/lambda_weights"]
        stored, attrs = d[...], dict(d.attrs)
        lam = np.exp(f["/ObsPix"][...])
        mask = f["/Mask"][...]
    assert stored.tobytes() == w.tobytes() and w.shape == (600,)
    assert attrs["method"] == lw.METHOD and attrs["small"] == 5 and attrs["large"] == 61
    assert attrs["min_w"] == 0.1 and attrs["n_spaxels_used"] == 23 and list(attrs["source_shape"]) == [23, 600]
    np.testing.assert_array_equal(w[~mask], 0.1)
    # the mock's strong metal lines carry the highest weights
    for centre in (5015.0, 5172.7, 5270.4, 5335.2):
        assert w[np.abs(lam - centre) < 5].max() == 1.0, centre
    assert np.mean(w[mask]) < 0.35
    # same parameters: reused (the file is not rewritten)
    before = os.stat(mock600).st_mtime_ns
    assert ensure_lambda_weights(str(mock600), comm=SELF).tobytes() == w.tobytes()
    assert os.stat(mock600).st_mtime_ns == before
    # other parameters: rebuilt; force: rebuilt
    w2 = ensure_lambda_weights(str(mock600), small=3, large=31, min_w=0.3, comm=SELF)
    assert w2.min() == pytest.approx(0.3) and not np.array_equal(w2, w)
    with h5py.File(mock600, "r") as f:
        assert f["/HyperCube/lambda_weights"].attrs["large"] == 31
    w3 = ensure_lambda_weights(str(mock600), small=3, large=31, min_w=0.3, force=True, comm=SELF)
    assert w3.tobytes() == w2.tobytes()


def test_ensure_keeps_external_weights_unless_forced(mock600):
    with h5py.File(mock600, "a") as f:
        f["/HyperCube/lambda_weights"] = np.full(600, 0.5)
    np.testing.assert_array_equal(ensure_lambda_weights(str(mock600), comm=SELF), 0.5)
    assert ensure_lambda_weights(str(mock600), force=True, comm=SELF).max() == 1.0


def test_bad_options_are_input_errors_and_leave_file_alone(mock600):
    before = os.stat(mock600).st_mtime_ns
    for kwargs, text in (({"small": 4}, "--small=4"), ({"small": 61, "large": 31}, "small < large"),
                         ({"min_w": 0.0}, "--min-w=0.0")):
        with pytest.raises(InputError, match=text):
            ensure_lambda_weights(str(mock600), comm=SELF, **kwargs)
    assert os.stat(mock600).st_mtime_ns == before


def test_read_applies_knobs_floor_and_mask(mock600, monkeypatch):
    with h5py.File(mock600, "r") as f:
        mask = f["/Mask"][...]
    monkeypatch.setenv("CUBEFIT_LAMBDA_WEIGHTS_AUTO", "0")
    assert read_lambda_weights(str(mock600), comm=SELF) is None
    monkeypatch.setenv("CUBEFIT_LAMBDA_WEIGHTS_AUTO", "1")
    monkeypatch.setenv("CUBEFIT_LAMBDA_MIN_W", "0.25")
    w = read_lambda_weights(str(mock600), comm=SELF)          # generated on the fly
    assert w.shape == (600,) and w.min() == pytest.approx(0.25)
    np.testing.assert_array_equal(w[~mask], 0.25)
    monkeypatch.setenv("CUBEFIT_LAMBDA_WEIGHTS_ENABLE", "0")
    assert read_lambda_weights(str(mock600), comm=SELF) is None


def test_read_rejects_wrong_length_and_bad_values(mock600, monkeypatch):
    monkeypatch.setenv("CUBEFIT_LAMBDA_WEIGHTS_DSET", "/MyWeights")
    with h5py.File(mock600, "a") as f:
        f["/MyWeights"] = np.ones(599)
    with pytest.raises(InputError, match=r"/MyWeights: expected shape \(600,\)"):
        read_lambda_weights(str(mock600), comm=SELF)
    with h5py.File(mock600, "a") as f:
        del f["/MyWeights"]
        bad = np.ones(600)
        bad[np.flatnonzero(f["/Mask"][...])[3]] = np.nan
        f["/MyWeights"] = bad
    with pytest.raises(InputError, match="/MyWeights: pixel"):
        read_lambda_weights(str(mock600), comm=SELF)


def _run_weights_cli(argv, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    code = args.handler(args, SELF)
    return code, capsys.readouterr().out


def test_cli_weights_prints_banner(mock600, capsys):
    code, out = _run_weights_cli(["weights", str(mock600), "--small", "3", "--large", "41", "--min-w", "0.2"],
                                 capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0] == f"{mock600}:/HyperCube/lambda_weights"
    assert lines[1].startswith("lambda-weights: min 0.2 max 1 mean ") and lines[1].endswith("over 588 unmasked pixels")
    with h5py.File(mock600, "r") as f:
        assert f["/HyperCube/lambda_weights"].attrs["large"] == 41


# ---------------------------------------------------------------------------------------------
# a real galaxy: NGC 3522 (SDSS DR18 spectrum shipped with the ppxf package)
# ---------------------------------------------------------------------------------------------
def _ngc3522():
    pytest.importorskip("astropy")
    spec = importlib.util.find_spec("ppxf")
    if spec is None:
        pytest.skip("ppxf (test dependency) is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "spectra", "NGC3522_SDSS_DR18.fits")
    if not os.path.exists(path):
        pytest.skip(f"{path} not shipped by this ppxf version")
    from astropy.io import fits

    with fits.open(path) as hdul:
        table = hdul[1].data
        z = float(hdul[2].data["Z"][0])                  # SDSS pipeline redshift, 0.00402
        loglam10 = np.asarray(table["loglam"], dtype=np.float64)
        flux = np.asarray(table["flux"], dtype=np.float64)
        good = (np.asarray(table["ivar"]) > 0) & (np.asarray(table["and_mask"]) == 0) & np.isfinite(flux)
    return loglam10 * math.log(10.0), flux, good, z


def test_real_galaxy_weights_fall_on_known_absorption_features(tmp_path):
    ln_lam, flux, good, z = _ngc3522()
    assert 0.003 < z < 0.005
    path = tmp_path / "ngc3522.h5"
    # a 3-spaxel cube of the same galaxy at different brightness: the normalised median is the spectrum
    with h5py.File(path, "w") as f:
        f["/ObsPix"] = ln_lam                            # SDSS is log-rebinned already (69 km/s/px)
        f["/DataCube"] = np.stack([flux, 20.0 * flux, 0.05 * flux])
        f["/Mask"] = good
    w = ensure_lambda_weights(str(path), comm=SELF)
    rest = np.exp(ln_lam) / (1.0 + z)                    # vacuum wavelengths in the rest frame
    # the named features of the brief: all carry high weight
    for name, centre in (("Hbeta", 4862.7), ("Mgb", 5175.0), ("Fe5270", 5271.9), ("Fe5335", 5336.7),
                         ("NaD", 5894.6)):
        assert w[np.abs(rest - centre) < 8].max() >= 0.9, name
    # the 40 highest weights between 4800 and 6000 A all sit on known absorption lines
    feature_centres = (4921.9, 5017.0, 5168.8, 5174.1, 5185.0, 5271.9, 5336.7, 5891.6, 5897.6)
    band = np.flatnonzero((rest > 4800) & (rest < 6000) & good)
    top = band[np.argsort(w[band])[::-1][:40]]
    distance = np.min(np.abs(rest[top, None] - np.array(feature_centres)[None, :]), axis=1)
    assert distance.max() < 12.0, rest[top][distance >= 12.0]
    # featureless continuum windows get the lowest weights
    for lo, hi in ((6030, 6080), (6400, 6450), (6650, 6700)):
        sel = (rest > lo) & (rest < hi) & good
        assert w[sel].mean() < 0.15, (lo, hi)
    assert np.mean(w[good]) < 0.3
