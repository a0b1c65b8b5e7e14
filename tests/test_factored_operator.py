"""The factored operator: the normal equations equal an independent float64 hypercube pass, files
without a hypercube solve, recon and plot, negative templates fall back, caches are per operator."""
import shutil

import h5py
import numpy as np
import pytest
import scipy.optimize
from conftest import run_cli
from mpi4py import MPI

from cubefit_mpi.config.errors import InputError
from cubefit_mpi.io.h5file import open_h5
from cubefit_mpi.io.model_inputs import ModelInputs
from cubefit_mpi.numerics.convolve import convolve_direct
from cubefit_mpi.numerics.kernels import unit_kernels
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.operators.base import Weighting
from cubefit_mpi.operators.select import open_operator
from cubefit_mpi.solvers.exact import solve_exact
from cubefit_mpi.solvers.kaczmarz.solver import solve_kaczmarz
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.mock import make_mock
from cubefit_mpi.stages.recon import reconstruct

SELF = MPI.COMM_SELF


def mock(path, **spec):
    base = dict(spaxels=23, components=3, populations=5, wavelengths=97, seed=11, snr=40, masked_pixels=7)
    base.update(spec)
    make_mock(str(path), MockSpec(**base), SELF)
    with h5py.File(path, "r+") as f:            # the mock stores /R_T: drop it where a variant wants another
        f.attrs["made_by"] = "test"
    return path


def dense_models(path, norm="model", amp="sum") -> np.ndarray:
    """A (S, C, P, L) float64 by the direct convolution and /R_T: independent of the factors' code."""
    with open_h5(path, "r", SELF) as f:
        inp = ModelInputs.read(f, norm, amp, SELF)
        losvd = np.asarray(f["/LOSVD"][...])
    kernels, _ = unit_kernels(losvd, inp.interp)
    out = np.empty((inp.dims.S, inp.dims.C, inp.dims.P, inp.dims.L))
    for s in range(inp.dims.S):
        for c in range(inp.dims.C):
            conv = convolve_direct(inp.templates, kernels[s, c], inp.shifts)
            out[s, c] = inp.scale[s, c] * np.maximum((inp.rebin_lt @ conv.T).T, 0.0)
    return out


def dense_system(path, models, weights=None):
    with h5py.File(path, "r") as f:
        y = f["/DataCube"][...]
        mask = f["/Mask"][...].astype(bool) if "/Mask" in f else np.ones(y.shape[1], bool)
    w = np.ones(y.shape[1]) if weights is None else weights
    sw = np.sqrt(w[mask])
    S, C, P, L = models.shape
    design = (models[..., mask] * sw).transpose(0, 3, 1, 2).reshape(-1, C * P)
    return design, (y[:, mask] * sw).reshape(-1), mask


@pytest.mark.parametrize("variant", ["plain", "data_norm", "trapz", "interp", "dark_component", "odd", "lt"])
def test_normal_equations_equal_an_independent_float64_pass(tmp_path, variant):
    path = mock(tmp_path / "g.h5", **({"spaxels": 17, "populations": 7, "wavelengths": 61} if variant == "odd" else {}))
    norm, amp = ("data" if variant == "data_norm" else "model"), ("trapz" if variant == "trapz" else "sum")
    with h5py.File(path, "r+") as f:
        if variant == "interp":
            from cubefit_mpi.numerics.rebin import rebin_operator

            del f["/R_T"]
            f["/R_T"] = rebin_operator(f["/TemPix"][...], f["/ObsPix"][...], "interp").toarray()
        if variant == "lt":                       # /R_T stored as (L, T)
            rt = f["/R_T"][...]
            del f["/R_T"]
            f["/R_T"] = rt.T
        if variant == "dark_component":            # component 1 carries no light in half the spaxels
            losvd = f["/LOSVD"][...]
            losvd[::2, :, 1] = 0.0
            f["/LOSVD"][...] = losvd
    op = open_operator(str(path), "factored", norm_mode=norm, amp_mode=amp, comm=SELF)
    models = dense_models(path, norm, amp)
    weights = np.random.default_rng(2).uniform(0.3, 1.0, models.shape[3])
    design, target, mask = dense_system(path, models, weights)
    ne = op.normal_equations(Weighting(mask, weights), SELF)
    gram, rhs = design.T @ design, design.T @ target
    scale = np.abs(gram).max()
    np.testing.assert_allclose(ne["gram"], gram, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(ne["rhs"], rhs, rtol=0, atol=1e-10 * np.abs(rhs).max())
    assert ne["yy"] == pytest.approx(target @ target, rel=1e-12)
    np.testing.assert_allclose(ne["diag"], np.diag(gram), rtol=1e-10)
    cols = np.array([1, 4, gram.shape[0] - 2])
    np.testing.assert_allclose(op.gram_columns(Weighting(mask, weights), cols, SELF), gram[:, cols], rtol=0,
                               atol=1e-10 * scale)
    x = np.random.default_rng(3).uniform(0.0, 1.0, gram.shape[0])
    chi2 = float(np.sum((target - design @ x) ** 2))
    assert op.residual_chi2(Weighting(mask, weights), x, SELF) == pytest.approx(chi2, rel=1e-10)
    # the factors' tiles equal the hypercube the FFT path builds, to its float32 rounding
    import os

    os.environ["CUBEFIT_BUILD_METHOD"] = "fft"
    try:
        build_hypercube(str(path), norm_mode=norm, amp_mode=amp, S_chunk=5, comm=SELF)
    finally:
        del os.environ["CUBEFIT_BUILD_METHOD"]
    with h5py.File(path, "r") as f:
        stored = f["/HyperCube/models"][...]
        losvd = f["/LOSVD"][...]
    tiles = op.tile_models(op.kappa(losvd, 0), 0, op.C, dtype=np.float64)
    np.testing.assert_allclose(tiles, stored, rtol=0, atol=3e-7 * np.abs(stored).max())


def test_a_file_without_hypercube_solves_to_the_dense_optimum_and_recons(tmp_path):
    path = mock(tmp_path / "g.h5")
    with h5py.File(path, "r") as f:
        assert "/HyperCube" not in f
    x, stats = solve_exact(str(path), use_weights=False, comm=SELF)
    assert stats["operator"] == "factored" and stats["kkt.ok"] and stats["chi2_consistent"]
    design, target, _ = dense_system(path, dense_models(path))
    x_ref, _ = scipy.optimize.nnls(design, target)
    f_ref = 0.5 * float(np.sum((target - design @ x_ref) ** 2))
    assert stats["objective"] == pytest.approx(f_ref, rel=1e-8)
    np.testing.assert_allclose(x, x_ref, rtol=1e-6, atol=1e-8 * x_ref.max())
    out = reconstruct(str(path), comm=SELF)
    with h5py.File(path, "r") as f:
        recon = f["/ReconCube"][...]
        assert f["/Solve/gram"].attrs["operator"] == "factored" and "/HyperCube" not in f
    model = dense_models(path).reshape(23, -1, 97)
    np.testing.assert_allclose(recon, np.einsum("sil,i->sl", model, x), rtol=1e-10, atol=1e-12)
    assert out["components_total"] == 3


def test_working_set_from_the_factors_equals_the_gram_method(tmp_path, monkeypatch):
    path = mock(tmp_path / "g.h5", populations=8)
    x_g, s_g = solve_exact(str(path), use_weights=False, comm=SELF)
    monkeypatch.setenv("CUBEFIT_GRAM_MAX_BYTES", str(8 * 24 * 23))      # G does not fit, 23 of its columns do
    x_w, s_w = solve_exact(str(path), use_weights=False, comm=SELF)
    assert s_w["method"] == "exact-working-set" and s_w["operator"] == "factored" and s_w["kkt.ok"]
    assert s_w["objective"] == pytest.approx(s_g["objective"], rel=1e-9)
    np.testing.assert_allclose(x_w, x_g, rtol=1e-6, atol=1e-9 * x_g.max())


def test_noise_free_truth_recovered_from_the_factors(tmp_path):
    path = mock(tmp_path / "g.h5", snr=None, masked_pixels=0, spaxels=40, populations=4)
    x, stats = solve_exact(str(path), use_weights=False, comm=SELF)
    with h5py.File(path, "r") as f:
        truth = f["/Truth/x"][...].reshape(-1)
    assert stats["kkt.ok"]
    np.testing.assert_allclose(x, truth, rtol=1e-6, atol=1e-6 * truth.max())


def test_the_two_operators_agree_to_float32_and_keep_separate_caches(tmp_path):
    path = mock(tmp_path / "g.h5")
    build_hypercube(str(path), S_chunk=4, comm=SELF)
    x_f, s_f = solve_exact(str(path), use_weights=False, comm=SELF)
    x_h, s_h = solve_exact(str(path), use_weights=False, operator="hypercube", comm=SELF)
    assert s_f["operator"] == "factored" and s_h["operator"] == "hypercube" and not s_h["from_cache"]
    assert s_f["kkt.ok"] and s_h["kkt.ok"]
    assert s_h["objective"] == pytest.approx(s_f["objective"], rel=1e-5)
    _, again = solve_exact(str(path), use_weights=False, comm=SELF)
    assert not again["from_cache"]                   # the cache held the hypercube's normal equations
    _, again = solve_exact(str(path), use_weights=False, comm=SELF)
    assert again["from_cache"]                       # now the factors'
    with h5py.File(path, "r") as f:
        assert f["/Solve/gram"].attrs["operator"] == "factored"


def test_negative_templates_refuse_the_factors_and_auto_uses_the_hypercube(tmp_path):
    path = mock(tmp_path / "g.h5")
    with h5py.File(path, "r+") as f:
        t = f["/Templates"][...]
        t[0, t.shape[1] // 2] = -1e-3               # inside the range the models use
        f["/Templates"][...] = t
    with pytest.raises(InputError, match=rf"^--operator factored: /Templates has negative values \(min -0.001 at "
                                         rf"template 0, pixel {t.shape[1] // 2}\).*--operator hypercube"):
        open_operator(str(path), "factored", comm=SELF)
    with pytest.raises(InputError, match=r"this file needs its hypercube; run `cubefit_mpi build"):
        open_operator(str(path), "auto", comm=SELF)
    build_hypercube(str(path), S_chunk=4, comm=SELF)
    assert open_operator(str(path), "auto", comm=SELF).kind == "hypercube"


def test_a_foreign_hypercube_is_used_as_stored(tmp_path):
    path = mock(tmp_path / "g.h5")
    build_hypercube(str(path), S_chunk=4, comm=SELF)
    with h5py.File(path, "r+") as f:
        del f["/HyperCube"].attrs["inputs.fingerprint"]
    assert open_operator(str(path), "auto", comm=SELF).kind == "hypercube"


def test_kaczmarz_from_the_factors_without_a_hypercube(tmp_path):
    path = mock(tmp_path / "g.h5", snr=None, spaxels=32)
    ref = tmp_path / "ref.h5"
    shutil.copy(path, ref)
    build_hypercube(str(ref), comm=SELF)
    x_f, s_f = solve_kaczmarz(str(path), epochs=4, use_weights=False, comm=SELF)
    x_h, s_h = solve_kaczmarz(str(ref), epochs=4, use_weights=False, comm=SELF)
    assert s_f["operator"] == "factored" and s_h["operator"] == "hypercube"
    assert s_f["tiles"] == s_h["tiles"]              # the same tiles: the builder's S-chunks
    assert s_f["objective"] < 0.05 * s_f["objective_zero"]
    assert s_f["objective"] == pytest.approx(s_h["objective"], rel=1e-2)


def test_cli_solve_recon_plot_on_a_file_with_only_the_inputs(tmp_path):
    path = mock(tmp_path / "g.h5")
    for args in (["solve"], ["recon"], ["plot", "--out", tmp_path / "plots"], ["status"]):
        res = run_cli(args[0], path, *args[1:])
        assert res.returncode == 0, res.stderr
    assert (tmp_path / "plots" / "spectra_best_worst.png").stat().st_size > 5000
    res = run_cli("solve", path, "--operator", "hypercube")
    assert res.returncode == 2 and "run `cubefit_mpi build" in res.stderr
