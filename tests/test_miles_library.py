"""The MILES SSP subset shipped with the package, and ``mock --templates miles`` made from it."""
from __future__ import annotations

import configparser
import fnmatch
import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_cli
from mpi4py import MPI

from cubefit_mpi.io.ingest_readers import read_templates
from cubefit_mpi.numerics.rebin import rebin_operator
from cubefit_mpi.numerics.synthetic_galaxy import MockModel, MockSpec, library_on_grid, make_grids
from cubefit_mpi.numerics.wavelength_grids import pixel_edges
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.mock import library_path, load_library, make_mock

ROOT = Path(__file__).resolve().parents[1]


def _shared_library() -> Path:
    """``../shared/data/miles_ssp.npz`` beside the checkout (for a git worktree: beside the main one)."""
    checkouts = [ROOT]
    if (ROOT / ".git").is_file():                 # a worktree: "gitdir: MAIN/.git/worktrees/NAME"
        gitdir = Path((ROOT / ".git").read_text().split("gitdir:", 1)[-1].strip())
        checkouts.append(gitdir.parents[2])
    for checkout in checkouts:
        if (checkout.parent / "shared" / "data" / "miles_ssp.npz").is_file():
            return checkout.parent / "shared" / "data" / "miles_ssp.npz"
    return ROOT.parent / "shared" / "data" / "miles_ssp.npz"


SHARED = _shared_library()
needs_shared = pytest.mark.skipif(not SHARED.is_file(), reason="the full MILES library (../shared) is absent")


def regen_script():
    spec = importlib.util.spec_from_file_location("make_miles_subset", ROOT / "scripts" / "make_miles_subset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# the shipped file
# ---------------------------------------------------------------------------------------------
def test_shipped_file_is_compact_and_holds_the_grid():
    path = library_path("miles")
    assert path.is_file() and path.stat().st_size < 600e3
    with np.load(path) as z:
        tem, lam, ages, metals = z["templates"], z["lam"], z["ages"], z["metals"]
        assert float(z["fwhm"]) == 2.51 and "Vazdekis" in str(z["citation"])
    assert tem.shape == (778, 53, 4) and tem.dtype == np.float32 and np.all(tem > 0)
    np.testing.assert_allclose(lam, 3540.5 + 0.9 * np.round((lam - 3540.5) / 0.9), atol=1e-9)
    np.testing.assert_allclose(np.diff(lam), 0.9, atol=1e-9)
    assert 4750.0 <= lam[0] < 4751.0 and 5449.0 < lam[-1] <= 5450.0
    assert ages.size == 53 and np.all(np.diff(ages) > 0) and ages[0] == 0.03 and ages[-1] == 14.0
    np.testing.assert_array_equal(metals, [-1.26, -0.66, -0.25, 0.26])
    lam2, flux, pop = read_templates(str(path))           # what ingest and mock read: age-major
    assert flux.shape == (212, 778) and pop["pop_shape"] == (53, 4)
    np.testing.assert_allclose(pop["log_age"], np.repeat(np.log10(ages * 1e9), 4))
    np.testing.assert_array_equal(pop["metallicity"], np.tile(metals, 53))
    np.testing.assert_array_equal(flux[4 * 10 + 2], tem[:, 10, 2])


def test_setup_cfg_ships_the_data_files():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    patterns = [p.strip() for p in cfg["options.package_data"]["cubefit_mpi"].split(",")]
    for name in ("data/miles_ssp_subset.npz", "data/README.md"):
        assert (ROOT / "cubefit_mpi" / name).is_file()
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name


@needs_shared
def test_shipped_file_is_what_the_script_makes_from_the_full_library(tmp_path):
    module = regen_script()
    assert module.main(["--source", str(SHARED), "--out", str(tmp_path / "m.npz")]) == 0
    with np.load(tmp_path / "m.npz") as new, np.load(library_path("miles")) as shipped:
        assert sorted(new.files) == sorted(shipped.files)
        for key in new.files:
            np.testing.assert_array_equal(new[key], shipped[key], err_msg=key)
    with np.load(SHARED) as full:                          # the values are the library's, unchanged
        i = np.flatnonzero((full["age"] == 10.0) & (full["met"] == -0.25))[0]
        pix = (full["lam"] >= 4750.0) & (full["lam"] <= 5450.0)
        with np.load(library_path("miles")) as shipped:
            j = int(np.flatnonzero(shipped["ages"] == 10.0)[0])
            np.testing.assert_array_equal(shipped["templates"][:, j, 2], full["flux"][i, pix])


def test_script_without_the_shared_file_says_so(tmp_path, capsys):
    assert regen_script().main(["--source", str(tmp_path / "none.npz"), "--out", str(tmp_path / "o.npz")]) == 2
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "o.npz").exists()


# ---------------------------------------------------------------------------------------------
# the mock on real templates
# ---------------------------------------------------------------------------------------------
def miles_model(**kw):
    spec = MockSpec(**{**dict(spaxels=12, components=2, populations=212, wavelengths=300, seed=5,
                              templates="miles"), **kw})
    obs, tem, vel = make_grids(spec)
    lam, flux, pop, _ = load_library("miles")
    return MockModel.create(spec, rebin_operator(tem, obs), (lam, flux, pop))


def test_library_on_grid_is_the_overlap_rebin_of_unit_mean():
    m = miles_model()
    assert m.templates.shape == (212, m.tem_pix.size)
    np.testing.assert_allclose(m.templates.mean(axis=1), 1.0, rtol=1e-12)
    lam, flux, pop, _ = load_library("miles")
    # the flux over the grid is the library's over the same range (piecewise-constant, exact overlap)
    edges = np.exp(pixel_edges(m.tem_pix))
    lib_edges = np.concatenate(([lam[0] - 0.45], lam + 0.45))
    cumulative = np.concatenate((np.zeros((flux.shape[0], 1)), np.cumsum(flux * 0.9, axis=1)), axis=1)
    expect = np.array([np.interp(edges[-1], lib_edges, c) - np.interp(edges[0], lib_edges, c) for c in cumulative])
    got = (m.templates * m.pop_info["norm"][:, None] * np.diff(edges)).sum(axis=1)
    np.testing.assert_allclose(got, expect, rtol=1e-10)
    assert m.pop_info["pop_shape"] == (53, 4) and np.all(m.pop_info["norm"] > 0)
    np.testing.assert_array_equal(m.pop_info["log_age"], pop["log_age"])
    with pytest.raises(ValueError, match="reaches outside the library"):
        library_on_grid(m.tem_pix + 0.2, lam, flux)


def test_miles_mock_refuses_other_sizes():
    with pytest.raises(ValueError, match="--populations 24: the miles library has 212 populations"):
        miles_model(populations=24)
    with pytest.raises(ValueError, match="--wavelengths 700: .* reaches outside the library's 4749.7-5449.8 A"):
        miles_model(wavelengths=700)
    with pytest.raises(ValueError, match="--templates 'foo'"):
        MockSpec(spaxels=1, components=1, populations=1, wavelengths=10, templates="foo")


def test_miles_mock_file_truth_reproduces_data_through_the_builder(tmp_path):
    path = tmp_path / "miles.h5"
    out = make_mock(str(path), MockSpec(spaxels=16, components=2, populations=212, wavelengths=200, seed=3,
                                        masked_pixels=4, templates="miles"), MPI.COMM_SELF)
    assert out["dims"].P == 212
    build_hypercube(str(path), comm=MPI.COMM_SELF)
    with h5py.File(path) as f:
        attrs = dict(f["/Templates"].attrs)
        assert tuple(attrs["pop_shape"]) == (53, 4) and attrs["library.fwhm"] == 2.51
        assert attrs["library"].startswith("miles") and "Vazdekis" in attrs["library.citation"]
        assert f["/Truth"].attrs["templates"] == "miles"
        np.testing.assert_allclose(10 ** f["/Populations/log_age"][::4] / 1e9, np.load(library_path("miles"))["ages"])
        assert f["/Populations/norm"].shape == (212,)
        models, x, data, mask = (f[n][...] for n in ("/HyperCube/models", "/Truth/x", "/DataCube", "/Mask"))
    recon = np.einsum("scpl,cp->sl", models.astype(np.float64), x)
    assert np.abs(recon[:, mask] - data[:, mask]).max() / np.abs(data[:, mask]).max() < 1e-5


def test_cli_mock_miles(tmp_path):
    res = run_cli("mock", tmp_path / "m.h5", "--templates", "miles", "--spaxels", 9, "--components", 1,
                  "--wavelengths", 100, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "S=9 C=1 P=212 L=100" in res.stdout
    res = run_cli("mock", tmp_path / "x.h5", "--templates", "miles", "--wavelengths", 700, timeout=120)
    assert res.returncode == 2 and "--wavelengths 700" in res.stderr and not (tmp_path / "x.h5").exists()
    res = run_cli("mock", tmp_path / "s.h5", "--spaxels", 4, "--wavelengths", 50, timeout=120)
    assert res.returncode == 0 and "P=24 " in res.stdout                  # synthetic stays the default
