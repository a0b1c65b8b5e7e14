"""watch --plot: PNGs of a running fit refreshed from the sidecar and the latest x snapshot,
replaced atomically, until the tracker closes (a thread-writer tracker plays the solver)."""
import argparse
import os
import shutil
import threading
import time

import numpy as np
import pytest
from mpi4py import MPI

from cubefit_mpi.cli.watch import register
from cubefit_mpi.io.tracker_sidecar import read_snapshot
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.plots import CONVERGENCE_PNG, POPULATIONS_PNG, SPECTRA_PNG, TOTALS_PNG
from cubefit_mpi.stages.tracker import FitTracker
from cubefit_mpi.stages.watch import refresh_plots, watch

SELF = MPI.COMM_SELF
PNGS = (CONVERGENCE_PNG, SPECTRA_PNG, POPULATIONS_PNG, TOTALS_PNG)


@pytest.fixture()
def built(small_mock, tmp_path):
    path = tmp_path / "g.h5"
    shutil.copy(small_mock, path)
    build_hypercube(str(path), comm=SELF)
    return path


@pytest.fixture()
def thread_tracker(monkeypatch):
    for key, value in dict(FITTRACKER_START="thread", CUBEFIT_TRACKER_FLUSH_EVERY=1, CUBEFIT_RMSE_STRIDE=1,
                           CUBEFIT_TRACKER_FLUSH_SEC=0).items():
        monkeypatch.setenv(key, str(value))


def _complete_png(path) -> bool:
    data = open(path, "rb").read()
    return data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")


def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def test_refresh_plots_draws_what_the_sidecar_and_file_allow(built, tmp_path, thread_tracker):
    out = tmp_path / "live"
    tracker = FitTracker(built, comm=SELF, method="kaczmarz", n_params=12)
    tracker.log_rmse(0, 0, 1.0)
    _wait_for(lambda: os.path.exists(tracker.path))
    time.sleep(0.2)
    first = refresh_plots(built, tracker.path, str(out))
    assert first["skipped"] == "no x snapshot yet" and first["epoch"] is None
    assert [os.path.basename(p) for p in first["written"]] == [CONVERGENCE_PNG]
    tracker.snapshot(np.linspace(0.0, 1.0, 12), 0, 1.0)
    _wait_for(lambda: read_snapshot(tracker.path) is not None)
    second = refresh_plots(built, tracker.path, str(out))
    assert second["skipped"] is None and second["epoch"] == 0
    assert sorted(os.path.basename(p) for p in second["written"]) == sorted(PNGS)
    assert all(_complete_png(out / name) for name in PNGS)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    os.rename(built, str(built) + ".away")                   # the cube file cannot be read now
    third = refresh_plots(built, tracker.path, str(out))
    assert third["skipped"].startswith(f"{built} not readable now") and len(third["written"]) == 1
    os.rename(str(built) + ".away", built)
    tracker.close()


@pytest.mark.slow
def test_watch_plot_follows_a_live_fit_until_it_ends(built, tmp_path, thread_tracker):
    out = tmp_path / "live"
    tracker = FitTracker(built, comm=SELF, method="kaczmarz", n_params=12)
    tracker.log_rmse(0, 0, 2.0)
    _wait_for(lambda: os.path.exists(tracker.path))
    time.sleep(0.2)
    result = {}
    follower = threading.Thread(target=lambda: result.setdefault(
        "code", watch(built, interval=0.05, stream=open(os.devnull, "w"), plot_dir=str(out))))
    follower.start()
    seen_partial, stamps = [], {}
    rng = np.random.default_rng(0)

    def look():                                              # a viewer reading while watch redraws
        for name in PNGS:
            path = out / name
            if path.exists():
                stamps.setdefault(name, set()).add(path.stat().st_mtime_ns)
                if not _complete_png(path):
                    seen_partial.append(name)

    for epoch in range(3):
        for step in range(5):
            tracker.log_rmse(epoch * 5 + step, epoch, 2.0 / (1 + epoch * 5 + step))
        tracker.progress(epoch, 5, 5)
        tracker.snapshot(rng.random(12), epoch, 2.0 / (1 + epoch))
        deadline = time.monotonic() + 30
        while len(stamps.get(TOTALS_PNG, ())) < epoch + 1 and time.monotonic() < deadline:
            look()                                           # until this snapshot's plots are drawn
            time.sleep(0.002)
    tracker.close()
    follower.join(timeout=60)
    assert not follower.is_alive() and result["code"] == 0
    assert seen_partial == []
    assert all(_complete_png(out / name) for name in PNGS)
    assert all(len(stamps.get(name, ())) >= 3 for name in PNGS), {k: len(v) for k, v in stamps.items()}  # refreshed
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_watch_cli_plot_once(built, tmp_path, thread_tracker, capsys):
    with FitTracker(built, comm=SELF, method="exact", n_params=12) as tracker:
        tracker.log_rmse(0, 0, 0.5)
        tracker.snapshot(np.ones(12), 0, 0.5)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["watch", str(built), "--once", "--plot", str(tmp_path / "p")])
    assert args.handler(args, SELF) == 0
    assert "complete" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "p")) == sorted(PNGS)
