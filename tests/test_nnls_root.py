"""Rank 0's exact NNLS (solvers.root_nnls) at one rank: memory refusal, the knob through
solve_exact, G restored, the certificate in the stats and the log."""
import logging
import re

import h5py
import numpy as np
import pytest
from conftest import file_bytes, run_cli
from mpi4py import MPI

from cubefit_mpi.config.errors import InputError
from cubefit_mpi.numerics.certificate import certify
from cubefit_mpi.numerics.nnls import nnls_gram
from cubefit_mpi.numerics.regularization import Regularization
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.parallel.threads import node_blas_threads, process_cores
from cubefit_mpi.solvers.exact import solve_exact
from cubefit_mpi.solvers.root_nnls import available_bytes, check_nnls_memory, solve_on_root
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.mock import make_mock

SELF = MPI.COMM_SELF


@pytest.fixture(autouse=True)
def no_auto_weights(monkeypatch):
    monkeypatch.setenv("CUBEFIT_LAMBDA_WEIGHTS_ENABLE", "0")


def make_case(tmp_path, **spec):
    params = dict(spaxels=30, components=3, populations=12, wavelengths=150, seed=8, snr=30.0, masked_pixels=5)
    params.update(spec)
    path = tmp_path / "case.h5"
    make_mock(str(path), MockSpec(**params), SELF)
    build_hypercube(str(path), S_chunk=5, comm=SELF)
    return path


def test_memory_check_figures(monkeypatch):
    n = 1000
    monkeypatch.setenv("CUBEFIT_GRAM_MAX_BYTES", str(int(1.5 * 8 * n * n)))
    with pytest.raises(InputError) as err:
        check_nnls_memory(n, SELF)
    text = str(err.value)
    assert text.startswith("the exact NNLS of N=1000 needs 16000000 bytes (0.02 GB) on rank 0 (G 8000000 bytes "
                           "+ one N x N factor 8000000 bytes) but 12000000 bytes (0.01 GB) are available "
                           "(CUBEFIT_GRAM_MAX_BYTES=12000000 x 1 rank(s) on the node)"), text
    assert "\n" not in text
    monkeypatch.setenv("CUBEFIT_GRAM_MAX_BYTES", str(2 * 8 * n * n))
    assert check_nnls_memory(n, SELF) == {"needed": 16_000_000, "available": 16_000_000,
                                          "source": "CUBEFIT_GRAM_MAX_BYTES=16000000 x 1 rank(s) on the node"}
    monkeypatch.setenv("CUBEFIT_GRAM_MAX_BYTES", "0")
    assert available_bytes() > 0
    with pytest.raises(InputError, match="MemAvailable"):
        check_nnls_memory(int(np.sqrt(available_bytes() / 8)) + 10, SELF)


def test_refused_early_by_the_cli(tmp_path):
    path = make_case(tmp_path, components=2, populations=6)               # N = 12: G is 1152 bytes
    before = file_bytes(path)
    res = run_cli("solve", path, env={"CUBEFIT_LAMBDA_WEIGHTS_ENABLE": "0", "CUBEFIT_GRAM_MAX_BYTES": "1728"})
    assert res.returncode == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if " INFO " not in ln and ln.strip()]
    assert len(errors) == 1, res.stderr
    assert re.search(r"the exact NNLS of N=12 needs 2304 bytes on rank 0 .* but 1728 bytes are available "
                     r"\(CUBEFIT_GRAM_MAX_BYTES=1728 x 1 rank\(s\) on the node\)", errors[0]), errors[0]
    assert file_bytes(path) == before


def test_solve_on_root_restores_g_and_certifies(caplog):
    rng = np.random.default_rng(0)
    a = np.abs(rng.standard_normal((400, 60)))
    gram, rhs = a.T @ a, a.T @ (a @ rng.uniform(0, 1, 60) + 0.1 * rng.standard_normal(400))
    reg = Regularization.build(3, 20, ridge=0.1, regul=5.0, pop_shape=(5, 4))
    original = gram.copy()
    with caplog.at_level(logging.INFO, logger="cubefit_mpi.solve"):
        x, info = solve_on_root(gram, rhs, reg, tol=1e-10, comm=SELF)
    assert np.allclose(gram, original, rtol=0, atol=1e-12 * np.abs(original).max())
    total = original + reg.dense()
    ref = nnls_gram(total, rhs).x
    assert np.abs(x - ref).max() <= 1e-8 * ref.max()
    assert info["kkt.ok"] and info["nnls.method"] == "lawson-hanson"          # N = 60 < AUTO_MIN_N
    assert info["curvature"] == pytest.approx(float(x @ original @ x), rel=1e-12)
    assert info["objective"] == pytest.approx(certify(total, rhs, x).objective, rel=1e-12)
    assert info["nnls.peak_bytes"] >= original.nbytes and info["nnls.threads"] == 0     # N < 2048: as launched
    assert "exact NNLS (lawson-hanson, auto)" in caplog.text and "peak memory on rank 0" in caplog.text


def test_not_certified_is_said(caplog, monkeypatch):
    """A result that fails the certificate (Lawson-Hanson stopped by its iteration cap) is logged NOT MET."""
    import cubefit_mpi.numerics.nnls_select as select

    real = select.nnls_gram
    monkeypatch.setattr(select, "nnls_gram", lambda *a, **k: real(*a, **{**k, "max_iter": 2}))
    rng = np.random.default_rng(1)
    a = rng.standard_normal((100, 40))
    gram, rhs = a.T @ a, a.T @ rng.standard_normal(100)
    with caplog.at_level(logging.INFO, logger="cubefit_mpi.solve"):
        x, info = solve_on_root(gram, rhs, Regularization.build(2, 20), tol=1e-10, comm=SELF)
    assert not info["kkt.ok"] and not info["converged"]
    assert "KKT certificate NOT MET" in caplog.text and "dual_min=" in caplog.text


@pytest.mark.parametrize("method", ["lawson-hanson", "block-pivoting", "auto"])
def test_knob_through_solve_exact(tmp_path, monkeypatch, method):
    path = make_case(tmp_path)
    monkeypatch.setenv("CUBEFIT_NNLS_GRAM_METHOD", "lawson-hanson")
    x_ref, s_ref = solve_exact(str(path), regul=10.0, comm=SELF)
    monkeypatch.setenv("CUBEFIT_NNLS_GRAM_METHOD", method)
    x, stats = solve_exact(str(path), regul=10.0, comm=SELF)
    assert stats["kkt.ok"] and stats["chi2_consistent"] and stats["from_cache"]
    assert stats["nnls.method"] == ("lawson-hanson" if method == "auto" else method)      # N = 36
    assert np.abs(x - x_ref).max() <= 1e-8 * x_ref.max()
    assert stats["objective"] == pytest.approx(s_ref["objective"], rel=1e-12)
    with h5py.File(path) as f:
        assert f["/Solve"].attrs["nnls.method"] == stats["nnls.method"]


def test_knob_governs_the_bootstrap_replicates(tmp_path, monkeypatch):
    """solve --bootstrap's replicates go through exact_nnls: the knob picks their method, same rows."""
    import shutil

    from cubefit_mpi.solvers import root_nnls
    from cubefit_mpi.solvers.uncertainty import REPLICATES, bootstrap_uncertainty

    path = make_case(tmp_path)
    solve_exact(str(path), regul=10.0, comm=SELF)
    other = tmp_path / "other.h5"
    shutil.copy(path, other)
    real, seen = root_nnls.solve_gram, []
    monkeypatch.setattr(root_nnls, "solve_gram", lambda *a, **k: seen.append(k["method"]) or real(*a, **k))
    rows = {}
    for method, name in (("lawson-hanson", path), ("block-pivoting", other)):
        monkeypatch.setenv("CUBEFIT_NNLS_GRAM_METHOD", method)
        seen.clear()
        assert bootstrap_uncertainty(str(name), replicates=3, seed=4, batch=3, comm=SELF)["computed"] == 3
        assert seen == [method] * 3
        with h5py.File(name) as f:
            rows[method] = f[REPLICATES][...]
    scale = rows["lawson-hanson"].max()
    np.testing.assert_allclose(rows["block-pivoting"], rows["lawson-hanson"], rtol=1e-5, atol=1e-6 * scale)


def test_node_blas_threads(monkeypatch):
    from threadpoolctl import threadpool_info

    import cubefit_mpi.parallel.threads as threads_module

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    assert 0.0 <= threads_module.idle_cores(0.01) <= process_cores() + 1e-9
    for idle, expected in ((0.0, 1), (1.7, min(2, process_cores())), (500.0, process_cores())):
        monkeypatch.setattr(threads_module, "idle_cores", lambda idle=idle: idle)
        with node_blas_threads() as count:
            assert count == expected and all(n == count for n in blas_threads())
    with node_blas_threads(1) as count:
        assert count == 1 and all(n == 1 for n in blas_threads())
    assert blas_threads() == before
