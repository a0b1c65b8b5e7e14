"""λ-weights and the fit tracker under MPI: ``mpiexec -n 2|3 python -m pytest --with-mpi tests/mpi``."""
import shutil
import time

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from cubefit_mpi.io.h5file import open_h5
from cubefit_mpi.io.tracker_sidecar import latest_snapshot, read_history, read_progress
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.stages.mock import make_mock
from cubefit_mpi.stages.tracker import FitTracker
from cubefit_mpi.stages.weights import ensure_lambda_weights, median_spectrum, read_lambda_weights

pytestmark = pytest.mark.mpi
comm = MPI.COMM_WORLD


def _same_everywhere(array) -> bool:
    return len(set(comm.allgather(np.ascontiguousarray(array).tobytes()))) == 1


def test_weights_identical_bits_at_any_rank_count(mpi_tmp_path):
    par, ser = str(mpi_tmp_path / "par.h5"), str(mpi_tmp_path / "ser.h5")
    make_mock(par, MockSpec(spaxels=37, components=2, populations=4, wavelengths=150, seed=8, snr=30,
                            masked_pixels=9), comm)
    if comm.rank == 0:
        shutil.copyfile(par, ser)
    comm.Barrier()
    w_par = ensure_lambda_weights(par, comm=comm)
    assert _same_everywhere(w_par)
    if comm.rank == 0:
        w_ser = ensure_lambda_weights(ser, comm=MPI.COMM_SELF)
        assert w_ser.tobytes() == w_par.tobytes()
        with h5py.File(par, "r") as f_par, h5py.File(ser, "r") as f_ser:
            a, b = f_par["/HyperCube/lambda_weights"], f_ser["/HyperCube/lambda_weights"]
            assert a[...].tobytes() == b[...].tobytes()
            assert a.attrs["n_spaxels_used"] == 37 and a.attrs["method"] == b.attrs["method"]
    comm.Barrier()
    # tiny buffers: many row blocks and λ sub-slabs, uneven over ranks -- still the same bits
    with open_h5(par, "r", comm) as f:
        mask = f["/Mask"][...]
        small_buf, _ = median_spectrum(f["/DataCube"], mask, comm=comm, rows_per_block=10, max_slab_bytes=16 * 37 * 17)
        big_buf, used = median_spectrum(f["/DataCube"], mask, comm=comm)
    assert used == 37 and small_buf.tobytes() == big_buf.tobytes() and _same_everywhere(big_buf)
    # read_lambda_weights: the same on every rank
    assert _same_everywhere(read_lambda_weights(par, comm=comm))


@pytest.mark.mpi(min_size=2)
def test_median_with_skipped_spaxels_and_a_rank_without_pixels(mpi_tmp_path):
    path = str(mpi_tmp_path / "tiny.h5")
    n_lam = comm.size - 1                                # the last rank owns no wavelength pixel
    rng = np.random.default_rng(3)
    cube = rng.uniform(0.5, 2.0, size=(9, n_lam)) * rng.uniform(0.1, 10.0, size=(9, 1))
    cube[2] = np.nan                                     # no data: skipped
    cube[5] = -cube[5]                                   # negative mean: skipped
    if comm.rank == 0:
        with h5py.File(path, "w") as f:
            f["DataCube"] = cube
    comm.Barrier()
    with open_h5(path, "r", comm) as f:
        median, used = median_spectrum(f["/DataCube"], None, comm=comm, rows_per_block=2, max_slab_bytes=8)
    keep = np.delete(cube, [2, 5], axis=0)
    expected = np.median(keep / keep.mean(axis=1, keepdims=True), axis=0)
    assert used == 7
    np.testing.assert_allclose(median, expected, rtol=1e-15)
    assert _same_everywhere(median)


@pytest.mark.mpi(min_size=2)
def test_tracker_at_n_ranks_read_live_by_the_other_ranks(mpi_tmp_path, monkeypatch):
    for key, value in (("CUBEFIT_TRACKER_FLUSH_EVERY", "1"), ("CUBEFIT_TRACKER_FLUSH_SEC", "0.05"),
                       ("CUBEFIT_RMSE_STRIDE", "1"), ("FITTRACKER_START", "spawn")):
        monkeypatch.setenv(key, value)
    main = mpi_tmp_path / "galaxy.h5"
    tracker = FitTracker(main, comm=comm, method="mpi-test", n_params=8)
    assert tracker.active == (comm.rank == 0) and (tracker.path is None) == (comm.rank != 0)
    sidecar = comm.bcast(tracker.path, root=0)
    for epoch in range(4):
        for step in range(3):                            # every rank calls; only rank 0 records
            tracker.log_rmse(3 * epoch + step, epoch, 1.0 / (1 + 3 * epoch + step))
        tracker.progress(epoch, comm.size, comm.size)
        tracker.snapshot(np.full(8, float(epoch)), epoch, 1.0 / (1 + epoch))
        comm.Barrier()
        if comm.rank != 0:                               # a reader in another process, while it is written
            deadline = MPI.Wtime() + 30
            while MPI.Wtime() < deadline:
                info = read_progress(sidecar)
                snap = latest_snapshot(main, n_params=8)
                if (info["n_history"] == 3 * (epoch + 1) and info["epoch"] == epoch and snap is not None
                        and snap[1] == epoch):             # wait for exactly what is asserted below
                    break
                time.sleep(0.02)
            assert info["status"] == "running" and info["epoch"] == epoch
            assert snap[1] == epoch and np.all(snap[0] == epoch)
        comm.Barrier()
    tracker.close()
    comm.Barrier()
    hist = read_history(sidecar)
    np.testing.assert_array_equal(hist["step"], np.arange(12))
    info = read_progress(sidecar)
    assert info["status"] == "complete" and info["dropped"] == 0 and info["tiles_total"] == comm.size
    comm.Barrier()
