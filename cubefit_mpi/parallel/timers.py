"""Wall time per named phase on each rank (``compute``, ``io``, ``comm``)."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

from .comm import get_comm


class PhaseTimer:
    """Wall time per named phase (``compute``, ``io``, ``comm``) on this rank.  Local.

    ``with timer.phase("io"): ...`` adds the block's wall time to that phase; :meth:`by_rank`
    gathers every rank's totals (collective).
    """

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def by_rank(self, comm=None) -> list[dict[str, float]]:
        """Every rank's phase totals, on every rank.  Collective over comm."""
        return get_comm(comm).allgather(dict(self.seconds))
