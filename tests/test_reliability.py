"""Nothing lost, ever (issue 17): staged writes, the free-space check and reservation, the one-writer
lock, one failing rank, content digests in `run`, ingest's WCS and existing output, and the
exit-code list.  The slow cases (a real full disk in every stage at 1 and 2 ranks, an exception on
each rank of every stage at 2 and 3 ranks) are marked slow; benchmarks/faults.py runs them all."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import PYTHON, ROOT, fill_disk, run_cli, run_group, small_tmpfs
from mpi4py import MPI

from cubefit_mpi.config.errors import InputError, WriteFailure
from cubefit_mpi.io import lock as lk
from cubefit_mpi.io import space
from cubefit_mpi.io.datasets import (COMMIT_ATTR, SPARE_SUFFIX, STAGED_SUFFIX, recover_swap, staged_bytes,
                                     staged_datasets, write_small)
from cubefit_mpi.io.h5file import is_write_error, open_h5, write_reason
from cubefit_mpi.parallel.failure import FailureAgreement

SELF = MPI.COMM_SELF
INJECT = ROOT / "benchmarks" / "fault_inject.py"
MOCK = ("--spaxels", 60, "--populations", 6, "--wavelengths", 120, "--seed", 3)


def contents(path) -> dict:
    """sha256 of every dataset's bytes and attributes, and of every group's attributes."""
    import hashlib

    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            h = hashlib.sha256(json.dumps({k: repr(np.asarray(v).tolist()) for k, v in obj.attrs.items()},
                                          sort_keys=True).encode())
            if isinstance(obj, h5py.Dataset):
                h.update(np.ascontiguousarray(obj[()]).tobytes())
            if not name.endswith(("__new", "__spare", "__old", "__recompress")):
                out[name] = h.hexdigest()
        f.visititems(visit)
        out["/"] = json.dumps({k: repr(v) for k, v in f.attrs.items()}, sort_keys=True)
    return out


def inject_cli(*args, ranks=None, env=None, timeout=120):
    """``cubefit_mpi ARGS`` through benchmarks/fault_inject.py (FAULT_* in ``env``)."""
    cmd = [PYTHON, "-m", "mpi4py", str(INJECT), *map(str, args)]
    if ranks is not None:
        cmd = ["mpiexec", "-n", str(ranks), *cmd]
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPIR_", "HYDRA", "FAULT_"))}
    full.update(env or {})
    return run_group(cmd, env=full, timeout=timeout)


def errors_of(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("cubefit_mpi ") and "error:" in ln]


@pytest.fixture(scope="module")
def solved(tmp_path_factory):
    """A small cube, built, weighted, solved and reconstructed (through the command line)."""
    path = tmp_path_factory.mktemp("solved") / "galaxy.h5"
    for args in (("mock", path, *MOCK), ("build", path), ("weights", path), ("solve", path), ("recon", path)):
        res = run_cli(*args)
        assert res.returncode == 0, res.stderr
    return path


@pytest.fixture
def cube(solved, tmp_path):
    path = tmp_path / "galaxy.h5"
    shutil.copy(solved, path)
    return path


# ---------------------------------------------------------------------------------------------
# staged writes
# ---------------------------------------------------------------------------------------------
def test_staged_write_swaps_only_when_complete(tmp_path):
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f["/a"] = np.arange(5.0)
    with open_h5(path, "r+", SELF) as f:
        with pytest.raises(RuntimeError):
            with staged_datasets(f, [("/a", (5,), "f8")], SELF) as staged:
                staged["/a"][...] = -1.0
                raise RuntimeError("a failure half-way")
        assert np.array_equal(f["/a"][...], np.arange(5.0))          # the old version untouched
        assert "/a" + STAGED_SUFFIX in f
        with staged_datasets(f, [("/a", (5,), "f8")], SELF) as staged:
            staged["/a"][...] = 7.0
            staged["/a"].attrs["made"] = "now"
            assert np.array_equal(f["/a"][...], np.arange(5.0))      # still the old one inside the block
        assert np.all(f["/a"][...] == 7.0) and f["/a"].attrs["made"] == "now"
        assert "/a" + STAGED_SUFFIX not in f and COMMIT_ATTR not in f.attrs


def test_a_kill_after_the_commit_record_rolls_forward(tmp_path):
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:                # the state a kill between two renames leaves
        f["/x"] = np.zeros(3)
        f["/x" + STAGED_SUFFIX] = np.ones(3)
        f["/y__old"] = np.full(2, 5.0)              # y: old version moved aside, new one not yet renamed
        f["/y" + STAGED_SUFFIX] = np.full(2, 6.0)
        f.attrs[COMMIT_ATTR] = json.dumps(["/x", "/y"])
        f["/z"] = np.zeros(1)                       # z: an unfinished write (no record): discarded
        f["/z" + STAGED_SUFFIX] = np.ones(1)
    with open_h5(path, "r+", SELF) as f:
        recover_swap(f, "/z")
        assert np.all(f["/x"][...] == 1) and np.all(f["/y"][...] == 6) and np.all(f["/z"][...] == 0)
        assert COMMIT_ATTR not in f.attrs and "/y__old" not in f and "/z" + STAGED_SUFFIX not in f


def test_rewrites_reuse_the_previous_copy(tmp_path):
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f["/big"] = np.zeros((200, 100))
    sizes = []
    for value in range(4):
        with open_h5(path, "r+", SELF) as f:
            need = staged_bytes(f, [("/big", (200, 100), "f8")])
            write_small(f, [("/big", np.full((200, 100), float(value)), {"v": value})], SELF)
        sizes.append((os.path.getsize(path), need))
    assert sizes[0][1] == 200 * 100 * 8 and all(need == 0 for _, need in sizes[1:])
    assert sizes[-1][0] - sizes[1][0] < 200 * 100 * 8 // 4          # bounded: two copies at most
    with h5py.File(path, "r") as f:
        assert np.all(f["/big"][...] == 3.0) and "/big" + SPARE_SUFFIX in f


# ---------------------------------------------------------------------------------------------
# free space
# ---------------------------------------------------------------------------------------------
def test_free_space_check_names_both_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(space, "free_bytes", lambda path: 3 * 2**20)
    with pytest.raises(InputError) as err:
        space.require_free_space(tmp_path / "f.h5", 2**20, "recon of /ReconCube", SELF)
    text = str(err.value)
    assert "recon of /ReconCube needs 5.0 MiB" in text and "has 3.0 MiB free" in text and "\n" not in text
    monkeypatch.setenv("CUBEFIT_SPACE_CHECK", "0")
    space.require_free_space(tmp_path / "f.h5", 2**20, "recon", SELF)


def test_reservation_failure_comes_before_the_flush_and_no_fallocate_writes_zeros(tmp_path, monkeypatch):
    path = tmp_path / "r.h5"
    with h5py.File(path, "w") as f:
        f["/a"] = np.zeros(10)

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    with open_h5(path, "r+", SELF) as f:
        start = space.file_size(path)
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        f.create_dataset("/b", shape=(1000,), dtype="f8", dcpl=dcpl)
        monkeypatch.setattr(os, "posix_fallocate", no_room)
        with pytest.raises(WriteFailure, match="no room for the"):
            space.reserved_flush(f, "the test", SELF, start, [f["/b"]])
        monkeypatch.delattr(os, "posix_fallocate")
        space.reserved_flush(f, "the test", SELF, start, [f["/b"]])       # emulated: zeros written
        assert space.file_size(path) >= start + 8000
        f["/b"][...] = 1.0
    with h5py.File(path, "r") as f:
        assert np.all(f["/b"][...] == 1.0)


def test_write_errors_are_recognised():
    assert is_write_error(OSError(errno.ENOSPC, "No space left on device"))
    assert is_write_error(RuntimeError("Can't decrement id ref count (file write failed: time = ...)"))
    created = ValueError("Unable to create dataset (file write failed: time = ..., errno = 28, error message = "
                         "'No space left on device', ...)")      # h5py's create of an early-allocated dataset
    assert is_write_error(created) and write_reason(created) == "No space left on device"
    assert not is_write_error(RuntimeError("an ordinary bug"))
    assert not is_write_error(ValueError("shape mismatch"))
    assert not is_write_error(OSError(errno.ENOENT, "no such file"))


# ---------------------------------------------------------------------------------------------
# one writer per file
# ---------------------------------------------------------------------------------------------
def test_lock_refuses_a_live_holder_and_breaks_a_stale_one(tmp_path, caplog):
    path = tmp_path / "c.h5"
    holder = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    try:
        record = {"pid": holder.pid, "host": lk.socket.gethostname(), "started": lk._start_time(holder.pid),
                  "command": "build", "since": "then", "token": "t"}
        Path(lk.lock_path(path)).write_text(json.dumps(record))
        with pytest.raises(InputError, match=rf"being written by PID {holder.pid} on host .* \(cubefit_mpi build"):
            with lk.write_lock(path, "solve", SELF):
                pass
        holder.kill()
        holder.wait()
        with lk.write_lock(path, "solve", SELF):                 # the holder is gone: broken, with a warning
            assert json.loads(Path(lk.lock_path(path)).read_text())["pid"] == os.getpid()
            with lk.write_lock(path, "run step", SELF):           # re-entrant within the process
                pass
            assert os.path.exists(lk.lock_path(path))
        assert not os.path.exists(lk.lock_path(path))
        assert "broke the stale lock" in caplog.text
    finally:
        holder.kill()


def test_lock_of_another_host_is_refused_and_released_after_an_error(tmp_path):
    path = tmp_path / "c.h5"
    Path(lk.lock_path(path)).write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "build"}))
    with pytest.raises(InputError, match="cannot be checked from"):
        with lk.write_lock(path, "solve", SELF):
            pass
    os.remove(lk.lock_path(path))
    with pytest.raises(ValueError):
        with lk.write_lock(path, "solve", SELF):
            raise ValueError("the command failed")
    assert not os.path.exists(lk.lock_path(path))


def test_an_empty_lock_is_refused_until_it_is_old(tmp_path):
    path = tmp_path / "c.h5"
    Path(lk.lock_path(path)).write_text("")                       # a writer killed while creating it
    with pytest.raises(InputError, match="unreadable lock"):
        with lk.write_lock(path, "solve", SELF):
            pass
    old = time.time() - 2 * lk.UNREADABLE_STALE_SEC
    os.utime(lk.lock_path(path), (old, old))
    with lk.write_lock(path, "solve", SELF):
        pass
    assert not os.path.exists(lk.lock_path(path))


@pytest.mark.parametrize("first_args, second_args", [(("recon",), ("solve",)),
                                                     (("build", "--force"), ("build", "--force"))])
def test_second_writer_refused_readers_work(cube, first_args, second_args):
    """Issue 17 case 3 (two builds at once) and any other pair: the second writer is refused."""
    before = contents(cube)
    first = subprocess.Popen([PYTHON, "-m", "mpi4py", str(INJECT), first_args[0], str(cube), *first_args[1:]],
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                             env={**os.environ, "FAULT_ACTION": "sleep", "FAULT_SLEEP": "8", "FAULT_AT": "3"})
    try:
        for line in first.stderr:
            if line.startswith("FAULT-INJECTED"):
                break
        res = run_cli(second_args[0], cube, *second_args[1:])
        assert res.returncode == 2 and len(errors_of(res.stderr)) == 1, res.stderr
        assert f"being written by PID {first.pid}" in res.stderr and f"cubefit_mpi {first_args[0]}" in res.stderr
        for reader in ("status", "validate"):
            assert run_cli(reader, cube).returncode == 0
        assert first.wait(timeout=120) == 0
    finally:
        first.kill()
    assert not os.path.exists(lk.lock_path(cube))
    after = contents(cube)                 # the first writer's result, whole: inputs untouched, models readable
    assert all(after[k] == before[k] for k in ("DataCube", "LOSVD", "Templates")) and "HyperCube/models" in after


# ---------------------------------------------------------------------------------------------
# one failing rank
# ---------------------------------------------------------------------------------------------
def test_failure_agreement_alone_is_immediate():
    assert FailureAgreement(SELF).all_failed(grace=0.0)


@pytest.mark.parametrize("ranks", [2, 3])
def test_exception_on_one_rank_ends_the_job(cube, ranks):
    res = inject_cli("recon", cube, ranks=ranks, timeout=60,
                     env={"FAULT_ACTION": "raise", "FAULT_RANK": str(ranks - 1), "FAULT_AT": "4"})
    assert res.returncode != 0
    assert "RuntimeError: injected fault" in res.stderr and f"[rank {ranks - 1}]" in res.stderr
    marks = [float(ln.split()[2]) for ln in res.stderr.splitlines() if ln.startswith("FAULT-INJECTED")]
    assert marks and time.time() - marks[0] < 30                       # the 10 s bound: benchmarks/faults.py
    assert run_cli("recon", cube).returncode == 0


# ---------------------------------------------------------------------------------------------
# a real full disk
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fits_inputs(tmp_path_factory):
    from ingest_fixtures import write_muse_like_inputs

    folder = tmp_path_factory.mktemp("fits")
    inputs = write_muse_like_inputs(folder)
    return ["--cube", inputs["cube"], "--templates", inputs["templates"], "--losvd", inputs["losvd"],
            "--velscale", inputs["velscale"]]


def _run_config(path: Path) -> Path:
    import yaml

    config = path.with_suffix(".yaml")
    config.write_text(yaml.safe_dump({"file": str(path), "steps": ["weights", "solve", "recon"],
                                      "weights": {"large": 31}, "solve": {"ridge": 1e-9}}))
    return config


STAGES = {   # stage -> the command line on FILE
    "recon": lambda f, fits: ["recon", f],
    "solve": lambda f, fits: ["solve", f, "--no-cache"],
    "kaczmarz": lambda f, fits: ["solve", f, "--method", "kaczmarz", "--epochs", "1"],
    "weights": lambda f, fits: ["weights", f, "--force", "--large", "31"],
    "energy": lambda f, fits: ["energy", f, "--weighted"],
    "convert-norm": lambda f, fits: ["convert-norm", f, "--to", "data"],
    "recompress": lambda f, fits: ["recompress", f, "--compression", "gzip:1"],
    "ingest": lambda f, fits: ["ingest", f, "--force", *fits],
    "mock": lambda f, fits: ["mock", f, *MOCK[:-1], 4],
    "run": lambda f, fits: ["run", _run_config(f)],
    "uncertainty": lambda f, fits: ["uncertainty", f, "--replicates", 8, "--batch", 4],
}
FAST = {("recon", 1), ("solve", 1), ("ingest", 1), ("uncertainty", 1)}
# The whole fault matrix (every stage x 1, 2 (3) ranks x both reservations) takes ~15 minutes;
# `make test` runs every stage once and the multi-rank and no-fallocate cases for solve and recon.
# FAULT_MATRIX=full runs all of it (as benchmarks/faults.py does for kills as well).
FULL_MATRIX = os.environ.get("FAULT_MATRIX") == "full"
SUITE = {("solve", 2), ("recon", 2), ("solve", 3)}


def _disk_full_case(cube, fits, tmp_path, stage, ranks, env, expected):
    with small_tmpfs(os.path.getsize(cube) // 1024 + 8192) as mnt:
        shutil.copy(cube, mnt / "g.h5")
        args = STAGES[stage](mnt / "g.h5", fits)
        before = contents(mnt / "g.h5")
        fill_disk(mnt, 8 * 1024)
        res = inject_cli(*args, ranks=ranks if ranks > 1 else None, env=env)
        if res.returncode == 0 and expected == 1:  # what the stage wrote fitted in the space left: fine too
            return
        assert res.returncode == expected, res.stderr[-3000:]
        assert len(errors_of(res.stderr)) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
        after = contents(mnt / "g.h5")
        if stage == "run" and expected == 1:      # steps that finished before the disk filled keep their results
            keep = ("X_global", "ReconCube", "HyperCube/lambda_weights", "Solve", "Pipeline", "/")
            before, after = ({k: v for k, v in d.items() if not k.startswith(keep)} for d in (before, after))
        assert after == before                                         # inputs and earlier results intact
        assert sorted(p.name for p in mnt.iterdir() if ".fit." not in p.name) == ["ballast", "g.h5", "g.yaml"][
            :2 + (stage == "run")]
        os.remove(mnt / "ballast")
        res = run_cli(*args)                                           # with room: it completes
        assert res.returncode == 0, res.stderr[-3000:]


def _params(*axes):
    import itertools

    out = []
    for values in itertools.product(*axes):
        slow = (values[0], values[1]) not in FAST
        out.append(pytest.param(*values, marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.mark.parametrize("stage, ranks", _params(list(STAGES), [1, 2]))
def test_disk_full_refused_before_writing(cube, fits_inputs, tmp_path, stage, ranks):
    _disk_full_case(cube, fits_inputs, tmp_path, stage, ranks, {}, 2)


def _matrix(*axes, keep):
    import itertools

    return [values for values in itertools.product(*axes) if FULL_MATRIX or keep(*values)]


@pytest.mark.slow
@pytest.mark.parametrize("stage, ranks, how", _matrix(list(STAGES), [1, 2], ["reserve", "no-fallocate"], keep=lambda
                         stage, ranks, how: (how == "reserve" and ranks == 1) or (stage, ranks) in SUITE
                         or (how == "no-fallocate" and (stage, ranks) == ("solve", 1))))
def test_disk_full_during_the_write_keeps_the_file(cube, fits_inputs, tmp_path, stage, ranks, how):
    env = {"CUBEFIT_SPACE_CHECK": "0", **({"FAULT_NOFALLOC": "1"} if how == "no-fallocate" else {})}
    _disk_full_case(cube, fits_inputs, tmp_path, stage, ranks, env, 1)


@pytest.mark.slow
@pytest.mark.parametrize("stage, ranks", _matrix(list(STAGES), [2, 3], keep=lambda stage, ranks: ranks == 2
                                                  or (stage, ranks) in SUITE))
def test_exception_on_each_rank_of_every_stage(cube, fits_inputs, tmp_path, stage, ranks):
    """An exception on one rank (each in turn) in the middle of the stage: the job ends within 10 s
    of it with the traceback and a non-zero exit, and the command then completes."""
    for rank in range(ranks):
        counted, path = tmp_path / f"c{rank}.h5", tmp_path / f"e{rank}.h5"
        shutil.copy(cube, counted)                 # the events of an undisturbed run, on its own copy
        shutil.copy(cube, path)
        counts = tmp_path / "counts"
        res = inject_cli(*STAGES[stage](counted, fits_inputs), ranks=ranks,
                         env={"FAULT_ACTION": "count", "FAULT_COUNT_FILE": str(counts)})
        assert res.returncode == 0, res.stderr[-2000:]
        at = max(1, int(Path(f"{counts}.{rank}").read_text()) // 2)
        args = STAGES[stage](path, fits_inputs)
        res = inject_cli(*args, ranks=ranks, timeout=90,
                         env={"FAULT_ACTION": "raise", "FAULT_RANK": str(rank), "FAULT_AT": str(at)})
        ended = time.time()
        marks = [float(ln.split()[2]) for ln in res.stderr.splitlines() if ln.startswith("FAULT-INJECTED")]
        assert res.returncode != 0 and "RuntimeError: injected fault" in res.stderr, res.stderr[-2000:]
        assert marks and ended - marks[0] < 10.0, f"rank {rank}: ended {ended - marks[0]:.1f}s after the fault"
        assert run_cli(*args, np_ranks=ranks).returncode == 0


# ---------------------------------------------------------------------------------------------
# ingest: the spectral WCS, an existing output
# ---------------------------------------------------------------------------------------------
def _edited_cube(src: str, dest: Path, edit) -> str:
    from astropy.io import fits

    with fits.open(src) as hdul:
        for ext in ("DATA", "STAT"):
            edit(hdul[ext].header)
        hdul.writeto(dest, overwrite=True)
    return str(dest)


@pytest.mark.parametrize("edit, named", [
    (lambda h: h.remove("CD3_3"), "CDELT3 (or CD3_3) missing"),
    (lambda h: h.__setitem__("CD3_3", 0.0), "CD3_3=0.0"),
    (lambda h: h.remove("CRPIX3"), "CRPIX3 missing"),
    (lambda h: h.remove("CRVAL3"), "CRVAL3 missing"),
])
def test_ingest_refuses_a_wcs_without_step_or_reference(fits_inputs, tmp_path, edit, named):
    args = list(fits_inputs)
    args[1] = _edited_cube(args[1], tmp_path / "bad.fits", edit)
    out = tmp_path / "out.h5"
    res = run_cli("ingest", out, *args)
    assert res.returncode == 2 and len(errors_of(res.stderr)) == 1 and named in res.stderr, res.stderr
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_ingest_never_replaces_a_good_output_with_a_worse_one(fits_inputs, tmp_path):
    out = tmp_path / "out.h5"
    assert run_cli("ingest", out, *fits_inputs).returncode == 0
    assert run_cli("build", out).returncode == 0
    before = out.read_bytes()
    res = run_cli("ingest", out, *fits_inputs)                        # would drop the hypercube
    assert res.returncode == 2 and "holds /HyperCube/models" in res.stderr and "--force" in res.stderr
    bad = list(fits_inputs)
    bad[1] = _edited_cube(bad[1], tmp_path / "bad.fits", lambda h: h.remove("CRPIX3"))
    truncated = tmp_path / "cut.fits"
    truncated.write_bytes(Path(fits_inputs[1]).read_bytes()[:-5000])
    cut = list(fits_inputs)
    cut[1] = str(truncated)
    for args in (bad, cut):
        res = run_cli("ingest", out, "--force", *args)
        assert res.returncode == 2 and len(errors_of(res.stderr)) == 1, res.stderr
    assert "truncated" in res.stderr
    assert out.read_bytes() == before and not Path(str(out) + ".partial").exists()
    assert run_cli("ingest", out, "--force", *fits_inputs).returncode == 0


# ---------------------------------------------------------------------------------------------
# run: an in-place edit of what a step read re-runs it
# ---------------------------------------------------------------------------------------------
def _ran(stdout: str) -> dict:
    return {ln.split()[0]: ln.split()[1] for ln in stdout.splitlines()
            if len(ln.split()) == 3 and ln.split()[0] in ("weights", "solve", "recon")}


def test_run_reruns_steps_whose_inputs_were_edited_in_place(cube):
    config = _run_config(cube)
    assert _ran(run_cli("run", config).stdout) == dict.fromkeys(("weights", "solve", "recon"), "ran")
    assert _ran(run_cli("run", config).stdout) == dict.fromkeys(("weights", "solve", "recon"), "skipped")
    with h5py.File(cube, "r+") as f:                                  # same shape, same name: new values
        x_before = f["/X_global"][...]
        f["/DataCube"][0] = 2.0 * f["/DataCube"][0]
    res = run_cli("run", config)
    assert _ran(res.stdout) == dict.fromkeys(("weights", "solve", "recon"), "ran"), res.stderr
    with h5py.File(cube, "r") as f:
        assert not np.array_equal(f["/X_global"][...], x_before)
    with h5py.File(cube, "r+") as f:                                  # the mask: solve and recon again
        mask = f["/Mask"][...]
        mask[:3] = False
        f["/Mask"][...] = mask
    assert _ran(run_cli("run", config).stdout) == dict.fromkeys(("weights", "solve", "recon"), "ran")
    assert _ran(run_cli("run", config).stdout) == dict.fromkeys(("weights", "solve", "recon"), "skipped")


# ---------------------------------------------------------------------------------------------
# the exit-code list: exit 2, one line naming the option or dataset, the file unchanged
# ---------------------------------------------------------------------------------------------
def _zero_losvd(path):
    with h5py.File(path, "r+") as f:
        f["/LOSVD"][...] = 0.0


@pytest.mark.parametrize("args, named, prepare", [
    (("build", "{f}", "--force", "--compression", "gzip:x"), "--compression gzip:x", None),
    (("recompress", "{f}", "--compression", "gzip:x"), "--compression gzip:x", None),
    (("solve", "{f}", "--ridge", "nan"), "--ridge", None),
    (("solve", "{f}", "--ridge", "inf"), "--ridge", None),
    (("solve", "{f}", "--regul", "nan"), "--regul", None),
    (("solve", "{f}", "--orbit-weights", "1,1,1", "--orbit-strength", "nan"), "--orbit-strength", None),
    (("solve", "{f}", "--method", "kaczmarz", "--orbit-weights", "1,1,1", "--orbit-strength", "nan"),
     "--orbit-strength", None),
    (("solve", "{f}", "--blas-threads", "-3"), "--blas-threads", None),
    (("solve", "{f}", "--method", "kaczmarz", "--blas-threads", "-3"), "--blas-threads", None),
    (("weights", "{f}", "--force", "--large", "121"), "--large=121", None),
    (("solve", "{f}", "--orbit-weights", "{d}/w.npy", "--orbit-strength", "1"), "expected 3 values", "npy"),
    (("plot", "{f}", "--out", "{ro}/plots"), "--out", "readonly"),
    (("build", "{f}", "--force"), "/LOSVD: every value is zero", "zero"),
    (("validate", "{f}"), "/LOSVD: every value is zero", "zero"),
])
def test_exit_code_list(cube, tmp_path, args, named, prepare):
    if prepare == "zero":
        _zero_losvd(cube)
    if prepare == "npy":
        np.save(tmp_path / "w.npy", np.array([1.0, 2.0]))          # an absolute path: read as the file
    with contextlib.ExitStack() as stack:
        ro = None
        if prepare == "readonly":                                   # a read-only file system
            ro = stack.enter_context(small_tmpfs(64))
            if subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True).returncode != 0:
                pytest.skip("cannot remount a tmpfs read-only here")
        before = contents(cube)
        res = run_cli(*[str(a).format(f=cube, d=tmp_path, ro=ro) for a in args])
        assert res.returncode == 2, res.stderr[-2000:]
        lines = [ln for ln in res.stderr.strip().splitlines() if " INFO " not in ln and " WARNING " not in ln]
        assert len(lines) == 1 and named in lines[0], res.stderr
        assert contents(cube) == before
        assert not os.path.exists(lk.lock_path(cube))


def test_solve_refuses_an_unbuilt_file_before_writing(tmp_path):
    path = tmp_path / "raw.h5"
    assert run_cli("mock", path, *MOCK).returncode == 0
    before = contents(path)
    res = run_cli("solve", path, "--operator", "hypercube")       # (--operator auto solves from the factors)
    assert res.returncode == 2 and "run `cubefit_mpi build" in res.stderr
    assert contents(path) == before
