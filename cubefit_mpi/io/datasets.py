"""Creating and replacing datasets: the default chunk shape of ``/HyperCube/models`` and its
compression filter (local), the one helper that creates or recreates a dataset, and the staged
write that replaces a result only once its new version is complete (collective)."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from ..config.errors import InputError

CHUNK_TARGET_BYTES = 8 * 2**20


def default_chunks(S: int, C: int, P: int, L: int, target: int = CHUNK_TARGET_BYTES) -> tuple[int, int, int]:
    """(S_chunk, C_chunk, P_chunk) with about ``target`` bytes per float32 chunk, all P.  Local."""
    per_sc = P * L * 4
    c_chunk = int(max(1, min(C, target // max(per_sc, 1))))
    s_chunk = int(max(1, min(S, target // max(per_sc * c_chunk, 1))))
    return s_chunk, c_chunk, P


def parse_compression(spec: str | None, n_ranks: int = 1) -> tuple[str | None, int | None]:
    """``"gzip[:level]" | "lzf" | "none" | None`` -> (filter, option).  Local.

    LZF (h5py's own filter) corrupts chunks written collectively by several ranks (seen with
    HDF5 1.10.8), so it is refused when ``n_ranks > 1``; gzip works in parallel.
    """
    if spec in (None, "", "none"):
        return None, None
    name, _, level = str(spec).partition(":")
    if name == "gzip":
        lvl = int(level) if level else 4
        if not 0 <= lvl <= 9:
            raise InputError(f"--compression {spec}: gzip level must be 0..9")
        return "gzip", lvl
    if name == "lzf" and not level:
        if n_ranks > 1:
            raise InputError(f"--compression lzf: not safe for parallel writes ({n_ranks} ranks); use gzip[:level] "
                             f"or write with one rank")
        return "lzf", None
    raise InputError(f"--compression {spec}: expected gzip[:level], lzf or none")


STAGED_SUFFIX = "__new"
RETIRED_SUFFIX = "__old"


def recover_swap(f, name: str) -> None:
    """Finish or undo a :func:`staged_dataset` swap that a kill interrupted.  Collective.

    ``name`` missing with ``name__old`` present: the kill fell between the two renames, the old
    dataset is put back (the new one is discarded: it may not have been complete).  A leftover
    ``name__old`` next to ``name`` is deleted, and so is an unfinished ``name__new``.
    """
    old, new = name + RETIRED_SUFFIX, name + STAGED_SUFFIX
    if name not in f and old in f:
        f.move(old, name)
    if old in f:
        del f[old]
    if new in f:
        del f[new]


@contextmanager
def staged_dataset(f, name: str, shape, dtype, **create_kwargs):
    """Write a new version of dataset ``name`` without ever damaging the current one.  Collective.

    Yields a fresh dataset ``name__new`` to write (collectively, e.g. with ``write_block``) and
    to give attributes; when the block ends without an exception the file is flushed and the
    new dataset is renamed to ``name`` (the old one, if any, is deleted after the rename).  On an
    exception the current ``name`` is untouched and ``name__new`` is left for the next call to
    discard.  The space of replaced datasets is not reclaimed by HDF5 (``recompress --compact``
    does).
    """
    recover_swap(f, name)
    staged = f.create_dataset(name + STAGED_SUFFIX, shape=tuple(shape), dtype=dtype, **create_kwargs)
    yield staged
    f.flush()
    if name in f:
        f.move(name, name + RETIRED_SUFFIX)
    f.move(name + STAGED_SUFFIX, name)
    if name + RETIRED_SUFFIX in f:
        del f[name + RETIRED_SUFFIX]


def replace_dataset(f, name: str, shape, dtype, **create_kwargs):
    """Dataset ``name`` with this shape and dtype, created or recreated as needed.  Collective.

    For datasets a stage fills completely before anything reads them (inputs of a build being
    made, a bitmap): an existing dataset of another shape or dtype is deleted first.  Results
    that must survive a failed rewrite use :func:`staged_dataset` instead.
    """
    shape = tuple(int(n) for n in shape)
    if name in f and (f[name].shape != shape or f[name].dtype != np.dtype(dtype)):
        del f[name]
    if name not in f:
        f.create_dataset(name, shape=shape, dtype=dtype, **create_kwargs)
    return f[name]


def allocated_now():
    """A dataset-creation property list that allocates all of a dataset's space when it is created
    or extended (``dcpl=`` of ``create_dataset``).  Parallel HDF5 needs it for datasets written
    collectively that were created by a serial run, and it lets a large result never be
    written with fill values (``fill_time="never"``).  Local."""
    from .h5file import h5py_module

    h5py = h5py_module()
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl
