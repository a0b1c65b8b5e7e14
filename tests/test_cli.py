import subprocess
import sys

from conftest import PYTHON, run_cli


def test_help_and_import_do_not_start_mpi():
    code = ("import sys, cubefit_mpi, cubefit_mpi.cli.main as c; c.build_parser(); "
            "import cubefit_mpi.io.h5file, cubefit_mpi.parallel.comm; "
            "print('mpi4py.MPI' in sys.modules)")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    res = subprocess.run([PYTHON, "-m", "cubefit_mpi", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "mock" in res.stdout and "status" in res.stdout


def test_info_reports_stack_without_mpi():
    res = subprocess.run([PYTHON, "-m", "cubefit_mpi", "info"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "MPICH" in res.stdout and "MPI build: True" in res.stdout
    assert "MPI initialised: no" in res.stdout and "pyFFTW" in res.stdout


def test_usage_errors_exit_2_with_one_line():
    res = subprocess.run([PYTHON, "-m", "cubefit_mpi", "mock"], capture_output=True, text=True)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "file" in res.stderr
    res = run_cli("status", "/nonexistent/x.h5")
    assert res.returncode == 2
    assert res.stderr.strip() == "cubefit_mpi status: error: /nonexistent/x.h5: no such file"


def test_bad_knob_exits_2_naming_it(small_mock):
    res = run_cli("status", small_mock, env={"CUBEFIT_BT_STEPS": "x"})
    assert res.returncode == 2 and "CUBEFIT_BT_STEPS='x'" in res.stderr


def test_mock_then_status(tmp_path):
    path = tmp_path / "g.h5"
    res = run_cli("mock", path, "--spaxels", 20, "--populations", 4, "--wavelengths", 100, "--noise", 40)
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and "S=20" in res.stdout
    res = run_cli("status", path)
    assert res.returncode == 0
    assert "S=20 L=100" in res.stdout and "mock galaxy (synthetic templates)" in res.stdout


def test_bad_mock_option_exit_2(tmp_path):
    res = run_cli("mock", tmp_path / "g.h5", "--spaxels", 0)
    assert res.returncode == 2 and "--spaxels: expected a positive integer" in res.stderr
    assert not (tmp_path / "g.h5").exists()


def test_console_script_installed():
    import shutil
    exe = shutil.which("cubefit-mpi", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe is not None
    res = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and "cubefit_mpi" in res.stdout
