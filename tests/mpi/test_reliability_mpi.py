"""Staged writes, the one-writer lock and failing ranks on a parallel file: the same at 1-4 ranks."""
import json
import os

import h5py
import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import assert_all

from cubefit_mpi.config.errors import InputError
from cubefit_mpi.io import lock as lk
from cubefit_mpi.io.blocks import write_block
from cubefit_mpi.io.datasets import COMMIT_ATTR, STAGED_SUFFIX, staged_datasets
from cubefit_mpi.io.h5file import open_h5
from cubefit_mpi.parallel.decomposition import block_range

pytestmark = pytest.mark.mpi
comm = MPI.COMM_WORLD


def _shared_path(tmp_path, name):
    return comm.bcast(str(tmp_path / name) if comm.rank == 0 else None, root=0)


def test_staged_write_on_a_parallel_file(tmp_path):
    path = _shared_path(tmp_path, "p.h5")
    if comm.rank == 0:
        with h5py.File(path, "w") as f:
            f["/a"] = np.zeros((10, 3))
    comm.Barrier()
    with open_h5(path, "r+", comm) as f:
        with staged_datasets(f, [("/a", (10, 3), "f8"), ("/b", (10,), "f8")], comm) as staged:
            lo, hi = block_range(10, comm.size, comm.rank)
            for name, block in (("/a", np.full((hi - lo, 3), 1.0 + lo)), ("/b", np.arange(lo, hi, dtype=float))):
                write_block(staged[name], (lo,) + (0,) * (block.ndim - 1) if hi > lo else None,
                            block if hi > lo else None)
            staged["/a"].attrs["ranks"] = comm.size
            still_old = bool(np.all(f["/a"][...] == 0))
        done = COMMIT_ATTR not in f.attrs and "/a" + STAGED_SUFFIX not in f
    assert_all(still_old and done, "the old /a must stay until the block ends")
    with h5py.File(path, "r") as f:
        b = f["/b"][...]
        a_ok = all(np.all(f["/a"][lo:hi] == 1.0 + lo) for lo, hi in
                   (block_range(10, comm.size, r) for r in range(comm.size)))
        assert_all(a_ok and np.array_equal(b, np.arange(10.0)) and f["/a"].attrs["ranks"] == comm.size)


def test_an_error_raised_by_every_rank_inside_a_parallel_file_is_clean(tmp_path):
    path = _shared_path(tmp_path, "e.h5")
    if comm.rank == 0:
        with h5py.File(path, "w") as f:
            f["/a"] = np.arange(4.0)
    comm.Barrier()
    raised = False
    try:
        with open_h5(path, "r+", comm):
            raise InputError("a bad input seen by every rank")
    except InputError:
        raised = True
    with open_h5(path, "r", comm) as f:                  # closed cleanly: opens again on every rank
        values = f["/a"][...]
    assert_all(raised and np.array_equal(values, np.arange(4.0)))


def test_the_lock_is_decided_by_rank_0(tmp_path):
    path = _shared_path(tmp_path, "l.h5")
    with lk.write_lock(path, "test", comm):
        holder = lk.read_holder(path)
        assert_all(holder is not None and holder["pid"] == comm.bcast(os.getpid(), root=0))
    comm.Barrier()
    assert_all(lk.read_holder(path) is None, "released on the way out")
    if comm.rank == 0:
        with open(lk.lock_path(path), "w") as fh:
            json.dump({"pid": 1, "host": "another-node", "command": "build"}, fh)
    comm.Barrier()
    refused = False
    try:
        with lk.write_lock(path, "test", comm):
            pass
    except InputError as exc:
        refused = "another-node" in str(exc)
    assert_all(refused, "every rank refuses, naming the holder")
