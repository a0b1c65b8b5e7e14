"""Run ``cubefit_mpi`` with a fault injected at an exact moment (for benchmarks/faults.py and the tests).

    [mpiexec -n N] python -m mpi4py benchmarks/fault_inject.py COMMAND ARGS...

The moments are I/O events, counted per rank in the order they happen: ``write`` (a collective
block write, ``io.blocks.write_block``), ``read`` (``read_block``), ``flush`` (``h5py.File.flush``)
and ``move`` (a rename, ``h5py.Group.move``: the swaps of staged writes).  Environment:

``FAULT_ACTION``  ``count`` (write the event counts to ``FAULT_COUNT_FILE.<rank>``), ``kill``
                  (SIGKILL this process just before the event), ``raise`` (raise
                  ``RuntimeError("injected fault ...")`` there), ``sleep`` (wait ``FAULT_SLEEP``
                  seconds there, e.g. to hold the write lock) or ``none``; every action but
                  ``count`` first prints ``FAULT-INJECTED <action> <unix time>`` on stderr
``FAULT_RANK``    the rank that acts (default 0)
``FAULT_AT``      the 1-based index of the event on that rank (default 1)
``FAULT_EVENTS``  the kinds counted, comma-separated (default ``write,flush,move``)
``FAULT_NOFALLOC``  ``1``: no ``posix_fallocate`` (a file system without it: the HDF5 write fails)

Patches are installed before any stage module is imported, so every ``from ..io.blocks import
write_block`` binds the counting version.  Not part of the package: a test and benchmark tool.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS: dict[str, int] = {}


def _rank() -> int:
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def install() -> None:
    """Patch the event functions according to the environment.  Local."""
    import h5py

    from cubefit_mpi.io import blocks

    action = os.environ.get("FAULT_ACTION", "none")
    kinds = set(os.environ.get("FAULT_EVENTS", "write,flush,move").split(","))
    acting = _rank() == int(os.environ.get("FAULT_RANK", "0"))
    at = int(os.environ.get("FAULT_AT", "1"))
    total = [0]
    if os.environ.get("FAULT_NOFALLOC") == "1" and hasattr(os, "posix_fallocate"):
        del os.posix_fallocate

    def event(kind: str) -> None:
        if kind not in kinds:
            return
        COUNTS[kind] = COUNTS.get(kind, 0) + 1
        total[0] += 1
        if not acting or total[0] != at:
            return
        if action == "kill":
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        sys.stderr.write(f"FAULT-INJECTED {action} {time.time():.3f}\n")
        sys.stderr.flush()
        if action == "raise":
            raise RuntimeError(f"injected fault before {kind} event {at} on rank {_rank()}")
        if action == "sleep":
            time.sleep(float(os.environ.get("FAULT_SLEEP", "20")))

    def wrap(fn, kind):
        def wrapper(*args, **kwargs):
            event(kind)
            return fn(*args, **kwargs)
        wrapper.__wrapped__ = fn
        return wrapper

    blocks.write_block = wrap(blocks.write_block, "write")
    blocks.read_block = wrap(blocks.read_block, "read")
    h5py.File.flush = wrap(h5py.File.flush, "flush")
    h5py.Group.move = wrap(h5py.Group.move, "move")
    if action == "count":
        out = os.environ["FAULT_COUNT_FILE"] + f".{_rank()}"

        def dump():
            with open(out, "w") as fh:
                fh.write(str(total[0]))
        atexit.register(dump)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    install()
    from cubefit_mpi.cli.main import run

    sys.argv = ["cubefit_mpi"] + sys.argv[1:]
    run()
