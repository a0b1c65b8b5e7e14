"""recompress --compact under MPI: rank 0 rewrites the file while the others wait; every rank gets
the same report, and an error reaches every rank."""
import os

import h5py
import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import assert_all, same_everywhere

from cubefit_mpi.config.errors import InputError
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.compact import compact_file
from cubefit_mpi.stages.hypercube_maintenance import recompress
from cubefit_mpi.stages.mock import make_mock

comm = MPI.COMM_WORLD


def test_compact_after_a_parallel_recompress(mpi_tmp_path):
    path = mpi_tmp_path / "c.h5"
    make_mock(str(path), MockSpec(spaxels=40, components=2, populations=5, wavelengths=90, seed=2), comm)
    build_hypercube(str(path), S_chunk=7, comm=comm)
    recompress(str(path), "gzip:3", comm=comm)
    reference = None
    if comm.rank == 0:
        with h5py.File(path) as f:
            reference = f["/HyperCube/models"][...]
    size = os.path.getsize(path)
    out = compact_file(str(path), comm=comm)
    assert_all(same_everywhere(out) and out["bytes_before"] == size and out["bytes_after"] < size, str(out))
    ok = True
    if comm.rank == 0:
        with h5py.File(path) as f:
            ok = np.array_equal(f["/HyperCube/models"][...], reference) and f["/HyperCube/models"].compression == "gzip"
    assert_all(ok)


def test_compact_error_on_every_rank(mpi_tmp_path):
    with pytest.raises(InputError, match="no such file"):
        compact_file(str(mpi_tmp_path / "missing.h5"), comm=comm)
