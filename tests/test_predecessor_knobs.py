"""The predecessor's jobscripts keep working: every CUBEFIT_* name it reads is recognised.

The names below are every ``CUBEFIT_*`` name in the predecessor's Python and shell sources
(adriano-poci/CubeFit at 5cd148c, its HEAD), found with ``git grep -ohE 'CUBEFIT_[A-Z0-9_]+'``;
the values are what its own scripts set (``kz_run.py``, ``kz_*.sh``) or its defaults.
"""
import logging

import pytest
from conftest import run_cli

from cubefit_mpi.config.errors import KnobError
from cubefit_mpi.config.knobs import (
    JOBSCRIPT_VARIABLES, PREDECESSOR_KNOBS, Knobs, knob_table, predecessor_knobs, warn_predecessor_knobs
)

# implemented by cubefit_mpi: the predecessor's values keep their meaning
IMPLEMENTED = {
    "CUBEFIT_BT_FACTOR": "0.5", "CUBEFIT_BT_STEPS": "3", "CUBEFIT_DEBUG_SAFE": "0", "CUBEFIT_EPS": "1e-12",
    "CUBEFIT_GLOBAL_ENERGY_BLEND": "0.0", "CUBEFIT_GLOBAL_TAU": "0.3", "CUBEFIT_LAMBDA_MIN_W": "1e-6",
    "CUBEFIT_LAMBDA_WEIGHTS_AUTO": "1", "CUBEFIT_LAMBDA_WEIGHTS_DSET": "/HyperCube/lambda_weights",
    "CUBEFIT_LAMBDA_WEIGHTS_ENABLE": "1", "CUBEFIT_MP_CTX": "forkserver", "CUBEFIT_NNLS_ENABLE": "0",
    "CUBEFIT_NNLS_EVERY": "5", "CUBEFIT_NNLS_L2": "0", "CUBEFIT_NNLS_MAX_BYTES": "1000000000",
    "CUBEFIT_NNLS_MAX_COLS": "64", "CUBEFIT_NNLS_MAX_ITER": "200", "CUBEFIT_NNLS_MIN_IMPROVE": "0.9995",
    "CUBEFIT_NNLS_PROP_PER_BAND": "0", "CUBEFIT_NNLS_SOLVER": "nnls", "CUBEFIT_NNLS_SUB_L": "512",
    "CUBEFIT_RDCC_BYTES": "268435456", "CUBEFIT_RDCC_NBYTES": str(16 * 1024**3), "CUBEFIT_RDCC_NSLOTS": "400003",
    "CUBEFIT_RDCC_SLOTS": "1000003", "CUBEFIT_RDCC_W0": "0.9", "CUBEFIT_RMSE_STRIDE": "16",
    "CUBEFIT_TILE_BT_FACTOR": "0.5", "CUBEFIT_TILE_BT_STEPS": "6", "CUBEFIT_TRACKER_FLUSH_EVERY": "128",
    "CUBEFIT_TRACKER_FLUSH_SEC": "5.0", "CUBEFIT_TRACKER_QSIZE": "8192", "CUBEFIT_TRUST_TAU": "0.7",
    "CUBEFIT_ZERO_COL_ABS": "1e-24", "CUBEFIT_ZERO_COL_REL": "5e-4",
}
# read by the predecessor, not by cubefit_mpi: accepted with one warning each
MOOT = {
    "CUBEFIT_CP_FLUX_ENABLE": "0", "CUBEFIT_DENOM_FLOOR_FRAC": "1e-6", "CUBEFIT_GLOBAL_STEP_FRAC": "1.0",
    "CUBEFIT_GLOBAL_TILE_SEED": "12345", "CUBEFIT_JACOBI_DIAG": "1", "CUBEFIT_JACOBI_MU_ITERS": "10",
    "CUBEFIT_JACOBI_NNLS_K": "128", "CUBEFIT_JACOBI_NNLS_PER_C": "8", "CUBEFIT_KACZ_L2": "0.0",
    "CUBEFIT_MIN_ACTIVE_ORBITS": "8", "CUBEFIT_NNLS_RATIO_WORSEN": "1.02", "CUBEFIT_ORBIT_BETA": "0.0",
    "CUBEFIT_ORBIT_WEIGHTS_DSET": "/HyperCube/norm/orbit_weights", "CUBEFIT_POLISH_SEED": "12345",
    "CUBEFIT_POOL_PING_TIMEOUT": "5.0", "CUBEFIT_POOL_RENEW_EVERY_EPOCH": "0", "CUBEFIT_PROBE_BT_MAX": "8",
    "CUBEFIT_PROBE_BT_SHRINK": "0.5", "CUBEFIT_PROBE_GROWTH_MAX": "1.10", "CUBEFIT_PROBE_IMPROVE_TOL": "1e-12",
    "CUBEFIT_PROBE_SEED": "24680", "CUBEFIT_PROBE_SIGN_FLIP": "1", "CUBEFIT_PROBE_TILES": "6",
    "CUBEFIT_RMSE_ABORT": "0.0", "CUBEFIT_RMSE_GUARD_TOL": "0.0", "CUBEFIT_RMSE_PROXY_GUARD": "0",
    "CUBEFIT_RMSE_WEIGHTED": "1", "CUBEFIT_SEED": "12345", "CUBEFIT_SEED_ABS_FLOOR": "1e-24",
    "CUBEFIT_SEED_PATH": "/Seeds/x0_nnls_patch", "CUBEFIT_SEED_REL_FLOOR": "1e-6", "CUBEFIT_SEED_SIMPLEX": "1",
    "CUBEFIT_SHIFT_DIAG": "0", "CUBEFIT_SYMBREAK_EPS": "1e-6", "CUBEFIT_SYMBREAK_MODE": "qr",
    "CUBEFIT_USE_NNLS_PRIOR": "0", "CUBEFIT_WORKER_MAXTASKS": "0", "CUBEFIT_X_SNAPSHOT_SEC": "3600",
    "CUBEFIT_ZERO_COL_FREEZE": "1",
}
JOBSCRIPT = {**IMPLEMENTED, **MOOT}


def test_every_predecessor_name_is_recognised_and_the_tables_are_disjoint():
    assert len(JOBSCRIPT) == 74 and len(MOOT) == 39
    ours = {env for env, _, _ in knob_table()}
    assert set(IMPLEMENTED) <= ours
    assert set(MOOT) == set(PREDECESSOR_KNOBS)
    assert not set(PREDECESSOR_KNOBS) & (ours | JOBSCRIPT_VARIABLES)
    knobs = Knobs.from_env(JOBSCRIPT)            # nothing raises
    assert knobs.nnls_sub_l == 512 and knobs.zero_col_rel == 5e-4 and knobs.rdcc_nbytes == 16 * 1024**3
    assert Knobs.from_env(MOOT) == Knobs.from_env({})          # moot values change nothing
    assert [name for name, _ in predecessor_knobs(JOBSCRIPT)] == sorted(MOOT)


def test_every_note_names_what_replaces_the_knob():
    for name, note in PREDECESSOR_KNOBS.items():
        assert "moot under MPI" in note or "`" in note or "CUBEFIT_" in note or "no " in note, name


def test_a_name_neither_reads_is_still_an_error_with_the_closest_name():
    with pytest.raises(KnobError, match=r"CUBEFIT_PROBE_TILE: unknown .*did you mean CUBEFIT_PROBE_TILES\?"):
        Knobs.from_env({"CUBEFIT_PROBE_TILE": "6"})
    with pytest.raises(KnobError, match=r"CUBEFIT_NNLS_EVRY: unknown .*did you mean CUBEFIT_NNLS_EVERY\?"):
        Knobs.from_env({**MOOT, "CUBEFIT_NNLS_EVRY": "5"})


def test_warnings_once_per_process(caplog):
    logger = logging.getLogger("cubefit_mpi.test_knobs")
    env = {"CUBEFIT_SEED": "1", "CUBEFIT_SHIFT_DIAG": "1", "CUBEFIT_BT_STEPS": "3"}
    with caplog.at_level(logging.WARNING, logger="cubefit_mpi.test_knobs"):
        first = warn_predecessor_knobs(logger, env)
        second = warn_predecessor_knobs(logger, env)
    assert second == [] and set(first) <= {"CUBEFIT_SEED", "CUBEFIT_SHIFT_DIAG"}
    for name in first:
        assert sum(name in r.getMessage() for r in caplog.records) == 1
    assert "velocity-bias" in PREDECESSOR_KNOBS["CUBEFIT_SHIFT_DIAG"]


@pytest.mark.parametrize("ranks", [None, 2])
def test_a_jobscript_with_every_predecessor_knob_runs(small_mock, ranks):
    res = run_cli("validate", small_mock, np_ranks=ranks, env=JOBSCRIPT)
    assert res.returncode == 0, res.stderr
    assert "inputs OK" in res.stdout
    warnings = [line for line in res.stderr.splitlines() if "a knob of the predecessor, ignored" in line]
    assert len(warnings) == len(MOOT)                       # rank 0 alone, one per knob
    for name, note in PREDECESSOR_KNOBS.items():
        assert sum(f"{name}: " in line for line in warnings) == 1, name
        assert any(line.endswith(note) for line in warnings), name
    typo = run_cli("validate", small_mock, np_ranks=ranks, env={**JOBSCRIPT, "CUBEFIT_SEEDPATH": "/x"})
    assert typo.returncode == 2
    assert "CUBEFIT_SEEDPATH: unknown cubefit_mpi environment variable (did you mean CUBEFIT_SEED_PATH?)" in typo.stderr
