"""Content digests of arrays, for provenance attributes (pure functions).

:func:`rows_digest` is an XOR of per-row keyed hashes: exact, and independent of how the rows
are split over ranks or slabs (combine partial digests with XOR, e.g. ``MPI.BXOR``).
Local (no MPI, no I/O).
"""
from __future__ import annotations

import hashlib

import numpy as np

DIGEST_MASK = 2**63 - 1


def rows_digest(rows: np.ndarray, first: int) -> int:
    """XOR of blake2b-64 hashes of each row, keyed by its global index ``first + i``.  Local."""
    out = 0
    for i, row in enumerate(rows):
        h = hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=8, key=str(first + i).encode())
        out ^= int.from_bytes(h.digest(), "little")
    return out & DIGEST_MASK


def array_digest(*arrays) -> str:
    """sha256 (32 hex digits) of the shapes and bytes of ``arrays`` (None allowed).  Local."""
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"None")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]
