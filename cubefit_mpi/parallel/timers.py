"""Wall time per named phase on each rank (``compute``, ``io``, ``comm``)."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

from .comm import get_comm


class PhaseTimer:
    """Wall time per named phase (``compute``, ``io``, ``comm``) on this rank.  Local.

    ``with timer.phase("io"): ...`` adds the block's wall time to that phase; a phase opened
    inside another counts once, as the inner one (the outer gets the rest), so the phases add up
    to at most the wall time.  :meth:`by_rank` gathers every rank's totals (collective).
    """

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []            # per open phase: the time of the phases inside it

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            self.seconds[name] += elapsed - self._inner.pop()
            if self._inner:
                self._inner[-1] += elapsed

    def by_rank(self, comm=None) -> list[dict[str, float]]:
        """Every rank's phase totals, on every rank.  Collective over comm."""
        return get_comm(comm).allgather(dict(self.seconds))
