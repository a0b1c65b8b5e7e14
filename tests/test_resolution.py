"""Resolution matching: the Gaussian broadening (numerics) and ``ingest --data-fwhm/--template-fwhm``."""
from __future__ import annotations

import json
import os
import re

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import run_cli
from ingest_fixtures import write_muse_like_inputs
from mpi4py import MPI
from scipy.optimize import curve_fit

from cubefit_mpi.config.errors import InputError
from cubefit_mpi.numerics.rebin import overlap_rebin
from cubefit_mpi.numerics.resolution import (
    FWHM_PER_SIGMA, broaden, broadening_operator, complete_range, fwhm_on_grid, pixel_widths, sigma_difference
)
from cubefit_mpi.numerics.wavelength_grids import edges_from_centres
from cubefit_mpi.pipeline.config import validate_config
from cubefit_mpi.stages.ingest import IngestOptions, run_ingest

MILES_FWHM = 2.51
LAM = 4000.0 + 0.9 * np.arange(2500)          # a MILES-like linear grid, 4000-6249 Å


def gaussian(x, depth, centre, fwhm):
    return depth * np.exp(-0.5 * ((x - centre) / (fwhm / FWHM_PER_SIGMA)) ** 2)


def fitted_fwhm(lam, flux, centre):
    """FWHM of a Gaussian least-squares fit to the line at ``centre`` (±30 Å)."""
    near = np.abs(lam - centre) < 30.0
    popt, _ = curve_fit(gaussian, lam[near], flux[near], p0=(flux[near].max(), centre, 3.0))
    return abs(popt[2])


def second_moment_fwhm(lam, flux):
    w = flux / flux.sum()
    mean = (w * lam).sum()
    return FWHM_PER_SIGMA * np.sqrt((w * (lam - mean) ** 2).sum())


def flux(lam, f):
    return float((f * pixel_widths(lam)).sum())


# ---------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fwhm_data", [2.6, 2.8, 3.2, 5.0])
@pytest.mark.parametrize("fwhm_line", [MILES_FWHM, 4.0, 1.5])
def test_constant_case_line_comes_out_at_quadrature_sum(fwhm_data, fwhm_line):
    sigma = sigma_difference(LAM, fwhm_on_grid(LAM, fwhm_data), fwhm_on_grid(LAM, MILES_FWHM))
    np.testing.assert_allclose(sigma * FWHM_PER_SIGMA, np.sqrt(fwhm_data**2 - MILES_FWHM**2), rtol=1e-12)
    line = gaussian(LAM, 1.0, 4800.3, fwhm_line)
    out = broaden(LAM, line, sigma)
    expect = np.sqrt(fwhm_line**2 + fwhm_data**2 - MILES_FWHM**2)
    if fwhm_line > 2.0:         # a Gaussian fit to the profile; 1.5 A (1.7 px) is too coarsely sampled for it
        assert abs(fitted_fwhm(LAM, out, 4800.3) / expect - 1) < 0.01
    # second moments add exactly (also for sigma of a fraction of a pixel: 2.6 A gives 0.32 px)
    assert abs(second_moment_fwhm(LAM, out) / np.hypot(second_moment_fwhm(LAM, line), sigma[0] * FWHM_PER_SIGMA)
               - 1) < 1e-9
    assert abs(flux(LAM, out) / flux(LAM, line) - 1) < 1e-12


def test_lambda_dependent_case_each_line_at_its_own_width():
    table = (np.array([3900.0, 6300.0]), np.array([2.7, 4.5]))          # an instrument whose LSF widens
    fd = fwhm_on_grid(LAM, table)
    sigma = sigma_difference(LAM, fd, fwhm_on_grid(LAM, MILES_FWHM))
    centres = (4300.2, 5000.7, 5700.4)
    lines = sum(gaussian(LAM, 1.0, c, MILES_FWHM) for c in centres)
    out = broaden(LAM, lines, sigma)
    for c in centres:
        expect = np.interp(c, *table)                                     # sqrt(2.51^2 + dFWHM^2) = FWHM_data
        assert abs(fitted_fwhm(LAM, out, c) / expect - 1) < 0.01, c
    assert abs(flux(LAM, out) / flux(LAM, lines) - 1) < 1e-12


@pytest.mark.parametrize("grid", ["linear", "log"])
def test_flux_conserved_to_rounding_and_flat_stays_flat_inside_complete_range(grid):
    lam = LAM if grid == "linear" else np.exp(np.linspace(np.log(4000.0), np.log(6250.0), 2400))
    sigma = sigma_difference(lam, fwhm_on_grid(lam, (np.array([4000.0, 6250.0]), np.array([2.6, 6.0]))),
                             fwhm_on_grid(lam, MILES_FWHM))
    spectra = np.random.default_rng(4).uniform(0.2, 2.0, size=(3, lam.size))
    out = broaden(lam, spectra, sigma)
    np.testing.assert_allclose((out * pixel_widths(lam)).sum(axis=1), (spectra * pixel_widths(lam)).sum(axis=1),
                               rtol=1e-12)
    lo, hi = complete_range(lam, sigma)
    inside = (lam >= lo) & (lam <= hi)
    assert lam[0] < lo < hi < lam[-1] and inside.sum() > 0.9 * lam.size
    flat = broaden(lam, np.ones(lam.size), sigma)
    assert np.max(np.abs(flat[inside] - 1.0)) < 1e-6


def test_complete_range_is_where_a_wider_grid_gives_the_same_result():
    sigma = np.full(LAM.size, 1.3)
    spectrum = 1.0 + gaussian(LAM, -0.5, 4011.0, 2.5) + gaussian(LAM, -0.4, 6230.0, 2.5)
    cut = slice(150, 2350)
    whole = broaden(LAM, spectrum, sigma)
    part = broaden(LAM[cut], spectrum[cut], sigma[cut])
    lo, hi = complete_range(LAM[cut], sigma[cut])
    inside = (LAM[cut] >= lo) & (LAM[cut] <= hi)
    np.testing.assert_allclose(part[inside], whole[cut][inside], rtol=1e-12)
    assert not np.allclose(part[~inside], whole[cut][~inside], rtol=1e-6)   # the ends are not exact


def test_zero_sigma_is_the_identity_and_bad_sigma_is_refused():
    op = broadening_operator(LAM, np.zeros(LAM.size))
    assert (op != sp.identity(LAM.size, format="csr")).nnz == 0
    with pytest.raises(ValueError, match="sigma"):
        broadening_operator(LAM, np.full(LAM.size, -1.0))


def test_refused_where_the_data_are_finer_than_the_templates():
    fd = fwhm_on_grid(LAM, (np.array([4000.0, 6250.0]), np.array([3.0, 2.0])))
    with pytest.raises(ValueError, match=r"finer than the templates \(FWHM 2.51 A\) at 5\d\d\d\.\d A"):
        sigma_difference(LAM, fd, fwhm_on_grid(LAM, MILES_FWHM))
    below = LAM < 5000.0                                   # only where it matters: fine there
    sigma = sigma_difference(LAM, fd, fwhm_on_grid(LAM, MILES_FWHM), check=below)
    assert np.all(sigma[below] > 0) and np.all(sigma[fd < MILES_FWHM] == 0)
    # equal resolution: nothing to do, not an error
    assert np.all(sigma_difference(LAM, fwhm_on_grid(LAM, 2.51), fwhm_on_grid(LAM, 2.51)) == 0)


# ---------------------------------------------------------------------------------------------
# ingest
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("resolution")
    fx = write_muse_like_inputs(d)
    # a one-template library with a single narrow line of FWHM 1.0 A on a 0.4 A grid
    with np.load(fx["templates"]) as z:
        lam = z["lam"]
    line = 1.0 - gaussian(lam, 0.6, 5000.0, 1.0)
    np.savez(d / "line.npz", templates=line[:, None], lam=lam)
    return fx, d


def opts_for(fx, **kw):
    base = dict(cube=fx["cube"], templates=fx["templates"], losvd=fx["losvd"], velscale=fx["velscale"],
                oversample=fx["oversample"])
    return IngestOptions(**{**base, **kw})


def test_ingested_templates_are_the_broadened_library_and_attributes_say_so(inputs, tmp_path):
    fx, d = inputs
    run_ingest(tmp_path / "m.h5", opts_for(fx, data_fwhm=3.0, template_fwhm=1.0), MPI.COMM_SELF)
    run_ingest(tmp_path / "plain.h5", opts_for(fx), MPI.COMM_SELF)
    with np.load(fx["templates"]) as z:
        lam, lib = z["lam"], z["templates"].reshape(z["lam"].size, -1).T
    sigma = np.full(lam.size, np.sqrt(3.0**2 - 1.0**2) / FWHM_PER_SIGMA)
    in_edges, _ = edges_from_centres(lam)
    with h5py.File(tmp_path / "m.h5") as f, h5py.File(tmp_path / "plain.h5") as g:
        tem_edges = edges_from_centres(np.exp(f["TemPix"][...]))[0]
        expect = overlap_rebin(in_edges, tem_edges).apply(broaden(lam, lib, sigma))
        np.testing.assert_allclose(f["Templates"][...], expect, rtol=1e-12)
        assert not np.allclose(f["Templates"][...], g["Templates"][...], rtol=1e-3)
        np.testing.assert_array_equal(f["DataCube"][...], g["DataCube"][...])
        attrs = dict(f["Templates"].attrs)
        assert attrs["resolution.matched"] and not g["Templates"].attrs["resolution.matched"]
        assert attrs["resolution.data_fwhm"] == "3" and attrs["resolution.template_fwhm"] == "1"
        np.testing.assert_allclose([attrs["resolution.sigma_min"], attrs["resolution.sigma_max"]], sigma[:2])
        options = json.loads(f.attrs["ingest.options"])
        assert options["data_fwhm"] == 3.0 and options["template_fwhm"] == 1.0


def test_ingested_line_width_grows_in_quadrature(inputs, tmp_path):
    """The rebinned line's width: w_matched^2 = w_plain^2 + FWHM_data^2 - FWHM_tem^2 (1 %)."""
    fx, d = inputs
    widths = {}
    for name, kw in (("plain", {}), ("matched", dict(data_fwhm=2.8, template_fwhm=1.0))):
        run_ingest(tmp_path / f"{name}.h5", opts_for(fx, templates=str(d / "line.npz"), **kw), MPI.COMM_SELF)
        with h5py.File(tmp_path / f"{name}.h5") as f:
            lam = np.exp(f["TemPix"][...])
            widths[name] = fitted_fwhm(lam, 1.0 - f["Templates"][0], 5000.0)
    assert abs(widths["matched"] / np.sqrt(widths["plain"]**2 + 2.8**2 - 1.0**2) - 1) < 0.01


def test_lsf_table_file_and_provenance(inputs, tmp_path):
    fx, d = inputs
    table = tmp_path / "lsf.txt"
    table.write_text("# lambda  FWHM (A)\n4700, 2.5\n5200 3.5\n5800 4.0\n")
    run_ingest(tmp_path / "t.h5", opts_for(fx, data_fwhm=str(table), template_fwhm=1.0), MPI.COMM_SELF)
    with h5py.File(tmp_path / "t.h5") as f:
        assert f["Templates"].attrs["resolution.data_fwhm"] == \
            "table lsf.txt (3 rows, 4700.0-5800.0 A, FWHM 2.5-4 A)"
        roles = [p["role"] for p in json.loads(f.attrs["provenance"])]
    assert "data_fwhm" in roles and "template_fwhm" not in roles


@pytest.mark.parametrize("case, args, message", [
    ("finer", ["--data-fwhm", "0.8", "--template-fwhm", "1.0"],
     r"--data-fwhm 0.8: the data \(FWHM 0.8 A\) are finer than the templates \(FWHM 1 A\) at 4\d\d\d\.\d A"),
    ("pair", ["--data-fwhm", "3"], "--template-fwhm: required with --data-fwhm"),
    ("pair2", ["--template-fwhm", "2.51"], "--data-fwhm: required with --template-fwhm"),
    ("negative", ["--data-fwhm", "-2", "--template-fwhm", "1"], "--data-fwhm -2.0: expected a positive FWHM"),
    ("missing", ["--data-fwhm", "nofile.txt", "--template-fwhm", "1"],
     "--data-fwhm nofile.txt: neither a number nor an existing file"),
    ("short", ["--data-fwhm", "LSF", "--template-fwhm", "1"], "the table covers 4800.00-5000.00 A but the observed"),
    ("ragged", ["--data-fwhm", "RAGGED", "--template-fwhm", "1"], "line 2: expected two numbers"),
    ("too_wide", ["--data-fwhm", "40", "--template-fwhm", "1"], "A once broadened to --data-fwhm but"),
])
def test_bad_resolution_options_one_line_exit_2_no_file(inputs, tmp_path, case, args, message):
    fx, _ = inputs
    (tmp_path / "lsf.txt").write_text("4800 3.0\n5000 3.2\n")
    (tmp_path / "ragged.txt").write_text("4800 3.0\n5000 3.2 1\n")
    args = [{"LSF": str(tmp_path / "lsf.txt"), "RAGGED": str(tmp_path / "ragged.txt")}.get(a, a) for a in args]
    out = tmp_path / "o.h5"
    res = run_cli("ingest", out, "--cube", fx["cube"], "--templates", fx["templates"], "--losvd", fx["losvd"],
                  "--velscale", 110, *args, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cubefit_mpi ingest: error: "), lines
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists() and not os.path.exists(str(out) + ".partial")


def test_config_section_takes_a_number_or_a_path():
    def ingest(**section):
        return validate_config({"steps": [], "ingest": section}, base_dir="/data")["ingest"]

    cfg = ingest(data_fwhm=2.9, template_fwhm="miles_lsf.txt")
    assert cfg["data_fwhm"] == 2.9 and cfg["template_fwhm"] == "/data/miles_lsf.txt"
    assert ingest()["data_fwhm"] is None and ingest()["template_fwhm"] is None
    for bad, message in ((True, "expected a FWHM in Å or a file name"), (-1, "expected a positive FWHM"),
                         ([2.5], "expected a FWHM in Å or a file name")):
        with pytest.raises(InputError, match=message):
            ingest(data_fwhm=bad)
    opts = IngestOptions.from_config(ingest(data_fwhm=2.9, template_fwhm=2))
    assert (opts.data_fwhm, opts.template_fwhm) == (2.9, 2.0) and isinstance(opts.template_fwhm, float)
