"""Content digests of datasets, for "is this result still current?" tests (``run``).

:func:`content_digest` hashes the bytes of the named datasets (rows split over the ranks, combined
with XOR, so any number of ranks gives the same digest) together with their shapes, dtypes and
attributes.  ``/HyperCube/models`` is never read: it is identified by its version and
inputs-fingerprint attributes, which every writer of the models renews.  Collective over comm.
"""
from __future__ import annotations

import numpy as np

from ..numerics.digest import array_digest, rows_digest
from ..parallel.comm import mpi
from ..parallel.decomposition import block_range, tile_bounds
from . import layout as lay

ROWS_PER_READ = 1024
MODELS_ATTRS = ("models.version", "inputs.fingerprint", "norm.mode", "complete")


def _attrs_text(obj) -> str:
    return repr(sorted((str(k), repr(np.asarray(v).tolist())) for k, v in obj.attrs.items()))


def dataset_digest(f, name: str, comm) -> str:
    """Digest of dataset ``name`` of ``f`` ("absent" when missing).  Collective over comm."""
    if name not in f:
        return "absent"
    if name == lay.MODELS:
        attrs = f[lay.HYPERCUBE].attrs
        return "models:" + repr([str(attrs.get(k, "")) for k in MODELS_ATTRS])
    dset = f[name]
    head = f"{dset.shape}{dset.dtype.str}{_attrs_text(dset)}"
    if dset.ndim == 0:
        return array_digest(np.frombuffer(head.encode(), dtype=np.uint8), np.asarray(dset[()]))
    start, stop = block_range(dset.shape[0], comm.Get_size(), comm.Get_rank())
    digest = 0
    for lo, hi in tile_bounds(stop - start, ROWS_PER_READ):
        digest ^= rows_digest(np.asarray(dset[start + lo:start + hi]), start + lo)
    digest = comm.allreduce(digest, op=mpi().BXOR) if comm.Get_size() > 1 else digest
    return array_digest(np.frombuffer(head.encode(), dtype=np.uint8)) + format(digest, "x")


def content_digest(f, names, comm) -> dict[str, str]:
    """``{name: digest}`` of the datasets ``names``.  Collective over comm."""
    return {name: dataset_digest(f, name, comm) for name in names}
