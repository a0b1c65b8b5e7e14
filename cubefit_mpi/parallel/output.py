"""Rank-0 output: the ``cubefit_mpi`` logger (rank prefix, non-root ranks at WARNING) and
progress from reduced counts (a bar on a TTY, a percentage line in a batch log)."""
from __future__ import annotations

import logging
import sys
import time

from .comm import get_comm, mpi

_LOG = logging.getLogger("cubefit_mpi")


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int, size: int):
        super().__init__("%(asctime)s %(rankinfo)s%(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        self.rankinfo = f"[{rank}/{size}] " if size > 1 else ""

    def format(self, record):
        record.rankinfo = self.rankinfo
        return super().format(record)


def setup_logging(comm=None, level: str = "INFO") -> logging.Logger:
    """Configure the ``cubefit_mpi`` logger: rank prefix; only rank 0 logs below WARNING.  Local."""
    comm = get_comm(comm)
    rank, size = comm.Get_rank(), comm.Get_size()
    logger = logging.getLogger("cubefit_mpi")
    for handler in list(logger.handlers):
        if getattr(handler, "_cubefit", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._cubefit = True  # type: ignore[attr-defined]
    handler.setFormatter(_RankFormatter(rank, size))
    logger.addHandler(handler)
    logger.setLevel(getattr(logging, level) if rank == 0 else logging.WARNING)
    logger.propagate = False
    return logger


class Progress:
    """Rank-0 progress from reduced counts: a bar on a TTY, a percentage line in a batch log.

    ``update(done_here)`` is collective over comm (it reduces the count); only rank 0 prints.
    """

    def __init__(self, total: int, label: str, comm=None, stream=None, min_interval: float = 2.0):
        self.comm = get_comm(comm)
        self.total = max(int(total), 0)
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = min_interval
        self._last = 0.0
        self._start = time.perf_counter()
        self._last_pct = -1
        self.done = 0

    def update(self, done_here: int) -> int:
        """Add this rank's newly finished items; returns the global count.  Collective over comm."""
        self.done += self.comm.allreduce(int(done_here), op=mpi().SUM)
        if self.comm.Get_rank() == 0 and self.total:
            now = time.perf_counter()
            pct = int(100 * self.done / self.total)
            finished = self.done >= self.total
            if finished or now - self._last >= self.min_interval:
                self._last = now
                elapsed = now - self._start
                if self.tty:
                    width = 30
                    fill = int(width * self.done / self.total)
                    self.stream.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] "
                                      f"{self.done}/{self.total} {elapsed:6.1f}s")
                    if finished:
                        self.stream.write("\n")
                elif pct != self._last_pct:
                    _LOG.info("%s: %d/%d (%d%%) %.1fs", self.label, self.done, self.total, pct, elapsed)
                self._last_pct = pct
                self.stream.flush()
        return self.done
