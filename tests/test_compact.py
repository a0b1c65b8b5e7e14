"""recompress --compact: the whole file rewritten (copy, verify, fsync, rename); space reclaimed,
every object and attribute kept, the original intact after a failure at any step before the rename."""
import os
import shutil

import h5py
import numpy as np
import pytest
from conftest import run_cli
from mpi4py import MPI

import cubefit_mpi.stages.compact as compact
from cubefit_mpi.config.errors import InputError
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.hypercube_maintenance import recompress

SELF = MPI.COMM_SELF


@pytest.fixture()
def bloated(small_mock, tmp_path):
    """A built file whose hypercube was recompressed: the old, uncompressed copy's bytes stay behind."""
    path = tmp_path / "g.h5"
    shutil.copy(small_mock, path)
    build_hypercube(str(path), comm=SELF)
    recompress(str(path), "gzip:4", comm=SELF)
    with h5py.File(path, "r+") as f:
        f["/Extra/scalar"] = 3.5
        f["/Extra/text"] = "a string"
        f["/Extra/empty"] = h5py.Empty("f8")
        f["/Extra"].attrs["nan"] = np.nan
        f["/Extra"].attrs["list"] = np.array([1, 2, 3], dtype=np.int32)
        f["/Extra/soft"] = h5py.SoftLink("/Extra/scalar")
        f["/Extra/external"] = h5py.ExternalLink("other.h5", "/x")
        f.create_dataset("/Extra/resizable", data=np.arange(10.0), maxshape=(None,), chunks=(4,))
    return path


def _snapshot(path):
    """Every object's kind, attributes and bytes (links as their targets)."""
    out = {}

    def visit(name, link):
        if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
            out[name] = ("link", getattr(link, "filename", None), link.path)
            return
        obj = f[name]
        attrs = {k: np.asarray(v).tobytes() for k, v in obj.attrs.items()}
        if isinstance(obj, h5py.Dataset):
            data = b"" if obj.shape is None else np.asarray(obj[()]).tobytes()
            out[name] = ("dataset", obj.dtype.str, obj.shape, obj.chunks, obj.compression, obj.maxshape, attrs, data)
        else:
            out[name] = ("group", attrs)

    with h5py.File(path) as f:
        f.visititems_links(visit)
        out["/"] = {k: np.asarray(v).tobytes() for k, v in f.attrs.items()}
    return out


def test_compaction_reclaims_space_and_keeps_everything(bloated):
    before_bytes, before = os.path.getsize(bloated), _snapshot(bloated)
    out = compact.compact_file(str(bloated), comm=SELF)
    assert out["bytes_before"] == before_bytes and out["bytes_after"] == os.path.getsize(bloated)
    hypercube = 60 * 2 * 6 * 120 * 4
    assert before_bytes - out["bytes_after"] > 0.8 * hypercube          # the old uncompressed copy is gone
    assert _snapshot(bloated) == before
    assert not os.path.exists(compact.temp_path(str(bloated)))
    with h5py.File(bloated) as f:
        assert f["/HyperCube/models"].compression == "gzip" and f["/HyperCube"].attrs["complete"]
    again = compact.compact_file(str(bloated), comm=SELF)             # nothing left to reclaim
    assert abs(again["bytes_after"] - out["bytes_after"]) < 0.01 * out["bytes_after"]


@pytest.mark.parametrize("where", ["copy", "verify", "fsync", "rename"])
def test_original_survives_a_failure_before_the_rename(bloated, monkeypatch, where):
    original = open(bloated, "rb").read()

    def boom(*args, **kwargs):
        raise OSError(f"simulated crash during {where}")

    target = {"copy": "_copy_all", "verify": "verify_copy", "fsync": "_fsync"}.get(where)
    if target:
        monkeypatch.setattr(compact, target, boom)
    else:
        monkeypatch.setattr(compact.os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        compact.compact_file(str(bloated), comm=SELF)
    assert open(bloated, "rb").read() == original
    assert not os.path.exists(compact.temp_path(str(bloated)))


def test_a_copy_that_differs_is_refused(bloated, monkeypatch):
    original = open(bloated, "rb").read()
    monkeypatch.setattr(compact, "verify_copy", lambda src, dst: ["/DataCube (layout or data)"])
    with pytest.raises(RuntimeError, match="differs from the original at /DataCube"):
        compact.compact_file(str(bloated), comm=SELF)
    assert open(bloated, "rb").read() == original


def test_verify_sees_differences(bloated, tmp_path):
    other = tmp_path / "other.h5"
    shutil.copy(bloated, other)
    with h5py.File(other, "r+") as f:
        f["/DataCube"][3, 5] += 1.0
        f["/Templates"].attrs["pop_shape"] = np.array([9, 9])
        del f["/Extra/text"]
    with h5py.File(bloated) as a, h5py.File(other) as b:
        problems = compact.verify_copy(a, b)
    assert problems == ["/DataCube (layout or data)", "/Extra/text (present in one file only)",
                        "/Templates (kind or attributes)"]


def test_leftover_of_a_crashed_run_is_removed_and_disk_is_checked(bloated, monkeypatch):
    tmp = compact.temp_path(str(bloated))
    open(tmp, "wb").write(b"half a file")
    compact.compact_file(str(bloated), comm=SELF)
    assert not os.path.exists(tmp)
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(compact.shutil, "disk_usage", lambda folder: usage(100, 90, 10))
    original = open(bloated, "rb").read()
    with pytest.raises(InputError, match=r"recompress --compact \(a copy of the whole file\) needs .* free"):
        compact.compact_file(str(bloated), comm=SELF)
    assert open(bloated, "rb").read() == original


def test_cli(bloated):
    res = run_cli("recompress", bloated)
    assert res.returncode == 2 and "give --compression" in res.stderr
    res = run_cli("recompress", bloated, "--compression", "gzip:1", "--compact")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"{bloated}:/HyperCube/models recompressed with gzip:1"
    words = lines[1].split()
    before, after = int(words[2]), int(words[4])        # "<file>: compacted, N -> M bytes (K reclaimed)"
    assert lines[1].startswith(f"{bloated}: compacted,") and after < before and after == os.path.getsize(bloated)
    with h5py.File(bloated) as f:
        assert f["/HyperCube/models"].compression_opts == 1
