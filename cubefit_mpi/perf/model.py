"""Performance model of ``build`` and the exact ``solve`` (pure numerics: no MPI, no I/O).

The model adds up, per stage, a serial set-up, the slowest rank's compute, its I/O and its
communication, from per-tile costs and machine bandwidths (``docs/scaling.md`` derives every
formula and lists its assumptions):

* build, per round of collective writes (one unit = one S-tile × one C-tile per rank):
  ``t = setup + rounds · (unit_compute · oversub + unit_io) + comm``;
* exact solve, per streaming pass over ``/HyperCube/models`` (one S-tile per rank and round):
  ``t = setup + passes · (tile_compute · oversub + tile_io) + reductions + rank-0 NNLS``,
  with the dense Gram method when ``N² · 8`` bytes fit the per-rank budget (as the solver
  decides) and the working-set method otherwise.

Everything here is a pure function of numbers; :mod:`cubefit_mpi.perf.study` measures the numbers
(or reads them for a target machine from JSON) and calls these.  Local (no MPI).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..numerics.nnls_select import AUTO_LH_FRACTION, AUTO_MIN_N
from ..solvers.limits import gram_budget_for, gram_reduce_row_blocks, working_set_block

NNLS_BLAS3_EFFICIENCY = 0.6         # blocked Cholesky on all of a node's cores: this share of cores x F (assumed)
LH_ITERATIONS_PER_K = 2.0           # Lawson–Hanson iterations per final non-zero weight, sparse fits (measured)
PIVOT_STREAMS = 2.0                 # passes over G per block-pivoting iteration (gradient, refinement; 1.8 measured)
BYTES_F32, BYTES_F64 = 4, 8
REAL_GALAXY = (3000, 200, 360, 1250)            # S, C, P, L of the fit the model is made for
NODE_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
# The assumed target node of the docs' table (docs/scaling.md); per-core costs come from this
# machine's micro-benchmarks unless a --machine file gives them.
GENERIC_NODE = {"name": "generic CPU node (assumed)", "cores_per_node": 128, "node_memory": 256 * 2**30,
                "write_bw_rank": 1.0e9, "write_bw_node": 5.0e9, "write_bw_fs": 200e9,
                "read_bw_rank": 2.0e9, "read_bw_node": 10.0e9, "read_bw_fs": 300e9,
                "io_round_seconds": 5e-3, "read_tile_seconds": 1e-3, "latency": 2e-6, "bandwidth": 12.5e9,
                "node_mem_bandwidth": 200e9,
                "build_setup_seconds": 5.0, "solve_setup_seconds": 2.0}


def next_fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c 7^d ≥ n (an FFT length FFTW is fast at).  Local."""
    m = max(int(n), 1)
    while True:
        rest = m
        for prime in (2, 3, 5, 7):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return m
        m += 1


def gram_reduce_elements(n_params: int) -> int:
    """Elements reduced to rank 0 for G (the solver's row blocks of the upper triangle).  Local."""
    n = int(n_params)
    return sum((i1 - i0) * (n - i0) for i0, i1 in gram_reduce_row_blocks(n))


@dataclass(frozen=True)
class Problem:
    """Sizes of one fit.

    ``S, C, P, L, T`` as in the file; ``K`` kernel taps; ``s_chunk, c_chunk`` the hypercube's
    chunk shape (units of the build, S-tiles of the solve); ``l_used`` unmasked pixels;
    ``active_set`` the expected number of non-zero weights of the solution (k), which sets the
    NNLS work and the working-set method's passes.
    """

    S: int
    C: int
    P: int
    L: int
    T: int
    K: int
    s_chunk: int
    c_chunk: int
    l_used: int = 0
    active_set: int = 2000

    def __post_init__(self):
        for name in ("S", "C", "P", "L", "T", "K", "s_chunk", "c_chunk"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Problem.{name}: expected a positive integer, got {getattr(self, name)}")
        if self.l_used <= 0:
            object.__setattr__(self, "l_used", self.L)

    @property
    def N(self) -> int:                                     # noqa: N802 (the manual's name)
        return self.C * self.P

    @property
    def nfft(self) -> int:
        return next_fast_len(self.T + self.K - 1)

    @property
    def model_bytes(self) -> float:
        return float(self.S) * self.C * self.P * self.L * BYTES_F32

    @property
    def n_s_tiles(self) -> int:
        return -(-self.S // self.s_chunk)

    @property
    def n_units(self) -> int:
        return self.n_s_tiles * -(-self.C // self.c_chunk)

    @property
    def fft_work(self) -> float:
        """P · nfft · log2(nfft): the convolution work of one (s, c), the build's cost unit."""
        return self.P * self.nfft * math.log2(self.nfft)

    @property
    def k(self) -> int:
        return int(min(self.active_set, self.N))


@dataclass(frozen=True)
class Machine:
    """Costs and bandwidths of one machine (seconds, bytes, bytes/s; see docs/scaling.md).

    Per-core costs: ``build_sc_seconds`` for one (s, c) of the build at ``build_ref_work``
    (= P·nfft·log2 nfft where it was measured; other sizes scale with that work),
    ``blas_flops`` (SYRK/GEMM flop/s of one core), ``design_seconds_per_elem`` (per element of
    a weighted design block: read-convert-scale), ``mem_bandwidth`` (one core streaming),
    ``nnls_iter_seconds`` (fixed cost of one Lawson–Hanson iteration), ``node_mem_bandwidth``
    (all of a node's cores streaming together, for rank 0's block-pivoting NNLS; 0: cores ×
    ``mem_bandwidth``).  I/O: per rank alone, per node
    (all its ranks together) and for the whole file system (``inf``: no shared limit), and
    the fixed cost of one collective write round (``io_round_seconds``) or tile read
    (``read_tile_seconds``).  Network: ``latency`` and ``bandwidth`` of one message step.
    ``contention``: slow-down of each rank when the job's ranks run at once beyond plain
    oversubscription (shared memory bandwidth, other users' load; 1 on a dedicated node).  ``write_other_seconds`` / ``read_other_seconds``: the stage's I/O per build
    round / pass tile beyond the probe's pattern (its small reads and writes; set by
    :func:`calibrate`, 0 for a machine given by its parameters).
    Serial set-up of each stage: ``build_setup_seconds``, ``solve_setup_seconds``.
    """

    name: str = "machine"
    cores_per_node: int = 1
    node_memory: float = 8 * 2**30
    build_sc_seconds: float = 1e-3
    build_ref_work: float = 1.0
    blas_flops: float = 1e10
    design_seconds_per_elem: float = 0.0
    mem_bandwidth: float = 5e9
    nnls_iter_seconds: float = 0.0
    write_bw_rank: float = 1e9
    write_bw_node: float = 1e9
    write_bw_fs: float = math.inf
    read_bw_rank: float = 1e9
    read_bw_node: float = 1e9
    read_bw_fs: float = math.inf
    io_round_seconds: float = 0.0
    read_tile_seconds: float = 0.0
    latency: float = 1e-6
    bandwidth: float = 1e9
    contention: float = 1.0
    write_other_seconds: float = 0.0
    read_other_seconds: float = 0.0
    build_setup_seconds: float = 0.0
    solve_setup_seconds: float = 0.0
    gram_max_bytes: float = 0.0
    node_mem_bandwidth: float = 0.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "name" and not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"Machine.{f.name}: expected a number >= 0, got {value!r}")
        for name in ("cores_per_node", "node_memory", "build_ref_work", "blas_flops", "mem_bandwidth",
                     "write_bw_rank", "write_bw_node", "write_bw_fs", "read_bw_rank", "read_bw_node",
                     "read_bw_fs", "bandwidth", "contention"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Machine.{name}: expected a positive number, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "Machine":
        """Machine from a JSON-like dict; unknown keys are an error, ``"inf"`` is infinity.  Local."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"machine parameters: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        clean = {k: (v if k == "name" else (math.inf if str(v).lower() in ("inf", "infinity") else float(v)))
                 for k, v in values.items()}
        if "cores_per_node" in clean:
            clean["cores_per_node"] = int(clean["cores_per_node"])
        return cls(**clean)

    def to_dict(self) -> dict:
        """JSON-safe dict (infinity as ``"inf"``).  Local."""
        return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in dataclasses.asdict(self).items()}

    @property
    def node_bandwidth(self) -> float:
        """Bytes/s all of a node's cores stream together (``node_mem_bandwidth``; 0: cores × one core's)."""
        return self.node_mem_bandwidth or self.mem_bandwidth * self.cores_per_node

    def gram_budget(self, ranks_per_node: int) -> float:
        """Bytes one rank may spend on the N×N Gram matrix, as the solver decides.  Local."""
        if self.gram_max_bytes > 0:
            return self.gram_max_bytes
        return gram_budget_for(self.node_memory, ranks_per_node)


@dataclass(frozen=True)
class Layout:
    """How ranks sit on nodes: ``ranks`` in all, ``ranks_per_node`` (default: one per core),
    ``threads`` BLAS/FFT threads per rank (assumed to scale perfectly up to the cores)."""

    ranks: int
    ranks_per_node: int
    threads: int = 1

    @property
    def nodes(self) -> int:
        return -(-self.ranks // self.ranks_per_node)

    def oversubscription(self, machine: Machine) -> float:
        """Slow-down of compute: ranks×threads on a node beyond its cores, times the machine's
        contention when more than one rank computes (≥ 1)."""
        busy = min(self.ranks, self.ranks_per_node) * self.threads
        return max(1.0, busy / machine.cores_per_node) * self.shared(machine)

    def shared(self, machine: Machine) -> float:
        """The machine's contention when more than one rank runs (≥ 1).  A rank that gets a
        1/c share of its core is slowed in everything it does, its part of collective I/O
        (and the partner's wait for it) included, so this factor applies to I/O as well."""
        return max(machine.contention, 1.0) if self.ranks > 1 else 1.0


def layout_for(machine: Machine, ranks: int, ranks_per_node: int | None = None, threads: int = 1) -> Layout:
    """Layout of ``ranks`` ranks, ``ranks_per_node`` each (default: the cores / threads).  Local."""
    if int(ranks) < 1:
        raise ValueError(f"ranks: expected a positive integer, got {ranks}")
    per_node = int(ranks_per_node or max(1, machine.cores_per_node // max(int(threads), 1)))
    return Layout(int(ranks), max(1, min(per_node, int(ranks))), max(1, int(threads)))


@dataclass
class Prediction:
    """Predicted seconds of one stage at one layout, split as the measurements are."""

    stage: str
    ranks: int
    nodes: int
    method: str
    setup: float
    compute: float
    io: float
    comm: float
    serial: float                    # rank 0 alone (the NNLS); 0 for the build
    passes: int = 1
    active_ranks: int = 0
    notes: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.setup + self.compute + self.io + self.comm + self.serial

    @property
    def bound(self) -> str:
        """The largest term: what this point is limited by."""
        terms = {"setup": self.setup, "compute": self.compute, "io": self.io, "comm": self.comm,
                 "rank-0 NNLS": self.serial}
        return max(terms, key=terms.get)


# ---------------------------------------------------------------------------------------------
# the pieces
# ---------------------------------------------------------------------------------------------
def aggregate_bandwidth(per_rank: float, per_node: float, whole_fs: float, ranks: int, nodes: int) -> float:
    """Bytes/s that ``ranks`` ranks on ``nodes`` nodes move together: the smallest limit.  Local."""
    return min(ranks * per_rank, nodes * per_node, whole_fs)


def message_seconds(machine: Machine, ranks: int, nbytes: float) -> float:
    """A reduce (or allreduce) of ``nbytes`` over ``ranks``: ⌈log2 p⌉ α + 2 (p−1)/p · n / B.  Local.

    The latency term is a binomial tree; the bandwidth term is the reduce-scatter + gather
    (Rabenseifner) that MPI libraries use for long messages.  Zero for one rank.
    """
    if ranks <= 1:
        return 0.0
    return math.ceil(math.log2(ranks)) * machine.latency + 2.0 * (ranks - 1) / ranks * nbytes / machine.bandwidth


def lawson_hanson_seconds(machine: Machine, n_params: int, k: int) -> float:
    """Lawson–Hanson on an N×N system ending with k passive columns, one core.  Local.

    k iterations; iteration j computes the gradient from the j passive rows of G (j·N doubles
    streamed) and updates a j×j Cholesky factor: Σ_j ≈ k²N/2 doubles + k³/3 multiply-adds.
    """
    k = max(int(k), 0)
    stream = BYTES_F64 * k * k * n_params / 2.0 / machine.mem_bandwidth
    flops = 2.0 * k**3 / 3.0 / machine.blas_flops
    return k * machine.nnls_iter_seconds + stream + flops


def pivot_counts(n_params: int) -> tuple[int, int]:
    """(iterations, factorizations) of block pivoting, fitted to the MILES measurements.  Local.

    Measured (``docs/performance.md``, regul 1e3): N = 848: 20 and 5; 3,392: 29 and 6;
    19,928: 38 and 9 -- about ``8 + 4 log2(N/100)`` and ``1 + 1.1 log2(N/100)``.
    """
    doublings = math.log2(max(int(n_params), 100) / 100.0)
    return int(math.ceil(8 + 4 * doublings)), int(math.ceil(1 + 1.1 * doublings))


def block_pivoting_seconds(machine: Machine, n_params: int, k: int) -> float:
    """Block pivoting on rank 0 with the node's cores as BLAS threads (the others asleep).  Local.

    The first factorization covers all N columns (every b_j > 0), the others ≈ k; the later
    iterations go through Schur complements (counted in the streams).  Each iteration streams
    G ≈ :data:`PIVOT_STREAMS` times (gradient, refinement) and each factorization gathers
    G[F, F]: ``(N³ + (R − 1) k³) / 3 / (F · cores · ε) + (I · s · 8N² + R · 8k²) / B_node``.
    """
    n, k = int(n_params), max(int(k), 0)
    iterations, factors = pivot_counts(n)
    flops = (float(n) ** 3 + (factors - 1) * float(k) ** 3) / 3.0
    rate = machine.blas_flops * machine.cores_per_node * NNLS_BLAS3_EFFICIENCY
    stream = BYTES_F64 * (iterations * PIVOT_STREAMS * float(n) ** 2 + factors * float(k) ** 2)
    return flops / rate + stream / machine.node_bandwidth


def nnls_seconds(machine: Machine, n_params: int, k: int, method: str = "lawson-hanson") -> float:
    """Rank 0's exact NNLS on an N×N system ending with k non-zero weights.  Local.

    ``method`` as ``CUBEFIT_NNLS_GRAM_METHOD``; ``"auto"`` as the solver's rule
    (:mod:`cubefit_mpi.numerics.nnls_select`): Lawson–Hanson when N < ``AUTO_MIN_N`` or when it
    ends within its budget of ``max(AUTO_MIN_N, N/8)`` iterations (≈ 2k measured on sparse
    fits), block pivoting otherwise (dense, smoothed solutions).
    """
    if method == "auto":
        budget = max(AUTO_MIN_N, AUTO_LH_FRACTION * n_params)
        sparse = n_params < AUTO_MIN_N or LH_ITERATIONS_PER_K * k <= budget
        method = "lawson-hanson" if sparse else "block-pivoting"
    if method == "lawson-hanson":
        return lawson_hanson_seconds(machine, n_params, k)
    if method == "block-pivoting":
        return block_pivoting_seconds(machine, n_params, k)
    raise ValueError(f"NNLS method {method!r}: expected auto, lawson-hanson or block-pivoting")


def build_sc_seconds(problem: Problem, machine: Machine) -> float:
    """One (s, c) of the build on one core, scaled from the reference by P·nfft·log2 nfft.  Local."""
    return machine.build_sc_seconds * problem.fft_work / machine.build_ref_work


def _tiles_of_slowest(n_tiles: int, ranks: int) -> int:
    return -(-n_tiles // ranks)


def rounds_io(n_items: int, ranks: int, item_bytes: float, bandwidth) -> float:
    """Seconds to move ``n_items`` blocks of ``item_bytes`` in collective rounds.  Local.

    Items are dealt in balanced blocks, one per rank and round: ``n_items // ranks`` full
    rounds move ``ranks`` blocks at ``bandwidth(ranks)`` bytes/s, a last round the remainder
    at ``bandwidth(remainder)``.
    """
    full, rest = divmod(int(n_items), int(ranks))
    seconds = full * ranks * item_bytes / bandwidth(ranks) if full else 0.0
    return seconds + (rest * item_bytes / bandwidth(rest) if rest else 0.0)


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------
def predict_build(problem: Problem, machine: Machine, layout: Layout) -> Prediction:
    """Seconds of ``cubefit_mpi build`` (all units pending) at ``layout``.  Local.

    Units are dealt in balanced blocks; each round every rank computes one unit, then all write
    collectively (the slowest rank sets the pace).  With ``n_sc = min(⌈U/R⌉ · s_chunk · c_chunk,
    S·C)`` the slowest rank's (s, c) pairs:
    ``compute = n_sc · t_sc · oversub / threads`` and
    ``io = (rounds_io(U, R, unit_bytes, B_write) + ⌈U/R⌉ · (io_round + write_other)) · contention`` where
    ``B_write(r) = min(r · B_rank, nodes(r) · B_node, B_fs)`` (:func:`rounds_io`).
    """
    rounds = _tiles_of_slowest(problem.n_units, layout.ranks)
    active = min(layout.ranks, problem.n_units)
    unit_sc = problem.s_chunk * min(problem.c_chunk, problem.C)
    pairs = min(rounds * unit_sc, problem.S * problem.C)          # (s, c) of the slowest rank
    compute = pairs * build_sc_seconds(problem, machine) * layout.oversubscription(machine) / layout.threads
    unit_bytes = problem.model_bytes / problem.n_units

    def bandwidth(writers):
        return aggregate_bandwidth(machine.write_bw_rank, machine.write_bw_node, machine.write_bw_fs, writers,
                                   -(-writers // layout.ranks_per_node))

    io = (rounds_io(problem.n_units, layout.ranks, unit_bytes, bandwidth)
          + rounds * (machine.io_round_seconds + machine.write_other_seconds)) * layout.shared(machine)
    comm = rounds * message_seconds(machine, layout.ranks, 8) \
        + message_seconds(machine, layout.ranks, problem.N * BYTES_F64)
    notes = []
    if layout.ranks > problem.n_units:
        notes.append(f"only {problem.n_units} units: {layout.ranks - problem.n_units} ranks idle")
    return Prediction("build", layout.ranks, layout.nodes, "fft", machine.build_setup_seconds, compute, io, comm,
                      0.0, 1, active, notes)


def _pass(problem: Problem, machine: Machine, layout: Layout, seconds_per_spaxel: float) -> tuple[float, float]:
    """(compute, io) of one streaming pass: the slowest rank's S-tiles.  Local."""
    tiles = _tiles_of_slowest(problem.n_s_tiles, layout.ranks)
    spaxels = min(tiles * problem.s_chunk, problem.S)
    compute = spaxels * seconds_per_spaxel * layout.oversubscription(machine)

    def bandwidth(readers):
        return aggregate_bandwidth(machine.read_bw_rank, machine.read_bw_node, machine.read_bw_fs, readers,
                                   -(-readers // layout.ranks_per_node))

    io = (rounds_io(problem.n_s_tiles, layout.ranks, problem.model_bytes / problem.n_s_tiles, bandwidth)
          + tiles * (machine.read_tile_seconds + machine.read_other_seconds)) * layout.shared(machine)
    return compute, io


def solve_method(problem: Problem, machine: Machine, layout: Layout) -> str:
    """``"gram"`` when N²·8 bytes fit the per-rank budget (the solver's rule), else ``"working-set"``."""
    return "gram" if problem.N**2 * BYTES_F64 <= machine.gram_budget(layout.ranks_per_node) else "working-set"


def predict_solve(problem: Problem, machine: Machine, layout: Layout, method: str = "auto") -> Prediction:
    """Seconds of ``cubefit_mpi solve --method exact`` (no cache, no verification pass).  Local.

    Gram method: one pass of per-spaxel SYRK (N(N+1)·L_used flops) plus the design-block copy,
    the reduction of G's upper triangle to rank 0, the NNLS there.  Working-set method: a
    diagonal pass, then ⌈k / block⌉ passes that each form ``block`` Gram columns by GEMM
    (2·N·block·L_used flops per spaxel), reduce them (N·block doubles) and re-solve on rank 0.
    """
    if method == "auto":
        method = solve_method(problem, machine, layout)
    n, l_used, k = problem.N, problem.l_used, problem.k
    threads = layout.threads
    copy = n * l_used * machine.design_seconds_per_elem
    notes = []
    if method == "gram":
        per_spaxel = copy + n * (n + 1) * l_used / (machine.blas_flops * threads)
        compute, io = _pass(problem, machine, layout, per_spaxel)
        comm = message_seconds(machine, layout.ranks, gram_reduce_elements(n) * BYTES_F64) \
            + 2 * message_seconds(machine, layout.ranks, n * BYTES_F64)
        serial = nnls_seconds(machine, n, k, "auto")
        passes = 1
    elif method == "working-set":
        block = working_set_block(n)
        budget = machine.gram_budget(layout.ranks_per_node)
        max_cols = int(budget // (BYTES_F64 * n))
        col_passes = -(-k // block)
        if col_passes * block > max_cols:
            notes.append(f"working set of ~{col_passes * block} columns exceeds the per-rank budget of {max_cols} "
                         f"columns ({budget / 2**30:.2f} GiB): the solver stops with an error; use fewer ranks per "
                         f"node or raise CUBEFIT_GRAM_MAX_BYTES")
        diag_c, diag_io = _pass(problem, machine, layout, 2 * copy)
        col_c, col_io = _pass(problem, machine, layout, copy + 2.0 * n * block * l_used / (machine.blas_flops * threads))
        compute = diag_c + col_passes * col_c
        io = diag_io + col_passes * col_io
        comm = 3 * message_seconds(machine, layout.ranks, n * BYTES_F64) + col_passes * (
            message_seconds(machine, layout.ranks, n * block * BYTES_F64)
            + 2 * message_seconds(machine, layout.ranks, n * BYTES_F64))
        serial = sum(nnls_seconds(machine, min(j * block, n), min(k, j * block), "auto")
                     + BYTES_F64 * n * j * block / machine.mem_bandwidth for j in range(1, col_passes + 1))
        passes = 1 + col_passes
        notes.append(f"N²·8 = {n * n * 8 / 2**30:.1f} GiB per rank does not fit the budget "
                     f"{budget / 2**30:.2f} GiB: working-set method, {passes} passes of {block} columns")
    else:
        raise ValueError(f"method {method!r}: expected auto, gram or working-set")
    if layout.ranks > problem.n_s_tiles:
        notes.append(f"only {problem.n_s_tiles} S-tiles: {layout.ranks - problem.n_s_tiles} ranks read nothing")
    active = min(layout.ranks, problem.n_s_tiles)
    return Prediction("solve", layout.ranks, layout.nodes, method, machine.solve_setup_seconds, compute, io, comm,
                      serial, passes, active, notes)


def predict(stage: str, problem: Problem, machine: Machine, layout: Layout) -> Prediction:
    """:func:`predict_build` or :func:`predict_solve` by name.  Local."""
    if stage == "build":
        return predict_build(problem, machine, layout)
    if stage == "solve":
        return predict_solve(problem, machine, layout)
    raise ValueError(f"stage {stage!r}: expected build or solve")


def table(problem: Problem, machine: Machine, nodes: list[int], *, stage: str, ranks_per_node: int | None = None,
          threads: int = 1) -> list[dict]:
    """Predictions at each node count, with speedup and efficiency against the first row.  Local."""
    rows, first = [], None
    for count in nodes:
        per_node = int(ranks_per_node or max(1, machine.cores_per_node // threads))
        lay = Layout(int(count) * per_node, per_node, threads)
        pred = predict(stage, problem, machine, lay)
        first = first or (int(count), pred.total)
        speedup = first[1] / pred.total
        rows.append({"nodes": int(count), "ranks": lay.ranks, "method": pred.method, "setup": pred.setup,
                     "compute": pred.compute, "io": pred.io, "comm": pred.comm, "serial": pred.serial,
                     "total": pred.total, "speedup": speedup, "efficiency": speedup * first[0] / int(count),
                     "bound": pred.bound, "passes": pred.passes, "notes": pred.notes,
                     "fails": any("exceeds" in n for n in pred.notes)})
    return rows


def limits(problem: Problem, machine: Machine, ranks_per_node: int | None = None, threads: int = 1) -> dict:
    """Where scaling stops, in numbers (see docs/scaling.md).  Local.

    Keys: ``build_max_ranks`` (units), ``solve_max_ranks`` (S-tiles), ``build_io_floor`` and
    ``pass_io_floor`` (the whole file system's bandwidth), ``gram_bytes`` and ``gram_budget``
    (per rank), ``solve_method``, ``nnls_floor`` (rank 0's NNLS, any rank count),
    ``setup_floor`` (serial set-up of build + solve).
    """
    per_node = int(ranks_per_node or max(1, machine.cores_per_node // threads))
    lay = Layout(per_node, per_node, threads)
    method = solve_method(problem, machine, lay)
    floor_solve = predict_solve(problem, machine, lay)
    return {
        "build_max_ranks": problem.n_units,
        "solve_max_ranks": problem.n_s_tiles,
        "build_max_nodes": -(-problem.n_units // per_node),
        "solve_max_nodes": -(-problem.n_s_tiles // per_node),
        "build_io_floor": problem.model_bytes / machine.write_bw_fs,
        "pass_io_floor": problem.model_bytes / machine.read_bw_fs,
        "gram_bytes": problem.N**2 * BYTES_F64,
        "gram_budget": machine.gram_budget(per_node),
        "solve_method": method,
        "solve_passes": floor_solve.passes,
        "nnls_floor": floor_solve.serial,
        "setup_floor": machine.build_setup_seconds + machine.solve_setup_seconds,
    }


# ---------------------------------------------------------------------------------------------
# calibration: a machine whose 1-rank prediction reproduces a 1-rank measurement
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """A measured run at one rank: wall seconds and the phases (max over ranks)."""

    wall: float
    compute: float
    io: float
    comm: float = 0.0
    serial: float = 0.0              # solve: rank 0's NNLS seconds
    active_set: int = 0              # solve: passive-set size of the solution


def calibrate(problem: Problem, machine: Machine, build: Sample | None = None, solve: Sample | None = None
              ) -> Machine:
    """Return ``machine`` with per-tile costs, I/O level and set-up times from 1-rank samples.  Local.

    ``machine`` holds what probes measured (bandwidths, per-round I/O costs, reduce α/β); the
    costs are solved for so that :func:`predict_build` / :func:`predict_solve` at one rank
    reproduce the sample's compute, I/O and wall seconds: one (s, c) of the build costs
    ``compute / (S·C)``; one spaxel of the Gram pass ``compute / S`` (expressed as a SYRK
    rate); the stage's I/O beyond the probe's pattern (bandwidths and per-round costs, kept
    per rank count -- see :func:`with_probe`) becomes a cost per round / tile
    (``write_other_seconds``, ``read_other_seconds``; 0 when the probe already accounts for
    more than the sample, so the 1-rank I/O is then over-predicted); the NNLS's
    per-iteration cost is what the sample's rank-0 seconds leave after the modelled stream
    and flop terms; set-up is the wall time outside the phases.  Gram method only.
    """
    values = {}
    one = Layout(1, 1, 1)
    if build is not None:
        values.update(build_sc_seconds=build.compute / (problem.S * problem.C), build_ref_work=problem.fft_work,
                      build_setup_seconds=max(0.0, build.wall - build.compute - build.io - build.comm))
        probe_io = predict_build(problem, dataclasses.replace(machine, write_other_seconds=0.0), one).io
        values["write_other_seconds"] = max(0.0, build.io - probe_io) / problem.n_units
    if solve is not None:
        n = problem.N
        values.update(design_seconds_per_elem=0.0,
                      blas_flops=n * (n + 1) * problem.l_used / max(solve.compute / problem.S, 1e-12))
        probe_io = predict_solve(problem, dataclasses.replace(machine, read_other_seconds=0.0), one, "gram").io
        values["read_other_seconds"] = max(0.0, solve.io - probe_io) / problem.n_s_tiles
        k = solve.active_set or problem.k
        rest = solve.serial - nnls_seconds(dataclasses.replace(machine, **values, nnls_iter_seconds=0.0), n, k)
        values["nnls_iter_seconds"] = max(0.0, rest / max(k, 1))
        values["solve_setup_seconds"] = max(0.0, solve.wall - solve.compute - solve.io - solve.comm - solve.serial)
    return dataclasses.replace(machine, **values)


def with_probe(costs: Machine, probed: Machine) -> Machine:
    """``costs`` (calibrated) with the I/O, network and contention that ``probed`` measured.  Local."""
    keep = ("write_bw_rank", "write_bw_node", "write_bw_fs", "read_bw_rank", "read_bw_node", "read_bw_fs",
            "io_round_seconds", "read_tile_seconds", "latency", "bandwidth", "contention")
    return dataclasses.replace(costs, **{k: getattr(probed, k) for k in keep})


def solve_layouts(problem: Problem, machine: Machine) -> list[tuple[str, int, int]]:
    """Rank layouts worth predicting for the solve: (label, ranks per node, threads).  Local.

    One rank per core; the most ranks per node (a power of two) whose working set still fits
    the per-rank budget when it does not at one per core; one rank per node with all cores as
    BLAS threads (the only way the dense Gram matrix of a large N can fit).
    """
    cores = machine.cores_per_node
    out = [("1 rank/core", cores, 1)]
    lay = Layout(cores, cores, 1)
    pred = predict_solve(problem, machine, lay)
    if pred.method == "working-set" and any("exceeds" in n for n in pred.notes):
        per_node = cores
        while per_node > 1:
            per_node //= 2
            trial = predict_solve(problem, machine, Layout(per_node, per_node, 1))
            if not any("exceeds" in n for n in trial.notes):
                out.append((f"{per_node} ranks/node (working set fits)", per_node, 1))
                break
    if cores > 1:
        out.append((f"1 rank/node × {cores} threads", 1, cores))
    return out
