"""The Kaczmarz rank grid: S-groups × c-bands over the communicator.

The C axis is cut into ``c_bands`` logical bands (default ``min(ranks, C)``); each S-group has up
to ``c_bands`` ranks and each of its ranks owns a contiguous block of the logical bands.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...parallel.decomposition import block_range


@dataclass
class Grid:
    """S-groups × c-bands over ``comm``: this rank's group, the logical bands and its own bands.

    ``bands`` lists every logical band ``(c0, c1)``; ``my_bands`` indexes those of this rank,
    whose union ``c_lo:c_hi`` it reads.  Built collectively by :meth:`make`.
    """

    comm: object
    group_comm: object
    n_groups: int
    group: int
    bands: list
    my_bands: list

    def __post_init__(self):
        self.group_rank = self.group_comm.Get_rank()
        self.leader = self.group_rank == 0
        self.c_lo = self.bands[self.my_bands[0]][0] if self.my_bands else 0
        self.c_hi = self.bands[self.my_bands[-1]][1] if self.my_bands else 0

    @classmethod
    def make(cls, comm, n_comp: int, c_bands: int | None) -> "Grid":
        """Split ``comm`` into S-groups of ``min(c_bands, size)`` ranks.  Collective over comm."""
        size, rank = comm.Get_size(), comm.Get_rank()
        n_bands = min(size, n_comp) if c_bands is None else int(c_bands)
        per_group = min(n_bands, size)
        n_groups = -(-size // per_group)
        group = rank // per_group
        group_comm = comm.Split(group, rank) if size > 1 else comm
        bands = [block_range(n_comp, n_bands, i) for i in range(n_bands)]
        b0, b1 = block_range(n_bands, group_comm.Get_size(), group_comm.Get_rank())
        return cls(comm, group_comm, n_groups, group, bands, list(range(b0, b1)))

    @property
    def max_bands_per_rank(self) -> int:
        return -(-len(self.bands) // self.group_comm.Get_size())

    def column_splits(self, P: int) -> np.ndarray:
        """Column boundaries ``(group size + 1,)``: group rank r holds columns ``[splits[r], splits[r+1])``.  Local."""
        size, n_bands = self.group_comm.Get_size(), len(self.bands)      # size <= n_bands: no rank is empty
        starts = [self.bands[block_range(n_bands, size, r)[0]][0] * P for r in range(size)]
        return np.asarray(starts + [self.bands[-1][1] * P], dtype=np.int64)

    def free(self) -> None:
        if self.group_comm is not self.comm:
            self.group_comm.Free()
