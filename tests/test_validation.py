"""Every input check rejects bad files with one clear line, exit 2, and leaves the file as it was."""
import shutil

import h5py
import numpy as np
import pytest
from conftest import file_bytes, run_cli


def _replace(f, name, data):
    attrs = dict(f[name].attrs) if name in f else {}
    if name in f:
        del f[name]
    f[name] = data
    for k, v in attrs.items():
        f[name].attrs[k] = v


def mutate_missing_losvd(f):
    del f["/LOSVD"]


def mutate_obs_not_increasing(f):
    obs = f["/ObsPix"][...]
    obs[5], obs[6] = obs[6], obs[5]
    _replace(f, "/ObsPix", obs)


def mutate_tem_not_uniform(f):
    tem = f["/TemPix"][...]
    tem[10:] += 0.3 * (tem[1] - tem[0])
    _replace(f, "/TemPix", tem)


def mutate_obs_outside_guard(f):
    _replace(f, "/VelPix", f["/VelPix"][...] * 20.0)


def mutate_templates_shape(f):
    _replace(f, "/Templates", f["/Templates"][:, :-3])


def mutate_templates_nan(f):
    t = f["/Templates"][...]
    t[2, 40] = np.nan
    _replace(f, "/Templates", t)


def mutate_losvd_negative(f):
    x = f["/LOSVD"][...]
    x[7, 3, 1] = -0.5
    _replace(f, "/LOSVD", x)


def mutate_losvd_inf(f):
    x = f["/LOSVD"][...]
    x[12, 0, 0] = np.inf
    _replace(f, "/LOSVD", x)


def mutate_data_nan_unmasked(f):
    y = f["/DataCube"][...]
    mask = f["/Mask"][...]
    y[4, int(np.flatnonzero(mask)[3])] = np.nan
    _replace(f, "/DataCube", y)


def mutate_all_masked(f):
    _replace(f, "/Mask", np.zeros(f["/Mask"].shape, dtype=bool))


def mutate_datacube_shape(f):
    _replace(f, "/DataCube", f["/DataCube"][:-1])


def mutate_velpix_nan(f):
    v = f["/VelPix"][...]
    v[0] = np.nan
    _replace(f, "/VelPix", v)


CASES = [
    (mutate_missing_losvd, "/LOSVD: dataset missing"),
    (mutate_obs_not_increasing, "/ObsPix: not strictly increasing"),
    (mutate_tem_not_uniform, "/TemPix: expected a grid uniform in ln"),
    (mutate_obs_outside_guard, "/ObsPix: observed range .* velocity guard"),
    (mutate_templates_shape, "/Templates: expected shape"),
    (mutate_templates_nan, r"/Templates: contains NaN/Inf \(first at index 2,40\)"),
    (mutate_losvd_negative, "/LOSVD: negative value -0.5 at index 7,3,1"),
    (mutate_losvd_inf, r"/LOSVD: contains NaN/Inf \(first at index 12,0,0\)"),
    (mutate_data_nan_unmasked, "/DataCube: NaN/Inf at spaxel 4"),
    (mutate_all_masked, "/Mask: every pixel is masked"),
    (mutate_datacube_shape, "/DataCube: expected shape"),
    (mutate_velpix_nan, "/VelPix: contains NaN/Inf"),
]


def test_good_file_passes(small_mock):
    res = run_cli("validate", small_mock)
    assert res.returncode == 0, res.stderr
    assert "inputs OK (S=60" in res.stdout


@pytest.mark.parametrize("mutate,message", CASES, ids=[c[0].__name__[7:] for c in CASES])
def test_bad_input_rejected_file_untouched(small_mock, tmp_path, mutate, message):
    path = tmp_path / "bad.h5"
    shutil.copy(small_mock, path)
    with h5py.File(path, "r+") as f:
        mutate(f)
    before = file_bytes(path)
    res = run_cli("validate", path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    import re
    assert re.search(message, lines[0]), lines[0]
    assert file_bytes(path) == before


def test_populate_rejects_before_writing(tmp_path):
    from mpi4py import MPI

    from cubefit_mpi import H5Dims, H5Manager, InputError

    tem = 8.4 + 1e-4 * np.arange(400)
    obs = tem[100:300:2]
    path = tmp_path / "p.h5"
    mgr = H5Manager(path, tem_pix=tem, obs_pix=obs, comm=MPI.COMM_SELF)
    mgr.init_base(H5Dims(nSpat=4, nLSpec=obs.size, nTSpec=tem.size, nVel=5, nComp=2, nPop=3))
    before = file_bytes(path)
    losvd = np.ones((4, 5, 2))
    losvd[1, 2, 0] = -1
    with pytest.raises(InputError, match="/LOSVD: negative value"):
        mgr.populate_from_arrays(losvd=losvd)
    with pytest.raises(InputError, match=r"/DataCube: expected shape \(4, 100\)"):
        mgr.populate_from_arrays(datacube=np.ones((3, obs.size)))
    with pytest.raises(InputError, match="pop_shape"):
        mgr.populate_from_arrays(templates=np.ones((3, tem.size)), pop_shape=(2, 2))
    assert file_bytes(path) == before
    mgr.populate_from_arrays(losvd=np.ones((4, 5, 2)), templates=np.ones((3, tem.size)),
                             vel_pix=np.linspace(-100, 100, 5), pop_shape=(3, 1))
    mgr.ensure_rebin_and_resample()
    with h5py.File(path, "r") as f:
        R = f["/R_T"][...]
        np.testing.assert_allclose(np.ones(tem.size) @ R, 1.0)
        assert f["/R_T"].attrs["rebin.mode"] == "overlap"
        assert tuple(f["/Templates"].attrs["pop_shape"]) == (3, 1)


def test_init_base_rejects_wrong_grid_length(tmp_path):
    from mpi4py import MPI

    from cubefit_mpi import H5Dims, H5Manager, InputError

    with pytest.raises(InputError, match="tem_pix: expected 50 values"):
        H5Manager(tmp_path / "x.h5", tem_pix=np.arange(40.0), comm=MPI.COMM_SELF).init_base(
            H5Dims(nSpat=1, nLSpec=5, nTSpec=50, nVel=3, nComp=1, nPop=1))
