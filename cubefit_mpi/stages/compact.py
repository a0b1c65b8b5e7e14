"""Compaction (``recompress --compact``): rewrite a whole cube file to reclaim the space HDF5 keeps.

HDF5 never shrinks a file: a deleted or replaced dataset (``recompress`` swaps ``/HyperCube/models``,
``--force`` rebuilds, a re-solved ``/Solve/gram``) leaves its bytes behind.  :func:`compact_file`
copies every object and attribute into a new file next to the original (``H5Ocopy``: datasets
keep their chunks, filters and creation properties; soft and external links stay links), checks
that the copy holds the same objects, attributes, shapes, types, layouts and bytes, flushes it
to disk (``fsync``) and renames it over the original.  Until that rename the original is never
opened for writing, so a crash at any point before it leaves the original as it was (a leftover
``.compact.tmp`` beside it is removed by the next run).

Hard links that name one object twice become two copies (the cube layout has none).  Rank 0
does the work; the other ranks wait.  Collective over comm.
"""
from __future__ import annotations

import logging
import os
import shutil
import time

import numpy as np

from ..io.h5file import h5py_module, open_h5
from ..io.space import require_free_space
from ..parallel.collectives import agree, raise_if_any
from ..parallel.comm import get_comm, mpi

_LOG = logging.getLogger("cubefit_mpi.build")
SLAB_BYTES = 64 * 2**20           # verification reads at most this much of a dataset at a time
TMP_SUFFIX = ".compact.tmp"


def temp_path(path: str) -> str:
    """Where the copy is written: beside ``path``, so the rename stays on one file system.  Local."""
    return os.fspath(path) + TMP_SUFFIX


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_bytes(f) -> int:
    """Bytes the datasets of ``f`` occupy (what the copy needs, plus metadata).  Local."""
    h5py = h5py_module()
    total = [0]

    def visit(_, obj):
        if isinstance(obj, h5py.Dataset):
            total[0] += int(obj.id.get_storage_size())

    f.visititems(visit)
    return total[0]


def _copy_all(src, dst) -> int:
    """Every root attribute and member of ``src`` into ``dst``; the number of root members.  Local."""
    h5py = h5py_module()
    for key, value in src.attrs.items():
        dst.attrs[key] = value
    for name in src:
        link = src.get(name, getlink=True)
        if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
            dst[name] = link
        else:
            src.copy(src[name], dst, name=name)
    return len(src)


def _same_attrs(a, b) -> bool:
    if sorted(a.keys()) != sorted(b.keys()):
        return False
    for key in a.keys():
        x, y = a[key], b[key]
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            x, y = np.asarray(x), np.asarray(y)
            if x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
                return False
        elif type(x) is not type(y) or (x != y and not (x != x and y != y)):     # NaN == NaN here
            return False
    return True


def _same_data(a, b) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.shape is None:                          # a dataset with a null dataspace
        return True
    if a.shape == ():
        return np.asarray(a[()]).tobytes() == np.asarray(b[()]).tobytes()
    if a.size == 0:
        return True
    row_bytes = max(1, a.dtype.itemsize * int(np.prod(a.shape[1:], dtype=np.int64)))
    step = max(1, SLAB_BYTES // row_bytes)
    for lo in range(0, a.shape[0], step):
        x, y = a[lo:lo + step], b[lo:lo + step]
        if a.dtype.kind == "O":
            if list(np.asarray(x).ravel()) != list(np.asarray(y).ravel()):
                return False
        elif np.ascontiguousarray(x).tobytes() != np.ascontiguousarray(y).tobytes():
            return False
    return True


def verify_copy(src, dst) -> list[str]:
    """Names of the objects that differ between two open files (empty: the same).  Local."""
    h5py = h5py_module()
    problems = []
    if not _same_attrs(src.attrs, dst.attrs):
        problems.append("/ (attributes)")

    def walk(group_src, group_dst):
        names_src, names_dst = set(group_src), set(group_dst)
        for name in sorted(names_src ^ names_dst):
            problems.append(f"{group_src.name.rstrip('/')}/{name} (present in one file only)")
        for name in sorted(names_src & names_dst):
            link_a, link_b = group_src.get(name, getlink=True), group_dst.get(name, getlink=True)
            full = f"{group_src.name.rstrip('/')}/{name}"
            if isinstance(link_a, (h5py.SoftLink, h5py.ExternalLink)) or \
                    isinstance(link_b, (h5py.SoftLink, h5py.ExternalLink)):
                same = type(link_a) is type(link_b) and getattr(link_a, "path", None) == getattr(link_b, "path", None) \
                    and getattr(link_a, "filename", None) == getattr(link_b, "filename", None)
                if not same:
                    problems.append(f"{full} (link)")
                continue
            a, b = group_src[name], group_dst[name]
            if type(a) is not type(b) or not _same_attrs(a.attrs, b.attrs):
                problems.append(f"{full} (kind or attributes)")
            elif isinstance(a, h5py.Group):
                walk(a, b)
            elif isinstance(a, h5py.Dataset):
                layout = (a.chunks, a.compression, a.compression_opts, a.shuffle, a.fletcher32, a.maxshape)
                if layout != (b.chunks, b.compression, b.compression_opts, b.shuffle, b.fletcher32, b.maxshape) \
                        or not _same_data(a, b):
                    problems.append(f"{full} (layout or data)")

    walk(src, dst)
    return problems


def _compact_here(path: str) -> dict:
    """The whole compaction on this process.  Local."""
    h5py = h5py_module()
    t0 = time.perf_counter()
    path = os.fspath(path)
    tmp = temp_path(path)
    if os.path.exists(tmp):                     # a leftover of a crashed run: the original is intact
        _LOG.warning("removing %s, left by an interrupted compaction", tmp)
        os.unlink(tmp)
    before = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open_h5(path, "r", mpi().COMM_SELF) as src:
            require_free_space(path, _storage_bytes(src), "recompress --compact (a copy of the whole file)",
                               mpi().COMM_SELF)            # exit 2, both sizes named: the file is unchanged
            with h5py.File(tmp, "w") as dst:    # the default (earliest) format, like the original
                members = _copy_all(src, dst)
            with h5py.File(tmp, "r") as dst:
                problems = verify_copy(src, dst)
        if problems:
            raise RuntimeError(f"{path}: the compacted copy differs from the original at "
                               f"{', '.join(problems[:5])}; the original is kept")
        shutil.copymode(path, tmp)
        _fsync(tmp)
        os.replace(tmp, path)                   # the only change to the original, atomic
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync(os.path.dirname(os.path.abspath(path)), directory=True)
    after = os.path.getsize(path)
    seconds = time.perf_counter() - t0
    _LOG.info("compacted %s: %d -> %d bytes (%.1f%% reclaimed), %d root objects, %.1fs", path, before, after,
              100.0 * (before - after) / max(before, 1), members, seconds)
    return {"bytes_before": before, "bytes_after": after, "objects": members, "seconds": seconds}


def compact_file(path: str, comm=None) -> dict:
    """Rewrite ``path`` to reclaim unused space: copy, verify, fsync, rename.  Collective over comm.

    Rank 0 does the work while the other ranks wait; no rank may hold the file open.

    Returns
    -------
    dict on every rank: ``bytes_before``, ``bytes_after``, ``objects`` (root members copied), ``seconds``.

    Raises
    ------
    InputError
        The file is missing or not HDF5, or the disk lacks the space for the copy (the file is
        unchanged).
    RuntimeError
        The copy differs from the original (the original is kept, the copy removed).
    """
    comm = get_comm(comm)
    result, error = None, None
    if comm.Get_rank() == 0:
        try:
            result = _compact_here(path)
        except Exception as exc:                # raised on every rank below, never left hanging
            error = exc
    raise_if_any(error, comm)
    return agree(result, comm)
