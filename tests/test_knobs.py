import pytest

from cubefit_mpi.config.errors import InputError, KnobError
from cubefit_mpi.config.knobs import Knobs, knob_table

SPEC_DEFAULTS = {
    "CUBEFIT_RDCC_NSLOTS": 400003, "CUBEFIT_RDCC_NBYTES": 4294967296, "CUBEFIT_RDCC_W0": 0.9,
    "CUBEFIT_RDCC_SLOTS": 1000003, "CUBEFIT_RDCC_BYTES": 268435456, "CUBEFIT_BT_STEPS": 3,
    "CUBEFIT_BT_FACTOR": 0.5, "CUBEFIT_TRUST_TAU": 0.7, "CUBEFIT_EPS": 1e-12,
    "CUBEFIT_ZERO_COL_REL": 1e-12, "CUBEFIT_ZERO_COL_ABS": 1e-24, "CUBEFIT_DEBUG_SAFE": False,
    "CUBEFIT_NNLS_PROP_PER_BAND": 6, "CUBEFIT_TILE_BT_STEPS": 6, "CUBEFIT_TILE_BT_FACTOR": 0.5,
    "CUBEFIT_GLOBAL_TAU": 0.5, "CUBEFIT_GLOBAL_ENERGY_BLEND": 1e-3, "CUBEFIT_NNLS_ENABLE": True,
    "CUBEFIT_NNLS_EVERY": 1, "CUBEFIT_NNLS_MAX_COLS": 128, "CUBEFIT_NNLS_MAX_BYTES": 1000000000,
    "CUBEFIT_NNLS_SUB_L": 0, "CUBEFIT_NNLS_SOLVER": "nnls", "CUBEFIT_NNLS_MAX_ITER": 50,
    "CUBEFIT_NNLS_MIN_IMPROVE": 0.999, "CUBEFIT_LAMBDA_WEIGHTS_ENABLE": True,
    "CUBEFIT_LAMBDA_WEIGHTS_DSET": "/HyperCube/lambda_weights", "CUBEFIT_LAMBDA_MIN_W": 1e-6,
    "CUBEFIT_LAMBDA_WEIGHTS_AUTO": True, "CUBEFIT_TRACKER_QSIZE": 8192, "CUBEFIT_TRACKER_FLUSH_EVERY": 128,
    "CUBEFIT_TRACKER_FLUSH_SEC": 5.0, "CUBEFIT_RMSE_STRIDE": 16, "HDF5_USE_FILE_LOCKING": False,
    "CUBEFIT_MP_CTX": "forkserver", "FITTRACKER_START": "spawn",
}


def test_every_spec_knob_has_the_spec_default():
    values = Knobs.from_env({}).as_dict()
    for name, default in SPEC_DEFAULTS.items():
        assert values[name] == default, name


def test_parsing_types():
    k = Knobs.from_env({"CUBEFIT_BT_STEPS": "5", "CUBEFIT_EPS": "1e-9", "CUBEFIT_NNLS_ENABLE": "0",
                        "CUBEFIT_NNLS_SOLVER": "fista", "CUBEFIT_RDCC_NBYTES": "1e9",
                        "HDF5_USE_FILE_LOCKING": "TRUE"})
    assert (k.bt_steps, k.eps, k.nnls_enable, k.nnls_solver, k.rdcc_nbytes, k.hdf5_use_file_locking) == \
        (5, 1e-9, False, "fista", 1000000000, True)
    assert k.differing_from_defaults()["CUBEFIT_BT_STEPS"] == 5


@pytest.mark.parametrize("env,match", [
    ({"CUBEFIT_BT_STEPS": "three"}, "CUBEFIT_BT_STEPS='three': expected an integer"),
    ({"CUBEFIT_EPS": "nan"}, "CUBEFIT_EPS='nan': expected a number"),
    ({"CUBEFIT_NNLS_ENABLE": "maybe"}, "CUBEFIT_NNLS_ENABLE='maybe': expected one of 1/0"),
    ({"CUBEFIT_NNLS_SOLVER": "adam"}, "expected one of nnls, lsq, mu, fista"),
    ({"CUBEFIT_BT_FACTOR": "1.5"}, "expected a value <= 1"),
    ({"CUBEFIT_TRUST_TAUU": "0.5"}, "unknown .*did you mean CUBEFIT_TRUST_TAU"),
    ({"CUBEFIT_LAMBDA_WEIGHTS_DSET": "weights"}, "absolute HDF5 path"),
])
def test_bad_values_are_errors(env, match):
    with pytest.raises(KnobError, match=match):
        Knobs.from_env(env)
    assert issubclass(KnobError, InputError)


def test_frozen_and_table():
    k = Knobs.from_env({})
    with pytest.raises(Exception):
        k.bt_steps = 4
    names = [row[0] for row in knob_table()]
    assert set(SPEC_DEFAULTS) <= set(names)


def test_jobscript_variables_are_not_knobs():
    k = Knobs.from_env({"CUBEFIT_FILE": "g.h5", "CUBEFIT_MOCK": "10,2,3,100", "CUBEFIT_SOLVE_ARGS": "--ridge 1"})
    assert k == Knobs.from_env({})
    with pytest.raises(KnobError, match="CUBEFIT_FILES: unknown"):
        Knobs.from_env({"CUBEFIT_FILES": "g.h5"})


def test_mpiio_hints_parse():
    from cubefit_mpi.io.h5file import mpiio_info

    info = mpiio_info("romio_cb_write=disable, romio_cb_read=enable")
    assert info.Get("romio_cb_write") == "disable" and info.Get("romio_cb_read") == "enable"
    assert mpiio_info("none").Get_nkeys() == 0
    with pytest.raises(InputError, match="CUBEFIT_MPIIO_HINTS='romio_cb_write': expected key=value"):
        mpiio_info("romio_cb_write")
