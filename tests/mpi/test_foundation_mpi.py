"""Parallel paths of the foundation, run as ``mpiexec -n 2|3 python -m pytest --with-mpi tests/mpi``."""
import h5py
import numpy as np
import pytest
from mpi4py import MPI

from cubefit_mpi.io.blocks import read_block, write_block
from cubefit_mpi.io.h5file import is_parallel, open_h5
from cubefit_mpi.io.layout import H5Dims
from cubefit_mpi.io.manager import H5Manager
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.parallel import collectives, decomposition
from cubefit_mpi.stages.mock import make_mock

pytestmark = pytest.mark.mpi
comm = MPI.COMM_WORLD


def test_rank_owning_nothing_does_not_hang_collective_write(mpi_tmp_path):
    n_rows = comm.size - 1                       # the last rank owns nothing
    path = mpi_tmp_path / "empty.h5"
    with open_h5(path, "w", comm) as f:
        dset = f.create_dataset("x", shape=(n_rows, 4), dtype="f8")
        mine = decomposition.owned_tiles(n_rows, comm)
        assert (len(mine) == 0) == (comm.rank == comm.size - 1)
        for tile in decomposition.padded_schedule(list(mine), comm):
            write_block(dset, None if tile is None else (tile, 0),
                        None if tile is None else np.full((1, 4), float(tile)))
        got = read_block(dset, (0, 0), (n_rows, 4)) if comm.rank == 0 else read_block(dset, None, None)
    if comm.rank == 0:
        np.testing.assert_array_equal(got[:, 0], np.arange(n_rows))
    else:
        assert got is None


def test_compressed_dataset_collective_rounds(mpi_tmp_path):
    path = mpi_tmp_path / "gz.h5"
    with open_h5(path, "w", comm) as f:
        dset = f.create_dataset("a", shape=(7, 50), chunks=(1, 50), dtype="f4", compression="gzip")
        for tile in decomposition.padded_schedule(list(decomposition.owned_tiles(7, comm)), comm):
            write_block(dset, None if tile is None else (tile, 0),
                        None if tile is None else np.full((1, 50), tile, dtype="f4"))
    if comm.rank == 0:
        with h5py.File(path, "r") as f:
            np.testing.assert_array_equal(f["a"][:, 0], np.arange(7))


def test_reductions_in_float64():
    local = np.full(5, 1e-17 + comm.rank, dtype=np.float32)
    total = collectives.allreduce_sum(local, comm)
    assert total.dtype == np.float64
    np.testing.assert_allclose(total, sum(np.float32(1e-17 + r) for r in range(comm.size)))
    root = collectives.reduce_sum(np.ones(3), comm)
    if comm.rank == 0:
        np.testing.assert_array_equal(root, comm.size)
    else:
        assert root is None
    b = collectives.bcast_array(np.arange(6.0).reshape(2, 3) if comm.rank == 0 else None, comm)
    np.testing.assert_array_equal(b, np.arange(6.0).reshape(2, 3))


@pytest.mark.mpi(min_size=2)
def test_raise_if_any_raises_everywhere():
    from cubefit_mpi.config.errors import InputError

    err = InputError("/X: bad on rank 1") if comm.rank == 1 else None
    with pytest.raises(InputError, match="/X: bad on rank 1"):
        collectives.raise_if_any(err, comm)


def _datasets(path):
    with h5py.File(path, "r") as f:
        out = {}
        f.visititems(lambda n, o: out.__setitem__(n, o[...]) if isinstance(o, h5py.Dataset) else None)
        return out


def test_mock_identical_bytes_at_any_rank_count(mpi_tmp_path):
    spec = MockSpec(spaxels=37, components=3, populations=6, wavelengths=90, seed=4, snr=20, masked_pixels=5)
    make_mock(str(mpi_tmp_path / "par.h5"), spec, comm, rows_per_round=5)
    if comm.rank == 0:
        make_mock(str(mpi_tmp_path / "ser.h5"), spec, MPI.COMM_SELF)
        par_d, ser_d = _datasets(mpi_tmp_path / "par.h5"), _datasets(mpi_tmp_path / "ser.h5")
        assert par_d.keys() == ser_d.keys() and "LOSVD" in par_d
        for name in ser_d:
            assert par_d[name].tobytes() == ser_d[name].tobytes(), name
    comm.Barrier()


def test_populate_parallel_equals_serial(mpi_tmp_path):
    rng = np.random.default_rng(2)
    tem = 8.4 + 1e-4 * np.arange(300)
    obs = tem[60:240:2]
    dims = H5Dims(nSpat=11, nLSpec=obs.size, nTSpec=tem.size, nVel=7, nComp=2, nPop=3)
    arrays = dict(losvd=rng.uniform(size=(11, 7, 2)), datacube=rng.normal(size=(11, obs.size)),
                  templates=rng.uniform(1, 2, size=(3, tem.size)), vel_pix=np.linspace(-90, 90, 7),
                  mask=rng.uniform(size=obs.size) > 0.1)
    for name, c in (("p.h5", comm), ("s.h5", MPI.COMM_SELF)):
        if c is MPI.COMM_SELF and comm.rank != 0:
            continue
        mgr = H5Manager(mpi_tmp_path / name, tem_pix=tem, obs_pix=obs, comm=c)
        mgr.init_base(dims)
        mgr.populate_from_arrays(**arrays)
        mgr.ensure_rebin_and_resample()
    comm.Barrier()
    if comm.rank == 0:
        a, b = _datasets(mpi_tmp_path / "p.h5"), _datasets(mpi_tmp_path / "s.h5")
        for name in b:
            assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.mpi(min_size=2)
def test_independent_read_by_one_rank_alone_and_gathers(mpi_tmp_path):
    path = mpi_tmp_path / "ind.h5"
    data = np.arange(6 * 5, dtype=np.float32).reshape(6, 5)
    if comm.rank == 0:
        with h5py.File(path, "w") as f:
            f.create_dataset("a", data=data, chunks=(2, 5))
    comm.Barrier()
    with open_h5(path, "r", comm) as f:
        assert is_parallel(f)
        if comm.rank == 0:            # no other rank calls HDF5 meanwhile: this would hang if it were collective
            np.testing.assert_array_equal(read_block(f["a"], (2, 1), (3, 4), collective=False), data[2:5, 1:])
        comm.Barrier()
    rows = [r + 1 for r in range(comm.size)]
    stacked = collectives.gather_rows(np.full((comm.rank + 1, 3), float(comm.rank)), rows, comm)
    if comm.rank == 0:
        np.testing.assert_array_equal(stacked[:, 0], np.repeat(np.arange(comm.size), rows))
    else:
        assert stacked is None
    every = collectives.allgather_array(np.array([comm.rank, -1.0]), comm)
    np.testing.assert_array_equal(every[:, 0], np.arange(comm.size))
