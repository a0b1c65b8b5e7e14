"""Creating datasets: the default chunk shape of ``/HyperCube/models`` and its compression filter.
Local (no collective call)."""
from __future__ import annotations

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
