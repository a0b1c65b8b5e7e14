"""Scaling study and performance model: the model's properties (pure, fast), the `scaling`
command at 1 and 2 ranks (CSV + PNGs), the model's predictions for this machine against the
measured 2-rank points, and `scaling --predict` for a given target machine."""
from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest
from conftest import run_cli

from cubefit_mpi.perf import model as sm
from cubefit_mpi.solvers.limits import working_set_block

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNGS = ("scaling_time.png", "scaling_speedup.png", "scaling_efficiency.png", "scaling_phases.png")


# ---------------------------------------------------------------------------------------------
# the model (pure)
# ---------------------------------------------------------------------------------------------
def galaxy(**kw) -> sm.Problem:
    values = dict(S=3000, C=200, P=360, L=1250, T=2563, K=55, s_chunk=1, c_chunk=4, active_set=2000)
    values.update(kw)
    return sm.Problem(**values)


def node(**kw) -> sm.Machine:
    values = {k: v for k, v in sm.GENERIC_NODE.items()}
    values.update(build_sc_seconds=0.01, build_ref_work=galaxy().fft_work, blas_flops=2e10, mem_bandwidth=1e10,
                  design_seconds_per_elem=1e-10, nnls_iter_seconds=1e-4)
    values.update(kw)
    return sm.Machine.from_dict(values)


def test_next_fast_len_is_the_smallest_7_smooth_number():
    def smooth(m):
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        return m == 1

    for n in (1, 2, 11, 97, 1000, 2617, 4099):
        m = sm.next_fast_len(n)
        assert m >= n and smooth(m)
        assert not any(smooth(j) for j in range(n, m))
    assert sm.next_fast_len(2617) == 2625


def test_gram_reduction_counts_the_solver_blocks():
    assert sm.gram_reduce_elements(100) == 100 * 100                # one block: the whole matrix
    n = 72_000
    rows = 2**27 // n                                               # MAX_MSG_ELEMENTS of the collectives
    expected = sum((min(n, i + rows) - i) * (n - i) for i in range(0, n, rows))
    assert sm.gram_reduce_elements(n) == expected
    assert n * n / 2 < expected < n * n                              # the upper triangle plus block overlap


def test_message_cost_is_zero_on_one_rank_and_grows_with_ranks_and_bytes():
    m = node()
    assert sm.message_seconds(m, 1, 1e9) == 0.0
    times = [sm.message_seconds(m, p, 1e6) for p in (2, 4, 64, 4096)]
    assert times == sorted(times) and times[0] == pytest.approx(m.latency + 1e6 / m.bandwidth)
    assert sm.message_seconds(m, 8, 2e6) > sm.message_seconds(m, 8, 1e6)


@pytest.mark.parametrize("stage", ["build", "solve"])
def test_strong_scaling_is_monotone_with_efficiency_at_most_one(stage):
    problem, machine = galaxy(), node()
    nodes = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    rows = sm.table(problem, machine, nodes, stage=stage, ranks_per_node=32)
    for a, b in zip(rows, rows[1:]):
        assert b["compute"] <= a["compute"] + 1e-12
        assert b["io"] <= a["io"] + 1e-12
        assert b["total"] <= a["total"] * (1 + 1e-9) + 1e-3        # only latency terms may grow, and barely
    for r in rows:
        assert 0 < r["efficiency"] <= 1.0 + 1e-12
        assert r["speedup"] <= r["nodes"] + 1e-9


def test_time_floors_at_the_file_system_bound():
    problem, machine = galaxy(), node(write_bw_fs=50e9, read_bw_fs=80e9)
    floor_build = problem.model_bytes / machine.write_bw_fs
    floor_pass = problem.model_bytes / machine.read_bw_fs
    for ranks in (128, 128 * 100, 128 * 1000):
        lay = sm.Layout(ranks, 128, 1)
        build = sm.predict_build(problem, machine, lay)
        solve = sm.predict_solve(problem, machine, lay)
        assert build.io >= floor_build * (1 - 1e-12) and build.total > floor_build
        assert solve.io >= solve.passes * floor_pass * (1 - 1e-12)
    huge = sm.predict_build(problem, machine, sm.Layout(128 * 1000, 128, 1))
    assert huge.bound == "io"
    assert huge.io == pytest.approx(floor_build + 2 * machine.io_round_seconds, rel=1e-6)


def test_no_more_useful_ranks_than_tiles():
    problem, machine = galaxy(), node()
    tiles, units = problem.n_s_tiles, problem.n_units
    assert (tiles, units) == (3000, 150_000)
    at_tiles = sm.predict_solve(problem, machine, sm.Layout(tiles, 100, 1))
    beyond = sm.predict_solve(problem, machine, sm.Layout(4 * tiles, 100, 1))
    assert beyond.compute == pytest.approx(at_tiles.compute)
    assert beyond.active_ranks == tiles and any("ranks read nothing" in n for n in beyond.notes)
    b1 = sm.predict_build(problem, machine, sm.Layout(units, 100, 1))
    b2 = sm.predict_build(problem, machine, sm.Layout(2 * units, 100, 1))
    assert b2.compute == pytest.approx(b1.compute) and any("idle" in n for n in b2.notes)
    lim = sm.limits(problem, machine, ranks_per_node=100)
    assert lim["solve_max_ranks"] == tiles and lim["build_max_ranks"] == units
    assert lim["solve_max_nodes"] == 30 and lim["build_max_nodes"] == 1500


def test_solver_method_follows_the_gram_budget():
    problem, machine = galaxy(), node()                 # N = 72,000: 38.6 GiB per rank
    assert machine.gram_budget(128) < problem.N**2 * 8 < machine.gram_budget(1)
    ws = sm.predict_solve(problem, machine, sm.Layout(128, 128, 1))
    block = working_set_block(problem.N)
    assert ws.method == "working-set" and block == 256
    assert ws.passes == 1 + math.ceil(problem.k / block)
    assert any("exceeds the per-rank budget" in n for n in ws.notes)       # 0.8 GiB: 1,491 columns < 2,048
    fits = sm.predict_solve(problem, machine, sm.Layout(32, 32, 1))
    assert fits.method == "working-set" and not any("exceeds" in n for n in fits.notes)
    big_node = node(node_memory=512 * 2**30)
    gram = sm.predict_solve(problem, big_node, sm.Layout(4, 1, 128))
    assert gram.method == "gram" and gram.passes == 1
    small = galaxy(C=4, P=60)
    assert sm.predict_solve(small, machine, sm.Layout(128, 128, 1)).method == "gram"
    layouts = sm.solve_layouts(problem, machine)
    assert [lbl for lbl, _, _ in layouts] == ["1 rank/core", "64 ranks/node (working set fits)",
                                              "1 rank/node × 128 threads"]


def test_calibration_reproduces_the_one_rank_sample():
    problem = sm.Problem(S=300, C=4, P=80, L=400, T=863, K=55, s_chunk=16, c_chunk=4, active_set=40)
    probed = sm.Machine(cores_per_node=2, write_bw_rank=1e9, write_bw_node=1e9, read_bw_rank=2e9,
                        read_bw_node=2e9, io_round_seconds=1e-4, read_tile_seconds=1e-4)
    build = sm.Sample(wall=0.8, compute=0.5, io=0.25, comm=0.001)
    solve = sm.Sample(wall=0.47, compute=0.32, io=0.12, comm=0.0006, serial=0.007, active_set=40)
    costs = sm.calibrate(problem, probed, build, solve)
    one = sm.Layout(1, 1, 1)
    pb, ps = sm.predict_build(problem, costs, one), sm.predict_solve(problem, costs, one)
    assert (pb.compute, pb.io) == pytest.approx((0.5, 0.25))
    assert pb.total == pytest.approx(build.wall - build.comm)                  # no messages on one rank
    assert (ps.compute, ps.io, ps.serial) == pytest.approx((0.32, 0.12, 0.007))
    assert ps.total == pytest.approx(solve.wall - solve.comm)
    two = sm.predict_build(problem, sm.with_probe(costs, probed), sm.Layout(2, 2, 1))
    assert two.compute == pytest.approx(0.5 * 640 / 1200, rel=1e-9)        # 10 full units of 16×4 (s, c)
    contended = dataclasses.replace(sm.with_probe(costs, probed), contention=1.2)
    assert sm.predict_build(problem, contended, sm.Layout(2, 2, 1)).compute == pytest.approx(1.2 * two.compute)
    oversub = sm.predict_build(problem, costs, sm.Layout(4, 4, 1))
    assert oversub.compute == pytest.approx(2 * 0.5 * 320 / 1200, rel=1e-9)  # 5 units, 4 ranks on 2 cores


def test_machine_parameters_are_checked():
    assert sm.Machine.from_dict({"write_bw_fs": "inf"}).write_bw_fs == math.inf
    with pytest.raises(ValueError, match="unknown key.*wrtie_bw_fs"):
        sm.Machine.from_dict({"wrtie_bw_fs": 1e9})
    with pytest.raises(ValueError, match="bandwidth"):
        sm.Machine(bandwidth=0)
    with pytest.raises(ValueError, match="Problem.S"):
        sm.Problem(0, 1, 1, 8, 8, 1, 1, 1)
    assert json.loads(json.dumps(node().to_dict()))["write_bw_fs"] == 200e9


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def check_pngs(folder):
    for name in PNGS:
        data = (folder / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000, name


def run_study(out):
    proc = run_cli("scaling", "--ranks", "1,2", "--what", "build,solve", "--repeat", "3", "--model",
                   "--out", out, "300,4,80,400", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Strong scaling of build and solve at 1 and 2 ranks, with the model (median of 3)."""
    return run_study(tmp_path_factory.mktemp("scaling"))


@pytest.mark.slow
def test_scaling_writes_csv_and_plots(study):
    out, proc = study
    rows = read_csv(out / "scaling.csv")
    assert [(r["ranks"], r["what"]) for r in rows] == [("1", "build"), ("2", "build"), ("1", "solve"),
                                                       ("2", "solve")]
    for r in rows:
        wall = float(r["wall"])
        assert wall > 0 and int(r["repeats"]) == 3 and r["spaxels"] == "300"
        assert float(r["compute_max"]) >= float(r["compute_mean"]) > 0
        assert float(r["efficiency"]) == pytest.approx(float(r["speedup"]) / int(r["ranks"]), rel=1e-4)
        assert float(r["model_wall"]) > 0
    assert float(rows[0]["speedup"]) == 1.0
    check_pngs(out)
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples["2"]) == 3 and len(samples["2"][0]["build"]["phases"]["compute"]) == 2
    for runs in samples.values():
        for run in runs:
            for stage in ("build", "solve"):
                phases = run[stage]["phases"]
                for rank in range(run["ranks"]):                # one rank's phases fit in the wall time
                    assert sum(phases[p][rank] for p in ("compute", "io", "comm")) <= run[stage]["wall"] * 1.001
    assert "build" in proc.stdout and "model" in proc.stdout


@pytest.mark.slow
def test_the_model_columns_are_filled_and_consistent(study):
    """The model's accuracy is a measurement (``benchmarks/scaling_model.py``); here its columns
    are checked: a prediction for every point, the error as defined, the contention seen."""
    for r in read_csv(study[0] / "scaling.csv"):
        assert float(r["model_wall"]) > 0 and float(r["model_contention"]) >= 1.0
        assert float(r["model_error"]) == pytest.approx(float(r["wall"]) / float(r["model_wall"]) - 1, abs=1e-4)


@pytest.mark.slow
def test_weak_scaling_grows_the_spaxels(tmp_path):
    proc = run_cli("scaling", "--ranks", "1,2", "--what", "build", "--repeat", "1", "--weak", "--out", tmp_path,
                   "40,2,6,120", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_csv(tmp_path / "scaling.csv")
    assert [(r["ranks"], r["spaxels"]) for r in rows] == [("1", "40"), ("2", "80")]
    eff = float(rows[1]["efficiency"])
    assert eff == pytest.approx(float(rows[0]["wall"]) / float(rows[1]["wall"]), rel=1e-4)
    assert float(rows[1]["speedup"]) == pytest.approx(2 * eff, rel=1e-4)
    check_pngs(tmp_path)


def test_predict_for_a_given_machine(tmp_path):
    machine = {**sm.GENERIC_NODE, "name": "test cluster", "build_sc_seconds": 0.01, "build_ref_work": 1.2e7,
               "blas_flops": 2e10, "design_seconds_per_elem": 1e-10, "mem_bandwidth": 1e10, "nnls_iter_seconds": 1e-4}
    path = tmp_path / "machine.json"
    path.write_text(json.dumps(machine))
    proc = run_cli("scaling", "--predict", "--machine", path, "--nodes", "1,2,4,1000", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "test cluster" in proc.stdout and "working-set" in proc.stdout and "exceeds the per-rank budget" \
        in proc.stdout
    assert "per-core costs measured" not in proc.stdout                  # all given: nothing measured
    rows = read_csv(tmp_path / "model_table.csv")
    build = [r for r in rows if r["stage"] == "build"]
    assert [int(r["nodes"]) for r in build] == [1, 2, 4, 1000]
    assert all(float(r["efficiency"]) <= 1.0 for r in rows)
    assert build[-1]["bound"] == "io"
    problem = galaxy()
    expected = sm.predict_build(problem, sm.Machine.from_dict(machine), sm.Layout(128, 128, 1)).total
    assert float(build[0]["total"]) == pytest.approx(expected, rel=1e-3)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"write_bw_fz": 1}))
    proc = run_cli("scaling", "--predict", "--machine", bad, "--out", tmp_path)
    assert proc.returncode == 2 and "unknown key(s) write_bw_fz" in proc.stderr


def test_scaling_refuses_to_run_under_mpi(tmp_path):
    proc = run_cli("scaling", "--ranks", "1", "--out", tmp_path, "20,1,2,60", np_ranks=2, timeout=60)
    assert proc.returncode == 2 and "run it as one process" in proc.stderr
    assert not (tmp_path / "scaling.csv").exists()


def test_bad_arguments_are_input_errors(tmp_path):
    proc = run_cli("scaling", "--out", tmp_path, str(tmp_path / "missing.h5"))
    assert proc.returncode == 2 and "expected an existing cube file or a mock size" in proc.stderr
    proc = run_cli("scaling", "--weak", "--out", tmp_path, __file__)
    assert proc.returncode == 2 and "--weak" in proc.stderr
    proc = run_cli("scaling", "--ranks", "0,2", "--out", tmp_path, "20,1,2,60")
    assert proc.returncode == 2 and "--ranks" in proc.stderr


def test_factored_model_counts_the_operators_flops_and_fits_g_per_rank():
    from cubefit_mpi.perf import factored_model as fm

    p, m = galaxy(), node()
    S, C, P, K, lu = p.S, p.C, p.P, p.K, p.l_used
    assert fm.pass_flops(p) == S * (C * K) ** 2 + 2.0 * S * lu * K * P + 2.0 * S * C * K * P
    assert fm.contraction_flops(p) == (K * P) ** 2 * lu + (C * K * P) ** 2
    layout = fm.best_layout(p, m, 1)
    assert p.N ** 2 * 8 <= m.gram_budget(layout.ranks_per_node) < p.N ** 2 * 8 * 2 or layout.ranks_per_node == 1
    assert layout.ranks_per_node * layout.threads == m.cores_per_node
    one = fm.predict_factored_solve(p, m, layout)
    assert one.compute == pytest.approx((fm.pass_flops(p) + fm.contraction_flops(p))
                                        / (m.blas_flops * layout.threads * layout.ranks))
    assert one.serial == sm.nnls_seconds(m, p.N, p.k)
    hyper = sm.predict_solve(p, m, sm.Layout(1, 1, m.cores_per_node))
    assert one.compute < hyper.compute / 100                  # no pass over the hypercube
    rows = fm.factored_table(p, m, [1, 2, 4])
    assert [r["nodes"] for r in rows] == [1, 2, 4] and rows[0]["speedup"] == 1.0


def test_phase_timer_counts_a_nested_phase_once():
    import time as _time

    from cubefit_mpi.parallel.timers import PhaseTimer

    timer = PhaseTimer()
    t0 = _time.perf_counter()
    with timer.phase("compute"):
        _time.sleep(0.02)
        with timer.phase("comm"):
            _time.sleep(0.03)
    wall = _time.perf_counter() - t0
    assert timer.seconds["comm"] >= 0.03 and timer.seconds["compute"] >= 0.02
    assert sum(timer.seconds.values()) <= wall * 1.001                  # the inner 0.03 s is not counted twice
