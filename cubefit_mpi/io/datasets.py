"""Creating and replacing datasets: the default chunk shape of ``/HyperCube/models`` and its
compression filter (local), the one helper that creates or recreates a dataset, and the staged
write that replaces a result only once its new version is complete (collective)."""
from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np

from ..config.errors import InputError
from ..parallel.collectives import agree

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
        try:
            lvl = int(level) if level else 4
        except ValueError:
            raise InputError(f"--compression {spec}: gzip level must be an integer 0..9") from None
        if not 0 <= lvl <= 9:
            raise InputError(f"--compression {spec}: gzip level must be 0..9")
        return "gzip", lvl
    if name == "lzf" and not level:
        if n_ranks > 1:
            raise InputError(f"--compression lzf: not safe for parallel writes ({n_ranks} ranks); use gzip[:level] "
                             f"or write with one rank")
        return "lzf", None
    raise InputError(f"--compression {spec}: expected gzip[:level], lzf or none")


STAGED_SUFFIX = "__new"          # the new version while it is written
RETIRED_SUFFIX = "__old"         # the old version between the renames of a swap
SPARE_SUFFIX = "__spare"         # a retired version kept so the next write reuses its space
COMMIT_ATTR = "cubefit.staged_commit"    # root attribute: the names whose new versions are complete


def _pending(f) -> list[str]:
    raw = f.attrs.get(COMMIT_ATTR)
    if raw is None:
        return []
    return list(json.loads(raw.decode() if isinstance(raw, bytes) else str(raw)))


def _retire(f, name: str, spare: str) -> None:
    """Keep ``name`` as the spare (its space is reused by the next write) or delete it.  Collective."""
    if spare in f:
        del f[name]
    else:
        f.move(name, spare)


def recover_swap(f, *names: str) -> None:
    """Finish or undo the :func:`staged_datasets` swaps that a kill interrupted.  Collective.

    Names listed in the file's commit record had complete new versions: their swap is finished
    (rolled forward).  Any other leftover ``name__new`` is unfinished and discarded; ``name``
    missing with ``name__old`` present is put back; a leftover ``name__old`` is retired.
    """
    pending = _pending(f)
    for name in dict.fromkeys(list(names) + pending):
        new, old, spare = name + STAGED_SUFFIX, name + RETIRED_SUFFIX, name + SPARE_SUFFIX
        if name in pending and new in f:
            if name in f:
                if old in f:
                    del f[old]
                f.move(name, old)
            f.move(new, name)
        if name not in f and old in f:
            f.move(old, name)
        for leftover in (old, new):
            if leftover in f:
                _retire(f, leftover, spare)
    if COMMIT_ATTR in f.attrs:
        del f.attrs[COMMIT_ATTR]


def _reusable(dset, shape, dtype, kwargs) -> bool:
    """A spare that can be written again in place: same shape and dtype, contiguous, no filters.  Local."""
    return (not kwargs and dset.shape == tuple(shape) and dset.dtype == np.dtype(dtype) and dset.chunks is None
            and dset.compression is None)


def _fresh_dataset(f, name: str, shape, dtype, kwargs):
    """``name__new``: the spare of ``name`` when it fits (attributes cleared), else a new dataset
    allocated now (so writing its data changes no HDF5 metadata).  Collective."""
    from .h5file import h5py_module

    new, spare = name + STAGED_SUFFIX, name + SPARE_SUFFIX
    if spare in f:
        if _reusable(f[spare], shape, dtype, kwargs):
            f.move(spare, new)
            for key in list(f[new].attrs):
                del f[new].attrs[key]
            return f[new]
        del f[spare]
    if kwargs:
        return f.create_dataset(new, shape=shape, dtype=dtype, **kwargs)
    h5py = h5py_module()
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return f.create_dataset(new, shape=shape, dtype=dtype, dcpl=dcpl)


def staged_bytes(f, specs) -> int:
    """Bytes the staged write of ``specs`` needs on disk (spares that fit cost nothing).  Local."""
    from .space import dataset_bytes

    total = 0
    for name, shape, dtype, kwargs in _normalised(specs):
        spare = name + SPARE_SUFFIX
        if not (spare in f and _reusable(f[spare], shape, dtype, kwargs)):
            total += dataset_bytes(shape, dtype)
    return total


def _normalised(specs):
    out = []
    for spec in specs:
        name, shape, dtype, *rest = spec
        out.append((name, tuple(int(n) for n in shape), dtype, dict(rest[0]) if rest else {}))
    return out


@contextmanager
def staged_datasets(f, specs, comm, what: str | None = None):
    """Write new versions of several datasets without ever damaging the current ones.  Collective over comm.

    ``specs``: ``[(name, shape, dtype), ...]`` (optionally a fourth item, ``create_dataset``
    keywords).  Yields ``{name: dataset}`` of fresh datasets ``name__new`` to write (e.g. with
    ``write_block``) and to give attributes.  Before yielding: interrupted swaps are recovered,
    the free space is checked (:func:`~.space.require_free_space`, exit 2), the datasets are
    created (allocated at once, or the previous version's spare reused), their bytes reserved
    and the file flushed (:func:`~.space.reserved_flush`, as every flush here), so writing their
    data can neither fail for space nor change HDF5 metadata.  When the block ends without an exception
    the file is flushed, the names are recorded as complete, and each new dataset is renamed to
    ``name`` (the old version kept as ``name__spare`` for the next write), flushed again.

    A failure or a kill before the record leaves every ``name`` as it was (the next call discards
    the unfinished ``name__new``); a kill after it is finished by the next call (:func:`recover_swap`).
    """
    from .space import file_size, require_free_space, reserved_flush

    specs = _normalised(specs)
    names = [s[0] for s in specs]
    what = what or ", ".join(names)
    require_free_space(f.filename, staged_bytes(f, specs), f"writing {what}", comm)
    reserved_flush(f, what, comm)
    start = agree(file_size(f.filename) if comm.Get_rank() == 0 else None, comm)
    recover_swap(f, *names)
    staged = {name: _fresh_dataset(f, name, shape, dtype, kwargs) for name, shape, dtype, kwargs in specs}
    reserved_flush(f, what, comm, start, staged.values())
    yield staged
    reserved_flush(f, what, comm)
    f.attrs[COMMIT_ATTR] = json.dumps(names)
    reserved_flush(f, what, comm)
    recover_swap(f, *names)
    reserved_flush(f, what, comm)


@contextmanager
def staged_dataset(f, name: str, shape, dtype, comm, **create_kwargs):
    """:func:`staged_datasets` for one dataset: yields the fresh ``name__new``.  Collective over comm."""
    with staged_datasets(f, [(name, shape, dtype, create_kwargs)], comm) as staged:
        yield staged[name]


def write_small(f, items, comm, what: str | None = None) -> None:
    """Replace small datasets written whole by rank 0: ``[(name, values (n,...), attrs dict)]``.  Collective over comm.

    Through :func:`staged_datasets`, so the old versions stay valid until all are written.
    """
    from .blocks import write_block

    root = comm.Get_rank() == 0
    items = [(name, np.asarray(values), attrs or {}) for name, values, attrs in items]
    with staged_datasets(f, [(name, values.shape, values.dtype) for name, values, _ in items], comm, what) as staged:
        for name, values, attrs in items:
            dset = staged[name]
            write_block(dset, (0,) * values.ndim if root else None, values if root and values.size else None)
            for key, value in attrs.items():
                dset.attrs[key] = value


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
