"""Launch behaviour under mpiexec: failures end the job, results do not depend on the rank count."""
import os
import subprocess
import time

import h5py
import numpy as np
from conftest import PYTHON, ROOT, run_cli

FAIL_ON_RANK_1 = """
from cubefit_mpi.parallel.comm import get_comm, install_abort_excepthook
comm = get_comm()
install_abort_excepthook(comm)
if comm.rank == 1:
    raise RuntimeError("boom on rank 1")
comm.recv(source=1)       # would hang forever without the abort hook
"""


def test_exception_on_one_rank_aborts_job_with_exit_1():
    t0 = time.perf_counter()
    res = subprocess.run(["mpiexec", "-n", "2", PYTHON, "-c", FAIL_ON_RANK_1],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, (res.returncode, res.stderr[-500:])
    assert "boom on rank 1" in res.stderr and "[rank 1]" in res.stderr
    assert time.perf_counter() - t0 < 30


def test_cli_bad_input_under_mpiexec_exits_2_one_line(tmp_path):
    res = run_cli("status", tmp_path / "missing.h5", np_ranks=2)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"cubefit_mpi status: error: {tmp_path / 'missing.h5'}: no such file"]


def test_mock_cli_identical_at_1_2_3_ranks(tmp_path):
    args = ["--spaxels", 41, "--populations", 6, "--wavelengths", 120, "--seed", 9, "--noise", 30,
            "--masked-pixels", 4]
    for n in (1, 2, 3):
        res = run_cli("mock", tmp_path / f"m{n}.h5", *args, np_ranks=n)
        assert res.returncode == 0, res.stderr
    with h5py.File(tmp_path / "m1.h5") as a, h5py.File(tmp_path / "m2.h5") as b, h5py.File(tmp_path / "m3.h5") as c:
        for name in ("LOSVD", "DataCube", "Templates", "R_T", "Truth/x", "Mask"):
            ref = a[name][...]
            assert np.array_equal(ref, b[name][...], equal_nan=True), name
            assert np.array_equal(ref, c[name][...], equal_nan=True), name


def test_build_identical_at_1_and_4_ranks(tmp_path):
    args = ["--spaxels", 30, "--populations", 5, "--wavelengths", 100, "--seed", 4]
    assert run_cli("mock", tmp_path / "a.h5", *args).returncode == 0
    import shutil
    shutil.copy(tmp_path / "a.h5", tmp_path / "b.h5")
    assert run_cli("build", tmp_path / "a.h5", "--chunks", "3,1,5").returncode == 0
    res = run_cli("build", tmp_path / "b.h5", "--chunks", "3,1,5", np_ranks=4)
    assert res.returncode == 0, res.stderr
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert a["/HyperCube/models"][...].tobytes() == b["/HyperCube/models"][...].tobytes()
        np.testing.assert_allclose(a["/HyperCube/col_energy"][...], b["/HyperCube/col_energy"][...], rtol=1e-12)


BLAS_THREADS = """
from threadpoolctl import threadpool_info
from cubefit_mpi.parallel.comm import get_comm
from cubefit_mpi.parallel.threads import limit_blas_threads
comm = get_comm()
applied = limit_blas_threads(comm)
threads = sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
print(comm.rank, applied, threads, flush=True)
"""


def test_ranks_share_the_cores_with_blas():
    import os
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                            "MKL_NUM_THREADS", "BLIS_NUM_THREADS")}
    res = subprocess.run(["mpiexec", "-n", "2", PYTHON, "-c", BLAS_THREADS], capture_output=True, text=True,
                         timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    cores = os.cpu_count()
    for line in res.stdout.strip().splitlines():
        rank, applied, threads = line.split(" ", 2)
        assert int(applied) == max(1, cores // 2)
        assert threads == f"[{max(1, cores // 2)}]"
    res = subprocess.run(["mpiexec", "-n", "2", PYTHON, "-c", BLAS_THREADS], capture_output=True, text=True,
                         timeout=60, env={**env, "OMP_NUM_THREADS": "1"})
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.split(" ", 2)[1] == "0" for line in lines), (res.stdout, res.stderr)   # launcher decides


def _selftest(case: str, timeout: float):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPIR_", "HYDRA"))}
    env["CUBEFIT_SELFTEST_CASE"] = case
    cmd = ["mpiexec", "-n", "2", PYTHON, "-m", "mpi4py", "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "--with-mpi", str(ROOT / "tests" / "mpi" / "selftest_one_rank_fails.py")]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return proc, time.monotonic() - t0


def test_a_failure_on_one_rank_fails_the_test_on_every_rank():
    proc, _ = _selftest("verdict", timeout=120)
    assert proc.returncode != 0
    out = proc.stdout
    # both ranks report the failed test; the next test runs and passes on both
    assert out.count("FAILED") >= 2 and "failed on rank(s) 1" in out, out[-3000:]
    assert out.count("1 failed, 1 passed") == 2, out[-3000:]


def test_a_failure_while_the_other_rank_waits_in_a_collective_ends_the_job_in_seconds():
    proc, seconds = _selftest("stuck", timeout=120)
    assert proc.returncode != 0
    assert "did not reach the verdict" in proc.stderr and "rank 1 failed before the collective" in proc.stderr
    assert seconds < 60, seconds                     # VERDICT_SECONDS (10 s) plus start-up, never a 300 s timeout
