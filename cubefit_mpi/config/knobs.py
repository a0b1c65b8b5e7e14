"""Every environment knob of cubefit_mpi, parsed once into one typed, frozen object.

The defaults are the spec's (``CubeFit.md``, "Environment variables").  A ``CUBEFIT_*``
variable that is not known here, or whose value does not parse, is an error (``KnobError``,
exit 2) naming the variable and what was expected -- never a silent default.

``CUBEFIT_MP_CTX`` (the predecessor's multiprocessing start method) is accepted and ignored:
MPI ranks replace the process pool.  ``OMP_NUM_THREADS`` & co. are left to the launcher;
``CUBEFIT_BLAS_THREADS`` sets them for our own BLAS calls when given.  The Slurm jobscripts'
own variables (``CUBEFIT_FILE``, ``CUBEFIT_MOCK``, ..., ``CUBEFIT_<STEP>_ARGS``) are accepted
and ignored.

The predecessor's knobs that cubefit_mpi does not implement (:data:`PREDECESSOR_KNOBS`: its
process pool, its random starts and probe tiles, its Jacobi seed, ...) are accepted so that its
jobscripts keep working; :func:`predecessor_knobs` lists those set, each with what replaces it,
and the command line logs one warning for each (rank 0, once per run).

Local (no MPI).  Importing this module reads nothing; call :func:`get_knobs`.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import KnobError

# variables of the Slurm jobscripts (jobscripts/README.md): accepted and ignored here
JOBSCRIPT_VARIABLES = frozenset({"CUBEFIT_FILE", "CUBEFIT_MOCK", "CUBEFIT_NORM", "CUBEFIT_METHOD", "CUBEFIT_OUT",
                                 "CUBEFIT_STEPS", "CUBEFIT_THREADS", "CUBEFIT_RANKS", "CUBEFIT_REPEATS"})
_JOBSCRIPT_ARGS = re.compile(r"CUBEFIT_[A-Z]+_ARGS$")
NNLS_GRAM_METHODS = ("auto", "lawson-hanson", "block-pivoting")   # numerics.nnls_select runs them

_WARM = "`solve --method kaczmarz --warm-start jacobi` (or `exact`, `resume`)"
_BACKTRACK = "CUBEFIT_TILE_BT_STEPS / CUBEFIT_TILE_BT_FACTOR (backtracking of the aggregated step)"
_DETERMINISTIC = "cubefit_mpi has no random start or tile sampling: every run takes the same path"
# Every CUBEFIT_* name the predecessor (adriano-poci/CubeFit at 5cd148c) reads that cubefit_mpi
# does not implement, with what replaces it.  Accepted with one warning each; the value is unused.
PREDECESSOR_KNOBS: dict[str, str] = {
    # the multiprocessing pool: MPI ranks replace it
    "CUBEFIT_POOL_PING_TIMEOUT": "moot under MPI: no worker pool to ping (ranks replace it)",
    "CUBEFIT_POOL_RENEW_EVERY_EPOCH": "moot under MPI: no worker pool to renew (ranks replace it)",
    "CUBEFIT_WORKER_MAXTASKS": "moot under MPI: no pool workers to recycle (ranks replace them)",
    # random starts, symmetry breaking and tile sampling
    "CUBEFIT_SEED": _DETERMINISTIC + "; the starting point is " + _WARM,
    "CUBEFIT_SYMBREAK_EPS": "no symmetry breaking is needed: " + _WARM + " or the exact solver",
    "CUBEFIT_SYMBREAK_MODE": "no symmetry breaking is needed: " + _WARM + " or the exact solver",
    "CUBEFIT_POLISH_SEED": _DETERMINISTIC + " (every tile is visited in each epoch)",
    "CUBEFIT_GLOBAL_TILE_SEED": _DETERMINISTIC + " (every tile is visited in each epoch)",
    # probe tiles of the predecessor's step acceptance
    "CUBEFIT_PROBE_TILES": "no probe tiles: steps are accepted by " + _BACKTRACK,
    "CUBEFIT_PROBE_SEED": "no probe tiles: " + _DETERMINISTIC,
    "CUBEFIT_PROBE_GROWTH_MAX": "no probe tiles: steps are accepted by " + _BACKTRACK,
    "CUBEFIT_PROBE_BT_MAX": "replaced by CUBEFIT_TILE_BT_STEPS",
    "CUBEFIT_PROBE_BT_SHRINK": "replaced by CUBEFIT_TILE_BT_FACTOR",
    "CUBEFIT_PROBE_SIGN_FLIP": "no probe tiles: steps are accepted by " + _BACKTRACK,
    "CUBEFIT_PROBE_IMPROVE_TOL": "no probe tiles: steps are accepted by " + _BACKTRACK,
    # the Jacobi / NNLS seed
    "CUBEFIT_JACOBI_DIAG": "the Jacobi start has no diagnostics switch: " + _WARM,
    "CUBEFIT_JACOBI_MU_ITERS": "the Jacobi start has no MU fallback: " + _WARM,
    "CUBEFIT_JACOBI_NNLS_K": "the Jacobi start has no NNLS polish: " + _WARM + " (exact: the full NNLS)",
    "CUBEFIT_JACOBI_NNLS_PER_C": "the Jacobi start has no NNLS polish: " + _WARM + " (exact: the full NNLS)",
    "CUBEFIT_SEED_REL_FLOOR": "the Jacobi start has no floors: " + _WARM,
    "CUBEFIT_SEED_ABS_FLOOR": "the Jacobi start has no floors: " + _WARM,
    "CUBEFIT_SEED_SIMPLEX": "the Jacobi start has no simplex projection: " + _WARM,
    "CUBEFIT_SEED_PATH": "no seed dataset is read: " + _WARM + ", or warm_start=array in "
                         "cubefit_mpi.solvers.kaczmarz.solve_kaczmarz",
    "CUBEFIT_USE_NNLS_PRIOR": "no seed prior: `solve --ridge` (CUBEFIT_NNLS_L2) is the only L2 term",
    # regularisation and orbit weights
    "CUBEFIT_KACZ_L2": "replaced by `solve --ridge` (CUBEFIT_NNLS_L2), the same for both methods",
    "CUBEFIT_ORBIT_BETA": "replaced by `solve --orbit-weights ... --orbit-strength`",
    "CUBEFIT_ORBIT_WEIGHTS_DSET": "replaced by `solve --orbit-weights /DATASET`",
    "CUBEFIT_MIN_ACTIVE_ORBITS": "no orbit pruning: every component stays in the fit (the exact NNLS "
                                 "decides which weights are zero)",
    # step control and guards of the predecessor's iterations
    "CUBEFIT_DENOM_FLOOR_FRAC": "replaced by CUBEFIT_EPS and CUBEFIT_ZERO_COL_ABS (denominator floors)",
    "CUBEFIT_GLOBAL_STEP_FRAC": "replaced by `solve --lr` and CUBEFIT_GLOBAL_TAU",
    "CUBEFIT_NNLS_RATIO_WORSEN": "replaced by CUBEFIT_NNLS_MIN_IMPROVE (polish acceptance)",
    "CUBEFIT_ZERO_COL_FREEZE": "the freeze follows CUBEFIT_ZERO_COL_REL / CUBEFIT_ZERO_COL_ABS "
                               "(set both to 0 to turn it off)",
    "CUBEFIT_RMSE_ABORT": "no RMSE abort cap: the exact solver needs none; `watch FILE` follows a Kaczmarz run",
    "CUBEFIT_RMSE_GUARD_TOL": "no RMSE guard: the tracker records every epoch (`watch FILE`)",
    "CUBEFIT_RMSE_PROXY_GUARD": "no RMSE proxy guard: the tracker records every epoch (`watch FILE`)",
    "CUBEFIT_RMSE_WEIGHTED": "the RMSE is always lambda-weighted when weights are used "
                             "(CUBEFIT_LAMBDA_WEIGHTS_ENABLE)",
    # diagnostics and snapshots
    "CUBEFIT_CP_FLUX_ENABLE": "replaced by `build --norm data` / `convert-norm` (the column flux scaling)",
    "CUBEFIT_SHIFT_DIAG": "replaced by `velocity-bias FILE` (the global velocity offset)",
    "CUBEFIT_X_SNAPSHOT_SEC": "the fit tracker snapshots x after every epoch (sidecar /snapshots); no interval",
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _knob(env: str, default: Any, doc: str, *, choices: tuple | None = None,
          minimum: float | None = None, maximum: float | None = None):
    """Declare one knob: the env variable, default, and validation limits."""
    return field(default=default, metadata=dict(env=env, doc=doc, choices=choices,
                                                minimum=minimum, maximum=maximum))


@dataclass(frozen=True)
class Knobs:
    """Resolved values of all knobs (read-only).  See ``docs/CubeFit.md`` for each one."""

    # --- HDF5 & dataset caching -------------------------------------------------------------
    hdf5_use_file_locking: bool = _knob("HDF5_USE_FILE_LOCKING", False,
                                        "HDF5 file locking (off: safe on shared filesystems)")
    rdcc_nslots: int = _knob("CUBEFIT_RDCC_NSLOTS", 400003, "file-level raw chunk cache slots", minimum=1)
    rdcc_nbytes: int = _knob("CUBEFIT_RDCC_NBYTES", 4294967296, "file-level raw chunk cache bytes", minimum=0)
    rdcc_w0: float = _knob("CUBEFIT_RDCC_W0", 0.9, "chunk cache preemption policy", minimum=0.0, maximum=1.0)
    mpiio_hints: str = _knob("CUBEFIT_MPIIO_HINTS", "romio_cb_write=disable,romio_cb_read=disable",
                             "MPI-IO hints key=value,... for parallel files ('none': the MPI library's defaults)")
    rdcc_slots: int = _knob("CUBEFIT_RDCC_SLOTS", 1000003, "per-dataset chunk cache slots", minimum=1)
    rdcc_bytes: int = _knob("CUBEFIT_RDCC_BYTES", 268435456, "per-dataset chunk cache bytes", minimum=0)
    # --- processes & threads ----------------------------------------------------------------
    mp_ctx: str = _knob("CUBEFIT_MP_CTX", "forkserver",
                        "predecessor's multiprocessing start method; ignored (MPI ranks replace the pool)",
                        choices=("forkserver", "spawn", "fork"))
    blas_threads: int = _knob("CUBEFIT_BLAS_THREADS", 0, "BLAS threads per rank (0: leave as launched)", minimum=0)
    read_ahead: str = _knob("CUBEFIT_READ_AHEAD", "auto",
                            "Kaczmarz reads the next tile in a background thread (auto: when the node has a "
                            "core more than its ranks)", choices=("auto", "1", "0"))
    fft_threads: int = _knob("CUBEFIT_FFT_THREADS", 1, "FFTW threads per rank in the builder", minimum=1)
    build_method: str = _knob("CUBEFIT_BUILD_METHOD", "auto",
                              "how build fills tiles: gemm (one GEMM of the two factors per unit), fft (FFT "
                              "convolution per (s, c) + sparse rebin), auto (gemm when the factors are exact)",
                              choices=("auto", "gemm", "fft"))
    build_checkpoint_sec: float = _knob("CUBEFIT_BUILD_CHECKPOINT_SEC", 10.0,
                                        "seconds between build checkpoints (file sync, then done bits)",
                                        minimum=0.0)
    # --- solver: worker-level stability & steps ---------------------------------------------
    bt_steps: int = _knob("CUBEFIT_BT_STEPS", 3, "backtracking steps per band", minimum=0)
    bt_factor: float = _knob("CUBEFIT_BT_FACTOR", 0.5, "alpha shrink per backtracking step", minimum=0.0, maximum=1.0)
    trust_tau: float = _knob("CUBEFIT_TRUST_TAU", 0.7, "trust region ||dR_w|| <= tau ||R_w||", minimum=0.0)
    eps: float = _knob("CUBEFIT_EPS", 1e-12, "numerical floor in denominators", minimum=0.0)
    zero_col_rel: float = _knob("CUBEFIT_ZERO_COL_REL", 1e-12, "freeze columns below this x median energy", minimum=0.0)
    zero_col_abs: float = _knob("CUBEFIT_ZERO_COL_ABS", 1e-24, "freeze columns below this energy", minimum=0.0)
    debug_safe: bool = _knob("CUBEFIT_DEBUG_SAFE", False, "log sanitisation/freeze counts per tile")
    nnls_prop_per_band: int = _knob("CUBEFIT_NNLS_PROP_PER_BAND", 6, "polish candidates per band", minimum=0)
    # --- solver: aggregation & NNLS polish --------------------------------------------------
    tile_bt_steps: int = _knob("CUBEFIT_TILE_BT_STEPS", 6, "backtracking steps for aggregated dR", minimum=0)
    tile_bt_factor: float = _knob("CUBEFIT_TILE_BT_FACTOR", 0.5, "aggregated alpha shrink", minimum=0.0, maximum=1.0)
    global_tau: float = _knob("CUBEFIT_GLOBAL_TAU", 0.5, "global step cap sum dx^2 E vs ||Y||", minimum=0.0)
    epoch_guard: bool = _knob("CUBEFIT_EPOCH_GUARD", True,
                              "Kaczmarz: track 1/2 chi2 per epoch, return the best iterate, undo an epoch that "
                              "raised it")
    epoch_damp: float = _knob("CUBEFIT_EPOCH_DAMP", 0.5,
                              "Kaczmarz: relaxation of every later epoch multiplied by this after an undone epoch",
                              minimum=0.0, maximum=1.0)
    global_energy_blend: float = _knob("CUBEFIT_GLOBAL_ENERGY_BLEND", 1e-3,
                                       "blend of global column energy in denominators", minimum=0.0)
    nnls_enable: bool = _knob("CUBEFIT_NNLS_ENABLE", True, "tile-local weighted NNLS polish")
    nnls_every: int = _knob("CUBEFIT_NNLS_EVERY", 1, "polish every N tiles", minimum=1)
    nnls_max_cols: int = _knob("CUBEFIT_NNLS_MAX_COLS", 128, "max columns in the polish system", minimum=1)
    nnls_max_bytes: int = _knob("CUBEFIT_NNLS_MAX_BYTES", 1000000000, "memory cap of the polish system", minimum=1)
    nnls_sub_l: int = _knob("CUBEFIT_NNLS_SUB_L", 0, "lambda subsample for the polish (0: all)", minimum=0)
    nnls_solver: str = _knob("CUBEFIT_NNLS_SOLVER", "nnls", "polish back-end",
                             choices=("nnls", "lsq", "mu", "fista"))
    nnls_max_iter: int = _knob("CUBEFIT_NNLS_MAX_ITER", 50, "iteration cap of iterative back-ends", minimum=1)
    nnls_min_improve: float = _knob("CUBEFIT_NNLS_MIN_IMPROVE", 0.999,
                                    "accept polish if weighted RMSE ratio < this", minimum=0.0)
    nnls_l2: float = _knob("CUBEFIT_NNLS_L2", 0.0, "ridge rho of the exact solve (rho/2 ||x||^2)", minimum=0.0)
    gram_max_bytes: int = _knob("CUBEFIT_GRAM_MAX_BYTES", 0,
                                "max bytes of the dense Gram matrix (0: from node memory and ranks)", minimum=0)
    nnls_gram_method: str = _knob("CUBEFIT_NNLS_GRAM_METHOD", "auto",
                                  "exact NNLS on the Gram matrix (auto: by N and the expected density)",
                                  choices=NNLS_GRAM_METHODS)
    # --- lambda-weights ---------------------------------------------------------------------
    lambda_weights_enable: bool = _knob("CUBEFIT_LAMBDA_WEIGHTS_ENABLE", True, "use lambda-weights in solvers")
    lambda_weights_dset: str = _knob("CUBEFIT_LAMBDA_WEIGHTS_DSET", "/HyperCube/lambda_weights",
                                     "dataset holding the weights")
    lambda_min_w: float = _knob("CUBEFIT_LAMBDA_MIN_W", 1e-6, "floor on lambda-weights", minimum=0.0, maximum=1.0)
    lambda_weights_auto: bool = _knob("CUBEFIT_LAMBDA_WEIGHTS_AUTO", True, "generate weights when missing")
    # --- fit tracking -----------------------------------------------------------------------
    fittracker_start: str = _knob("FITTRACKER_START", "spawn", "tracker writer start method",
                                  choices=("spawn", "forkserver", "fork", "thread"))
    tracker_qsize: int = _knob("CUBEFIT_TRACKER_QSIZE", 8192, "tracker queue size", minimum=1)
    tracker_flush_every: int = _knob("CUBEFIT_TRACKER_FLUSH_EVERY", 128, "flush after N messages", minimum=1)
    tracker_flush_sec: float = _knob("CUBEFIT_TRACKER_FLUSH_SEC", 5.0, "flush after this many seconds", minimum=0.0)
    rmse_stride: int = _knob("CUBEFIT_RMSE_STRIDE", 16, "enqueue every Nth RMSE sample", minimum=1)
    # --- logging ----------------------------------------------------------------------------
    log_level: str = _knob("CUBEFIT_LOG_LEVEL", "INFO", "rank-0 log level",
                           choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Knobs":
        """Parse knobs from ``environ`` (default ``os.environ``).  Local.

        Raises
        ------
        KnobError
            An unknown ``CUBEFIT_*`` variable (with the closest known name) or a value that
            does not parse or is out of range.
        """
        environ = os.environ if environ is None else environ
        known = {f.metadata["env"]: f for f in dataclasses.fields(cls)}
        for name in environ:
            if name in JOBSCRIPT_VARIABLES or _JOBSCRIPT_ARGS.match(name) or name in PREDECESSOR_KNOBS:
                continue
            if name.startswith("CUBEFIT_") and name not in known:
                close = difflib.get_close_matches(name, [*known, *PREDECESSOR_KNOBS, *JOBSCRIPT_VARIABLES], n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise KnobError(f"{name}: unknown cubefit_mpi environment variable{hint}")
        values = {}
        for env, f in known.items():
            if env in environ and environ[env].strip() != "":
                values[f.name] = _parse(env, environ[env], f)
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """``{ENV_NAME: value}`` for logging and for storing as HDF5 attributes.  Local."""
        return {f.metadata["env"]: getattr(self, f.name) for f in dataclasses.fields(self)}

    def differing_from_defaults(self) -> dict[str, Any]:
        """Only the knobs whose value is not the spec's default.  Local."""
        return {f.metadata["env"]: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}


def _parse(env: str, raw: str, f: dataclasses.Field) -> Any:
    kind = type(f.default)
    text = raw.strip()
    meta = f.metadata
    try:
        if kind is bool:
            low = text.lower()
            if low in _TRUE:
                value: Any = True
            elif low in _FALSE:
                value = False
            else:
                raise ValueError
        elif kind is int:
            value = int(float(text)) if "e" in text.lower() else int(text)
            if "e" in text.lower() and float(text) != value:
                raise ValueError
        elif kind is float:
            value = float(text)
            if value != value:  # NaN
                raise ValueError
        else:
            value = text.upper() if env == "CUBEFIT_LOG_LEVEL" else text
    except ValueError:
        expected = {bool: "one of 1/0/true/false/yes/no/on/off", int: "an integer",
                    float: "a number"}.get(kind, "a string")
        raise KnobError(f"{env}={raw!r}: expected {expected}") from None
    if meta["choices"] is not None and value not in meta["choices"]:
        raise KnobError(f"{env}={raw!r}: expected one of {', '.join(meta['choices'])}")
    if meta["minimum"] is not None and value < meta["minimum"]:
        raise KnobError(f"{env}={raw!r}: expected a value >= {meta['minimum']}")
    if meta["maximum"] is not None and value > meta["maximum"]:
        raise KnobError(f"{env}={raw!r}: expected a value <= {meta['maximum']}")
    if env == "CUBEFIT_LAMBDA_WEIGHTS_DSET" and not value.startswith("/"):
        raise KnobError(f"{env}={raw!r}: expected an absolute HDF5 path such as /HyperCube/lambda_weights")
    return value


def predecessor_knobs(environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """``(NAME, what replaces it)`` of every predecessor-only knob set in ``environ``, sorted.  Local."""
    environ = os.environ if environ is None else environ
    return [(name, PREDECESSOR_KNOBS[name]) for name in sorted(environ) if name in PREDECESSOR_KNOBS]


_WARNED: set[str] = set()


def warn_predecessor_knobs(logger, environ: Mapping[str, str] | None = None) -> list[str]:
    """Log one warning per predecessor-only knob set, once per process.  Local.

    Call it on rank 0 only.  Returns the names warned about by this call.
    """
    fresh = []
    for name, note in predecessor_knobs(environ):
        if name not in _WARNED:
            _WARNED.add(name)
            fresh.append(name)
            logger.warning("%s: a knob of the predecessor, ignored by cubefit_mpi: %s", name, note)
    return fresh


_CACHE: dict[tuple, Knobs] = {}


def get_knobs(environ: Mapping[str, str] | None = None) -> Knobs:
    """The knobs for the current environment, parsed once per distinct environment.  Local.

    The cache is keyed on the knob variables themselves: a changed ``os.environ`` (a test's
    monkeypatch, ``run``'s ``knobs:`` section) is parsed anew on the next call.
    """
    environ = os.environ if environ is None else environ
    key = tuple(sorted((k, v) for k, v in environ.items()
                       if k.startswith(("CUBEFIT_", "FITTRACKER_", "HDF5_USE_FILE_LOCKING"))))
    if key not in _CACHE:
        _CACHE[key] = Knobs.from_env(environ)
    return _CACHE[key]


def knob_table() -> list[tuple[str, Any, str]]:
    """``(ENV_NAME, default, description)`` for every knob, for docs and ``init-config``.  Local."""
    return [(f.metadata["env"], f.default, f.metadata["doc"]) for f in dataclasses.fields(Knobs)]
