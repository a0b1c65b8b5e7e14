"""The factored operator under MPI: the same G, b, x and recon at any rank count, also when
ranks own no S-tile."""
import shutil

import h5py
import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import assert_all, same_everywhere

from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.operators import factored as factored_module
from cubefit_mpi.operators.base import Weighting
from cubefit_mpi.operators.select import open_operator
from cubefit_mpi.solvers.exact import solve_exact
from cubefit_mpi.stages.mock import make_mock
from cubefit_mpi.stages.recon import reconstruct

pytestmark = pytest.mark.mpi
comm = MPI.COMM_WORLD


@pytest.fixture
def pair(mpi_tmp_path):
    path = mpi_tmp_path / "g.h5"
    make_mock(str(path), MockSpec(spaxels=29, components=3, populations=6, wavelengths=90, seed=5, snr=30,
                                  masked_pixels=6), comm)
    if comm.rank == 0:
        shutil.copy(path, mpi_tmp_path / "ref.h5")
    comm.Barrier()
    return path, mpi_tmp_path / "ref.h5"


@pytest.mark.parametrize("tile_bytes", [None, 3000])       # one tile for all (ranks > 0 own none), or many
def test_normal_equations_at_any_rank_count(pair, monkeypatch, tile_bytes):
    path, ref = pair
    if tile_bytes is not None:
        monkeypatch.setattr(factored_module, "TILE_BYTES", tile_bytes)
    monkeypatch.setattr(factored_module, "BLOCK_BYTES", 40_000)       # several population blocks
    op = open_operator(str(path), "factored", comm=comm)
    with h5py.File(path, "r", driver="mpio", comm=comm) as f:
        mask = f["/Mask"][...].astype(bool)
    weights = np.linspace(0.5, 1.0, mask.size)
    ne = op.normal_equations(Weighting(mask, weights), comm)
    serial = None
    if comm.rank == 0:
        serial = open_operator(str(ref), "factored", comm=MPI.COMM_SELF).normal_equations(Weighting(mask, weights),
                                                                                      MPI.COMM_SELF)
    ok, message = True, ""
    if comm.rank == 0:
        scale = np.abs(serial["gram"]).max()
        ok = (np.abs(ne["gram"] - serial["gram"]).max() <= 1e-12 * scale
              and np.allclose(ne["rhs"], serial["rhs"], rtol=1e-12, atol=0)
              and abs(ne["yy"] - serial["yy"]) <= 1e-12 * serial["yy"])
        message = f"G differs by {np.abs(ne['gram'] - serial['gram']).max() / scale:.3g} (relative)"
    assert_all(ok, message)
    assert_all(same_everywhere(ne["rhs"]) and same_everywhere(ne["diag"]))


def test_exact_solve_and_recon_from_the_factors_at_any_rank_count(pair):
    path, ref = pair
    x, stats = solve_exact(str(path), use_weights=False, comm=comm)
    reconstruct(str(path), comm=comm)
    assert_all(stats["operator"] == "factored" and stats["kkt.ok"] and same_everywhere(x))
    ok, message = True, ""
    if comm.rank == 0:
        x_ser, s_ser = solve_exact(str(ref), use_weights=False, comm=MPI.COMM_SELF)
        reconstruct(str(ref), comm=MPI.COMM_SELF)
        with h5py.File(path, "r") as f, h5py.File(ref, "r") as g:
            recon_diff = np.abs(f["/ReconCube"][...] - g["/ReconCube"][...]).max() / np.abs(g["/ReconCube"][...]).max()
        ok = (abs(stats["objective"] - s_ser["objective"]) <= 1e-10 * abs(s_ser["objective"])
              and np.allclose(x, x_ser, rtol=1e-7, atol=1e-9 * x_ser.max()) and recon_diff <= 1e-12)
        message = f"objective {stats['objective']} vs {s_ser['objective']}, recon {recon_diff:.3g}"
    assert_all(ok, message)
