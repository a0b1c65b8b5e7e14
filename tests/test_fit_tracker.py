"""Fit tracker: sidecar layout, stride, drops, live SWMR reading, killed writers, resume, watch."""
import argparse
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from cubefit_mpi.cli.watch import register
from cubefit_mpi.config.errors import InputError
from cubefit_mpi.io.tracker_sidecar import (
    find_sidecars, latest_snapshot, open_sidecar, read_history, read_progress, sidecar_path
)
from cubefit_mpi.stages.tracker import FitTracker
from cubefit_mpi.stages.watch import format_progress, watch

SELF = MPI.COMM_SELF


@pytest.fixture()
def main_file(tmp_path):
    path = tmp_path / "galaxy.h5"
    path.write_bytes(b"")            # the tracker never opens the main file
    return path


def _env(monkeypatch, **values):
    for key, value in values.items():
        monkeypatch.setenv(key, str(value))


def _wait_for(predicate, timeout=20.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out waiting")


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("start", ["thread", "spawn"])
def test_layout_stride_ewma_and_snapshots(main_file, monkeypatch, start):
    _env(monkeypatch, FITTRACKER_START=start, CUBEFIT_RMSE_STRIDE=16)
    rmse = 1.0 / (1.0 + np.arange(100))
    with FitTracker(main_file, comm=SELF, method="kaczmarz", n_params=5) as tracker:
        assert tracker.active and os.path.dirname(tracker.path) == str(main_file.parent)
        assert os.path.basename(tracker.path).startswith(f"galaxy.h5.fit.{os.getpid()}.")
        assert (tracker.writer_pid is None) == (start == "thread")
        for i in range(100):
            tracker.log_rmse(i, i // 10, rmse[i])
            tracker.progress(i // 10, i % 10 + 1, 10)
        snap_rmse = [0.5, 0.2, 0.3] + [0.4] * 17         # 20 snapshots; the best is the second
        for k, r in enumerate(snap_rmse):
            tracker.snapshot(np.arange(5.0) + k, k, r)
    hist = read_history(tracker.path)
    np.testing.assert_array_equal(hist["step"], np.arange(0, 100, 16))        # every 16th call
    np.testing.assert_array_equal(hist["epoch"], np.arange(0, 100, 16) // 10)
    np.testing.assert_allclose(hist["rmse"], rmse[::16])
    ewma = [rmse[0]]
    for r in rmse[16::16]:
        ewma.append(0.1 * r + 0.9 * ewma[-1])
    np.testing.assert_allclose(hist["ewma"], ewma)
    assert np.all(np.diff(hist["time"]) >= 0) and hist["time"][0] >= 0
    with open_sidecar(tracker.path) as f:
        assert f["history/step"].dtype == np.int64 and f["history/rmse"].dtype == np.float64
        attrs = dict(f.attrs)
        assert attrs["status"] == "complete" and attrs["dropped"] == 0 and attrs["method"] == "kaczmarz"
        assert attrs["main_file"] == str(main_file) and attrs["started"][:4].isdigit()
        assert dict(f["progress"].attrs)["tiles_done"] == 10 and f["progress"].attrs["epoch"] == 9
        best, last = f["snapshots/best"], f["snapshots/last"]
        np.testing.assert_array_equal(best["x"][...], np.arange(5.0) + 1)
        assert best.attrs["epoch"] == 1 and best.attrs["rmse"] == 0.2
        np.testing.assert_array_equal(last["x"][...], np.arange(5.0) + 19)
        assert last.attrs["epoch"] == 19
        h = f["snapshots/history"]
        assert h["x"].shape == (16, 5)
        order = np.argsort(h["seq"][...])
        np.testing.assert_array_equal(h["epoch"][...][order], np.arange(4, 20))   # the last 16
        np.testing.assert_array_equal(h["x"][...][order][:, 0], np.arange(4.0, 20.0))
    x, epoch, path = latest_snapshot(main_file, n_params=5)
    assert epoch == 19 and path == tracker.path
    np.testing.assert_array_equal(x, np.arange(5.0) + 19)


def test_dropped_messages_are_counted_when_the_queue_is_tiny(main_file, monkeypatch):
    _env(monkeypatch, FITTRACKER_START="thread", CUBEFIT_TRACKER_QSIZE=1, CUBEFIT_RMSE_STRIDE=1)
    n_calls = 5000
    tracker = FitTracker(main_file, comm=SELF, method="t")
    t0 = time.perf_counter()
    for i in range(n_calls):
        tracker.log_rmse(i, 0, 1.0)
    assert time.perf_counter() - t0 < 5.0                 # never waits on the writer
    tracker.close()
    hist = read_history(tracker.path)
    with open_sidecar(tracker.path) as f:
        stored = int(f.attrs["dropped"])
    assert tracker.dropped > 0 and stored == tracker.dropped
    assert hist["step"].size + tracker.dropped == n_calls     # every call is either written or counted
    assert np.all(np.diff(hist["step"]) > 0)


def test_inactive_trackers_do_nothing(main_file):
    class Rank1:
        def Get_rank(self):
            return 1

    for tracker in (FitTracker(main_file, comm=Rank1()), FitTracker(main_file, comm=SELF, enabled=False)):
        assert not tracker.active and tracker.path is None and tracker.writer_pid is None
        tracker.log_rmse(0, 0, 1.0)
        tracker.progress(0, 1, 2)
        tracker.snapshot(np.ones(3), 0, 1.0)
        tracker.close()
    assert find_sidecars(main_file) == []


def test_a_lazy_tracker_makes_its_sidecar_at_the_first_message_only(main_file, monkeypatch):
    _env(monkeypatch, FITTRACKER_START="thread")
    with FitTracker(main_file, comm=SELF, method="kaczmarz", lazy=True) as unused:
        assert unused.path is None and not unused.active
    assert find_sidecars(main_file) == []
    with FitTracker(main_file, comm=SELF, method="kaczmarz", lazy=True) as tracker:
        tracker.progress(1, 2, 4)
        assert tracker.active and tracker.path == find_sidecars(main_file)[0]
    assert read_progress(tracker.path)["tiles_done"] == 2


def test_exception_closes_as_failed_and_wrong_length_is_refused(main_file, monkeypatch):
    _env(monkeypatch, FITTRACKER_START="thread")
    with pytest.raises(RuntimeError, match="boom"):
        with FitTracker(main_file, comm=SELF, n_params=3) as tracker:
            tracker.snapshot(np.ones(3), 0, 1.0)
            with pytest.raises(ValueError, match="expected 3"):
                tracker.snapshot(np.ones(4), 1, 1.0)
            raise RuntimeError("boom")
    assert read_progress(tracker.path)["status"] == "failed"


def test_sidecar_names_use_the_job_id_and_never_collide(main_file, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = sidecar_path(main_file, when=1.7e9)
    assert os.path.basename(first).startswith("galaxy.h5.fit.4242.") and first.endswith(".h5")
    open(first, "wb").close()
    second = sidecar_path(main_file, when=1.7e9)
    assert second == first[:-3] + "-2.h5"
    open(second, "wb").close()
    assert find_sidecars(main_file) == [first, second]


# ---------------------------------------------------------------------------------------------
# live readers and killed writers
# ---------------------------------------------------------------------------------------------
SOLVER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from mpi4py import MPI
    from cubefit_mpi.stages.tracker import FitTracker

    if __name__ == "__main__":
        tracker = FitTracker(sys.argv[1], comm=MPI.COMM_SELF, method="fake", n_params=7)
        print(tracker.writer_pid, flush=True)
        epoch = 0
        while True:                               # a solver that never ends: it gets killed
            for step in range(5):
                tracker.log_rmse(5 * epoch + step, epoch, 1.0 / (1 + epoch))
            tracker.progress(epoch, epoch % 4, 4)
            tracker.snapshot(np.arange(7.0) * 10 + epoch, epoch, 1.0 / (1 + epoch))
            epoch += 1
            time.sleep(0.03)
""")


@pytest.mark.parametrize("start,final_status", [("thread", "running"), ("spawn", "orphaned")])
def test_live_reader_then_sigkill_leaves_last_flushed_snapshot(main_file, tmp_path, start, final_status):
    script = tmp_path / "solver.py"
    script.write_text(SOLVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPIR_", "HYDRA"))}
    env.update(FITTRACKER_START=start, CUBEFIT_TRACKER_FLUSH_EVERY="1", CUBEFIT_TRACKER_FLUSH_SEC="0.05",
               CUBEFIT_RMSE_STRIDE="1")
    proc = subprocess.Popen([sys.executable, str(script), str(main_file)], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        writer_pid = proc.stdout.readline().strip()
        sidecar = _wait_for(lambda: find_sidecars(main_file))[0]
        seen_lengths, seen_epochs = set(), set()
        def enough():                             # read while the solver writes
            hist = read_history(sidecar)
            info = read_progress(sidecar)
            assert info["status"] == "running"
            assert np.all(np.diff(hist["step"]) == 1) and hist["rmse"].size == hist["ewma"].size
            seen_lengths.add(hist["step"].size)
            snap = latest_snapshot(main_file, n_params=7)
            if snap is not None:
                np.testing.assert_array_equal(snap[0], np.arange(7.0) * 10 + snap[1])
                seen_epochs.add(snap[1])
            return len(seen_epochs) >= 3 and max(seen_epochs) >= 5
        _wait_for(enough)
        assert len(seen_lengths) >= 3                      # the reader saw the history grow
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    if start == "spawn":                                   # the orphaned writer notices and closes
        assert writer_pid.isdigit()
        _wait_for(lambda: read_progress(sidecar)["status"] != "running")
    x, epoch, path = latest_snapshot(main_file, n_params=7)
    assert path == sidecar and epoch >= max(seen_epochs)
    np.testing.assert_array_equal(x, np.arange(7.0) * 10 + epoch)   # consistent with its epoch
    info = read_progress(sidecar)
    assert info["status"] == final_status and info["epoch"] >= 5
    assert read_history(sidecar)["step"].size >= 5 * max(seen_epochs)


def test_killed_writer_process_never_blocks_the_solver(main_file, monkeypatch):
    _env(monkeypatch, FITTRACKER_START="spawn", CUBEFIT_TRACKER_QSIZE=64, CUBEFIT_RMSE_STRIDE=1)
    tracker = FitTracker(main_file, comm=SELF, n_params=4)
    tracker.snapshot(np.full(4, 2.0), 2, 0.5)
    _wait_for(lambda: latest_snapshot(main_file, n_params=4))
    os.kill(tracker.writer_pid, signal.SIGKILL)
    t0 = time.perf_counter()
    for i in range(20000):
        tracker.log_rmse(i, 3, 0.1)
    tracker.snapshot(np.full(4, 3.0), 3, 0.4)
    tracker.close("complete")
    assert time.perf_counter() - t0 < 10.0
    assert tracker.dropped > 0
    x, epoch, _ = latest_snapshot(main_file, n_params=4)
    assert epoch == 2 and np.all(x == 2.0)


def test_latest_snapshot_of_the_latest_run_skips_corrupt_and_wrong_length(main_file, monkeypatch):
    _env(monkeypatch, FITTRACKER_START="thread")
    with FitTracker(main_file, comm=SELF, n_params=4) as a:
        for epoch in range(4):
            a.snapshot(np.full(4, float(epoch)), epoch, 1.0 - 0.1 * epoch)
    with FitTracker(main_file, comm=SELF, n_params=6) as b:    # newer sidecar, older epochs
        for epoch in range(2):
            b.snapshot(np.full(6, 10.0 + epoch), epoch, 1.0)
    junk = main_file.parent / "galaxy.h5.fit.999.20991231T235959.h5"
    junk.write_bytes(b"not an HDF5 file at all")
    assert find_sidecars(main_file)[-1] == str(junk)
    assert latest_snapshot(main_file, n_params=4)[1:] == (3, a.path)
    assert latest_snapshot(main_file, n_params=6)[1:] == (1, b.path)
    assert latest_snapshot(main_file)[1:] == (1, b.path)      # the latest run's, not the highest epoch of all runs
    assert latest_snapshot(main_file, n_params=5) is None
    # a torn write: x changed without its CRC -- the slot is skipped, history still has epoch 3
    with h5py.File(a.path, "r+") as f:
        f["snapshots/last/x"][0] = 99.0
        f["snapshots/best/x"][0] = 99.0
    x, epoch, _ = latest_snapshot(main_file, n_params=4)
    assert epoch == 3 and np.all(x == 3.0)
    with h5py.File(a.path, "r+") as f:
        h = f["snapshots/history"]
        row = int(np.flatnonzero(h["epoch"][...] == 3)[0])
        h["x"][row, 1] = -1.0
    x, epoch, _ = latest_snapshot(main_file, n_params=4)
    assert epoch == 2 and np.all(x == 2.0)


# ---------------------------------------------------------------------------------------------
# watch
# ---------------------------------------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_watch_follows_a_live_run_until_complete(main_file, monkeypatch):
    _env(monkeypatch, FITTRACKER_START="thread", CUBEFIT_TRACKER_FLUSH_EVERY=1, CUBEFIT_RMSE_STRIDE=1)
    with pytest.raises(InputError, match="no fit-tracker sidecar"):
        watch(main_file, once=True)
    tracker = FitTracker(main_file, comm=SELF, method="exact")
    tracker.log_rmse(0, 0, 2.0)
    tracker.progress(0, 0, 3)
    _wait_for(lambda: read_progress(tracker.path)["n_history"] == 1)
    out, result = io.StringIO(), {}
    follower = threading.Thread(target=lambda: result.setdefault("code", watch(main_file, interval=0.02, stream=out)))
    follower.start()
    for tile in range(1, 4):
        time.sleep(0.15)
        tracker.log_rmse(tile, 0, 2.0 / (tile + 1))
        tracker.progress(0, tile, 3)
    time.sleep(0.15)
    tracker.close()
    follower.join(timeout=20)
    assert result["code"] == 0
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and all(line.startswith("exact: epoch 0 | tiles ") for line in lines)
    assert lines[-1] == "exact: epoch 0 | tiles 3/3 (100%) | rmse 0.5 | ewma 1.649 | 4 samples, 0 snapshots | complete"
    tty = _Tty()
    assert watch(main_file, stream=tty) == 0
    assert tty.getvalue().startswith("\r") and tty.getvalue().endswith("complete\n")


def test_watch_cli_once(main_file, monkeypatch, capsys):
    _env(monkeypatch, FITTRACKER_START="thread")
    with FitTracker(main_file, comm=SELF, method="kaczmarz") as tracker:
        tracker.progress(2, 5, 10)
        tracker.log_rmse(0, 2, 0.25)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["watch", str(main_file), "--once", "--interval", "0.1"])
    assert args.handler(args, SELF) == 0
    assert capsys.readouterr().out == ("kaczmarz: epoch 2 | tiles 5/10 (50%) | rmse 0.25 | ewma 0.25 | "
                                       "1 samples, 0 snapshots | complete\n")
    info = read_progress(tracker.path)
    info.update(status="running", updated=time.time() - 300, dropped=3)
    assert format_progress(info).endswith("running (no update for 300s) | 3 dropped")
