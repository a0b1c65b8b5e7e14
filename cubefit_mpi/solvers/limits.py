"""The exact solver's sizing rules, in one place: the Gram memory budget, the working set's block
of columns per pass, the row blocks of the Gram reduction.  The performance model
(:mod:`cubefit_mpi.perf.model`) imports them, so the prediction follows the code.  Local.
"""
from __future__ import annotations

import os

from ..parallel.collectives import upper_row_blocks

GRAM_BUDGET_FRACTION = 0.4       # of the node's memory, shared by the ranks on the node


def node_memory_bytes() -> int:
    """Physical memory of this node (8 GiB when the system does not say).  Local."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 8 * 2**30


def gram_budget_for(node_memory: float, ranks_on_node: int) -> int:
    """Bytes one rank may spend on an N×N Gram matrix: 40 % of the node's memory divided by the
    ranks on the node (every rank holds a partial G while accumulating).  Local."""
    return int(GRAM_BUDGET_FRACTION * node_memory / max(int(ranks_on_node), 1))


def working_set_block(n_params: int) -> int:
    """Columns the working-set method adds per pass: ``N/20 + 1`` within [8, 256].  Local."""
    return int(max(8, min(int(n_params) // 20 + 1, 256)))


def gram_reduce_row_blocks(n_params: int) -> list[tuple[int, int]]:
    """Row blocks ``[(i0, i1), ...]`` in which the upper triangle of G is reduced to rank 0.  Local."""
    return upper_row_blocks(n_params)
