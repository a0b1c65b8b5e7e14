"""Rank 0's exact NNLS under MPI: the same x at any rank count, the other ranks asleep, errors on all."""
import shutil
import time

import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import assert_all, same_everywhere

from cubefit_mpi.numerics.nnls import nnls_gram
from cubefit_mpi.numerics.regularization import Regularization
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.parallel.collectives import wait_for_root
from cubefit_mpi.solvers.exact import solve_exact
from cubefit_mpi.solvers.root_nnls import solve_on_root
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.mock import make_mock

comm = MPI.COMM_WORLD


@pytest.fixture
def built(mpi_tmp_path, monkeypatch):
    monkeypatch.setenv("CUBEFIT_LAMBDA_WEIGHTS_ENABLE", "0")
    path = mpi_tmp_path / "g.h5"
    make_mock(str(path), MockSpec(spaxels=40, components=4, populations=12, wavelengths=150, seed=31, snr=30,
                                  masked_pixels=7), comm)
    build_hypercube(str(path), S_chunk=4, comm=comm)
    if comm.rank == 0:
        shutil.copy(path, mpi_tmp_path / "ref.h5")
    comm.Barrier()
    yield path, mpi_tmp_path / "ref.h5"


@pytest.mark.parametrize("method", ["block-pivoting", "auto"])
def test_same_x_at_every_rank_count(built, method, monkeypatch):
    path, ref = built
    monkeypatch.setenv("CUBEFIT_NNLS_GRAM_METHOD", method)
    x, stats = solve_exact(str(path), regul=20.0, comm=comm)
    assert_all(stats["kkt.ok"] and stats["chi2_consistent"], f"certificate {stats['kkt.ok']}")
    assert_all(same_everywhere(x), "x differs between ranks")
    assert_all(same_everywhere(stats["nnls.method"]), "method differs between ranks")
    ok, why = True, ""
    if comm.rank == 0:
        x_ser, s_ser = solve_exact(str(ref), regul=20.0, comm=MPI.COMM_SELF)
        ok = bool(np.abs(x - x_ser).max() <= 1e-8 * x_ser.max()) and s_ser["nnls.method"] == stats["nnls.method"]
        why = f"max |dx| {np.abs(x - x_ser).max():.3g}, methods {s_ser['nnls.method']} {stats['nnls.method']}"
    assert_all(ok, why)


def test_solve_on_root_matches_lawson_hanson():
    rng = np.random.default_rng(5)
    a = np.abs(rng.standard_normal((700, 300)))
    gram = a.T @ a if comm.rank == 0 else None
    rhs = a.T @ (a @ rng.uniform(0, 1, 300) + 0.05 * rng.standard_normal(700))
    reg = Regularization.build(3, 100, regul=3.0, pop_shape=(20, 5))
    x, info = solve_on_root(gram, rhs, reg, tol=1e-10, comm=comm)
    assert_all(same_everywhere(x) and same_everywhere(info), "x or info differ between ranks")
    ok = True
    if comm.rank == 0:
        ref = nnls_gram(a.T @ a + reg.dense(), rhs).x
        ok = bool(np.abs(x - ref).max() <= 1e-8 * ref.max()) and info["nnls.method"] == "block-pivoting"
    assert_all(ok and info["kkt.ok"], f"{info['nnls.method']}")


def test_an_error_on_rank_0_is_raised_everywhere():
    bad = np.full((300, 300), np.nan) if comm.rank == 0 else None
    with pytest.raises(ValueError, match="gram and rhs must be finite"):
        solve_on_root(bad, np.ones(300), Regularization.build(1, 300), tol=1e-10, comm=comm)
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
def test_waiting_ranks_sleep():
    """While rank 0 works 0.6 s, the others wait in wait_for_root using little CPU (not spinning)."""
    comm.Barrier()
    cpu0 = time.process_time()
    if comm.rank == 0:
        time.sleep(0.6)
    waited = wait_for_root(comm)
    cpu = time.process_time() - cpu0
    ok = True if comm.rank == 0 else (waited >= 0.5 and cpu < 0.2)
    assert_all(ok, f"waited {waited:.2f} s using {cpu:.2f} s of CPU")
