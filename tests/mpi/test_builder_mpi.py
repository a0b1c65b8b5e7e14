"""The builder and its utilities under MPI: same bytes as one rank, whatever the split."""
import shutil

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from cubefit_mpi.config.errors import InputError
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.convert_norm import convert_hypercube_norm
from cubefit_mpi.stages.hypercube_maintenance import invalidate_tiles, recompress, recompute_col_energy
from cubefit_mpi.stages.mock import make_mock

pytestmark = pytest.mark.mpi
comm = MPI.COMM_WORLD


@pytest.fixture
def pair(mpi_tmp_path):
    """The same mock twice: 'par.h5' for the parallel run, 'ser.h5' for rank 0's serial reference."""
    spec = MockSpec(spaxels=45, components=3, populations=6, wavelengths=100, seed=12, snr=50, masked_pixels=4)
    make_mock(str(mpi_tmp_path / "par.h5"), spec, comm)
    if comm.rank == 0:
        shutil.copy(mpi_tmp_path / "par.h5", mpi_tmp_path / "ser.h5")
    comm.Barrier()
    return mpi_tmp_path / "par.h5", mpi_tmp_path / "ser.h5"


def _read(path, name):
    with h5py.File(path, "r") as f:
        return f[name][...]


@pytest.mark.parametrize("chunks,compression", [((4, 1, 6), None), ((7, 3, 4), "gzip:1")])
def test_parallel_build_same_bytes_as_serial(pair, chunks, compression):
    par, ser = pair
    out = build_hypercube(str(par), S_chunk=chunks[0], C_chunk=chunks[1], P_chunk=chunks[2],
                          compression=compression, comm=comm)
    assert out["complete"] and out["units_built"] == out["units_total"]
    if comm.rank == 0:
        build_hypercube(str(ser), S_chunk=5, comm=MPI.COMM_SELF)
        assert _read(par, "/HyperCube/models").tobytes() == _read(ser, "/HyperCube/models").tobytes()
        np.testing.assert_allclose(_read(par, "/HyperCube/col_energy"), _read(ser, "/HyperCube/col_energy"),
                                   rtol=1e-12)
        np.testing.assert_array_equal(_read(par, "/HyperCube/norm/losvd_amp"), _read(ser, "/HyperCube/norm/losvd_amp"))
    comm.Barrier()


def test_parallel_utilities_match_serial(pair):
    par, ser = pair
    build_hypercube(str(par), norm_mode="data", S_chunk=4, comm=comm)
    convert_hypercube_norm(str(par), "model", comm=comm)
    invalidate_tiles(str(par), "9:20", comm=comm)
    out = build_hypercube(str(par), norm_mode="model", comm=comm)
    assert out["units_built"] == 3 and out["complete"]          # S-tiles [8,12) [12,16) [16,20)
    if comm.size > 1:
        with pytest.raises(InputError, match="lzf: not safe for parallel writes"):
            recompress(str(par), "lzf", comm=comm)
    recompress(str(par), "gzip:2", comm=comm)
    energy = recompute_col_energy(str(par), comm=comm)
    if comm.rank == 0:
        build_hypercube(str(ser), norm_mode="model", S_chunk=4, comm=MPI.COMM_SELF)
        a, b = _read(par, "/HyperCube/models"), _read(ser, "/HyperCube/models")
        np.testing.assert_allclose(a, b, rtol=3e-7, atol=0)          # data -> model costs float32 rounding
        np.testing.assert_array_equal(a[8:20], b[8:20])               # rebuilt tiles are exact
        np.testing.assert_allclose(energy, _read(ser, "/HyperCube/col_energy"), rtol=1e-6)
        with h5py.File(par, "r") as f:
            assert f["/HyperCube/models"].compression == "gzip" and f["/HyperCube"].attrs["norm.mode"] == "model"
    comm.Barrier()
