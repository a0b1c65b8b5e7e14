"""Who owns what: balanced contiguous blocks of tiles, tile bounds, padded schedules.

Work comes in *tiles* (chunk-aligned blocks of spaxels, or cells of a tile grid).  Tiles are
dealt to ranks in contiguous, balanced blocks (:func:`block_range`); a rank may own none.
Collective HDF5 writes happen in *rounds*: every rank calls the write the same number of times
(:func:`n_rounds`, :func:`padded_schedule`), writing an empty selection when it has nothing left.
"""
from __future__ import annotations

from typing import Any, Sequence

from .comm import get_comm, mpi


def block_range(n_items: int, size: int, rank: int) -> tuple[int, int]:
    """Half-open range ``[start, stop)`` of ``n_items`` owned by ``rank`` of ``size``.  Local.

    Balanced contiguous blocks: the first ``n_items % size`` ranks get one item more.  A rank
    gets an empty range when ``n_items < size``.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in a communicator of size {size}")
    base, extra = divmod(int(n_items), size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return start, stop


def owned_tiles(n_tiles: int, comm=None) -> range:
    """Tile indices owned by this rank (contiguous, balanced; possibly empty).  Local."""
    comm = get_comm(comm)
    start, stop = block_range(n_tiles, comm.Get_size(), comm.Get_rank())
    return range(start, stop)


def n_rounds(n_tiles: int, size: int) -> int:
    """Number of collective rounds needed when each rank does one tile per round.  Local."""
    return -(-int(n_tiles) // int(size)) if n_tiles > 0 else 0


def tile_bounds(n_items: int, tile: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of consecutive tiles of length ``tile`` covering ``n_items``.  Local."""
    tile = max(1, int(tile))
    return [(s, min(s + tile, n_items)) for s in range(0, n_items, tile)]


def padded_schedule(items: Sequence[Any], comm=None) -> list[Any | None]:
    """Pad this rank's work list with ``None`` to the longest list over ranks.  Collective over comm.

    Iterating over the result makes every rank take the same number of steps, so each step may
    contain a collective call (a rank with ``None`` makes it with an empty selection).
    """
    comm = get_comm(comm)
    longest = comm.allreduce(len(items), op=mpi().MAX)
    return list(items) + [None] * (longest - len(items))
