"""The state of ``/HyperCube/models``: its version, which spaxels are missing, and whether it
is usable by a reader."""
from __future__ import annotations

from . import layout as lay


def mark_models_changed(f, comm) -> None:
    """Give ``/HyperCube/models`` a new ``models.version`` (caches keyed on it go stale).  Collective."""
    import uuid

    f[lay.HYPERCUBE].attrs["models.version"] = comm.bcast(uuid.uuid4().hex if comm.Get_rank() == 0 else None)


def missing_spaxel_ranges(tile_ids, s_chunk, n_spaxels) -> list[tuple[int, int]]:
    out = []
    for t in tile_ids:
        lo, hi = int(t) * s_chunk, min((int(t) + 1) * s_chunk, n_spaxels)
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out
