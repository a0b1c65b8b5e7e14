"""ingest (FITS cube, templates, LOSVDs -> layout), the ln λ log-rebin and the pipeline config."""
from __future__ import annotations

import hashlib
import json
import math
import os

import h5py
import numpy as np
import pytest
from conftest import PYTHON, run_cli
from ingest_fixtures import cumulative_rebin_matrix, write_muse_like_inputs
from mpi4py import MPI

from cubefit_mpi.config.errors import InputError
from cubefit_mpi.io.validation import check_grid
from cubefit_mpi.numerics import rebin, wavelength_grids
from cubefit_mpi.numerics.rebin import rebin_operator
from cubefit_mpi.numerics.wavelength_grids import pixel_edges
from cubefit_mpi.pipeline.config import init_config_text, load_config, validate_config
from cubefit_mpi.stages.ingest import IngestOptions, run_ingest


def cli(*args, np_ranks=None):
    return run_cli(*args, np_ranks=np_ranks, timeout=120)


def opts_for(fx, **kw):
    base = dict(cube=fx["cube"], templates=fx["templates"], losvd=fx["losvd"], bins=fx["bins"],
                velscale=fx["velscale"], oversample=fx["oversample"], mask_ranges=((4900.0, 4905.0),))
    base.update(kw)
    return IngestOptions(**base)


def read_all(path):
    with h5py.File(path, "r") as f:
        out = {}
        f.visititems(lambda n, o: out.__setitem__(n, o[...]) if isinstance(o, h5py.Dataset) else None)
        out["attrs"] = dict(f.attrs)
        out["attrs/Templates"] = dict(f["Templates"].attrs)
        out["attrs/Mask"] = dict(f["Mask"].attrs)
        out["attrs/DataCube"] = dict(f["DataCube"].attrs)
        return out


# ---------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------
def test_logrebin_conserves_flux_of_random_spectrum():
    rng = np.random.default_rng(5)
    lam_edges = 4800.0 + 1.25 * np.arange(401)                      # linear λ pixels
    f = rng.normal(10.0, 3.0, 400)                                   # per Å
    in_edges = np.log(lam_edges)
    out_edges = wavelength_grids.uniform_log_edges(in_edges[0] + 3e-4, in_edges[-1] - 2e-4, 77.0 / 299792.458)
    op = rebin.overlap_rebin(in_edges, out_edges, measure="lambda")
    out = op.apply(f)
    covered = np.diff(np.interp(np.exp(out_edges[[0, -1]]), lam_edges,
                                np.concatenate(([0.0], np.cumsum(f * 1.25)))))[0]
    assert abs(np.sum(out * np.diff(np.exp(out_edges))) - covered) <= 1e-10 * abs(covered)
    # the same numbers as the independent cumulative construction, variances with squared weights
    M = cumulative_rebin_matrix(lam_edges, np.exp(out_edges))
    np.testing.assert_allclose(out, M @ f, rtol=1e-11)
    var = rng.uniform(0.5, 2.0, 400)
    np.testing.assert_allclose(op.apply(var, variance=True), (M ** 2) @ var, rtol=1e-9)
    np.testing.assert_allclose(op.apply(np.full(400, 3.5)), 3.5, rtol=1e-13)   # flat stays flat
    assert op.to_sparse().shape == (400, out.size)
    # NaN reaches exactly the output pixels that overlap the bad input pixel
    g = f.copy()
    g[123] = np.nan
    bad = np.isnan(op.apply(g))
    np.testing.assert_array_equal(bad, M[:, 123] > 0)
    # per unit ln λ: ∫ f dλ = Σ out_j Δlnλ_j
    per_ln = op.scaled(rebin.per_lnlambda_factor(out_edges)).apply(f)
    assert abs(np.sum(per_ln * np.diff(out_edges)) - covered) <= 1e-10 * abs(covered)


def test_lnlambda_measure_is_the_R_T_overlap_operator():
    tem = 8.4 + 1e-4 * np.arange(300)
    obs = tem[40:260:3] + 3e-5
    op = rebin.overlap_rebin(pixel_edges(tem), pixel_edges(obs), measure="lnlambda")
    np.testing.assert_allclose(op.to_sparse().toarray(), rebin_operator(tem, obs).toarray(), atol=1e-14)


def test_grid_helpers():
    edges = wavelength_grids.template_edges(np.log(4800.0) + 1e-4 * np.arange(51), 3, 500.0)
    check_grid(wavelength_grids.centres(edges), "/TemPix", uniform=True)
    guard = wavelength_grids.guard_pixels(500.0, 1e-4 / 3, 3)
    np.testing.assert_allclose(edges[guard::3][:51], np.log(4800.0) + 1e-4 * np.arange(51), atol=1e-12)
    assert guard * 1e-4 / 3 >= -math.log1p(-500.0 / 299792.458)
    _, kind = wavelength_grids.edges_from_centres(np.exp(8.5 + 1e-4 * np.arange(10)))
    assert kind == "log"
    mask = wavelength_grids.range_mask(np.log([10.0, 11.0, 12.0, 13.0]), [(11.5, 11.6)])
    np.testing.assert_array_equal(mask, [False, True, False])


# ---------------------------------------------------------------------------------------------
# ingest
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unbinned(tmp_path_factory):
    d = tmp_path_factory.mktemp("unbinned")
    fx = write_muse_like_inputs(d)
    run_ingest(d / "out.h5", opts_for(fx, rows_per_read=2), MPI.COMM_SELF)
    return fx, d / "out.h5", read_all(d / "out.h5")


def expected_mask(fx, ranges=((4900.0, 4905.0),)):
    lam = np.exp(fx["obs_edges"])
    hit = np.zeros(lam.size - 1, dtype=bool)
    for lo, hi in ranges:
        hit |= (lam[1:] > lo) & (lam[:-1] < hi)
    return ~(hit | (fx["M"][:, fx["bad_lin"]] > 0).any(axis=1))


def test_grids_templates_and_populations(unbinned):
    fx, _, got = unbinned
    check_grid(got["ObsPix"], "/ObsPix", uniform=True)
    check_grid(got["TemPix"], "/TemPix", uniform=True)
    np.testing.assert_allclose(got["ObsPix"], wavelength_grids.centres(fx["obs_edges"]), atol=1e-13)
    np.testing.assert_allclose(got["TemPix"], wavelength_grids.centres(fx["tem_edges"]), atol=1e-12)
    np.testing.assert_allclose(np.diff(got["ObsPix"]) * 299792.458, fx["velscale"], rtol=1e-9)
    np.testing.assert_allclose(got["Templates"], fx["tem_T"], rtol=1e-10, atol=1e-12)
    assert tuple(got["attrs/Templates"]["pop_shape"]) == fx["pop_shape"] == (3, 2)
    np.testing.assert_allclose(got["Populations/log_age"], np.repeat(np.linspace(8.0, 10.1, 3), 2), atol=1e-12)
    np.testing.assert_allclose(got["Populations/metallicity"], np.tile([-1.5, 0.3], 3), atol=1e-12)
    np.testing.assert_array_equal(got["VelPix"], fx["vel"])
    np.testing.assert_array_equal(got["LOSVD"], fx["losvd_array"])


def test_spectra_nan_spaxels_mask_and_variance(unbinned):
    fx, _, got = unbinned
    kept = fx["kept"].ravel()
    assert got["DataCube"].shape == (int(kept.sum()), fx["obs_edges"].size - 1) == (27, 165)
    np.testing.assert_array_equal(got["Spaxels/dropped_yx"], [[0, 0], [2, 3], [5, 4]])
    np.testing.assert_array_equal(got["Spaxels/yx"], np.argwhere(fx["kept"]))
    np.testing.assert_array_equal(got["Spaxels/n_members"], 1)
    mask = expected_mask(fx)
    np.testing.assert_array_equal(got["Mask"], mask)
    assert got["attrs/Mask"]["masked.ranges"] == 4 and got["attrs/Mask"]["masked.bad_some"] >= 1
    y = np.nan_to_num(fx["y_lin"].reshape(-1, fx["y_lin"].shape[2])[kept])   # NaN pixels are masked
    v = np.nan_to_num(fx["var_lin"].reshape(-1, fx["y_lin"].shape[2])[kept])
    scale = np.abs(fx["model_L"]).max()
    assert np.max(np.abs(got["DataCube"][:, mask] - fx["model_L"][:, mask])) < 1e-10 * scale
    np.testing.assert_allclose(got["DataCube"][:, mask], (y @ fx["M"].T)[:, mask], rtol=1e-9)
    np.testing.assert_allclose(got["DataVar"][:, mask], (v @ (fx["M"] ** 2).T)[:, mask], rtol=1e-9)
    xy = got["Spaxels/xy"]
    np.testing.assert_allclose(xy[1] - xy[0], [0.2, 0.0], atol=1e-9)     # arcsec along NAXIS1


def test_provenance_wcs_and_attributes(unbinned):
    fx, _, got = unbinned
    prov = {p["role"]: p for p in json.loads(got["attrs"]["provenance"])}
    assert set(prov) == {"cube", "templates", "losvd"}
    for role in prov:
        data = open(fx[role], "rb").read()
        assert prov[role]["sha256"] == hashlib.sha256(data).hexdigest()
        assert prov[role]["bytes"] == len(data) and prov[role]["name"] == os.path.basename(fx[role])
    assert "CTYPE3" in got["attrs"]["wcs_header"] and "RA---TAN" in got["attrs"]["wcs_header"]
    assert got["attrs"]["ingest.bin_combine"] == "none" and got["attrs"]["ingest.log_rebinned"]
    assert got["attrs/DataCube"]["flux_density"] == "per_angstrom"
    assert json.loads(got["attrs"]["ingest.options"])["oversample"] == 2


def test_ingested_file_passes_validate(unbinned):
    res = run_cli("validate", unbinned[1])
    assert res.returncode == 0, res.stderr
    assert "inputs OK (S=27 L=165 T=360 V=25 C=2 P=6)" in res.stdout


@pytest.mark.parametrize("combine", ["sum", "mean"])
def test_bin_map_sum_and_mean(tmp_path, combine):
    from astropy.io import fits

    fx = write_muse_like_inputs(tmp_path, binning=combine)
    bins = fx["bins"]
    if combine == "mean":                                         # the FITS-image form of the bin map
        bins = str(tmp_path / "bins.fits")
        fits.PrimaryHDU(fx["bin_map"].astype(np.int32)).writeto(bins)
    run_ingest(tmp_path / "b.h5", opts_for(fx, bins=bins, bin_combine=combine, rows_per_read=1), MPI.COMM_SELF)
    got = read_all(tmp_path / "b.h5")
    mask = expected_mask(fx)
    n_members = fx["n_members"]
    np.testing.assert_array_equal(got["Spaxels/n_members"], n_members)
    np.testing.assert_array_equal(got["Spaxels/n_members"], [3, 4, 2, 4, 3, 2, 4, 4, 1])
    expected_map = np.where(fx["kept"], fx["bin_map"], -1)
    np.testing.assert_array_equal(got["Spaxels/bin_map"], expected_map)
    assert got["attrs"]["ingest.bin_combine"] == combine == got["attrs/DataCube"]["bin_combine"]
    scale = np.abs(fx["model_L"]).max()
    assert np.max(np.abs(got["DataCube"][:, mask] - fx["model_L"][:, mask])) < 1e-10 * scale
    n_lin = fx["y_lin"].shape[2]
    v = np.nan_to_num(fx["var_lin"].reshape(-1, n_lin))
    var_sum = np.stack([v[expected_map.ravel() == b].sum(axis=0) for b in range(n_members.size)])
    if combine == "mean":
        var_sum = var_sum / n_members[:, None] ** 2
    np.testing.assert_allclose(got["DataVar"][:, mask], (var_sum @ (fx["M"] ** 2).T)[:, mask], rtol=1e-9)


def test_nm_units_and_flux_integral(tmp_path):
    (tmp_path / "aa").mkdir()
    (tmp_path / "nm").mkdir()
    a = write_muse_like_inputs(tmp_path / "aa", bad_channel=None, bad_pixel=None)
    b = write_muse_like_inputs(tmp_path / "nm", bad_channel=None, bad_pixel=None, unit="nm")
    with h5py.File(tmp_path / "nm" / "losvd.h5", "w") as f:      # the .h5 form of the LOSVD file
        f["losvd"], f["vel"] = b["losvd_array"], b["vel"]
    run_ingest(tmp_path / "a.h5", opts_for(a, mask_ranges=()), MPI.COMM_SELF)
    run_ingest(tmp_path / "b.h5", opts_for(b, mask_ranges=(), losvd=str(tmp_path / "nm" / "losvd.h5")),
               MPI.COMM_SELF)
    ga, gb = read_all(tmp_path / "a.h5"), read_all(tmp_path / "b.h5")
    np.testing.assert_array_equal(gb["LOSVD"], ga["LOSVD"])
    assert ga["Mask"].all()
    np.testing.assert_allclose(gb["ObsPix"], ga["ObsPix"], atol=1e-12)
    np.testing.assert_allclose(gb["DataCube"], ga["DataCube"], rtol=1e-10)
    # ∫ f dλ over the covered range is preserved for every spectrum
    lam_e = np.exp(a["obs_edges"])
    y = a["y_lin"].reshape(-1, a["y_lin"].shape[2])[a["kept"].ravel()]
    cum = np.concatenate((np.zeros((y.shape[0], 1)), np.cumsum(y * 1.25, axis=1)), axis=1)
    covered = np.array([np.diff(np.interp(lam_e[[0, -1]], a["in_edges_aa"], row))[0] for row in cum])
    np.testing.assert_allclose(ga["DataCube"] @ np.diff(lam_e), covered, rtol=1e-10)


def test_log_cube_is_kept_and_fits_template_directory(tmp_path):
    from astropy.io import fits

    fx = write_muse_like_inputs(tmp_path, nan_spaxels=(), bad_channel=None, bad_pixel=None, ny=3, nx=4)
    obs_c = wavelength_grids.centres(fx["obs_edges"])
    dln = obs_c[1] - obs_c[0]
    hdr = fits.Header()
    for k, v in (("CTYPE3", "WAVE-LOG"), ("CUNIT3", "Angstrom"), ("CRPIX3", 1.0), ("CRVAL3", math.exp(obs_c[0])),
                 ("CDELT3", math.exp(obs_c[0]) * dln)):
        hdr[k] = v
    cube = fx["model_L"].T.reshape(-1, 3, 4)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(cube, hdr, name="DATA")]).writeto(tmp_path / "log.fits")
    lib = tmp_path / "lib"
    lib.mkdir()
    z = np.load(fx["templates"])
    lam = z["lam"]
    for i_age, age in enumerate(z["ages"]):
        for i_met, met in enumerate(z["metals"]):
            h = fits.Header()
            h["CRVAL1"], h["CDELT1"], h["CRPIX1"] = lam[0], lam[1] - lam[0], 1.0
            name = f"Mun1.30Z{'m' if met < 0 else 'p'}{abs(met):.2f}T{age:07.4f}_iTp0.00_baseFe.fits"
            fits.PrimaryHDU(z["templates"][:, i_age, i_met], h).writeto(lib / name)
    opts = opts_for(fx, cube=str(tmp_path / "log.fits"), templates=str(lib), velscale=None, mask_ranges=())
    run_ingest(tmp_path / "o.h5", opts, MPI.COMM_SELF)
    got = read_all(tmp_path / "o.h5")
    assert not got["attrs"]["ingest.log_rebinned"]
    assert "DataVar" not in got
    np.testing.assert_allclose(got["ObsPix"], obs_c, atol=1e-9)
    np.testing.assert_allclose(got["DataCube"], fx["model_L"], rtol=1e-9)
    np.testing.assert_allclose(got["Templates"], fx["tem_T"], rtol=1e-8)
    assert tuple(got["attrs/Templates"]["pop_shape"]) == (3, 2)
    np.testing.assert_allclose(got["Populations/metallicity"], np.tile([-1.5, 0.3], 3), atol=1e-12)
    prov = json.loads(got["attrs"]["provenance"])
    assert [p["files"] for p in prov if p["role"] == "templates"] == [6]


# ---------------------------------------------------------------------------------------------
# command line and bad input
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return write_muse_like_inputs(d), d


def test_cli_ingest_then_validate(inputs):
    fx, d = inputs
    out = d / "cli.h5"
    res = cli("ingest", out, "--cube", fx["cube"], "--templates", fx["templates"], "--losvd", fx["losvd"],
              "--velscale", 110, "--mask-ranges", "4900:4905,5000:5001")
    assert res.returncode == 0, res.stderr
    assert f"wrote {out}: S=27 L=165 T=360 V=25 C=2 P=6 (3 spaxels dropped" in res.stdout
    assert not os.path.exists(str(out) + ".partial")
    assert run_cli("validate", out).returncode == 0


def test_cli_ingest_from_config_under_mpiexec(inputs, tmp_path):
    fx, _ = inputs
    text = (init_config_text().replace('"cube.fits"', f'"{fx["cube"]}"')
            .replace('"templates.npz"', f'"{fx["templates"]}"').replace('"losvd.npz"', f'"{fx["losvd"]}"')
            .replace("velscale: null", "velscale: 110.0").replace("mask_ranges: []", 'mask_ranges: ["4900:4905"]'))
    (tmp_path / "cubefit.yaml").write_text(text)
    out = tmp_path / "cfg.h5"
    res = cli("ingest", out, "--config", tmp_path / "cubefit.yaml", "--oversample", 3, np_ranks=2)
    assert res.returncode == 0, res.stderr
    assert f"wrote {out}: S=27 L=165 T=" in res.stdout and "on 2 rank(s)" in res.stdout
    with h5py.File(out, "r") as f:
        assert f["TemPix"].size > 3 * 165 and f.attrs["dims"][2] == f["TemPix"].size
        assert int(f["Mask"].attrs["masked.ranges"]) == 4


def _bad_cube(fx, d, **header):
    from astropy.io import fits

    path = d / "bad.fits"
    with fits.open(fx["cube"]) as hdul:
        for key, value in header.items():
            hdul["DATA"].header[key] = value
        hdul.writeto(path, overwrite=True)
    return path


@pytest.mark.parametrize("case", ["units", "no_overlap", "binmap_shape", "losvd_count", "config_key"])
def test_bad_input_one_line_exit_2_no_file(inputs, tmp_path, case):
    fx, d = inputs
    args = {"--cube": fx["cube"], "--templates": fx["templates"], "--losvd": fx["losvd"], "--velscale": 110}
    expect = {}
    if case == "units":
        args["--cube"] = _bad_cube(fx, tmp_path, CUNIT3="km/s")
        expect = "CUNIT3='km/s' is not a wavelength unit; expected Angstrom or nm"
    elif case == "no_overlap":
        args["--cube"] = _bad_cube(fx, tmp_path, CRVAL3=6500.0)
        expect = "A is needed (the observed range plus the 600 km/s LOSVD velocity guard)"
    elif case == "binmap_shape":
        np.save(tmp_path / "bins.npy", np.zeros((5, 5), dtype=int))
        args["--bins"] = tmp_path / "bins.npy"
        expect = "bin map shape (5, 5) does not match the cube's spatial shape (6, 5)"
    elif case == "losvd_count":
        np.savez(tmp_path / "l.npz", losvd=fx["losvd_array"][:20], vel=fx["vel"])
        args["--losvd"] = tmp_path / "l.npz"
        expect = "holds LOSVDs for 20 bins, but the cube gives 27 spectra"
    else:
        (tmp_path / "c.yaml").write_text(f"file: x.h5\ningest:\n  cube: {fx['cube']}\n  oversampel: 3\n")
        args = {"--config": tmp_path / "c.yaml", "--templates": fx["templates"], "--losvd": fx["losvd"]}
        expect = "ingest.oversampel: unknown key (did you mean ingest.oversample?)"
    out = tmp_path / "out.h5"
    res = cli("ingest", out, *[str(v) for kv in args.items() for v in kv])
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cubefit_mpi ingest: error: ") and expect in lines[0], lines
    assert not out.exists() and not os.path.exists(str(out) + ".partial")


def test_bad_input_under_mpiexec_is_one_line_from_rank_0(inputs, tmp_path):
    fx, _ = inputs
    out = tmp_path / "o.h5"
    res = cli("ingest", out, "--cube", fx["cube"], "--templates", fx["templates"], "--losvd", fx["losvd"],
              "--bins", fx["templates"], np_ranks=2)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--bins" in lines[0] and "expected a .npy file or a FITS image" in lines[0], lines
    assert os.listdir(tmp_path) == []


def test_errors_after_partial_file_remove_it(inputs, tmp_path):
    fx, _ = inputs
    with pytest.raises(InputError, match="every pixel is masked"):
        run_ingest(tmp_path / "o.h5", opts_for(fx, mask_ranges=((4000.0, 6000.0),)), MPI.COMM_SELF)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
def test_init_config_round_trip(tmp_path):
    res = cli("init-config")
    assert res.returncode == 0, res.stderr
    assert res.stdout == init_config_text()
    for key in ("ingest:", "build:", "weights:", "solve:", "recon:", "plots:", "# CUBEFIT_NNLS_SOLVER:",
                "# CUBEFIT_RDCC_NBYTES: 4294967296", "mask_ranges:", "oversample: 2"):
        assert key in res.stdout
    path = tmp_path / "cubefit.yaml"
    path.write_text(res.stdout.replace("# CUBEFIT_BT_STEPS: 3", "CUBEFIT_BT_STEPS: 5")
                    .replace("mask_ranges: []", 'mask_ranges: ["5570:5590", [6290, 6310]]'))
    cfg = load_config(path)
    assert cfg["file"] == str(tmp_path / "galaxy.h5") and cfg["ingest"]["cube"] == str(tmp_path / "cube.fits")
    assert cfg["ingest"]["mask_ranges"] == [[5570.0, 5590.0], [6290.0, 6310.0]]
    assert cfg["knobs"] == {"CUBEFIT_BT_STEPS": "5"} and cfg["weights"]["min_w"] == 0.1
    assert cfg["steps"] == ["ingest", "build", "weights", "solve", "recon", "plots"]
    opts = IngestOptions.from_config(cfg["ingest"])
    assert opts.mask_ranges == ((5570.0, 5590.0), (6290.0, 6310.0)) and opts.oversample == 2


@pytest.mark.parametrize("raw, message", [
    ({"bulid": {}}, "bulid: unknown key (did you mean build?)"),
    ({"solve": {"methd": "exact"}}, "solve.methd: unknown key (did you mean solve.method?)"),
    ({"knobs": {"CUBEFIT_NNLS_SOLVR": "fista"}}, "did you mean knobs.CUBEFIT_NNLS_SOLVER?"),
    ({"knobs": {"CUBEFIT_BT_STEPS": "x"}}, "knobs.CUBEFIT_BT_STEPS='x': expected an integer"),
    ({"ingest": {"oversample": "2"}}, "ingest.oversample: expected an integer, got '2'"),
    ({"ingest": {"bin_combine": "median"}}, "ingest.bin_combine: expected one of sum, mean"),
    ({"solve": {"lr": -1}}, "solve.lr: expected a value >= 0"),
    ({"steps": ["biuld"]}, "steps: unknown step 'biuld' (did you mean build?)"),
    ({"file": "g.h5", "steps": ["ingest"]}, "ingest.cube: required when steps include ingest"),
])
def test_config_errors_name_the_key(raw, message):
    with pytest.raises(InputError) as info:
        validate_config(raw)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest: [unclosed\n")
    with pytest.raises(InputError, match=r"bad.yaml: not valid YAML .* at line 2"):
        load_config(bad)
    with pytest.raises(InputError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    ok = tmp_path / "ok.yaml"
    ok.write_text("file: g.h5\nsteps: [solve, build]\nsolve:\n  orbit_weights: [1, 2]\n")
    cfg = load_config(ok)
    assert cfg["steps"] == ["build", "solve"] and cfg["solve"]["orbit_weights"] == [1.0, 2.0]
