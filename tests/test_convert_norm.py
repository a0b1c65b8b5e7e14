"""convert-norm is idempotent per tile: a conversion stopped at any step, or SIGKILLed, is refused by
every reader with the command that finishes it, and that command gives the uninterrupted bytes."""
import os
import shutil
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
from conftest import PYTHON, run_cli
from mpi4py import MPI

from cubefit_mpi.config.errors import InputError
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.solvers.gram import load_solve_inputs
from cubefit_mpi.stages import convert_norm as cn
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.mock import make_mock

SELF = MPI.COMM_SELF


def _models(path):
    with h5py.File(path, "r") as f:
        return f["/HyperCube/models"][...], f["/HyperCube/col_energy"][...], dict(f["/HyperCube"].attrs)


@pytest.fixture(scope="module")
def data_norm_cube(tmp_path_factory):
    """A cube built with norm=data in 12 S-tiles, and the same cube converted to model without a stop."""
    d = tmp_path_factory.mktemp("convert")
    path, ref = d / "cube.h5", d / "ref.h5"
    make_mock(str(path), MockSpec(spaxels=24, components=2, populations=5, wavelengths=90, seed=4, snr=40,
                                  masked_pixels=4), SELF)
    build_hypercube(str(path), norm_mode="data", S_chunk=2, comm=SELF)
    shutil.copy(path, ref)
    cn.convert_hypercube_norm(str(ref), "model", comm=SELF)
    return path, ref


def test_a_stop_at_every_flush_resumes_to_the_uninterrupted_bytes(data_norm_cube, tmp_path, monkeypatch):
    src, ref = data_norm_cube
    ref_models, ref_energy, _ = _models(ref)
    real_flush = h5py.File.flush

    class Stop(Exception):
        pass

    total = None
    stop_at = 1
    while total is None or stop_at <= total:
        path = tmp_path / f"stop{stop_at}.h5"
        shutil.copy(src, path)
        calls = []

        def flush(self):
            calls.append(1)
            if len(calls) == stop_at:
                raise Stop()
            return real_flush(self)

        monkeypatch.setattr(h5py.File, "flush", flush)
        try:
            cn.convert_hypercube_norm(str(path), "model", comm=SELF)
            total = len(calls)                    # this stop point is past the conversion's last flush
        except Stop:
            pass
        monkeypatch.setattr(h5py.File, "flush", real_flush)
        with h5py.File(path, "r") as f:
            converting = f["/HyperCube"].attrs.get("norm.converting_to")
        if converting:
            with pytest.raises(InputError, match=r"convert-norm .* --to model"):
                load_solve_inputs(str(path), use_weights=False, comm=SELF)
        out = cn.convert_hypercube_norm(str(path), "model", comm=SELF)
        models, energy, attrs = _models(path)
        assert models.tobytes() == ref_models.tobytes(), f"stopped at flush {stop_at}"
        np.testing.assert_allclose(energy, ref_energy, rtol=1e-12)
        assert attrs["norm.mode"] == "model" and "norm.converting_to" not in attrs
        with h5py.File(path, "r") as f:
            assert not any(name in f for name in cn.JOURNAL)
        if converting:
            assert out["converted"]
        stop_at += 1
    assert total > 12 * 4                         # four journal flushes per tile were exercised


def test_conversion_to_the_other_mode_while_one_is_unfinished_is_refused(data_norm_cube, tmp_path):
    src, _ = data_norm_cube
    path = tmp_path / "half.h5"
    shutil.copy(src, path)
    with h5py.File(path, "r+") as f:
        f["/HyperCube"].attrs["norm.converting_to"] = "model"
    before = path.read_bytes()
    with pytest.raises(InputError, match=r"interrupted conversion to norm 'model' must be finished first"):
        cn.convert_hypercube_norm(str(path), "data", comm=SELF)
    with pytest.raises(InputError, match=r"convert-norm .* --to model"):
        build_hypercube(str(path), norm_mode="data", S_chunk=2, comm=SELF)
    assert path.read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("ranks, kill_after", [(1, 3), (2, 5), (2, 11)])
def test_sigkill_then_every_reader_refuses_and_the_rerun_finishes(tmp_path, ranks, kill_after):
    path, ref = tmp_path / "k.h5", tmp_path / "ref.h5"
    assert run_cli("mock", path, "--spaxels", 160, "--components", 2, "--populations", 12, "--wavelengths", 300,
                   "--seed", 5, "--noise", 50).returncode == 0
    assert run_cli("build", path, "--norm", "data", "--chunks", "2,2,12").returncode == 0
    shutil.copy(path, ref)
    assert run_cli("convert-norm", ref, "--to", "model").returncode == 0
    cmd = [PYTHON, "-m", "mpi4py", "-m", "cubefit_mpi", "convert-norm", str(path), "--to", "model"]
    if ranks > 1:
        cmd = ["mpiexec", "-n", str(ranks), *cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPIR_", "HYDRA"))}
    env["CUBEFIT_LOG_LEVEL"] = "DEBUG"
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    killed, t0 = False, time.time()
    for line in proc.stderr:
        if "convert round:" in line and int(line.split("convert round:")[1].split("/")[0]) >= kill_after:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        assert time.time() - t0 < 120
    proc.wait(timeout=30)
    assert killed, "the conversion finished before it could be killed"
    before = path.read_bytes()
    for args in (["solve"], ["recon"], ["solve", "--method", "kaczmarz", "--epochs", "1"]):
        res = run_cli(args[0], path, *args[1:])
        assert res.returncode == 2, res.stderr
        lines = [ln for ln in res.stderr.strip().splitlines() if "broke the stale lock" not in ln]   # the kill's lock
        assert f"convert-norm {path} --to model" in res.stderr and len(lines) == 1, res.stderr
    assert path.read_bytes() == before
    res = run_cli("convert-norm", path, "--to", "model", np_ranks=ranks if ranks > 1 else None)
    assert res.returncode == 0, res.stderr
    a, ea, attrs = _models(path)
    b, eb, _ = _models(ref)
    assert a.tobytes() == b.tobytes()
    np.testing.assert_allclose(ea, eb, rtol=1e-12)
    assert attrs["norm.mode"] == "model"
    assert run_cli("solve", path).returncode == 0


def test_a_compressed_cube_is_refused_with_the_commands_that_convert_it(data_norm_cube, tmp_path):
    """Rewriting compressed chunks in place is not crash-safe (HDF5 moves them: metadata changes),
    so convert-norm refuses a gzip cube, file unchanged; the commands it names do the conversion."""
    src, ref = data_norm_cube
    path = tmp_path / "gz.h5"
    shutil.copy(src, path)
    assert run_cli("recompress", path, "--compression", "gzip:4").returncode == 0
    before = path.read_bytes()
    res = run_cli("convert-norm", path, "--to", "model")
    lines = [ln for ln in res.stderr.strip().splitlines() if " INFO " not in ln]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "compressed (gzip:4)" in lines[0] and f"recompress {path} --compression none" in lines[0]
    assert path.read_bytes() == before
    for args in (("recompress", path, "--compression", "none"), ("convert-norm", path, "--to", "model"),
                 ("recompress", path, "--compression", "gzip:4")):
        assert run_cli(*args).returncode == 0
    assert np.array_equal(_models(path)[0], _models(ref)[0])
