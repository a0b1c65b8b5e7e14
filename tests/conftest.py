"""Shared fixtures: small synthetic galaxies made once per session, CLI runners."""
from __future__ import annotations

import contextlib
import os
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
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)


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
def small_tmpfs(mnt, size_kb: int):
    """A real tmpfs of ``size_kb`` KiB mounted at ``mnt`` for the block (a full disk that is cheap to
    make); skips the test where mounting is not allowed (needs root)."""
    mnt = Path(mnt)
    mnt.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size_kb)}k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def fill_disk(folder, keep: int) -> None:
    """Take every free byte of ``folder``'s file system but ``keep``."""
    import shutil

    free = shutil.disk_usage(folder).free
    if free > keep:
        with open(Path(folder) / "ballast", "wb") as fh:
            fh.write(b"\0" * (free - keep))
