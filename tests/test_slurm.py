"""The jobscripts on a real Slurm: a single-node cluster started for this module.

``scripts/start_slurm.sh`` installs Debian's ``slurm-wlm`` and ``munge`` when missing and starts
``slurmctld``/``slurmd`` on free loopback ports in a private folder; ``scripts/stop_slurm.sh``
stops exactly those daemons by pid at the end, also when a test fails.  Skipped (with the
reason) only when not root or when apt cannot install Slurm.

The jobs run the project's own venv python (``<repo>/.venv/bin/python``).  Which pipeline steps
are exercised depends on the sub-commands the installed ``cubefit_mpi`` has: a missing one is
skipped by the jobscript with "step X not available in this version", and the checks follow.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobscripts"
SCRIPTS = ROOT / "scripts"
VENV_PY = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PY) if VENV_PY.exists() else sys.executable
JOBSCRIPTS = ("build.sbatch", "solve.sbatch", "pipeline.sbatch", "scaling.sbatch")
PIPELINE_STEPS = ("mock", "validate", "build", "weights", "solve", "recon", "plot", "status")
STAMP = r"\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\]"

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]   # includes a first-time apt-get install of slurm-wlm


# ---- without Slurm -----------------------------------------------------------------------------
def _common_block(path: Path) -> str:
    text = path.read_text()
    start = text.index("# >>> common block")
    return text[start:text.index("# <<< common block <<<", start)]


def test_jobscripts_share_one_common_block_and_parse():
    blocks = {name: _common_block(JOBS / name) for name in JOBSCRIPTS}
    reference = blocks["pipeline.sbatch"]
    assert len(reference.splitlines()) > 50
    for name, block in blocks.items():
        assert block == reference, f"{name}: the common block differs from pipeline.sbatch's"
        res = subprocess.run(["bash", "-n", str(JOBS / name)], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, (name, res.stderr)
        head = (JOBS / name).read_text().splitlines()[:8]
        assert head[0] == "#!/bin/bash" and "set -euo pipefail" in (JOBS / name).read_text()
        assert any(line.startswith("#SBATCH --ntasks=") for line in head), name


def _available_commands() -> set[str]:
    """Sub-commands of the installed cubefit_mpi, parsed as the jobscripts parse them."""
    res = subprocess.run([PYTHON, "-m", "cubefit_mpi", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return set(re.findall(r"^    ([a-z][a-z0-9-]*)(?: |$)", res.stdout, flags=re.M))


# ---- the cluster -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Environment (with SLURM_CONF) of a freshly started single-node Slurm; stopped afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: slurmd, slurmctld and munged are started as system daemons")
    state = tmp_path_factory.mktemp("slurm")
    ctld_port = _free_port()
    slurmd_port = _free_port()
    while slurmd_port == ctld_port:
        slurmd_port = _free_port()
    ports = {"SLURM_TEST_CTLD_PORT": str(ctld_port), "SLURM_TEST_SLURMD_PORT": str(slurmd_port)}
    try:
        res = subprocess.run(["timeout", "840", "bash", str(SCRIPTS / "start_slurm.sh"), str(state)],
                             capture_output=True, text=True, env={**os.environ, **ports}, timeout=870)
        if res.returncode == 3:
            pytest.skip("Slurm cannot run here: " + res.stderr.strip().splitlines()[-1])
        assert res.returncode == 0, f"start_slurm.sh exit {res.returncode}:\n{res.stderr[-3000:]}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PMI_", "MPIR_", "HYDRA", "SLURM_", "SBATCH_", "SRUN_", "CUBEFIT_"))}
        env.update(SLURM_CONF=str(state / "slurm.conf"), PYTHON=PYTHON, PYTHONDONTWRITEBYTECODE="1")
        yield env
    finally:
        subprocess.run(["timeout", "90", "bash", str(SCRIPTS / "stop_slurm.sh"), str(state)],
                       capture_output=True, text=True, timeout=120)


def _sbatch(env: dict, script: str, log: Path, job_env: dict, *options: str, limit: int = 240):
    """``sbatch --wait`` under ``timeout``; returns (exit code, seconds, job log).  A job still
    running at the limit is cancelled and the test fails."""
    cmd = ["timeout", str(limit), "sbatch", "--parsable", "--wait", "--nodes=1", f"--output={log}",
           f"--chdir={log.parent}", *options, str(JOBS / script)]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**env, **job_env}, timeout=limit + 30)
    seconds = time.monotonic() - t0
    text = log.read_text() if log.exists() else ""
    if res.returncode == 124:
        job_id = res.stdout.strip().split(";")[0]
        if job_id:
            subprocess.run(["timeout", "20", "scancel", job_id], env=env, capture_output=True)
        pytest.fail(f"{script} still running after {limit} s (cancelled):\n{text[-3000:]}")
    return res.returncode, seconds, text


def _stamp(log: str, pattern: str) -> datetime:
    m = re.search(r"^\[(\S+)\] " + pattern, log, flags=re.M)
    assert m, f"no log line '{pattern}' in:\n{log[-3000:]}"
    return datetime.fromisoformat(m.group(1))


# ---- the jobs ----------------------------------------------------------------------------------
S, C, P, L = 200, 2, 6, 200


def test_pipeline_job_on_a_mock_with_4_ranks(slurm, tmp_path):
    import h5py

    available = _available_commands()
    h5 = tmp_path / "mock.h5"
    plots = tmp_path / "plots"
    job_env = {"CUBEFIT_FILE": str(h5), "CUBEFIT_MOCK": f"{S},{C},{P},{L}", "CUBEFIT_OUT": str(plots)}
    rc, seconds, log = _sbatch(slurm, "pipeline.sbatch", tmp_path / "pipeline.log", job_env, "--ntasks=4")
    assert rc == 0, log[-4000:]

    # the log: each step timed, or skipped with the agreed message; one MPI world of 4 ranks
    assert re.search(STAMP + r" job \d+ 'cubefit-pipeline' on \S+: 4 task\(s\) on 1 node\(s\), "
                     r"1 thread\(s\) per task", log)
    assert "MPI build: True" in log
    for step in PIPELINE_STEPS:
        if step in available:
            assert re.search(rf"^{STAMP} step {step}: done in \d+ s$", log, flags=re.M), step
        else:
            assert re.search(rf"^{STAMP} step {step} not available in this version$", log, flags=re.M), step
    assert "on 4 rank(s)" in log and "on 1 rank(s)" not in log
    assert log.rstrip().endswith("job end: exit code 0")

    # the file: what each step that ran must have written
    with h5py.File(h5, "r") as f:
        assert f["HyperCube/models"].shape == (S, C, P, L)
        assert bool(f["HyperCube"].attrs["complete"])
        models = f["HyperCube/models"][...]
        assert np.isfinite(models).all() and models.min() >= 0 and models.max() > 0
        truth = f["Truth/x"][...].reshape(-1)
        if "weights" in available:
            w = f["HyperCube/lambda_weights"][...]
            assert w.shape == (L,) and 0 < w.min() <= w.max() <= 1
        if "solve" in available:       # noise-free mock: the exact solve recovers the truth
            x = f["X_global"][...]
            assert x.shape == (C * P,) and x.min() >= 0
            np.testing.assert_allclose(x, truth, rtol=0, atol=1e-5 * np.abs(truth).max())
        if "recon" in available:
            data = f["DataCube"][...]
            recon = f["ReconCube"][...]
            assert recon.shape == (S, L)
            assert f["ReconCube_rmse"].shape == (S,)
            assert np.nanmax(f["ReconCube_rmse"][...]) < 1e-5 * np.abs(data).max()
    if "plot" in available:
        pngs = sorted(plots.glob("*.png"))
        assert len(pngs) >= 3, pngs
        assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_bad_input_job_ends_with_exit_2_in_seconds(slurm, tmp_path):
    missing = tmp_path / "missing.h5"
    rc, seconds, log = _sbatch(slurm, "pipeline.sbatch", tmp_path / "bad.log",
                               {"CUBEFIT_FILE": str(missing)}, "--ntasks=2", limit=120)
    assert rc == 2, log[-3000:]
    assert f"cubefit_mpi validate: error: {missing}: no such file" in log
    assert re.search(rf"^{STAMP} step validate: FAILED with exit code 2 after \d+ s$", log, flags=re.M)
    assert "step build" not in log and "step mock: skipped (CUBEFIT_MOCK not set)" in log
    assert log.rstrip().endswith("job end: exit code 2")
    assert seconds < 60, seconds


def test_crash_on_rank_1_during_build_ends_the_job(slurm, tmp_path):
    """rank 1 raises while rank 0 is in the build: the job must end (non-zero), not hang."""
    wrapper = tmp_path / "python_fails_on_rank_1"
    wrapper.write_text(
        "#!/bin/bash\n"
        "# the real python, except that task 1 of the build step raises right after MPI_Init\n"
        f'if [ "${{SLURM_PROCID:-0}}" = 1 ] && [[ " $* " == *" build "* ]]; then\n'
        f'  exec {PYTHON} -m mpi4py -c "from mpi4py import MPI; MPI.COMM_WORLD.Get_rank(); '
        "raise RuntimeError('injected failure on rank 1')\"\n"
        "fi\n"
        f'exec {PYTHON} "$@"\n')
    wrapper.chmod(0o755)
    job_env = {"CUBEFIT_FILE": str(tmp_path / "crash.h5"), "CUBEFIT_MOCK": "60,2,4,120",
               "CUBEFIT_STEPS": "mock build status", "PYTHON": str(wrapper)}
    rc, seconds, log = _sbatch(slurm, "pipeline.sbatch", tmp_path / "crash.log", job_env, "--ntasks=2",
                               limit=120)
    assert rc != 0, log[-3000:]
    assert "injected failure on rank 1" in log
    assert re.search(rf"^{STAMP} step mock: done in \d+ s$", log, flags=re.M)
    assert re.search(rf"^{STAMP} step build: FAILED with exit code [1-9]\d* after \d+ s$", log, flags=re.M)
    assert "step status" not in log
    started = _stamp(log, "step build: start")
    ended = _stamp(log, "job end: exit code [1-9]")
    assert (ended - started).total_seconds() < 30, log[-3000:]


def test_scaling_job_times_build_at_1_and_2_ranks(slurm, tmp_path):
    import h5py

    available = _available_commands()
    h5, csv = tmp_path / "scal.h5", tmp_path / "scaling.csv"
    job_env = {"CUBEFIT_FILE": str(h5), "CUBEFIT_MOCK": "80,2,4,120", "CUBEFIT_RANKS": "1 2",
               "CUBEFIT_OUT": str(csv) if "scaling" not in available else str(tmp_path / "study"),
               "CUBEFIT_REPEATS": "1"}
    rc, seconds, log = _sbatch(slurm, "scaling.sbatch", tmp_path / "scaling.log", job_env,
                               "--ntasks=2", limit=300)
    assert rc == 0, log[-3000:]
    if "scaling" in available:
        assert re.search(rf"^{STAMP} step scaling: done in \d+ s$", log, flags=re.M)
        rows = (tmp_path / "study" / "scaling.csv").read_text().splitlines()
        header = rows[0].split(",")
        ranks = sorted({line.split(",")[header.index("ranks")] for line in rows[1:]})
        assert ranks == ["1", "2"]
        assert any(p.suffix == ".png" for p in (tmp_path / "study").iterdir())
        return
    assert "step scaling not available in this version" in log
    lines = csv.read_text().splitlines()
    assert lines[0] == "ranks,nodes,threads,repeat,wall_s,speedup,efficiency"
    rows = [line.split(",") for line in lines[1:]]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("1", "1", "1", "1"), ("2", "1", "1", "1")]
    walls = [float(r[4]) for r in rows]
    assert all(w > 0 for w in walls)
    assert float(rows[0][5]) == 1.0 and float(rows[0][6]) == 1.0
    speedup2 = float(rows[1][5])
    assert speedup2 == pytest.approx(walls[0] / walls[1], abs=2e-3)
    assert float(rows[1][6]) == pytest.approx(speedup2 / 2, abs=2e-3)
    assert len(re.findall(rf"^{STAMP} scaling: build on \d rank\(s\)", log, flags=re.M)) == 2
    with h5py.File(h5, "r") as f:
        assert bool(f["HyperCube"].attrs["complete"]) and f["HyperCube/models"].shape == (80, 2, 4, 120)


def test_apptainer_image_path_launches_each_rank_through_the_container_command(slurm, tmp_path):
    """APPTAINER_IMAGE set: every rank runs ``apptainer exec IMAGE python -m mpi4py -m cubefit_mpi``.

    Apptainer is not packaged for Debian 12, so a stand-in records each call and runs the
    command with the venv's ``bin`` first on PATH (as the image's %environment does).
    """
    import h5py

    image = tmp_path / "cubefit_mpi.sif"
    image.write_bytes(b"stand-in image")
    calls = tmp_path / "apptainer_calls.txt"
    stand_in = tmp_path / "apptainer"
    stand_in.write_text(
        "#!/bin/bash\n"
        f'echo "$SLURM_PROCID $*" >> {calls}\n'
        '[ "$1" = exec ] && [ -f "$2" ] || { echo "stand-in: expected exec IMAGE CMD..." >&2; exit 99; }\n'
        "shift 2\n"
        f'PATH={Path(PYTHON).parent}:$PATH exec "$@"\n')
    stand_in.chmod(0o755)
    h5 = tmp_path / "img.h5"
    job_env = {"CUBEFIT_FILE": str(h5), "CUBEFIT_MOCK": "60,2,4,120", "CUBEFIT_STEPS": "mock build status",
               "APPTAINER_IMAGE": str(image), "APPTAINER": str(stand_in), "PYTHON": "/nonexistent/python"}
    rc, seconds, log = _sbatch(slurm, "pipeline.sbatch", tmp_path / "img.log", job_env, "--ntasks=2", limit=120)
    assert rc == 0, log[-3000:]
    assert f"step build: start on 2 rank(s): srun --mpi=pmi2 {stand_in} exec {image} python -m mpi4py " \
           f"-m cubefit_mpi build {h5} --norm model" in log
    recorded = calls.read_text().splitlines()
    build_calls = sorted(line.split()[0] for line in recorded
                         if line.endswith(f"exec {image} python -m mpi4py -m cubefit_mpi build {h5} --norm model"))
    assert build_calls == ["0", "1"]          # one container per rank, Slurm task ids 0 and 1
    assert all(" exec " + str(image) + " python -m " in line for line in recorded)
    with h5py.File(h5, "r") as f:
        assert bool(f["HyperCube"].attrs["complete"])
