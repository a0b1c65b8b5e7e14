"""Bootstrap uncertainties (solvers.uncertainty): a replicate is the exact fit of its own data
y* = ŷ + e* (checked by solving y* from scratch), for both operators; the parametric bootstrap of
an all-passive problem has the analytic covariance σ² G⁻¹; extending and resuming keep every
finished row; bad input is refused with exit 2 and the file unchanged."""
import os
import shutil
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
from conftest import PYTHON, file_bytes, run_cli
from mpi4py import MPI

from cubefit_mpi.config.errors import InputError
from cubefit_mpi.numerics import bootstrap as bs
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.solvers.exact import GRAM, solve_exact
from cubefit_mpi.solvers.uncertainty import DONE, REPLICATES, bootstrap_uncertainty
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.mock import make_mock
from cubefit_mpi.stages.recon import reconstruct

SELF = MPI.COMM_SELF


@pytest.fixture(autouse=True)
def _plain_weights(monkeypatch):
    monkeypatch.setenv("CUBEFIT_LAMBDA_WEIGHTS_ENABLE", "0")


def fitted(path, operator="factored", **spec):
    base = dict(spaxels=30, components=2, populations=5, wavelengths=90, seed=5, snr=30, masked_pixels=5)
    base.update(spec)
    make_mock(str(path), MockSpec(**base), SELF)
    if operator == "hypercube":
        build_hypercube(str(path), S_chunk=8, comm=SELF)
    solve_exact(str(path), operator=operator, comm=SELF)
    return path


def with_data(src, dst, data):
    """A copy of ``src`` whose /DataCube is ``data`` and which has no fit."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        f["/DataCube"][...] = data
        for name in ("/Solve", "/X_global", "/Uncertainty", "/ReconCube", "/ReconCube_chi2", "/ReconCube_rmse"):
            if name in f:
                del f[name]
    return dst


@pytest.mark.parametrize("operator, method, block", [("factored", "wild", "spaxel"), ("hypercube", "wild", "spaxel"),
                                                     ("hypercube", "wild", "pixel"),
                                                     ("factored", "residual", "spaxel"),
                                                     ("hypercube", "parametric", "spaxel")])
def test_a_replicate_is_the_fit_of_its_own_data(tmp_path, operator, method, block):
    path = fitted(tmp_path / "g.h5", operator)
    out = bootstrap_uncertainty(str(path), replicates=3, method=method, block=block, seed=9, batch=2, comm=SELF)
    assert out["replicates"] == 3 and out["computed"] == 3
    reconstruct(str(path), comm=SELF)
    with h5py.File(path, "r") as f:
        y, y_hat = f["/DataCube"][...], f["/ReconCube"][...]
        mask = f["/Mask"][...].astype(bool)
        var = f["/DataVar"][...]
        rows = f[REPLICATES][...]
        assert f[DONE][...].tolist() == [1, 1, 1]
        assert f["/Uncertainty"].attrs["method"] == method and f["/Uncertainty"].attrs["n_replicates"] == 3
        assert f["/Uncertainty/weights_std"].shape == (10,)
    resid = np.where(np.isfinite(y), y - y_hat, 0.0)
    for r in (0, 2):
        e = bs.draw_errors(method, resid, mask, seed=9, replicate=r, first=0, block=block, variance=var)
        star = np.where(mask, y_hat + e, np.nan)
        x_star, _ = solve_exact(str(with_data(path, tmp_path / f"star{r}.h5", star)), operator=operator, comm=SELF)
        np.testing.assert_allclose(rows[r], x_star, rtol=2e-5, atol=1e-6 * x_star.max())


def test_parametric_bootstrap_has_the_analytic_covariance(tmp_path):
    """All weights far from their bound, no regularisation: x̂ is linear in y, cov = σ² G⁻¹."""
    path = tmp_path / "p.h5"
    make_mock(str(path), MockSpec(spaxels=40, components=2, populations=3, wavelengths=80, seed=2, masked_pixels=4), SELF)
    with h5py.File(path, "r+") as f:
        f.create_dataset("/XDense", data=np.array([[1.0, 2.0, 1.5], [2.0, 1.0, 1.0]]))
    reconstruct(str(path), out="/Clean", x_dataset="/XDense", comm=SELF)
    with h5py.File(path, "r") as f:
        clean, mask = f["/Clean"][...], f["/Mask"][...].astype(bool)
    solve_exact(str(path), ridge=0.0, comm=SELF)
    with h5py.File(path, "r") as f:
        cov_unit = np.linalg.inv(f[GRAM][...])
    sigma = 0.04 / np.sqrt(np.diag(cov_unit).max())          # 4 % error on the worst weight: never at 0
    noisy = np.where(mask, clean + sigma * np.random.default_rng(0).standard_normal(clean.shape), np.nan)
    data = with_data(path, tmp_path / "noisy.h5", noisy)
    with h5py.File(data, "r+") as f:
        f.create_dataset("/DataVar", data=np.full(clean.shape, sigma ** 2))
    x_hat, _ = solve_exact(str(data), ridge=0.0, comm=SELF)
    assert x_hat.min() > 0.5
    R = 400
    bootstrap_uncertainty(str(data), replicates=R, method="parametric", seed=1, batch=100, comm=SELF)
    with h5py.File(data, "r") as f:
        reps = f[REPLICATES][...].astype(np.float64)
        std = f["/Uncertainty/weights_std"][...]
    assert reps.min() > 0.0                                       # no bound touched: the law is Gaussian
    expected = sigma ** 2 * cov_unit
    sample = np.cov(reps, rowvar=False)
    np.testing.assert_allclose(np.diag(sample), np.diag(expected), rtol=4 * np.sqrt(2 / R))
    np.testing.assert_allclose(std, np.sqrt(np.diag(sample)), rtol=1e-6)
    d = np.sqrt(np.diag(expected))
    np.testing.assert_allclose(sample / np.outer(d, d), expected / np.outer(d, d), atol=4 / np.sqrt(R))
    np.testing.assert_allclose(reps.mean(axis=0), x_hat, atol=4 * d.max() / np.sqrt(R))


def test_more_replicates_extend_and_a_lost_batch_is_redone(tmp_path):
    path = fitted(tmp_path / "g.h5")
    bootstrap_uncertainty(str(path), replicates=4, batch=3, comm=SELF)
    with h5py.File(path, "r") as f:
        first = f[REPLICATES][...]
    out = bootstrap_uncertainty(str(path), replicates=7, batch=3, comm=SELF)
    assert out["computed"] == 3
    with h5py.File(path, "r+") as f:
        grown = f[REPLICATES][...]
        np.testing.assert_array_equal(grown[:4], first)
        assert f["/Uncertainty"].attrs["n_replicates"] == 7 and f["/Uncertainty/component_totals"].shape == (7, 2)
        f[DONE][1:3] = 0                                          # as if killed before these flags
        f[REPLICATES][1:3] = np.nan
    assert bootstrap_uncertainty(str(path), replicates=7, batch=3, comm=SELF)["computed"] == 2
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f[REPLICATES][...], grown)
    assert bootstrap_uncertainty(str(path), replicates=7, seed=1, comm=SELF)["computed"] == 7   # new seed: anew


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_sigkill_keeps_the_finished_batches_and_the_rerun_gives_the_same_matrix(tmp_path, ranks):
    path = fitted(tmp_path / "k.h5", spaxels=60)
    ref = shutil.copy(path, tmp_path / "ref.h5")
    bootstrap_uncertainty(str(ref), replicates=40, batch=2, comm=SELF)
    cmd = [PYTHON, "-m", "mpi4py", "-m", "cubefit_mpi", "uncertainty", str(path), "--replicates", "40", "--batch", "2"]
    if ranks > 1:
        cmd = ["mpiexec", "-n", str(ranks), *cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPIR_", "HYDRA"))}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    killed, t0 = False, time.time()
    for line in proc.stderr:
        if "bootstrap:" in line and int(line.split("bootstrap:")[1].split("/")[0]) >= 6:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        assert time.time() - t0 < 120
    proc.wait(timeout=30)
    assert killed, "the bootstrap finished before it could be killed"
    with h5py.File(path, "r") as f:
        done = f[DONE][...].astype(bool)
        kept = f[REPLICATES][...][done]
    assert 6 <= done.sum() < 40
    res = run_cli("uncertainty", path, "--replicates", "40", "--batch", "2", np_ranks=ranks if ranks > 1 else None)
    assert res.returncode == 0, res.stderr
    assert f"({40 - int(done.sum())} computed now" in res.stdout, res.stdout
    with h5py.File(path, "r") as f, h5py.File(ref, "r") as g:
        np.testing.assert_array_equal(f[REPLICATES][...][done], kept)
        np.testing.assert_allclose(f[REPLICATES][...], g[REPLICATES][...], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(f["/Uncertainty/totals_std"][...], g["/Uncertainty/totals_std"][...], rtol=1e-4)


@pytest.mark.parametrize("pop_shape", [(5, 1), None])
def test_plot_and_status_and_a_new_fit_makes_them_stale(tmp_path, pop_shape):
    from cubefit_mpi.stages.plots import make_plots
    from cubefit_mpi.stages.plots_uncertainty import UNCERTAINTY_PNG

    path = fitted(tmp_path / "g.h5")
    if pop_shape is None:
        with h5py.File(path, "r+") as f:
            del f["/Templates"].attrs["pop_shape"]
    bootstrap_uncertainty(str(path), replicates=5, comm=SELF)
    written = make_plots(str(path), str(tmp_path / "plots"), comm=SELF)
    assert str(tmp_path / "plots" / UNCERTAINTY_PNG) in written
    assert (tmp_path / "plots" / UNCERTAINTY_PNG).stat().st_size > 10_000
    solve_exact(str(path), ridge=1e-3, comm=SELF)
    written = make_plots(str(path), str(tmp_path / "later"), comm=SELF)
    assert not any(p.endswith(UNCERTAINTY_PNG) for p in written)
    assert "STALE" in run_cli("status", path).stdout
    assert bootstrap_uncertainty(str(path), replicates=2, comm=SELF)["computed"] == 2
    assert "STALE" not in run_cli("status", path).stdout


def test_cli_and_solve_bootstrap(tmp_path):
    path = fitted(tmp_path / "g.h5")
    res = run_cli("uncertainty", path, "--replicates", "3", "--block", "pixel", "--seed", "4", np_ranks=None)
    assert res.returncode == 0, res.stderr
    assert "/Uncertainty: 3 replicates" in res.stdout and "component totals" in res.stdout
    res = run_cli("solve", path, "--bootstrap", "2")
    assert res.returncode == 0, res.stderr
    assert "/Uncertainty: 2 replicates" in res.stdout
    res = run_cli("status", path)
    assert res.returncode == 0 and "/Uncertainty       2/2 replicates (wild, seed 0)" in res.stdout, res.stdout
    res = run_cli("uncertainty", path, "--replicates", "1")
    assert res.returncode == 0 and "2 replicates (0 computed now" in res.stdout, res.stdout


@pytest.mark.parametrize("args, message", [
    (("--replicates", "0"), "--replicates"),
    (("--method", "parametric"), "/DataVar"),
    (("--batch", "-1"), "--batch"),
])
def test_bad_input_exit_2_file_unchanged(tmp_path, args, message):
    path = fitted(tmp_path / "g.h5", snr=None)
    before = file_bytes(path)
    res = run_cli("uncertainty", path, *args)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in res.stderr, res.stderr
    assert file_bytes(path) == before


def test_needs_an_exact_fit(tmp_path):
    path = tmp_path / "g.h5"
    make_mock(str(path), MockSpec(spaxels=10, components=2, populations=3, wavelengths=60, seed=1), SELF)
    with pytest.raises(InputError, match="/X_global: no exact fit"):
        bootstrap_uncertainty(str(path), replicates=2, comm=SELF)
    res = run_cli("solve", path, "--method", "kaczmarz", "--bootstrap", "2")
    assert res.returncode == 2 and "--bootstrap" in res.stderr


def test_small_coverage_validation(tmp_path):
    """benchmarks/bootstrap_coverage.py in small: the intervals of the component totals cover the
    truth about 68 % of the time and the bootstrap's spread matches the fits' spread."""
    import json
    import sys

    from conftest import ROOT

    out = tmp_path / "coverage.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bootstrap_coverage.py"), "--realisations", "30",
                          "--replicates", "30", "--spaxels", "30", "--block", "pixel", "--figure",
                          str(tmp_path / "coverage.png"), "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    summary = json.loads(out.read_text())
    for c in range(2):
        assert 0.45 <= summary["totals"]["coverage"][c] <= 0.9, summary["totals"]
        assert 0.75 <= summary["totals"]["spread_ratio"][c] <= 1.3, summary["totals"]
        assert 0.75 <= summary["mean_metallicity"]["spread_ratio"][c] <= 1.3, summary["mean_metallicity"]
    assert summary["weights_zero"] > 0.85          # a weight at its bound: the interval [0, p84] contains 0
    assert (tmp_path / "coverage.png").stat().st_size > 10_000
