"""The Kaczmarz solver under MPI: the same x as one rank, and the S-group combination rule."""
import shutil

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from cubefit_mpi.config.errors import InputError
from cubefit_mpi.config.knobs import Knobs
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.solvers.kaczmarz.solver import solve_kaczmarz
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.mock import make_mock

pytestmark = pytest.mark.mpi
comm = MPI.COMM_WORLD
NO_WEIGHTS = Knobs.from_env({"CUBEFIT_LAMBDA_WEIGHTS_ENABLE": "0"})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A noisy galaxy with C=3, built once in parallel (rank 0's directory, shared)."""
    root = comm.bcast(str(tmp_path_factory.mktemp("kaczmarz_mpi")) if comm.rank == 0 else None)
    path = f"{root}/source.h5"
    make_mock(path, MockSpec(spaxels=40, components=3, populations=4, wavelengths=100, seed=8, snr=40.0,
                             masked_pixels=4), comm)
    build_hypercube(path, S_chunk=8, comm=comm)
    return path


@pytest.fixture
def pair(source, mpi_tmp_path):
    """'par.h5' for the parallel run and 'ser.h5', rank 0's copy for serial reference runs."""
    if comm.rank == 0:
        for name in ("par.h5", "ser.h5"):
            shutil.copy(source, mpi_tmp_path / name)
    comm.Barrier()
    return mpi_tmp_path / "par.h5", mpi_tmp_path / "ser.h5"


def _same_everywhere(x) -> bool:
    return all(np.array_equal(x, other) for other in comm.allgather(x))


@pytest.mark.parametrize("weights", [False, True])
def test_parallel_equals_serial(pair, weights):
    if comm.size > 3:
        pytest.skip("more ranks than components: several S-groups (next test)")
    par, ser = pair
    knobs = Knobs.from_env({}) if weights else NO_WEIGHTS
    if weights:
        from cubefit_mpi.stages.weights import ensure_lambda_weights

        ensure_lambda_weights(str(par), comm=comm)
        if comm.rank == 0:
            ensure_lambda_weights(str(ser), comm=MPI.COMM_SELF)
    bands = min(comm.size, 3)
    x, st = solve_kaczmarz(str(par), epochs=2, comm=comm, knobs=knobs)          # default bands
    assert st["c_bands"] == bands and st["s_groups"] == 1 and _same_everywhere(x)
    with h5py.File(par, "r") as f:
        assert np.array_equal(f["/X_global"][...], x)
    if comm.rank == 0:
        xs, ss = solve_kaczmarz(str(ser), epochs=2, comm=MPI.COMM_SELF, knobs=knobs, c_bands=bands)
        assert np.abs(x - xs).max() <= 1e-10 * max(1.0, np.abs(xs).max())
        assert np.allclose(st["rmse_history"], ss["rmse_history"], rtol=1e-10, atol=0)
        for key in ("tiles", "polish_calls", "polish_accepts", "band_steps", "tile_bt_shrinks", "band_bt_shrinks"):
            assert st[key] == ss[key], key
        assert st["polish_calls"] > 0 and st["objective"] == pytest.approx(ss["objective"], rel=1e-10)
    assert np.all(st["rmse_history"] <= st["rmse_before"] * (1 + 1e-12))


def test_s_groups_deterministic_and_monotone_per_round(pair):
    par, _ = pair
    x1, st = solve_kaczmarz(str(par), epochs=2, comm=comm, knobs=NO_WEIGHTS, c_bands=1)
    read_ahead = Knobs.from_env({"CUBEFIT_LAMBDA_WEIGHTS_ENABLE": "0", "CUBEFIT_READ_AHEAD": "1"})
    x2, _ = solve_kaczmarz(str(par), epochs=2, comm=comm, knobs=read_ahead, c_bands=1)   # reader threads
    assert st["s_groups"] == comm.size and np.array_equal(x1, x2) and _same_everywhere(x1)
    assert np.all(x1 >= 0) and st["tiles"] == 10 and st["polish_calls"] == 10
    keys = list(zip(st["history_epochs"], st["history_rounds"]))
    assert len(keys) == 10 and sorted(st["history_tiles"][:5]) == list(range(5))
    for key in set(keys):
        sel = np.array([k == key for k in keys])
        sw = st["history_sum_w"][sel]
        before = np.sum(st["rmse_before"][sel] ** 2 * sw)
        after = np.sum(st["rmse_history"][sel] ** 2 * sw)
        assert after <= before * (1 + 1e-12)


def test_jacobi_start_parallel_equals_serial(pair):
    par, ser = pair
    x, _ = solve_kaczmarz(str(par), epochs=0, warm_start="jacobi", comm=comm, knobs=NO_WEIGHTS)
    if comm.rank == 0:
        xs, _ = solve_kaczmarz(str(ser), epochs=0, warm_start="jacobi", comm=MPI.COMM_SELF, knobs=NO_WEIGHTS)
        assert np.allclose(x, xs, rtol=1e-10, atol=0) and x.any()


class _Tracker:
    def __init__(self):
        self.calls = 0

    def log_rmse(self, *a):
        self.calls += 1

    progress = snapshot = log_rmse


def test_tracker_only_on_rank0_and_errors_on_all_ranks(pair):
    par, _ = pair
    tracker = _Tracker()
    solve_kaczmarz(str(par), epochs=1, comm=comm, knobs=NO_WEIGHTS, tracker=tracker)
    assert (tracker.calls > 0) == (comm.rank == 0)
    with pytest.raises(InputError, match="c_bands"):
        solve_kaczmarz(str(par), comm=comm, knobs=NO_WEIGHTS, c_bands=4)
    comm.Barrier()
