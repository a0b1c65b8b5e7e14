"""preflight: the go/no-go table; one test per no-go row, the command's exit codes."""
import shutil
from collections import namedtuple

import h5py
import numpy as np
import pytest
from conftest import run_cli
from mpi4py import MPI

import cubefit_mpi.stages.preflight as pf
from cubefit_mpi.config.errors import InputError
from cubefit_mpi.stages.build import build_hypercube

SELF = MPI.COMM_SELF
GIB = 2**30


@pytest.fixture()
def cube(small_mock, tmp_path):
    path = tmp_path / "g.h5"
    shutil.copy(small_mock, path)
    return path


def _rows(path, **kw):
    return {r.check: r for r in pf.preflight(str(path), comm=SELF, **kw)}


def test_go_on_a_fresh_file_for_both_methods(cube):
    for method in ("exact", "kaczmarz"):
        rows = _rows(cube, method=method, node_memory=64 * GIB)
        assert list(rows) == ["inputs", "chunks", "build memory", "solve memory", "disk"]
        assert all(r.verdict == "go" for r in rows.values()), rows
        assert pf.failing(list(rows.values())) == []
    rows = _rows(cube, node_memory=64 * GIB)
    assert "S=60 C=2 P=6 L=120" in rows["inputs"].have
    assert "exact, gram: N=12" in rows["solve memory"].note
    assert "hypercube 345.6 KiB" in rows["disk"].note or "hypercube" in rows["disk"].note
    hyper = 60 * 2 * 6 * 120 * 4
    gram = 12 * 12 * 8 + 12 * 8
    recon = 60 * 120 * 8 + 2 * 60 * 8
    assert rows["disk"].need == pf.human_bytes(hyper + gram + recon)
    text = pf.format_table(list(rows.values()))
    assert text.splitlines()[0].split()[:4] == ["check", "needs", "has", "verdict"] and text.endswith("\nGO")


def test_built_file_needs_no_build_memory_nor_hypercube_disk(cube):
    build_hypercube(str(cube), comm=SELF)
    rows = _rows(cube, node_memory=64 * GIB)
    assert rows["build memory"].note == "hypercube already built"
    assert "hypercube complete" in rows["disk"].note and "hypercube " not in rows["disk"].note.split(";")[1]


def test_no_go_inputs(cube):
    with h5py.File(cube, "r+") as f:
        f["/Templates"][0, 3] = np.nan
    rows = _rows(cube)
    assert list(rows) == ["inputs"] and rows["inputs"].verdict == "no-go"
    assert "/Templates: contains NaN/Inf" in rows["inputs"].note
    with h5py.File(cube, "r+") as f:
        f["/Templates"][0, 3] = 1.0
        del f["/R_T"]
    assert "/R_T: dataset missing" in _rows(cube)["inputs"].note


def test_no_go_chunks_in_conflict_with_the_existing_hypercube(cube):
    build_hypercube(str(cube), S_chunk=10, comm=SELF)
    rows = _rows(cube, chunks=(20, 2, 6))
    assert rows["chunks"].verdict == "no-go" and "build refuses --chunks (20, 2, 6)" in rows["chunks"].note
    assert _rows(cube, chunks=(10, 2, 6))["chunks"].verdict == "go"
    warn = _rows(cube, ranks=16, ranks_per_node=2)["chunks"]
    assert warn.verdict == "warn" and "6 S-tiles for 16 ranks" in warn.note


def test_no_go_build_memory(cube):
    rows = _rows(cube, node_memory=500_000)            # 762 KiB to build, 349 KiB to solve
    assert rows["build memory"].verdict == "no-go" and rows["solve memory"].verdict == "warn"
    assert pf.failing(list(rows.values())) == ["build memory"]


def test_no_go_solve_memory(cube, monkeypatch):
    build_hypercube(str(cube), comm=SELF)
    monkeypatch.setenv("CUBEFIT_GRAM_MAX_BYTES", "64")           # less than one Gram column of N=12
    rows = _rows(cube)
    assert rows["solve memory"].verdict == "no-go" and "cannot hold one column" in rows["solve memory"].note
    monkeypatch.setenv("CUBEFIT_GRAM_MAX_BYTES", str(12 * 8 * 5))   # 5 columns: the working set
    row = _rows(cube)["solve memory"]
    assert row.verdict == "warn" and "working set" in row.note and "up to 5 Gram columns" in row.note
    monkeypatch.delenv("CUBEFIT_GRAM_MAX_BYTES")
    assert _rows(cube, method="kaczmarz", node_memory=10_000)["solve memory"].verdict == "no-go"


def test_no_go_disk(cube, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda folder: usage(10**6, 10**6 - 1000, 1000))
    rows = _rows(cube, node_memory=64 * GIB)
    assert rows["disk"].verdict == "no-go" and pf.failing(list(rows.values())) == ["disk"]


def test_bad_options(cube):
    with pytest.raises(InputError, match="--method gram"):
        pf.preflight(str(cube), method="gram", comm=SELF)
    with pytest.raises(InputError, match="--ranks-per-node 8: expected 1..4"):
        pf.preflight(str(cube), ranks=4, ranks_per_node=8, comm=SELF)


def test_cli_exit_codes(cube):
    res = run_cli("preflight", cube, "--node-memory", "64")
    assert res.returncode == 0, res.stderr
    assert res.stdout.rstrip().endswith("GO") and "solve memory" in res.stdout
    res = run_cli("preflight", cube, "--node-memory", "0.0002", "--method", "kaczmarz")
    assert res.returncode == 2
    assert "NO-GO: build memory" in res.stdout
    assert res.stderr.strip().splitlines()[-1] == f"cubefit_mpi preflight: error: {cube}: no-go: build memory, solve memory"
    res = run_cli("preflight", cube, "--chunks", "1,2")
    assert res.returncode == 2 and "--chunks 1,2: expected three integers" in res.stderr
