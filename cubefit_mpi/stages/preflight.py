"""Stage ``preflight``: every check a long job needs, before it starts, as a go/no-go table.

Rows (each ``go``, ``warn`` or ``no-go``):

``inputs``
    :func:`cubefit_mpi.io.validation.validate_inputs` (grids, shapes, NaN, LOSVD >= 0, mask,
    velocity guard) and ``/R_T`` present.
``chunks``
    the hypercube's chunk shape (the existing one, ``--chunks`` or the default): under HDF5's
    4 GiB per chunk, not in conflict with an existing hypercube (``build`` would refuse), and
    enough S-tiles (solve) and units (build) for the ranks.
``build memory``
    per rank, while the hypercube is not complete: templates, ``/R_T`` read dense, the FFT
    buffers of :class:`cubefit_mpi.numerics.convolve.FFTConvolver` over the cropped template
    range (template spectra, product and inverse over all P), one unit ``(S_chunk, C_chunk, P, L)`` float32, the amplitudes
    ``(S, C)``; against the node's memory divided by the ranks on it.
``solve memory``
    exact: the Gram matrix ``N² · 8`` bytes against the solver's own budget
    (:func:`cubefit_mpi.solvers.exact.gram_budget`), else the working-set method's columns;
    plus one S-tile read as float32 and one spaxel's float64 design.  Kaczmarz: two S-tiles of a
    c-band (current and read-ahead).
``disk``
    bytes still to be written (hypercube ``S·C·P·L·4`` unless built, the Gram cache ``N²·8``
    for the exact method unless cached, the reconstruction ``S·L·8`` plus its statistics unless
    present) against ``shutil.disk_usage`` of the file's folder.

Read-only.  Collective over comm: every rank validates its slab of the inputs, rank 0 reads the
rest, decides and broadcasts the table.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import numpy as np

from ..config.errors import InputError
from ..io import layout as lay
from ..io.datasets import default_chunks
from ..io.h5file import open_h5
from ..io.validation import validate_inputs
from ..numerics.convolve import FFTConvolver, needed_template_range
from ..numerics.kernels import kernel_shifts
from ..numerics.rebin import rebin_sparse
from ..parallel.collectives import agree
from ..parallel.comm import get_comm
from ..solvers.exact import GRAM, gram_budget
from ..solvers.limits import node_memory_bytes

METHODS = ("exact", "kaczmarz")
HDF5_CHUNK_LIMIT = 2**32
RECON = "/ReconCube"
WARN_FRACTION = 0.5          # a memory row warns above half of what a rank has


@dataclass(frozen=True)
class Row:
    """One line of the table: what was checked, the numbers, the verdict, a note."""

    check: str
    need: str
    have: str
    verdict: str
    note: str = ""


def human_bytes(n: float) -> str:
    """``1.5 GiB``-style size.  Local."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TiB"


def _memory_row(check: str, need: float, per_rank: float, note: str) -> Row:
    verdict = "no-go" if need > per_rank else ("warn" if need > WARN_FRACTION * per_rank else "go")
    return Row(check, human_bytes(need), f"{human_bytes(per_rank)} per rank", verdict, note)


def _chunks(f, dims, planned, ranks: int) -> tuple[tuple[int, int, int], list[Row]]:
    """The chunk shape the build will use and the ``chunks`` row.  Local."""
    S, C, P, L = dims.S, dims.C, dims.P, dims.L
    existing = tuple(int(v) for v in f[lay.MODELS].chunks[:3]) if lay.MODELS in f and f[lay.MODELS].chunks else None
    problems, notes = [], []
    if planned is not None:
        chunks = tuple(int(min(max(1, v), n)) for v, n in zip(planned, (S, C, P)))
        if existing is not None and existing != chunks:
            problems.append(f"{lay.MODELS} exists with chunks {existing}: build refuses --chunks {chunks} "
                            f"(drop --chunks, or build --force)")
    else:
        chunks = existing or default_chunks(S, C, P, L)
    chunk_bytes = chunks[0] * chunks[1] * chunks[2] * L * 4
    if chunk_bytes >= HDF5_CHUNK_LIMIT:
        problems.append(f"a chunk of {human_bytes(chunk_bytes)} exceeds HDF5's 4 GiB limit")
    s_tiles = -(-S // chunks[0])
    units = s_tiles * -(-C // chunks[1])
    if s_tiles < ranks:
        notes.append(f"{s_tiles} S-tiles for {ranks} ranks: {ranks - s_tiles} rank(s) idle in solve/recon")
    if units < ranks:
        notes.append(f"{units} build units for {ranks} ranks")
    verdict = "no-go" if problems else ("warn" if notes else "go")
    have = f"{human_bytes(chunk_bytes)} per chunk, {s_tiles} S-tiles, {units} units"
    return chunks, [Row("chunks", f"{chunks} (S, C, P)", have, verdict, "; ".join(problems + notes))]


def _hypercube_state(f) -> str:
    if lay.MODELS not in f:
        return "absent"
    return "complete" if bool(f[lay.HYPERCUBE].attrs.get("complete", False)) else "incomplete"


def _build_memory(f, dims, info, chunks) -> float:
    S, C, P, L, T = dims.S, dims.C, dims.P, dims.L, dims.T
    shifts = kernel_shifts(info["vel_pix"], float(info["tem_pix"][1] - info["tem_pix"][0]))
    lo, hi = needed_template_range(rebin_sparse(np.asarray(f[lay.R_T][...]), T, L), shifts, T)
    nfft = FFTConvolver.fft_length(hi - lo, shifts)          # the builder convolves the cropped range
    n_freq = nfft // 2 + 1
    fft = P * nfft * 8 * 2 + P * n_freq * 16 * 2              # padded input + output, spectra and product
    unit = chunks[0] * chunks[1] * P * L * 4 + L * P * 8 + chunks[0] * C * shifts.size * 8
    return P * T * 8 + T * L * 8 + fft + unit + 2 * S * C * 8


def _solve_memory(dims, chunks, method: str, ranks: int, per_node: int, node_memory: int,
                  used_pixels: int) -> list[Row]:
    C, P, L = dims.C, dims.P, dims.L
    n = C * P
    per_rank = node_memory / per_node
    if method == "kaczmarz":
        band = -(-C // max(1, min(ranks, C)))
        need = 2 * chunks[0] * band * P * L * 4 + 8 * n * 8
        return [_memory_row("solve memory", need, per_rank,
                            f"kaczmarz: two S-tiles of a {band}-component band (current and read-ahead)")]
    budget = gram_budget(per_node, node_memory)
    tile = chunks[0] * C * P * L * 4 + n * used_pixels * 8
    gram = n * n * 8
    if gram <= budget:
        row = _memory_row("solve memory", gram + tile, per_rank,
                          f"exact, gram: N={n}, N²·8 = {human_bytes(gram)} within the budget {human_bytes(budget)}")
        return [row]
    max_cols = int(budget // (8 * n))
    if max_cols < 1:
        return [Row("solve memory", f"{human_bytes(8 * n)} (one Gram column)", f"budget {human_bytes(budget)}",
                    "no-go", f"exact: N={n}; the working-set method cannot hold one column: raise "
                             f"CUBEFIT_GRAM_MAX_BYTES or use fewer ranks per node")]
    row = _memory_row("solve memory", max_cols * n * 8 + tile, per_rank,
                      f"exact, working set: N²·8 = {human_bytes(gram)} exceeds the budget {human_bytes(budget)}; "
                      f"up to {max_cols} Gram columns")
    if row.verdict == "go" and max_cols < min(n, 256):
        row = Row(row.check, row.need, row.have, "warn", row.note + " (fails if the active set needs more)")
    return [row]


def _disk(f, path: str, dims, method: str) -> Row:
    S, C, P, L = dims.S, dims.C, dims.P, dims.L
    n = C * P
    parts = []
    state = _hypercube_state(f)
    if state == "absent":
        parts.append(("hypercube", S * C * P * L * 4))
    elif state == "incomplete":
        models = f[lay.MODELS]
        remaining = max(0, S * C * P * L * 4 - int(models.id.get_storage_size()))
        if models.compression is not None:        # chunks allocated as written: bound by the raw size
            parts.append(("rest of the hypercube", remaining))
    if method == "exact" and not (GRAM in f and f[GRAM].shape == (n, n)):
        parts.append(("Gram cache", n * n * 8 + n * 8))
    if RECON not in f:
        parts.append(("recon", S * L * 8 + 2 * S * 8))
    need = sum(b for _, b in parts)
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    note = ", ".join(f"{name} {human_bytes(b)}" for name, b in parts) or "nothing left to write"
    return Row("disk", human_bytes(need), f"{human_bytes(free)} free in {folder}", "no-go" if need > free else "go",
               f"hypercube {state}; {note}")


def preflight(path: str, *, method: str = "exact", ranks: int | None = None, ranks_per_node: int | None = None,
              node_memory: int | None = None, chunks: tuple[int, int, int] | None = None, comm=None) -> list[Row]:
    """The go/no-go table for a long job on ``path``.  Collective over comm.

    Parameters
    ----------
    path : str, the cube file (read only)
    method : {"exact", "kaczmarz"}, the solver the job will run
    ranks : int, ranks of the job (default: this run's)
    ranks_per_node : int, ranks sharing a node (default: ``min(ranks, cores of this node)``)
    node_memory : int, bytes of a node (default: this node's)
    chunks : (S_chunk, C_chunk, P_chunk), the build's planned chunks (default: existing or default)

    Returns
    -------
    list of :class:`Row`, the same on every rank.
    """
    comm = get_comm(comm)
    if method not in METHODS:
        raise InputError(f"--method {method}: expected one of {', '.join(METHODS)}")
    ranks = comm.Get_size() if ranks is None else int(ranks)
    if ranks < 1:
        raise InputError(f"--ranks {ranks}: expected a positive integer")
    per_node = min(ranks, os.cpu_count() or 1) if ranks_per_node is None else int(ranks_per_node)
    if not 1 <= per_node <= ranks:
        raise InputError(f"--ranks-per-node {ranks_per_node}: expected 1..{ranks} (--ranks)")
    node_memory = node_memory_bytes() if node_memory is None else int(node_memory)
    with open_h5(path, "r", comm) as f:
        info, input_error = None, None
        try:
            info = validate_inputs(f, check_data=True, comm=comm)
            if lay.R_T not in f:
                raise InputError(f"{lay.R_T}: dataset missing; create it with H5Manager(path).ensure_rebin_and_resample()")
        except InputError as exc:
            input_error = str(exc)
        rows = None
        if comm.Get_rank() == 0:
            rows = _table(f, path, info, input_error, method, ranks, per_node, node_memory, chunks)
    return agree(rows, comm)


def _table(f, path, info, input_error, method, ranks, per_node, node_memory, planned) -> list[Row]:
    if input_error is not None:
        return [Row("inputs", "valid inputs", "invalid", "no-go", input_error)]
    dims = info["dims"]
    rows = [Row("inputs", "valid inputs", f"S={dims.S} C={dims.C} P={dims.P} L={dims.L} T={dims.T} V={dims.V}",
                "go", f"{lay.R_T} present; velocity guard, shapes, values checked")]
    chunks, chunk_rows = _chunks(f, dims, planned, ranks)
    rows += chunk_rows
    per_rank = node_memory / per_node
    state = _hypercube_state(f)
    if state == "complete":
        rows.append(Row("build memory", "-", f"{human_bytes(per_rank)} per rank", "go", "hypercube already built"))
    else:
        rows.append(_memory_row("build memory", _build_memory(f, dims, info, chunks), per_rank,
                                f"one unit of {chunks[0]}x{chunks[1]}x{dims.P}x{dims.L} float32 plus FFT buffers"))
    used = int(np.count_nonzero(info["mask"])) if info["mask"] is not None else dims.L
    rows += _solve_memory(dims, chunks, method, ranks, per_node, node_memory, used)
    rows.append(_disk(f, path, dims, method))
    return rows


def failing(rows: list[Row]) -> list[str]:
    """Names of the no-go rows.  Local."""
    return [r.check for r in rows if r.verdict == "no-go"]


def format_table(rows: list[Row]) -> str:
    """The table as aligned text, one row per check, with the overall verdict last.  Local."""
    head = ("check", "needs", "has", "verdict", "note")
    cells = [head] + [(r.check, r.need, r.have, r.verdict, r.note) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(4)) + "  " + c[4] for c in cells]
    bad = failing(rows)
    lines.append("NO-GO: " + ", ".join(bad) if bad else "GO")
    return "\n".join(line.rstrip() for line in lines)
