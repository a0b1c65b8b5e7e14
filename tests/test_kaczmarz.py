"""The Kaczmarz stage on one rank: guarantees, optimality on easy data, and every knob's effect."""
import logging
import shutil

import h5py
import numpy as np
import pytest
import scipy.optimize
from mpi4py import MPI

from cubefit_mpi.config.errors import InputError
from cubefit_mpi.config.knobs import Knobs
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.solvers.kaczmarz import steps as ks
from cubefit_mpi.solvers.kaczmarz.solver import solve_kaczmarz
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.mock import make_mock

SELF = MPI.COMM_SELF
BASE = {"CUBEFIT_LAMBDA_WEIGHTS_ENABLE": "0"}


def knobs(**env):
    merged = dict(BASE)
    merged.update({f"CUBEFIT_{k.upper()}": str(v) for k, v in env.items()})
    return Knobs.from_env(merged)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Noise-free (P=4) and noisy (P=6, S/N 30) galaxies, C=2, 40 spaxels in 5 S-tiles of 8."""
    root = tmp_path_factory.mktemp("kaczmarz")
    out = {}
    for name, pops, snr in (("clean", 4, None), ("noisy", 6, 30.0)):
        path = root / f"{name}.h5"
        make_mock(str(path), MockSpec(spaxels=40, components=2, populations=pops, wavelengths=120, seed=5,
                                      snr=snr, masked_pixels=5), SELF)
        build_hypercube(str(path), S_chunk=8, comm=SELF)
        out[name] = path
    return out


@pytest.fixture
def clean(sources, tmp_path):
    return shutil.copy(sources["clean"], tmp_path / "clean.h5")


@pytest.fixture
def noisy(sources, tmp_path):
    return shutil.copy(sources["noisy"], tmp_path / "noisy.h5")


def dense(path, weights=None):
    """The weighted dense system (rows, N), (rows,) over unmasked pixels, and f(0)."""
    with h5py.File(path, "r") as f:
        a = f["/HyperCube/models"][...].astype(np.float64)
        y = f["/DataCube"][...]
        mask = f["/Mask"][...]
    s, c, p, _ = a.shape
    sw = np.ones(mask.sum()) if weights is None else np.sqrt(weights[mask])
    design = (a[..., mask] * sw).transpose(0, 3, 1, 2).reshape(-1, c * p)
    target = (y[:, mask] * sw).reshape(-1)
    return design, target


def objective(design, target, x):
    r = target - design @ x
    return 0.5 * float(r @ r)


def exact_optimum(path):
    design, target = dense(path)
    x, _ = scipy.optimize.nnls(design, target)
    return x, objective(design, target, x), 0.5 * float(target @ target)


def run(path, env=None, **kw):
    kw.setdefault("epochs", 2)
    return solve_kaczmarz(str(path), comm=SELF, knobs=knobs(**(env or {})), **kw)


def monotone(stats):
    return bool(np.all(stats["rmse_history"] <= stats["rmse_before"] * (1 + 1e-12)))


# ---------------------------------------------------------------------------------------------
def test_solution_written_nonnegative_and_monotone(clean):
    x, st = run(clean, epochs=3)
    assert np.all(x >= 0) and x.shape == (8,)
    with h5py.File(clean, "r") as f:
        assert np.array_equal(f["/X_global"][...], x)
        assert f["/X_global"].attrs["method"] == "kaczmarz"
        assert f["/X_global"].attrs["CUBEFIT_BT_STEPS"] == 3
    assert st["tiles"] == 15 and st["rmse_history"].size == 15 and monotone(st)
    assert st["history_tiles"][:5].tolist() == st["history_tiles"][5:10].tolist()
    design, target = dense(clean)
    assert st["objective"] == pytest.approx(objective(design, target, x), rel=1e-9, abs=1e-12)
    assert st["objective_zero"] == pytest.approx(0.5 * float(target @ target), rel=1e-12)
    assert np.allclose(st["component_totals"], x.reshape(2, 4).sum(axis=1))
    assert st["accepted_steps"] + st["rejected_steps"] == st["tiles"] and st["seconds"] > 0


def test_hardest_tile_first(clean):
    _, st = run(clean, epochs=1)
    with h5py.File(clean, "r") as f:
        y, mask = f["/DataCube"][...], f["/Mask"][...]
    norms = [float(np.sum(y[s:s + 8][:, mask] ** 2)) for s in range(0, 40, 8)]
    assert st["history_tiles"].tolist() == list(np.argsort(norms)[::-1])


def test_noise_free_reaches_the_exact_optimum(clean):
    x_opt, f_opt, f0 = exact_optimum(clean)
    x, st = run(clean, epochs=4)
    gap = (st["objective"] - f_opt) / (f0 - f_opt)
    assert gap < 1e-3 and gap < 1e-9
    assert np.allclose(x, x_opt, atol=1e-4)


def test_noisy_gap_is_reported(noisy):
    x_opt, f_opt, f0 = exact_optimum(noisy)
    with h5py.File(noisy, "r+") as f:                  # what `solve` (exact) leaves behind
        f.create_dataset("/X_global", data=x_opt)
        f["/X_global"].attrs["method"] = "exact"
    x, st = run(noisy, epochs=3)
    assert st["exact_objective"] == pytest.approx(f_opt, rel=1e-9)
    assert st["gap_rel"] == pytest.approx((st["objective"] - f_opt) / (f0 - f_opt), rel=1e-6)
    assert 0 < st["gap_rel"] < 0.05 and st["x_distance_rel"] > 0
    assert monotone(st)


def test_weighted_objective_with_lambda_weights(clean):
    from cubefit_mpi.stages.weights import ensure_lambda_weights

    weights = ensure_lambda_weights(str(clean), comm=SELF)
    assert weights.min() < 1.0
    x, st = solve_kaczmarz(str(clean), comm=SELF, knobs=Knobs.from_env({}), epochs=1)
    design, target = dense(clean, weights)
    assert st["objective"] == pytest.approx(objective(design, target, x), rel=1e-9, abs=1e-12)
    assert monotone(st)


# --- knobs of the polish ------------------------------------------------------------------------
@pytest.fixture
def recorder(monkeypatch):
    calls = []
    real = ks.nnls_dense

    def spy(design, target, **kw):
        calls.append(dict(kw, shape=design.shape))
        return real(design, target, **kw)

    monkeypatch.setattr(ks, "nnls_dense", spy)
    return calls


def test_nnls_enable(clean, recorder):
    _, on = run(clean)
    assert on["polish_calls"] == len(recorder) == 10 and on["polish_accepts"] > 0
    recorder.clear()
    _, off = run(clean, {"nnls_enable": 0})
    assert off["polish_calls"] == 0 and recorder == []


@pytest.mark.parametrize("method", ["nnls", "lsq", "mu", "fista"])
def test_nnls_solver_and_max_iter(clean, recorder, method):
    run(clean, {"nnls_solver": method, "nnls_max_iter": 7}, epochs=1)
    assert [c["method"] for c in recorder] == [method] * 5
    assert all(c["max_iter"] == 7 for c in recorder)


def test_nnls_max_iter_changes_fista(clean):
    x1, _ = run(clean, {"nnls_solver": "fista", "nnls_max_iter": 1})
    x2, _ = run(clean, {"nnls_solver": "fista", "nnls_max_iter": 200})
    assert np.abs(x1 - x2).max() > 1e-6


def test_nnls_sub_l_and_caps(clean, recorder):
    _, full = run(clean, epochs=1)
    assert full["polish_rows_max"] == 8 * 115 and full["polish_cols_max"] == 6
    _, sub = run(clean, {"nnls_sub_l": 10}, epochs=1)
    assert sub["polish_rows_max"] == 8 * 10
    _, cols = run(clean, {"nnls_max_cols": 2}, epochs=1)
    assert cols["polish_cols_max"] == 2
    _, mem = run(clean, {"nnls_max_bytes": 8 * 8 * 115 * 3}, epochs=1)
    assert mem["polish_cols_max"] == 3
    recorder.clear()
    _, none = run(clean, {"nnls_max_bytes": 100}, epochs=1)
    assert none["polish_calls"] == 0 and none["polish_skipped"] == 5 and recorder == []
    _, prop = run(clean, {"nnls_prop_per_band": 2}, epochs=1)
    assert prop["polish_cols_max"] == 2
    _, zero = run(clean, {"nnls_prop_per_band": 0}, epochs=1)
    assert zero["polish_calls"] == 0


def test_nnls_every_and_min_improve(clean):
    _, every = run(clean, {"nnls_every": 3}, epochs=2)            # tiles 3, 6, 9 of 10
    assert every["polish_calls"] == 3
    _, never = run(clean, {"nnls_min_improve": 0})
    assert never["polish_calls"] == 10 and never["polish_accepts"] == 0
    _, strict = run(clean, {"nnls_min_improve": 0.5})
    assert 0 < strict["polish_accepts"] < 10
    _, loose = run(clean, {"nnls_min_improve": 5})
    assert monotone(loose)


# --- knobs of the Kaczmarz step -------------------------------------------------------------------
NO_POLISH = {"nnls_enable": 0}


def test_trust_tau_bound_holds(clean):
    x_def, st_def = run(clean, NO_POLISH)
    x, st = run(clean, dict(NO_POLISH, trust_tau=0.05))
    assert st["trust_clipped"] > 0 and st["trust_ratio_max"] <= 0.05 * (1 + 1e-12)
    assert st_def["trust_ratio_max"] <= 0.7 * (1 + 1e-12)
    assert np.abs(x - x_def).max() > 1e-6 and monotone(st)


def test_bt_steps_and_factor(clean):
    # two bands (with one, the band and tile checks test the same direction) and a wide trust
    # region (with tau = 0.7 every step is clipped to the same length whatever alpha was)
    loose = dict(NO_POLISH, trust_tau=2)
    x_def, st_def = run(clean, loose, lr=3.0, c_bands=2)
    assert st_def["band_bt_shrinks"] > 0
    x0, st0 = run(clean, dict(loose, bt_steps=0), lr=3.0, c_bands=2)
    assert st0["band_bt_shrinks"] == 0 and st0["band_rejected"] == 0
    assert np.abs(x0 - x_def).max() > 1e-6 and monotone(st0)       # the tile level still guards
    x9, st9 = run(clean, dict(loose, bt_factor=0.9), lr=3.0, c_bands=2)
    assert st9["band_bt_shrinks"] != st_def["band_bt_shrinks"] and np.abs(x9 - x_def).max() > 1e-6


def test_tile_bt_steps_and_factor(clean):
    x_def, st_def = run(clean, NO_POLISH, c_bands=2)
    assert st_def["tile_bt_shrinks"] > 0
    x0, st0 = run(clean, dict(NO_POLISH, tile_bt_steps=0), c_bands=2)
    assert st0["tile_bt_shrinks"] == 0 and st0["tile_rejected"] > 0 and monotone(st0)
    x9, st9 = run(clean, dict(NO_POLISH, tile_bt_factor=0.9), c_bands=2)
    assert st9["tile_bt_shrinks"] > st_def["tile_bt_shrinks"]
    assert min(np.abs(x0 - x_def).max(), np.abs(x9 - x_def).max()) > 1e-6


def test_global_tau_caps_the_step(clean):
    x_def, st_def = run(clean, NO_POLISH)
    assert st_def["global_capped"] == 0
    x, st = run(clean, dict(NO_POLISH, global_tau=1e-3))
    assert st["global_capped"] == st["tiles"] and st["cap_ratio_max"] <= 1e-3 * (1 + 1e-9)
    assert st["objective"] > st_def["objective"] and monotone(st)


def test_energy_blend_and_eps(clean):
    x_def, st_def = run(clean, NO_POLISH)
    x_b, _ = run(clean, dict(NO_POLISH, global_energy_blend=1))
    assert np.abs(x_b - x_def).max() > 1e-6
    x_e, st_e = run(clean, dict(NO_POLISH, eps=1e30))
    assert np.abs(x_e).max() < 1e-10 and st_e["objective"] > 0.99 * st_e["objective_zero"]


def test_zero_col_freezing(clean):
    _, st_def = run(clean, NO_POLISH)
    assert st_def["frozen_columns"] == 0
    _, st_rel = run(clean, dict(NO_POLISH, zero_col_rel=0.9))
    assert st_rel["frozen_columns"] > 0
    x_abs, st_abs = run(clean, {"zero_col_abs": 1e30})
    assert st_abs["frozen_max"] == 8 and st_abs["frozen_columns"] == 8 * 10
    assert not x_abs.any() and st_abs["polish_calls"] == 0


def test_debug_safe_and_sanitising(clean, caplog):
    with h5py.File(clean, "r+") as f:
        block = f["/HyperCube/models"][0:2]
        block[0, 0, 0, 10] = np.nan
        block[1, 1, 2, 20] = np.inf
        f["/HyperCube/models"][0:2] = block
    with caplog.at_level(logging.INFO, logger="cubefit_mpi.solve"):
        x, st = run(clean, epochs=1)
    assert st["sanitised_A"] == 2 and np.all(np.isfinite(x))
    assert not [r for r in caplog.records if "debug-safe" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cubefit_mpi.solve"):
        run(clean, {"debug_safe": 1}, epochs=1)
    lines = [r.getMessage() for r in caplog.records if "debug-safe" in r.getMessage()]
    assert len(lines) == 5 and any("sanitised 2 A values" in line for line in lines)


def test_decorrelate_changes_the_path(clean):
    x0, _ = run(clean, NO_POLISH)
    x1, st1 = run(clean, NO_POLISH, decorrelate=1.0)
    assert np.abs(x1 - x0).max() > 1e-6 and st1["decorrelate"] == 1.0 and monotone(st1)


def test_project_nonneg_off_disables_polish(clean):
    _, st = run(clean, project_nonneg=False)
    assert st["polish_calls"] == 0


# --- starts, orbit weights, tracker, options --------------------------------------------------------
def test_warm_starts(clean, monkeypatch, caplog):
    with pytest.raises(InputError, match="/X_global"):
        run(clean, warm_start="exact")
    x_opt, f_opt, _ = exact_optimum(clean)
    with h5py.File(clean, "r+") as f:
        f.create_dataset("/X_global", data=x_opt)
        f["/X_global"].attrs["method"] = "exact"
    x, st = run(clean, warm_start="exact", epochs=0)
    assert np.array_equal(x, x_opt) and st["warm_start"] == "exact"
    assert st["objective"] == pytest.approx(f_opt, rel=1e-9, abs=1e-12) and st["gap_rel"] < 1e-12
    given = np.arange(8.0)
    assert np.array_equal(run(clean, warm_start=given, epochs=0)[0], given)
    assert np.array_equal(run(clean, x0=given - 3, epochs=0)[0], np.maximum(given - 3, 0))
    with pytest.raises(InputError, match="x0"):
        run(clean, x0=np.ones(3))
    with pytest.raises(InputError, match="warm-start"):
        run(clean, warm_start="magic")


def test_resume_start(clean, monkeypatch, caplog):
    import cubefit_mpi.io.tracker_sidecar as ft

    monkeypatch.setattr(ft, "latest_snapshot", lambda path, n_params=None: None)
    with caplog.at_level(logging.WARNING, logger="cubefit_mpi.solve"):
        x, st = run(clean, warm_start="resume", epochs=0)
    assert st["warm_start"] == "zeros" and not x.any() and "no snapshot" in caplog.text
    snap = np.linspace(0.1, 0.8, 8)
    monkeypatch.setattr(ft, "latest_snapshot", lambda path, n_params=None: (snap, 4, "side.h5"))
    x, st = run(clean, warm_start="resume", epochs=0)
    assert np.array_equal(x, snap) and st["warm_start"] == "resume:4"


def test_jacobi_start(clean):
    design, target = dense(clean)
    b, diag = design.T @ target, np.einsum("ij,ij->j", design, design)
    xj = np.maximum(b, 0) / diag
    gamma = (b @ xj) / np.sum((design @ xj) ** 2)
    x, st = run(clean, warm_start="jacobi", epochs=0)
    assert np.allclose(x, gamma * xj, rtol=1e-8)
    assert st["objective"] < st["objective_zero"]


def test_orbit_weights_ratio_step(clean):
    targets = np.array([0.8, 0.2])
    x_full, _ = run(clean, orbit_weights=targets, orbit_strength=1.0)
    assert np.allclose(x_full.reshape(2, 4).sum(axis=1) / x_full.sum(), targets)
    x_none, _ = run(clean)
    x_def, st_def = run(clean, orbit_weights="4,1", orbit_mode="penalty")
    frac = lambda x: x.reshape(2, 4).sum(axis=1)[0] / x.sum()      # noqa: E731
    assert st_def["orbit_strength"] == 0.1 and st_def["orbit_mode"] == "penalty"
    assert abs(frac(x_def) - 0.8) < abs(frac(x_none) - 0.8)


@pytest.mark.parametrize("totals,values", [("fractions", np.array([0.8, 0.2])), ("absolute", np.array([3.0, 0.5]))])
def test_orbit_strict_totals_exact_after_every_epoch(clean, totals, values):
    tracker = _Tracker()
    x, st = run(clean, orbit_weights=values, orbit_totals=totals, epochs=3, tracker=tracker)   # auto -> strict
    assert st["orbit_mode"] == "strict" and st["orbit_strength"] == 0.0
    assert len(tracker.snapshots) == 3
    for snap, _, _ in tracker.snapshots + [(x, None, None)]:
        comp = snap.reshape(2, 4).sum(axis=1)
        want = values * snap.sum() if totals == "fractions" else values
        np.testing.assert_allclose(comp, want, rtol=1e-12)
        assert np.all(snap >= 0)
    with h5py.File(clean) as f:
        assert f["/X_global"].attrs["orbit_mode"] == "strict" and f["/X_global"].attrs["orbit_totals"] == totals


class _Tracker:
    def __init__(self):
        self.rmse, self.progress_calls, self.snapshots = [], [], []

    def log_rmse(self, step, epoch, rmse):
        self.rmse.append((step, epoch, rmse))

    def progress(self, epoch, done, total):
        self.progress_calls.append((epoch, done, total))

    def snapshot(self, x, epoch, rmse):
        self.snapshots.append((x.copy(), epoch, rmse))


def test_tracker_receives_history(clean):
    tracker = _Tracker()
    x, st = run(clean, tracker=tracker, epochs=2)
    assert [r[0] for r in tracker.rmse] == list(range(1, 11))
    assert np.allclose([r[2] for r in tracker.rmse], st["rmse_history"])
    assert tracker.progress_calls[-1] == (2, 5, 5) and len(tracker.progress_calls) == 10
    assert [s[1] for s in tracker.snapshots] == [1, 2] and np.array_equal(tracker.snapshots[-1][0], x)


@pytest.mark.parametrize("kw,match", [({"epochs": -1}, "epochs"), ({"lr": 0.0}, "--lr"),
                                      ({"c_bands": 3}, "c_bands"), ({"orbit_strength": 2.0}, "orbit-strength"),
                                      ({"decorrelate": 1.5}, "decorrelate")])
def test_bad_options(clean, kw, match):
    with pytest.raises(InputError, match=match):
        run(clean, **kw)
    with h5py.File(clean, "r") as f:
        assert "/X_global" not in f


def test_read_ahead_changes_nothing_but_timing(noisy):
    x_on, st_on = run(noisy, {"read_ahead": "1"}, epochs=2)
    x_off, st_off = run(noisy, {"read_ahead": "0"}, epochs=2)
    assert np.array_equal(x_on, x_off) and st_on["objective"] == st_off["objective"]
    assert np.array_equal(st_on["rmse_history"], st_off["rmse_history"])
    assert st_on["epoch_seconds"].shape == (2,) and np.all(st_on["epoch_seconds"] > 0)


def test_energies_recomputed_when_over_the_cache_budget(noisy, monkeypatch):
    import cubefit_mpi.solvers.kaczmarz.tiles as kz

    x_cached, st_cached = run(noisy, epochs=2)
    monkeypatch.setattr(kz, "ENERGY_CACHE_BYTES", 0)             # every visit recomputes them
    x_fresh, st_fresh = run(noisy, epochs=2)
    assert np.array_equal(x_cached, x_fresh) and st_cached["objective"] == st_fresh["objective"]
