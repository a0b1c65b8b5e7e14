"""`cubefit_mpi run cubefit.yaml`: ingest -> build -> weights -> solve -> recon -> plots from an
astronomer's files, recovering the truth, resuming, and rejecting bad configurations."""
import h5py
import numpy as np
import yaml
from conftest import run_cli
from ingest_fixtures import write_muse_like_inputs


def _config(tmp_path, inputs, **changes):
    res = run_cli("init-config")
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    cfg["file"] = str(tmp_path / "galaxy.h5")
    cfg["ingest"].update(cube=inputs["cube"], templates=inputs["templates"], losvd=inputs["losvd"],
                         velscale=float(inputs["velscale"]), oversample=int(inputs["oversample"]))
    cfg["plots"]["outdir"] = str(tmp_path / "plots")
    for key, value in changes.items():
        cfg[key].update(value) if isinstance(value, dict) else cfg.__setitem__(key, value)
    path = tmp_path / "cubefit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_from_fits_recovers_truth_and_resumes(tmp_path):
    inputs = write_muse_like_inputs(tmp_path)
    config = _config(tmp_path, {k: str(tmp_path / v) if not str(v).startswith("/") else v
                                for k, v in inputs.items() if k in ("cube", "templates", "losvd")}
                     | {"velscale": inputs["velscale"], "oversample": inputs["oversample"]})
    res = run_cli("run", config, np_ranks=2)
    assert res.returncode == 0, res.stderr
    lines = {ln.split()[0]: ln.split()[1] for ln in res.stdout.splitlines() if ln.split() and ln.split()[0] in
             ("ingest", "build", "weights", "solve", "recon", "plots")}
    assert lines == dict.fromkeys(("ingest", "build", "weights", "solve", "recon", "plots"), "ran")
    with h5py.File(tmp_path / "galaxy.h5") as f:
        x = f["/X_global"][...].reshape(inputs["x_true"].shape)
        assert f["/Solve"].attrs["kkt.ok"]
        assert "/ReconCube" in f and "/HyperCube/lambda_weights" in f
    truth = inputs["x_true"]
    assert np.abs(x - truth).max() <= 1e-4 * truth.max()
    assert any(p.suffix == ".png" for p in (tmp_path / "plots").iterdir())
    res = run_cli("run", config)                                   # everything current: all skipped
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("skipped") == 6
    cfg = yaml.safe_load(config.read_text())                       # a changed solve option reruns solve on
    cfg["solve"]["ridge"] = 1e-6
    config.write_text(yaml.safe_dump(cfg))
    res = run_cli("run", config)
    status = {ln.split()[0]: ln.split()[1] for ln in res.stdout.splitlines()
              if len(ln.split()) == 3 and ln.split()[0] != "pipeline"}
    assert status == {"ingest": "skipped", "build": "skipped", "weights": "skipped", "solve": "ran",
                      "recon": "ran", "plots": "ran"}


def test_bad_config_key_named_with_closest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("file: g.h5\nsolve:\n  ridgee: 1.0\n")
    res = run_cli("run", path)
    assert res.returncode == 2
    errors = res.stderr.strip().splitlines()
    assert len(errors) == 1 and "solve.ridgee" in errors[0] and "ridge" in errors[0].split("solve.ridgee")[1]
    assert not (tmp_path / "g.h5").exists()
