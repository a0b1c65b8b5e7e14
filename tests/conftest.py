"""Shared fixtures: small synthetic galaxies made once per session, CLI runners."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def run_cli(*args, np_ranks: int | None = None, env=None, timeout=300, cwd=None):
    """Run ``python -m cubefit_mpi ARGS`` (under ``mpiexec -n np_ranks`` when given)."""
    cmd = [PYTHON, "-m", "mpi4py", "-m", "cubefit_mpi", *map(str, args)]
    if np_ranks is not None:
        cmd = ["mpiexec", "-n", str(np_ranks), *cmd]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPIR_", "HYDRA"))}
    full_env.update(env or {})
    return run_group(cmd, env=full_env, timeout=timeout, cwd=cwd)


def run_group(cmd, *, env, timeout, cwd=None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd)`` in a process group of its own, the whole group killed on a timeout
    (mpiexec's ranks included: none is left holding a file, or a test's tmpfs, open)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def file_bytes(path) -> bytes:
    return Path(path).read_bytes()


@pytest.fixture(scope="session")
def small_mock(tmp_path_factory):
    """A noise-free small galaxy (S=60, C=2, P=6, L=120), made serially once."""
    from mpi4py import MPI

    from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
    from cubefit_mpi.stages.mock import make_mock

    path = tmp_path_factory.mktemp("mock") / "small.h5"
    make_mock(str(path), MockSpec(spaxels=60, components=2, populations=6, wavelengths=120, seed=3,
                                  masked_pixels=6), MPI.COMM_SELF)
    return path


@contextlib.contextmanager
def small_tmpfs(size_kb: int):
    """A real tmpfs of ``size_kb`` KiB for the block (a full disk that is cheap to make); yields its
    folder.  Skips the test where mounting is not possible (no root, no ``mount``, a container
    without the capability).  Mounted on a private folder, not under pytest's ``tmp_path``
    (another pytest session may rename old temporary folders while this one runs), and always
    unmounted on the way out: lazily when a process still holds a file there."""
    import tempfile

    mnt = Path(tempfile.mkdtemp(prefix="cubefit-tmpfs-"))
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size_kb)}k", "tmpfs", str(mnt)],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        mounted = False
    if not mounted:
        mnt.rmdir()
        pytest.skip("cannot mount a tmpfs here (needs root and the mount capability)")
    try:
        yield mnt
    finally:
        unmount(mnt)
        with contextlib.suppress(OSError):
            mnt.rmdir()


def unmount(mnt) -> None:
    """Unmount ``mnt`` (lazily, ``umount -l``, if it is busy); never raises."""
    for cmd in (["umount", str(mnt)], ["umount", "-l", str(mnt)]):
        try:
            if subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0:
                return
        except (OSError, subprocess.SubprocessError):
            pass


def fill_disk(folder, keep: int) -> None:
    """Take every free byte of ``folder``'s file system but ``keep``."""
    import shutil

    free = shutil.disk_usage(folder).free
    if free > keep:
        with open(Path(folder) / "ballast", "wb") as fh:
            fh.write(b"\0" * (free - keep))
