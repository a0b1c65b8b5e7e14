"""velocity-bias and preflight under MPI: ranks own spaxels, the correlation is reduced; the same
answer (to the rounding of the reduction) as one process, at 1-4 ranks."""
import h5py
import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import assert_all, same_everywhere

from cubefit_mpi.config.errors import InputError
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.stages.mock import make_mock
from cubefit_mpi.stages.preflight import preflight
from cubefit_mpi.stages.velocity_bias import apply_velocity_bias, estimate_velocity_bias

comm = MPI.COMM_WORLD
INJECTED = 35.0


def _offset_mock(folder):
    """Rank 0 writes a mock and moves /VelPix 35 km/s blueward (data redward of the model)."""
    path = folder / "vb.h5"
    if comm.rank == 0:
        make_mock(str(path), MockSpec(spaxels=45, components=3, populations=8, wavelengths=240, seed=4,
                                      snr=50.0, masked_pixels=6), MPI.COMM_SELF)
        with h5py.File(path, "r+") as f:
            f["/VelPix"][...] -= INJECTED
    comm.Barrier()
    return path


def test_velocity_bias_same_as_one_process(mpi_tmp_path):
    path = _offset_mock(mpi_tmp_path)
    result = estimate_velocity_bias(str(path), n_boot=64, rows_per_round=4, comm=comm)  # several rounds, ranks idle
    reference = estimate_velocity_bias(str(path), n_boot=64, comm=MPI.COMM_SELF) if comm.rank == 0 else None
    reference = comm.bcast(reference, root=0)
    assert_all(abs(result["offset_kms"] - INJECTED) <= 3.0, f"offset {result['offset_kms']}")
    assert_all(abs(result["offset_kms"] - reference["offset_kms"]) <= 1e-8,
               f"{result['offset_kms']} vs {reference['offset_kms']}")
    assert_all(abs(result["sigma_kms"] - reference["sigma_kms"]) <= 1e-8)
    np.testing.assert_allclose(result["correlation"], reference["correlation"], rtol=1e-12)
    assert_all(same_everywhere(result["correlation"]))
    applied = apply_velocity_bias(str(path), result, comm=comm)
    again = apply_velocity_bias(str(path), result, comm=comm)
    assert_all(applied["applied"] and not again["applied"])
    if comm.rank == 0:
        with h5py.File(path) as f:
            shift = f["/VelPix"].attrs["velocity_bias.offset_kms"]
            step = np.diff(f["/VelPix"][...])
        ok = shift == result["offset_kms"] and np.allclose(step, 40.0)
    else:
        ok = True
    assert_all(ok)


def test_velocity_bias_errors_on_every_rank(mpi_tmp_path):
    path = _offset_mock(mpi_tmp_path)
    with pytest.raises(InputError, match="widen --range"):
        estimate_velocity_bias(str(path), v_range=20.0, step=10.0, n_boot=8, comm=comm)


def test_preflight_rows_the_same_on_every_rank(mpi_tmp_path):
    path = _offset_mock(mpi_tmp_path)
    rows = preflight(str(path), node_memory=2**36, comm=comm)
    assert_all(same_everywhere(rows))
    assert_all([r.check for r in rows] == ["inputs", "chunks", "build memory", "solve memory", "disk"])
    assert_all("no-go" not in [r.verdict for r in rows], [(r.check, r.verdict) for r in rows])
    if comm.rank == 0:
        with h5py.File(path, "r+") as f:
            f["/LOSVD"][44, 0, 0] = -1.0                 # found by the last rank's slab
    comm.Barrier()
    rows = preflight(str(path), comm=comm)
    assert_all(len(rows) == 1 and rows[0].verdict == "no-go" and "/LOSVD: negative value" in rows[0].note)
