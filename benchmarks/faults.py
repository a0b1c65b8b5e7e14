"""Fault injection over every writing stage: nothing lost, ever (issue 17).

    .venv/bin/python benchmarks/faults.py [--ranks 1,2] [--raise-ranks 2,3] [--only recon,solve] [--quick]

Cases, each on a small cube (S=200 C=3 P=12 L=300) and run through the command line:

* ``disk-full``: the file on a tmpfs with half of what the stage writes free, three ways: the
  free-space check on (expected: exit 2), off (``CUBEFIT_SPACE_CHECK=0``: the reservation or an
  HDF5 write fails, exit 1), off and no ``posix_fallocate`` (zeros reserve the space).  Survived:
  no crash or hang, one error line, every dataset and attribute of the file as before (for
  ``run``: but the results of the steps that finished), ``status`` reads it, and the same command
  with room gives the bytes of an uninterrupted run;
* ``sigkill``: SIGKILL of one rank at >= 5 moments (I/O events spread over the stage, the last
  ones inside the final swap); survived: the file reads, the rerun gives the uninterrupted bytes;
* ``writers``: a second writer while the first holds the file (paused inside its write);
  survived: the second gets exit 2 naming the holder, ``status`` and ``validate`` still work,
  the first finishes with the uninterrupted bytes;
* ``raise``: a RuntimeError injected on one rank (each rank in turn) in the middle of the
  stage at 2 and 3 ranks; survived: the job ends within 10 s of the injection with the
  traceback and a non-zero exit, and the rerun gives the uninterrupted bytes;
* ``bad-input``: each bad option or input of the issue's list; survived: exit 2, one line, the
  file unchanged.

Needs root for the tmpfs (``disk-full`` is skipped otherwise).  Prints the counts per kind and
stage as markdown rows for ``docs/reliability.md``.  ``--quick``: 1 rank, fewer moments.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
INJECT = ROOT / "benchmarks" / "fault_inject.py"
TIMEOUT = 120
MOCK = ["--spaxels", "200", "--populations", "12", "--wavelengths", "300", "--seed", "8"]

# stage -> (arguments after the file, datasets it writes (None: the whole file), start state)
STAGES = {
    "recon": (["recon"], ["/ReconCube", "/ReconCube_chi2", "/ReconCube_rmse"], "solved"),
    "solve": (["solve", "--no-cache"], ["/X_global", "/Solve/gram", "/Solve/rhs", "/Solve/component_totals"], "solved"),
    "kaczmarz": (["solve", "--method", "kaczmarz", "--epochs", "2"], ["/X_global"], "solved"),
    "weights": (["weights", "--force", "--large", "101"], ["/HyperCube/lambda_weights"], "solved"),
    "energy": (["energy", "--weighted"], ["/HyperCube/col_energy"], "solved"),
    "convert-norm": (["convert-norm", "--to", "data"], ["/HyperCube/models", "/HyperCube/col_energy"], "solved"),
    "recompress": (["recompress", "--compression", "gzip:1"], ["/HyperCube/models"], "solved"),
    "rebin": (["rebin", "--force", "--mode", "interp"], ["/R_T"], "solved"),
    "ingest": (["ingest", "--force"], None, "ingested"),
    "mock": (["mock"] + MOCK[:-1] + ["9"], None, "mocked"),
    "run": (["run"], ["/X_global", "/ReconCube", "/HyperCube/lambda_weights"], "solved"),
    "uncertainty": (["uncertainty", "--replicates", "16", "--batch", "4"],
                    ["/Uncertainty/replicates", "/Uncertainty/_done", "/Uncertainty/totals_mean"], "solved"),
}


# ---------------------------------------------------------------------------------------------
# running commands
# ---------------------------------------------------------------------------------------------
def cli(args, ranks: int = 1, env=None, inject: bool = True, timeout: int = TIMEOUT, background: bool = False):
    """``[mpiexec -n R] python -m mpi4py fault_inject.py ARGS`` -> (rc, stdout, stderr, seconds)."""
    cmd = [PY, "-m", "mpi4py", str(INJECT) if inject else "-m", *([] if inject else ["cubefit_mpi"]), *map(str, args)]
    if ranks > 1:
        cmd = ["mpiexec", "-n", str(ranks), *cmd]
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPIR_", "HYDRA", "FAULT_"))}
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")
    full.update(env or {})
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full,
                                start_new_session=True)
    t0 = time.time()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full, start_new_session=True)
        return out.returncode, out.stdout, out.stderr, time.time() - t0
    except subprocess.TimeoutExpired as exc:
        return "hang", exc.stdout or "", exc.stderr or "", time.time() - t0


def error_lines(stderr: str) -> list[str]:
    """Our own error lines (not INFO/WARNING log lines, not the launcher's, not the injection marker)."""
    return [ln for ln in stderr.splitlines() if ln.startswith("cubefit_mpi ") and "error:" in ln]


def crashed(rc, stderr: str) -> bool:
    return rc == "hang" or (isinstance(rc, int) and rc < 0) or rc in (134, 139) or "Segmentation fault" in stderr


# ---------------------------------------------------------------------------------------------
# file contents
# ---------------------------------------------------------------------------------------------
def _attrs(obj) -> dict:
    return {k: repr(np.asarray(v).tolist()) for k, v in obj.attrs.items()}


def snapshot(path, names=None, attrs: bool = True) -> dict:
    """``{name: sha256 of bytes (+ attributes)}`` of the datasets (all, or ``names``) and groups."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if any(name.endswith(sfx) for sfx in ("__new", "__old", "__spare", "__recompress")):
                return
            key = "/" + name
            if isinstance(obj, h5py.Dataset):
                if names is not None and key not in names:
                    return
                h = hashlib.sha256(np.ascontiguousarray(obj[()]).tobytes())
                if attrs:
                    h.update(json.dumps(_attrs(obj), sort_keys=True).encode())
                out[key] = h.hexdigest()
            elif attrs and names is None:
                out[key + " (attrs)"] = json.dumps(_attrs(obj), sort_keys=True)
        f.visititems(visit)
        if attrs and names is None:
            out["/ (attrs)"] = json.dumps({k: v for k, v in _attrs(f).items() if k != "cubefit.staged_commit"},
                                          sort_keys=True)
    return out


def outputs(path, stage: str) -> dict:
    """The bytes a stage is judged on (no attributes: they hold times)."""
    names = STAGES[stage][1]
    return snapshot(path, None if names is None else set(names), attrs=False)


# ---------------------------------------------------------------------------------------------
# the starting files
# ---------------------------------------------------------------------------------------------
class Fixtures:
    """Start files made once: a solved cube, FITS inputs with an earlier ingest, an earlier mock."""

    def __init__(self, work: Path):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.solved = work / "solved.h5"
        for args in (["mock", self.solved, *MOCK], ["build", self.solved], ["weights", self.solved],
                     ["solve", self.solved], ["recon", self.solved]):
            rc, _, err, _ = cli(args, inject=False)
            assert rc == 0, err
        sys.path.insert(0, str(ROOT / "tests"))
        from ingest_fixtures import write_muse_like_inputs

        (work / "fits").mkdir(exist_ok=True)
        inputs = write_muse_like_inputs(work / "fits")
        self.ingest_args = ["--cube", inputs["cube"], "--templates", inputs["templates"], "--losvd",
                            inputs["losvd"], "--velscale", inputs["velscale"]]
        self.ingested = work / "ingested.h5"
        rc, _, err, _ = cli(["ingest", self.ingested, *self.ingest_args, "--oversample", "3"], inject=False)
        assert rc == 0, err
        self.mocked = work / "mocked.h5"
        rc, _, err, _ = cli(["mock", self.mocked, *MOCK], inject=False)
        assert rc == 0, err

    def start(self, stage: str, dest: Path) -> Path:
        """A fresh copy of the stage's start file at ``dest``."""
        src = {"solved": self.solved, "ingested": self.ingested, "mocked": self.mocked}[STAGES[stage][2]]
        shutil.copy(src, dest)
        return dest

    def args(self, stage: str, path: Path) -> list:
        """The stage's command line on ``path`` (``run`` gets a configuration next to it)."""
        words = STAGES[stage][0]
        if stage == "run":
            return ["run", write_config(path)]
        extra = self.ingest_args if stage == "ingest" else []
        return [words[0], path, *words[1:], *extra]


def write_config(path: Path) -> Path:
    import yaml

    cfg = {"file": str(path), "steps": ["weights", "solve", "recon"], "weights": {"large": 101},
           "solve": {"ridge": 1e-9}}
    config = path.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(cfg))
    return config


# ---------------------------------------------------------------------------------------------
# tmpfs
# ---------------------------------------------------------------------------------------------
class Tmpfs:
    """A tmpfs at ``mnt`` holding a copy of ``src`` with ``free`` bytes left."""

    def __init__(self, mnt: Path, src: Path, free: int):
        self.mnt = mnt
        mnt.mkdir(parents=True, exist_ok=True)
        used = int(subprocess.run(["du", "-k", str(src)], capture_output=True, text=True).stdout.split()[0])
        extra = sum(int(subprocess.run(["du", "-k", str(p)], capture_output=True, text=True).stdout.split()[0])
                    for p in src.parent.glob(src.name + ".*") if p.suffix in (".yaml",))
        size_kb = used + extra + max(free // 1024, 4) + 8
        self.ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)],
                                 capture_output=True).returncode == 0
        if self.ok:
            subprocess.run(["cp", "--sparse=always", str(src), str(mnt / src.name)], check=True)

    def fill(self, keep: int) -> None:
        """Take all free space but ``keep`` bytes."""
        free = shutil.disk_usage(self.mnt).free
        if free > keep:
            with open(self.mnt / "ballast", "wb") as fh:
                fh.write(b"\0" * (free - keep))

    def copy_out(self, name: str, dest: Path) -> None:
        subprocess.run(["cp", "--sparse=always", str(self.mnt / name), str(dest)], check=True)

    def close(self) -> None:
        if self.ok and subprocess.run(["umount", str(self.mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)      # busy: detached now, freed later


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------
class Tally:
    def __init__(self):
        self.rows: dict[tuple, list[int]] = {}
        self.failures: list[str] = []

    def add(self, kind: str, stage: str, ranks: int, ok: bool, what: str) -> None:
        row = self.rows.setdefault((kind, stage, ranks), [0, 0])
        row[0] += 1
        row[1] += int(ok)
        if not ok:
            self.failures.append(f"{kind} {stage} n={ranks}: {what}")
        print(f"  {'ok  ' if ok else 'FAIL'} {kind:9s} {stage:12s} n={ranks} {what}", flush=True)


def reference(fx: Fixtures, stage: str, ranks: int, work: Path) -> tuple[dict, float]:
    path = fx.start(stage, work / f"ref_{stage}_{ranks}.h5")
    rc, _, err, seconds = cli(fx.args(stage, path), ranks)
    assert rc == 0, f"reference {stage}: {err[-2000:]}"
    return outputs(path, stage), seconds


def rerun_matches(fx, stage, path, ranks, ref) -> tuple[bool, str]:
    rc, _, err, _ = cli(fx.args(stage, path), ranks)
    if rc != 0:
        return False, f"rerun rc={rc}: {error_lines(err) or err[-300:]}"
    got = outputs(path, stage)
    return got == ref, "rerun gives the uninterrupted bytes" if got == ref else \
        f"rerun differs in {sorted(k for k in ref if got.get(k) != ref[k])}"


def case_disk_full(fx, stage, ranks, work, tally, ref) -> None:
    size_before = (work / "probe.h5")
    fx.start(stage, size_before)
    before_kb = os.path.getsize(size_before)
    ref_path = work / f"ref_{stage}_{ranks}.h5"
    grown = max(os.path.getsize(ref_path) - before_kb, 0) if STAGES[stage][1] is not None else os.path.getsize(ref_path)
    free = max(grown // 2, 16 * 1024)
    variants = (("check", {}), ("reserve", {"CUBEFIT_SPACE_CHECK": "0"}),
                ("no-fallocate", {"CUBEFIT_SPACE_CHECK": "0", "FAULT_NOFALLOC": "1"}))
    for variant, env in variants:
        src = fx.start(stage, work / "df.h5")
        before = snapshot(src)
        fs = Tmpfs(work / "mnt", src, free + 2**20)
        if not fs.ok:
            tally.add("disk-full", stage, ranks, True, "skipped (no tmpfs: needs root)")
            return
        try:
            target = fs.mnt / "df.h5"
            args = fx.args(stage, target)
            fs.fill(free)
            rc, _, err, _ = cli(args, ranks, env=env)
            fs.copy_out("df.h5", work / "after.h5")
            leftovers = sorted(p.name for p in fs.mnt.iterdir()
                               if p.name not in ("df.h5", "ballast", "df.yaml") and ".fit." not in p.name)
        finally:
            fs.close()
        after = work / "after.h5"
        problems = []
        if crashed(rc, err):
            problems.append(f"crashed rc={rc}")
        lines = error_lines(err)
        if rc != 0 and (len(lines) != 1 or "Traceback" in err):
            problems.append(f"{len(lines)} error lines{' + traceback' if 'Traceback' in err else ''}: "
                            f"{err.strip().splitlines()[-1][:200] if err.strip() else ''}")
        try:
            changed = snapshot(after)
        except Exception as exc:                 # noqa: BLE001 -- an unreadable file is the failure we count
            changed = {"unreadable": str(exc)[:120]}
        if stage == "run":          # the steps that finished before the disk filled keep their results
            keep = ("/X_global", "/ReconCube", "/HyperCube/lambda_weights", "/Solve", "/Pipeline")
            before = {k: v for k, v in before.items() if not k.startswith(keep)}
            changed = {k: v for k, v in changed.items() if not k.startswith(keep)}
        if rc != 0 and changed != before:
            problems.append(f"file changed: {sorted(k for k in set(before) | set(changed) if changed.get(k) != before.get(k))[:4]}")
        if leftovers:
            problems.append(f"left {leftovers}")
        st, _, serr, _ = cli(["status", after], inject=False)
        if st != 0:
            problems.append(f"status rc={st}")
        ok_rerun, what = rerun_matches(fx, stage, after, ranks, ref)
        if not ok_rerun:
            problems.append(what)
        tally.add("disk-full", stage, ranks, not problems,
                  f"[{variant}] rc={rc} " + ("; ".join(problems) if problems else
                                              (lines[0][:110] if lines else "completed in the space left")))


def event_count(fx, stage, ranks, rank, work) -> int:
    path = fx.start(stage, work / "count.h5")
    counts = work / "counts"
    rc, _, err, _ = cli(fx.args(stage, path), ranks, env={"FAULT_ACTION": "count", "FAULT_COUNT_FILE": str(counts)})
    assert rc == 0, err
    return int(Path(f"{counts}.{rank}").read_text())


def moments(n: int, how_many: int) -> list[int]:
    picks = {1, n, max(1, n - 1), max(1, n - 2)} | {max(1, round(n * k / (how_many + 1))) for k in range(1, how_many + 1)}
    return sorted(picks)


def case_sigkill(fx, stage, ranks, work, tally, ref, how_many) -> None:
    for rank in range(ranks):
        n = event_count(fx, stage, ranks, rank, work)
        for at in moments(n, how_many if rank == 0 else max(2, how_many // 2)):
            path = fx.start(stage, work / "k.h5")
            rc, _, err, _ = cli(fx.args(stage, path), ranks,
                                env={"FAULT_ACTION": "kill", "FAULT_RANK": str(rank), "FAULT_AT": str(at)})
            problems = [] if rc != 0 else ["not killed"]
            if rc == "hang":
                problems.append("hang after the kill")
            st, _, serr, _ = cli(["status", path], inject=False)
            if st != 0:
                problems.append(f"status rc={st}: {error_lines(serr) or serr[-200:]}")
            ok, what = rerun_matches(fx, stage, path, ranks, ref)
            if not ok:
                problems.append(what)
            tally.add("sigkill", stage, ranks, not problems,
                      f"rank {rank} at event {at}/{n}: " + ("; ".join(problems) if problems else what))


def case_writers(fx, stage, ranks, work, tally, ref) -> None:
    path = fx.start(stage, work / "w.h5")
    n = event_count(fx, stage, ranks, 0, work)
    first = cli(fx.args(stage, path), ranks, background=True,
                env={"FAULT_ACTION": "sleep", "FAULT_SLEEP": "15", "FAULT_AT": str(max(1, n // 2))})
    problems = []
    t0 = time.time()
    seen = False
    for line in first.stderr:
        if line.startswith("FAULT-INJECTED"):
            seen = True
            break
        if time.time() - t0 > 60:
            break
    if not seen:
        problems.append("the first writer never paused")
    rc2, _, err2, _ = cli(fx.args(stage, path), 1, inject=False)
    lines = error_lines(err2)
    if rc2 != 2 or len(lines) != 1 or "being written by" not in lines[0]:
        problems.append(f"second writer rc={rc2} {lines or err2[-200:]}")
    if STAGES[stage][2] != "mocked" and stage != "ingest":
        for reader in ("status", "validate"):
            rc, _, err, _ = cli([reader, path], inject=False)
            if rc != 0:
                problems.append(f"{reader} during the write rc={rc}: {error_lines(err)}")
    out, err = first.communicate(timeout=TIMEOUT)
    if first.returncode != 0:
        problems.append(f"first writer rc={first.returncode}: {error_lines(err) or err[-300:]}")
    elif outputs(path, stage) != ref:
        problems.append("first writer's result differs from an undisturbed run")
    if os.path.exists(str(path) + ".lock"):
        problems.append("lock left behind")
    tally.add("writers", stage, ranks, not problems, "; ".join(problems) if problems else
              f"second refused ({lines[0].split('error: ')[1][:70]}...), readers ran, first completed")


def case_raise(fx, stage, ranks, work, tally, ref) -> None:
    for rank in range(ranks):
        n = event_count(fx, stage, ranks, rank, work)
        at = max(1, n // 2)
        path = fx.start(stage, work / "r.h5")
        rc, _, err, t_end = cli(fx.args(stage, path), ranks,
                                env={"FAULT_ACTION": "raise", "FAULT_RANK": str(rank), "FAULT_AT": str(at)})
        problems = []
        marks = [float(ln.split()[2]) for ln in err.splitlines() if ln.startswith("FAULT-INJECTED")]
        ended = time.time()
        if rc == 0 or rc == "hang":
            problems.append(f"rc={rc}")
        if "RuntimeError: injected fault" not in err:
            problems.append("no traceback")
        delay = ended - marks[0] if marks else float("nan")
        if not marks or delay > 10.0:
            problems.append(f"ended {delay:.1f}s after the injection")
        ok, what = rerun_matches(fx, stage, path, ranks, ref)
        if not ok:
            problems.append(what)
        tally.add("raise", stage, ranks, not problems,
                  f"rank {rank} at event {at}/{n}: " + ("; ".join(problems) if problems else
                                                       f"ended {delay:.1f}s after it with the traceback, rc={rc}"))


BAD_INPUTS = [
    (["build", "{f}", "--force", "--compression", "gzip:x"], "--compression"),
    (["solve", "{f}", "--ridge", "nan"], "--ridge"),
    (["solve", "{f}", "--ridge", "inf"], "--ridge"),
    (["solve", "{f}", "--regul", "nan"], "--regul"),
    (["solve", "{f}", "--orbit-weights", "1,1,1", "--orbit-strength", "nan"], "--orbit-strength"),
    (["solve", "{f}", "--method", "kaczmarz", "--orbit-weights", "1,1,1", "--orbit-strength", "nan"],
     "--orbit-strength"),
    (["solve", "{f}", "--blas-threads", "-3"], "--blas-threads"),
    (["weights", "{f}", "--force", "--large", "401"], "--large"),
    (["solve", "{f}", "--orbit-weights", "{dir}/missing.npy", "--orbit-strength", "1"], "--orbit-weights"),
    (["plot", "{f}", "--out", "/proc/cubefit-plots"], "--out"),
    (["recompress", "{f}", "--compression", "lzf:3"], "--compression"),
]


def case_bad_inputs(fx, work, tally) -> None:
    for args, word in BAD_INPUTS:
        path = fx.start("recon", work / "bad.h5")
        before = snapshot(path)
        words = [str(a).format(f=path, dir=work) for a in args]
        rc, _, err, _ = cli(words, inject=False)
        lines = error_lines(err)
        ok = rc == 2 and len(lines) == 1 and word in lines[0] and snapshot(path) == before
        tally.add("bad-input", words[0], 1, ok, " ".join(words[2:]) + f" -> rc={rc} " + (lines[0][:90] if lines else err[-200:]))


# ---------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2", help="rank counts of disk-full, sigkill, writers (default 1,2)")
    ap.add_argument("--raise-ranks", default="2,3", help="rank counts of the injected exceptions (default 2,3)")
    ap.add_argument("--only", default=None, help="comma-separated stages (default all)")
    ap.add_argument("--kinds", default="disk-full,sigkill,writers,raise,bad-input")
    ap.add_argument("--moments", type=int, default=5, help="SIGKILL moments per stage and rank 0 (default 5)")
    ap.add_argument("--quick", action="store_true", help="1 rank (raise at 2), 3 moments")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    opts = ap.parse_args()
    ranks = [1] if opts.quick else [int(r) for r in opts.ranks.split(",")]
    raise_ranks = [2] if opts.quick else [int(r) for r in opts.raise_ranks.split(",")]
    how_many = 3 if opts.quick else opts.moments
    stages = list(STAGES) if opts.only is None else opts.only.split(",")
    kinds = opts.kinds.split(",")
    work = Path(tempfile.mkdtemp(prefix="cubefit-faults-"))
    tally = Tally()
    t0 = time.time()
    try:
        fx = Fixtures(work / "fixtures")
        for stage in stages:
            for n in sorted(set(ranks + (raise_ranks if "raise" in kinds else []))):
                ref, _ = reference(fx, stage, n, work)
                if n in ranks and "disk-full" in kinds:
                    case_disk_full(fx, stage, n, work, tally, ref)
                if n in ranks and "sigkill" in kinds:
                    case_sigkill(fx, stage, n, work, tally, ref, how_many)
                if n in ranks and "writers" in kinds:
                    case_writers(fx, stage, n, work, tally, ref)
                if n in raise_ranks and n > 1 and "raise" in kinds:
                    case_raise(fx, stage, n, work, tally, ref)
        if "bad-input" in kinds:
            case_bad_inputs(fx, work, tally)
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{sum(v[0] for v in tally.rows.values())} cases, {sum(v[1] for v in tally.rows.values())} survived, "
          f"{time.time() - t0:.0f} s\n")
    print("| kind | stage | ranks | cases | survived |")
    print("|---|---|---|---|---|")
    for (kind, stage, n), (tried, ok) in sorted(tally.rows.items()):
        print(f"| {kind} | {stage} | {n} | {tried} | {ok} |")
    totals: dict[str, list[int]] = {}
    for (kind, _, _), (tried, ok) in tally.rows.items():
        t = totals.setdefault(kind, [0, 0])
        t[0] += tried
        t[1] += ok
    print("\n| kind | cases | survived |\n|---|---|---|")
    for kind, (tried, ok) in totals.items():
        print(f"| {kind} | {tried} | {ok} |")
    if tally.failures:
        print("\nnot survived:\n" + "\n".join("  " + f for f in tally.failures))
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
