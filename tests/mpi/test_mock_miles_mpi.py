"""``mock --templates miles`` under MPI: the same bytes as alone.

Run: ``mpiexec -n 2|3|4 python -m mpi4py -m pytest --with-mpi tests/mpi/test_mock_miles_mpi.py``.
"""
import h5py
import pytest
from mpi4py import MPI
from mpi_helpers import assert_all

from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.stages.mock import make_mock

pytestmark = pytest.mark.mpi(min_size=2)
comm = MPI.COMM_WORLD


def _contents(path):
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[...].tobytes()
            out["attrs:" + name] = sorted((k, str(v)) for k, v in obj.attrs.items())
        f.visititems(visit)
    return out


def test_miles_mock_identical_bytes_at_any_rank_count(mpi_tmp_path):
    spec = MockSpec(spaxels=23, components=2, populations=212, wavelengths=150, seed=4, snr=30, masked_pixels=3,
                    templates="miles")
    make_mock(str(mpi_tmp_path / "par.h5"), spec, comm, rows_per_round=4)
    ok, message = True, ""
    if comm.rank == 0:
        make_mock(str(mpi_tmp_path / "ser.h5"), spec, MPI.COMM_SELF)
        par, ser = _contents(mpi_tmp_path / "par.h5"), _contents(mpi_tmp_path / "ser.h5")
        differ = sorted(name for name in ser.keys() | par.keys() if par.get(name) != ser.get(name))
        ok = not differ and "Populations/norm" in par and "Templates" in par
        message = f"differ at {comm.size} ranks: {differ}"
    assert_all(ok, message)
