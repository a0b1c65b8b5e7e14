"""The hypercube builder and its utilities (serial; the parallel paths are in tests/mpi)."""
import os
import shutil
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
from conftest import PYTHON, file_bytes, run_cli, small_tmpfs
from mpi4py import MPI

from cubefit_mpi import H5Dims, H5Manager, InputError
from cubefit_mpi.io.datasets import default_chunks
from cubefit_mpi.numerics.constants import SPEED_OF_LIGHT_KMS
from cubefit_mpi.numerics.convolve import convolve_direct
from cubefit_mpi.numerics.kernels import interpolation_matrix, losvd_amplitude, shift_to_velocity, unit_kernels
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.convert_norm import convert_hypercube_norm
from cubefit_mpi.stages.hypercube_maintenance import invalidate_tiles, recompress, recompute_col_energy

SELF = MPI.COMM_SELF


@pytest.fixture
def built(small_mock, tmp_path):
    path = tmp_path / "built.h5"
    shutil.copy(small_mock, path)
    build_hypercube(str(path), S_chunk=8, comm=SELF)
    return path


def read(path, *names):
    with h5py.File(path, "r") as f:
        return [np.asarray(f[n][...]) for n in names]


def test_models_equal_independent_direct_path_and_reproduce_data(built):
    models, tem, vel, templates, R, losvd, x_true, data, mask = read(
        built, "/HyperCube/models", "/TemPix", "/VelPix", "/Templates", "/R_T", "/LOSVD", "/Truth/x", "/DataCube", "/Mask")
    M, shifts = interpolation_matrix(vel, tem[1] - tem[0])
    kernels, _ = unit_kernels(losvd, M)
    amp = losvd_amplitude(losvd, vel, "sum")
    for s in (0, 17, 59):
        for c in range(models.shape[1]):
            direct = amp[s, c] * (convolve_direct(templates, kernels[s, c], shifts) @ R)
            np.testing.assert_allclose(models[s, c], direct, rtol=1e-5, atol=1e-6 * np.abs(direct).max())
    recon = np.einsum("scpl,cp->sl", models.astype(np.float64), x_true)
    rel = np.abs(recon[:, mask] - data[:, mask]).max() / np.abs(data[:, mask]).max()
    assert rel < 1e-5
    with h5py.File(built) as f:
        assert f["/HyperCube"].attrs["complete"] and f["/HyperCube"].attrs["norm.mode"] == "model"
        np.testing.assert_allclose(f["/HyperCube/norm/losvd_amp"][...], amp)
        np.testing.assert_allclose(f["/HyperCube/norm/losvd_amp_sum"][...], amp.sum(1))
        energy = np.einsum("scpl,scpl->cp", *(2 * [models[..., mask].astype(np.float64)]))
        np.testing.assert_allclose(f["/HyperCube/col_energy"][...], energy, rtol=1e-10)


def _delta_file(path, velocities_px, amp=2.0):
    """A 1-template file whose LOSVDs are deltas at whole-pixel velocities; identical grids (R = I)."""
    dln = 40.0 / SPEED_OF_LIGHT_KMS
    tem = np.log(5000.0) + dln * np.arange(400)
    obs = tem.copy()[60:340]
    vel = shift_to_velocity(np.arange(-10, 11), dln)
    S = len(velocities_px)
    losvd = np.zeros((S, vel.size, 1))
    for s, k in enumerate(velocities_px):
        losvd[s, k + 10, 0] = amp
    rng = np.random.default_rng(0)
    templates = 1.0 + 0.5 * rng.uniform(size=(1, tem.size))
    mgr = H5Manager(path, tem_pix=tem, obs_pix=obs, comm=SELF)
    mgr.init_base(H5Dims(nSpat=S, nLSpec=obs.size, nTSpec=tem.size, nVel=vel.size, nComp=1, nPop=1))
    mgr.populate_from_arrays(losvd=losvd, templates=templates, vel_pix=vel, datacube=np.ones((S, obs.size)))
    mgr.ensure_rebin_and_resample()
    return templates[0]


def test_delta_losvd_gives_shifted_rebinned_template(tmp_path):
    path = tmp_path / "delta.h5"
    shifts = [0, 3, -5]
    template = _delta_file(path, shifts)
    build_hypercube(str(path), comm=SELF)
    (models,) = read(path, "/HyperCube/models")
    for s, k in enumerate(shifts):
        expected = 2.0 * np.roll(template, k)[60:340]          # obs = tem[60:340], redward for k > 0
        np.testing.assert_allclose(models[s, 0, 0], expected, rtol=2e-7)
    # area: the unit-area kernel keeps the total flux (away from the edges)
    np.testing.assert_allclose(models[1, 0, 0].sum(), 2.0 * template[57:337].sum(), rtol=1e-6)


def test_chunks_and_compression_do_not_change_bytes(small_mock, tmp_path):
    paths = []
    for i, (chunks, comp) in enumerate((((8, 1, 6), None), ((60, 2, 6), "gzip:1"), ((7, 2, 3), "lzf"))):
        p = tmp_path / f"c{i}.h5"
        shutil.copy(small_mock, p)
        build_hypercube(str(p), S_chunk=chunks[0], C_chunk=chunks[1], P_chunk=chunks[2], compression=comp, comm=SELF)
        paths.append(p)
    ref = read(paths[0], "/HyperCube/models")[0]
    for p in paths[1:]:
        assert read(p, "/HyperCube/models")[0].tobytes() == ref.tobytes()
    with h5py.File(paths[2]) as f:
        assert f["/HyperCube/models"].chunks == (7, 2, 3, 120) and f["/HyperCube/_done"].shape == (9, 1, 2)


@pytest.mark.parametrize("method", ["gemm", "fft"])
def test_either_fill_method_gives_the_same_bytes_at_any_chunk_shape(small_mock, tmp_path, monkeypatch, method):
    monkeypatch.setenv("CUBEFIT_BUILD_METHOD", method)
    paths = []
    for i, chunks in enumerate(((8, 1, 6), (60, 2, 6), (7, 2, 3))):
        p = tmp_path / f"{method}{i}.h5"
        shutil.copy(small_mock, p)
        build_hypercube(str(p), S_chunk=chunks[0], C_chunk=chunks[1], P_chunk=chunks[2], comm=SELF)
        paths.append(p)
        with h5py.File(p) as f:
            assert f["/HyperCube"].attrs["build.method"] == method
    ref = read(paths[0], "/HyperCube/models")[0]
    for p in paths[1:]:
        assert read(p, "/HyperCube/models")[0].tobytes() == ref.tobytes()


def test_gemm_and_fft_agree_to_float32_and_a_resume_keeps_its_method(small_mock, tmp_path, monkeypatch):
    a, b = tmp_path / "gemm.h5", tmp_path / "fft.h5"
    for path, method in ((a, "gemm"), (b, "fft")):
        shutil.copy(small_mock, path)
        monkeypatch.setenv("CUBEFIT_BUILD_METHOD", method)
        build_hypercube(str(path), S_chunk=8, comm=SELF)
    ma, mb = read(a, "/HyperCube/models")[0], read(b, "/HyperCube/models")[0]
    np.testing.assert_allclose(ma, mb, rtol=0, atol=3e-7 * np.abs(mb).max())
    monkeypatch.setenv("CUBEFIT_BUILD_METHOD", "auto")
    invalidate_tiles(str(b), "0:16", comm=SELF)
    assert build_hypercube(str(b), comm=SELF)["units_built"] == 2          # resumed with fft, not gemm
    assert read(b, "/HyperCube/models")[0].tobytes() == mb.tobytes()
    with h5py.File(a, "r+") as f:
        t = f["/Templates"][...]
        t[0, t.shape[1] // 2] = -1.0
        f["/Templates"][...] = t
    monkeypatch.setenv("CUBEFIT_BUILD_METHOD", "gemm")
    with pytest.raises(InputError, match="CUBEFIT_BUILD_METHOD=gemm: /Templates has negative values"):
        build_hypercube(str(a), force=True, comm=SELF)


def test_data_norm_and_convert_roundtrip(small_mock, tmp_path):
    model_path, data_path = tmp_path / "m.h5", tmp_path / "d.h5"
    for p, norm in ((model_path, "model"), (data_path, "data")):
        shutil.copy(small_mock, p)
        build_hypercube(str(p), norm_mode=norm, S_chunk=16, comm=SELF)
    A_model, amp_sum = read(model_path, "/HyperCube/models", "/HyperCube/norm/losvd_amp_sum")
    A_data, flux, data, mask = read(data_path, "/HyperCube/models", "/HyperCube/data_flux", "/DataCube", "/Mask")
    np.testing.assert_allclose(flux, np.nanmean(np.where(mask, data, np.nan), axis=1), rtol=1e-12)
    factor = (flux / amp_sum)[:, None, None, None]
    np.testing.assert_allclose(A_data, A_model * factor, rtol=2e-6, atol=1e-30)
    convert_hypercube_norm(str(data_path), "model", comm=SELF)
    A_back, energy = read(data_path, "/HyperCube/models", "/HyperCube/col_energy")
    np.testing.assert_allclose(A_back, A_model, rtol=3e-7, atol=0)
    ref_energy = read(model_path, "/HyperCube/col_energy")[0]
    np.testing.assert_allclose(energy, ref_energy, rtol=1e-6)
    convert_hypercube_norm(str(data_path), "data", comm=SELF)
    np.testing.assert_allclose(read(data_path, "/HyperCube/models")[0], A_data, rtol=5e-7, atol=0)
    with h5py.File(data_path) as f:
        assert f["/HyperCube"].attrs["norm.mode"] == "data" and "norm.converting_to" not in f["/HyperCube"].attrs


def test_invalidate_rebuilds_exactly_those_tiles(built):
    before = read(built, "/HyperCube/models")[0]
    reset = invalidate_tiles(str(built), "10:20", comm=SELF)
    assert reset == 2 * 1                                      # S-tiles [8,16) and [16,24), one C-tile
    with h5py.File(built, "r+") as f:                          # scribble on those tiles: the rebuild must redo them
        f["/HyperCube/models"][8:24] = -1
        assert not f["/HyperCube"].attrs["complete"]
    out = build_hypercube(str(built), comm=SELF)
    assert (out["units_built"], out["units_skipped"]) == (2, 6)
    assert read(built, "/HyperCube/models")[0].tobytes() == before.tobytes()


def test_recompress_and_energy(built):
    before, energy = read(built, "/HyperCube/models", "/HyperCube/col_energy")
    recompress(str(built), "gzip:2", comm=SELF)
    with h5py.File(built) as f:
        assert f["/HyperCube/models"].compression == "gzip" and "/HyperCube/models__recompress" not in f
        assert np.array_equal(f["/HyperCube/models"][...], before)
    np.testing.assert_allclose(recompute_col_energy(str(built), comm=SELF), energy, rtol=1e-12)
    w = np.linspace(0.1, 1.0, before.shape[3])
    with h5py.File(built, "r+") as f:
        f["/HyperCube/lambda_weights"] = w
        mask = f["/Mask"][...]
    weighted = recompute_col_energy(str(built), weighted=True, comm=SELF)
    a = before[..., mask].astype(np.float64)
    np.testing.assert_allclose(weighted, np.einsum("scpl,scpl,l->cp", a, a, w[mask]), rtol=1e-10)


def test_complete_build_is_a_noop_and_other_params_refused(built):
    out = build_hypercube(str(built), comm=SELF)
    assert out["units_built"] == 0
    with pytest.raises(InputError, match="exists with other parameters .*norm.mode"):
        build_hypercube(str(built), norm_mode="data", comm=SELF)


def test_default_chunks_bounded():
    s, c, p = default_chunks(3000, 200, 360, 1200)
    assert p == 360 and s * c * p * 1200 * 4 <= 8 * 2**20 and s >= 1
    assert default_chunks(10, 2, 5, 100) == (10, 2, 5)


# --------------------------------------------------------------------------------------------
# bad input: clear one-line error, exit 2, file unchanged
# --------------------------------------------------------------------------------------------
BAD = [
    ("templates_nan_no_rt", lambda f: (f["/Templates"].__setitem__((0, 5), np.nan), f.__delitem__("/R_T")),
     ["build"], r"/Templates: contains NaN/Inf"),
    ("templates_nan", lambda f: f["/Templates"].__setitem__((0, 5), np.nan), ["build"],
     r"/Templates: contains NaN/Inf"),
    ("data_norm_no_data", lambda f: f.__delitem__("/DataCube"), ["build", "--norm", "data"],
     "/DataCube: dataset missing"),
    ("bad_norm", lambda f: None, ["build", "--norm", "flux"], "--norm flux: expected one of model, data"),
    ("bad_chunks", lambda f: None, ["build", "--chunks", "4,4"], "--chunks 4,4: expected three integers"),
    ("bad_compression", lambda f: None, ["build", "--compression", "zstd"], "--compression zstd"),
]


@pytest.mark.parametrize("name,mutate,args,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input(small_mock, tmp_path, name, mutate, args, message):
    path = tmp_path / "bad.h5"
    shutil.copy(small_mock, path)
    with h5py.File(path, "r+") as f:
        mutate(f)
    before = file_bytes(path)
    res = run_cli(args[0], path, *args[1:])
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and message.split(":")[0] in res.stderr, res.stderr
    import re
    assert re.search(message, res.stderr), res.stderr
    assert file_bytes(path) == before


def test_build_makes_a_missing_rebin_operator(small_mock, tmp_path):
    ref, path = tmp_path / "ref.h5", tmp_path / "no_rt.h5"
    shutil.copy(small_mock, ref)
    shutil.copy(small_mock, path)
    with h5py.File(path, "r+") as f:
        del f["/R_T"]
    res = run_cli("build", path, "--chunks", "8,2,6")
    assert res.returncode == 0, res.stderr
    assert "wrote /R_T" in res.stderr and "overlap rebinning" in res.stderr
    assert run_cli("build", ref, "--chunks", "8,2,6").returncode == 0
    with h5py.File(path, "r") as f, h5py.File(ref, "r") as g:
        assert f["/R_T"].attrs["rebin.mode"] == "overlap"
        np.testing.assert_array_equal(f["/R_T"][...], g["/R_T"][...])
        np.testing.assert_array_equal(f["/HyperCube/models"][...], g["/HyperCube/models"][...])


def test_zero_kernel_with_amplitude_is_an_error(tmp_path):
    path = tmp_path / "z.h5"
    _delta_file(path, [0, 1])
    with h5py.File(path, "r+") as f:
        vel = f["/VelPix"][...]
        # LOSVD non-zero only at a velocity far from every whole-pixel velocity: interpolation gives 0
        fine_vel = np.linspace(vel[0], vel[-1], 201)
        del f["/VelPix"], f["/LOSVD"]
        f["/VelPix"] = fine_vel
        losvd = np.zeros((2, 201, 1))
        losvd[0, 100, 0] = 1.0
        losvd[1, 103, 0] = 1.0          # between pixel velocities
        f["/LOSVD"] = losvd
        f.attrs["dims"] = [2, 280, 400, 201, 1, 1]
    before = file_bytes(path)
    res = run_cli("build", path)
    assert res.returncode == 2
    assert "/LOSVD: row [1, :, 0] gives an all-zero kernel" in res.stderr
    assert file_bytes(path) == before


def test_file_locked_elsewhere(built):
    holder = subprocess.Popen([PYTHON, "-c", f"import h5py, time; f = h5py.File({str(built)!r}, 'r+'); "
                               "print('open', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "HDF5_USE_FILE_LOCKING": "TRUE"})
    try:
        assert holder.stdout.readline().strip() == "open"
        res = run_cli("build", built, "--force", env={"HDF5_USE_FILE_LOCKING": "TRUE"})
        assert res.returncode == 2
        assert "locked or open for writing elsewhere" in res.stderr
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_disk_full_keeps_finished_tiles_and_resumes(tmp_path):
    """A real full disk (a small tmpfs): clear error, finished tiles valid, the resume completes."""
    src, ref = tmp_path / "src.h5", tmp_path / "ref.h5"
    res = run_cli("mock", src, "--spaxels", 200, "--populations", 12, "--wavelengths", 300, "--seed", 8)
    assert res.returncode == 0, res.stderr
    shutil.copy(src, ref)
    build_hypercube(str(ref), S_chunk=4, C_chunk=3, comm=SELF)
    size_kb = os.path.getsize(src) // 1024 + 4096            # room for about half of the 8.6 MB hypercube
    with small_tmpfs(size_kb) as mnt:
        shutil.copy(src, mnt / "full.h5")
        res = run_cli("build", mnt / "full.h5", "--chunks", "4,3,12", env={"CUBEFIT_BUILD_CHECKPOINT_SEC": "0"})
        assert res.returncode == 1, res.stderr
        errors = [ln for ln in res.stderr.strip().splitlines() if " INFO " not in ln]
        assert len(errors) == 1 and "is the disk full?" in errors[0] and "rerun `cubefit_mpi build" in errors[0]
        subprocess.run(["cp", "--sparse=always", str(mnt / "full.h5"), str(tmp_path / "full.h5")], check=True)
    path = tmp_path / "full.h5"
    with h5py.File(path) as f:
        done = f["/HyperCube/_done"][...].astype(bool)
        models = f["/HyperCube/models"][...]
    assert 0 < done.sum() < done.size
    ref_models = read(ref, "/HyperCube/models")[0]
    for s_tile in np.flatnonzero(done.all(axis=(1, 2))):
        assert np.array_equal(models[4 * s_tile:4 * s_tile + 4], ref_models[4 * s_tile:4 * s_tile + 4])
    out = build_hypercube(str(path), comm=SELF)
    assert out["units_skipped"] == done.all(axis=(1, 2)).sum() and out["complete"]
    assert read(path, "/HyperCube/models")[0].tobytes() == ref_models.tobytes()
    np.testing.assert_allclose(read(path, "/HyperCube/col_energy")[0], read(ref, "/HyperCube/col_energy")[0],
                               rtol=1e-12)


@pytest.mark.slow
def test_sigkill_of_mpiexec_build_then_resume(tmp_path):
    """A real SIGKILL of a running `mpiexec -n 2` build; the resumed build equals an uninterrupted one."""
    path, ref = tmp_path / "k.h5", tmp_path / "ref.h5"
    res = run_cli("mock", path, "--spaxels", 400, "--populations", 24, "--wavelengths", 500, "--seed", 2)
    assert res.returncode == 0, res.stderr
    shutil.copy(path, ref)
    cmd = ["mpiexec", "-n", "2", PYTHON, "-m", "mpi4py", "-m", "cubefit_mpi", "build", str(path), "--chunks", "2,1,24"]
    env = {**os.environ, "CUBEFIT_LOG_LEVEL": "DEBUG", "CUBEFIT_BUILD_CHECKPOINT_SEC": "0"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    killed_at = None
    t0 = time.time()
    for line in proc.stderr:
        if "build round:" in line:
            n_done = int(line.split("build round:")[1].split("/")[0])
            if n_done >= 40:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = n_done
                break
        assert time.time() - t0 < 120
    proc.wait(timeout=30)
    assert killed_at is not None, "the build finished before it could be killed"
    res = run_cli("build", path, np_ranks=2)
    assert res.returncode == 0, res.stderr
    assert "already done" in res.stdout
    skipped = int(res.stdout.split("units built, ")[1].split(" already")[0])
    assert 40 <= skipped < 600
    res = run_cli("build", ref, "--chunks", "2,1,24", np_ranks=2)
    assert res.returncode == 0
    a, ea = read(path, "/HyperCube/models", "/HyperCube/col_energy")
    b, eb = read(ref, "/HyperCube/models", "/HyperCube/col_energy")
    assert a.tobytes() == b.tobytes()
    np.testing.assert_allclose(ea, eb, rtol=1e-12)


def test_checkpoint_interval_delays_done_bits(small_mock, tmp_path, monkeypatch):
    """With a long checkpoint interval the done bits are written once, at the end, all together."""
    path = tmp_path / "c.h5"
    shutil.copy(small_mock, path)
    monkeypatch.setenv("CUBEFIT_BUILD_CHECKPOINT_SEC", "3600")
    import cubefit_mpi.stages.build as hb
    calls = []
    real = hb.write_block
    monkeypatch.setattr(hb, "write_block", lambda d, o, b: (calls.append(d.name), real(d, o, b)))
    out = build_hypercube(str(path), S_chunk=6, comm=SELF)
    assert out["units_built"] == 10 and out["complete"]
    assert calls.count("/HyperCube/_done") == 1 and calls.count("/HyperCube/models") == 10
