"""Read-ahead of hypercube blocks, reads into reused buffers, one BLAS thread for matrix-vector stages."""
import h5py
import numpy as np
import pytest

from cubefit_mpi.io.blocks import read_block
from cubefit_mpi.io.h5file import is_parallel, open_h5
from cubefit_mpi.io.read_ahead import ReadAhead
from cubefit_mpi.parallel import launcher, threads


@pytest.fixture
def cube(tmp_path):
    path = tmp_path / "cube.h5"
    data = np.arange(10 * 3 * 4, dtype=np.float32).reshape(10, 3, 4)
    with h5py.File(path, "w") as f:
        f.create_dataset("a", data=data, chunks=(2, 3, 4))
    return path, data


@pytest.mark.parametrize("enabled", [True, False])
def test_read_ahead_gives_the_planned_blocks_in_order(cube, enabled):
    path, data = cube
    plan = [(0, 2), None, (6, 10), (2, 3), (4, 6)]
    requests = [None if p is None else ((p[0], 1, 0), (p[1] - p[0], 2, 4)) for p in plan]
    with open_h5(path, "r") as f, ReadAhead(f["a"], requests, enabled=enabled) as reader:
        assert (reader._pool is not None) == enabled
        for p in plan:
            block = reader.next()
            if p is None:
                assert block is None
            else:
                np.testing.assert_array_equal(block, data[p[0]:p[1], 1:3])
        with pytest.raises(IndexError):
            reader.next()
    assert reader._pool is None                      # closed


def test_read_ahead_reuses_two_buffers_and_rejects_mixed_shapes(cube):
    path, _ = cube
    with open_h5(path, "r") as f:
        with ReadAhead(f["a"], [((s, 0, 0), (2, 3, 4)) for s in (0, 2, 4)]) as reader:
            first, second, third = reader.next(), reader.next(), reader.next()
            assert np.shares_memory(first, third) and not np.shares_memory(first, second)
        with pytest.raises(ValueError, match="trailing"):
            ReadAhead(f["a"], [((0, 0, 0), (2, 3, 4)), ((0, 0, 0), (2, 2, 4))])
        with ReadAhead(f["a"], [((9, 0, 0), (4, 3, 4))], enabled=False) as reader:
            with pytest.raises(ValueError, match="outside"):     # the read's error reaches the caller
                reader.next()
        with ReadAhead(f["a"], [((0, 0, 0), (2, 3, 4)), ((9, 0, 0), (4, 3, 4))]) as reader:
            reader.next()
            with pytest.raises(ValueError, match="outside"):     # ... also from the reader thread
                reader.next()


def test_read_block_into_a_buffer(cube):
    path, data = cube
    with open_h5(path, "r") as f:
        assert not is_parallel(f)
        buf = np.full((4, 3, 4), -1.0, dtype=np.float32)
        out = read_block(f["a"], (3, 0, 0), (2, 3, 4), out=buf)
        assert np.shares_memory(out, buf) and out.shape == (2, 3, 4)
        np.testing.assert_array_equal(out, data[3:5])
        with pytest.raises(ValueError, match="does not hold"):
            read_block(f["a"], (3, 0, 0), (2, 3, 4), out=np.empty((2, 3, 4)))      # float64 buffer
        assert read_block(f["a"], None, None, collective=False) is None


def test_matvec_blas_threads_limits_to_one_unless_told(monkeypatch):
    from threadpoolctl import threadpool_info

    for var in launcher.THREAD_VARIABLES:
        monkeypatch.delenv(var, raising=False)

    def blas_threads():
        return {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}

    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=2, user_api="blas"):
        if blas_threads() != {2}:
            pytest.skip("this BLAS cannot run 2 threads here")
        with threads.matvec_blas_threads(0):
            assert blas_threads() == {1}
        assert blas_threads() == {2}                 # restored after the block
        with threads.matvec_blas_threads(2):             # CUBEFIT_BLAS_THREADS given: left alone
            assert blas_threads() == {2}
    monkeypatch.setenv("OMP_NUM_THREADS", "2")       # set by the launcher: left alone
    with threadpool_limits(limits=2, user_api="blas"), threads.matvec_blas_threads(0):
        assert blas_threads() == {2}
