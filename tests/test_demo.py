"""`make demo` (real MILES templates) and `make demo-config` (the README's main job) run end to end and
say where the results are."""
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_pipeline(tmp_path):
    out = subprocess.run(["bash", "scripts/demo.sh", str(tmp_path / "galaxy.h5"), "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "demo done: results in" in out.stdout
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert {"spectra_best_worst.png", "population_weights.png", "component_totals.png"} <= set(pngs)
    assert "residual rms / noise sigma" in out.stdout
    with h5py.File(tmp_path / "galaxy.h5") as f:
        assert f["/Solve"].attrs["kkt.ok"] and f["/HyperCube"].attrs["complete"]
        assert f["/Templates"].attrs["library"].startswith("miles")          # real templates, shipped
        assert tuple(f["/Templates"].attrs["pop_shape"]) == (53, 4)
        x = f["/X_global"][...].reshape(f["/Truth/x"].shape)
        truth = f["/Truth/x"][...]
        mask, sigma = f["/Mask"][...], f["/Truth/noise_sigma"][...]
        resid = (f["/DataCube"][...] - f["/ReconCube"][...])[:, mask]
    np.testing.assert_allclose(x.sum(1), truth.sum(1), rtol=0.05)        # noisy (S/N 60): totals close
    ratio = np.sqrt(np.mean(resid**2, axis=1)) / sigma                    # the fit reaches the noise
    assert 0.9 < np.median(ratio) < 1.1


@pytest.mark.slow
def test_demo_from_config(tmp_path):
    out = subprocess.run(["bash", "scripts/demo_config.sh", str(tmp_path), "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    status = [ln.split()[1] for ln in out.stdout.splitlines()
              if ln.split() and ln.split()[0] in ("build", "weights", "solve", "recon", "plots")]
    assert status == ["ran"] * 5 + ["skipped"] * 5
