"""Template-range cropping: the builder convolves only the template pixels the observed grid and
the velocity guard need; a library far wider than that gives the same hypercube."""
import logging
import shutil

import h5py
import numpy as np
import scipy.sparse as sp
from mpi4py import MPI

from cubefit_mpi.io.layout import H5Dims
from cubefit_mpi.io.manager import H5Manager
from cubefit_mpi.numerics.convolve import convolve_direct, needed_template_range
from cubefit_mpi.numerics.kernels import interpolation_matrix, losvd_amplitude, unit_kernels
from cubefit_mpi.stages.build import build_hypercube

SELF = MPI.COMM_SELF
PAD = 400            # template pixels added on each side: the library spans far more than needed


def test_needed_range_is_the_rebin_support_widened_by_the_shifts():
    rebin = sp.csr_matrix(np.kron(np.eye(5), [0.5, 0.5]))            # observed pixels 0..4 <- template 0..9
    wide = sp.hstack([sp.csr_matrix((5, 20)), rebin, sp.csr_matrix((5, 20))]).tocsr()   # template 20..29
    assert needed_template_range(wide, np.arange(-3, 5), 50) == (16, 33)
    assert needed_template_range(wide, np.arange(-30, 30), 50) == (0, 50)       # clipped to the grid
    assert needed_template_range(wide, np.array([2, 3]), 50) == (17, 30)


def _wide_copy(src, dst):
    """``src`` with its template grid extended by PAD pixels on each side (the original inside)."""
    with h5py.File(src) as f:
        arrays = {k: f[k][...] for k in ("TemPix", "ObsPix", "VelPix", "LOSVD", "DataCube", "Templates", "Mask")}
        pop_shape = f["Templates"].attrs["pop_shape"]
    tem, templates = arrays["TemPix"], arrays["Templates"]
    dln = tem[1] - tem[0]
    wide = np.concatenate([tem[0] + dln * np.arange(-PAD, 0), tem, tem[-1] + dln * np.arange(1, PAD + 1)])
    rng = np.random.default_rng(5)
    outside = lambda: 1.0 + 0.1 * rng.random((templates.shape[0], PAD))       # noqa: E731
    wide_templates = np.hstack([outside(), templates, outside()])
    S, V, C = arrays["LOSVD"].shape
    mgr = H5Manager(dst, tem_pix=wide, obs_pix=arrays["ObsPix"], comm=SELF)
    mgr.init_base(H5Dims(S, arrays["ObsPix"].size, wide.size, V, C, templates.shape[0]), overwrite=True)
    mgr.populate_from_arrays(losvd=arrays["LOSVD"], datacube=arrays["DataCube"], templates=wide_templates,
                             vel_pix=arrays["VelPix"], mask=arrays["Mask"], pop_shape=pop_shape)
    mgr.ensure_rebin_and_resample("overlap")


def _cropped_copy(src, dst, lo, hi):
    """``src`` with /TemPix, /Templates and /R_T cut to template pixels [lo, hi)."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        for name, cut in (("TemPix", lambda a: a[lo:hi]), ("Templates", lambda a: a[:, lo:hi]),
                          ("R_T", lambda a: a[lo:hi])):
            values, attrs = cut(f[name][...]), dict(f[name].attrs)
            del f[name]
            f[name] = values
            f[name].attrs.update(attrs)
        dims = f.attrs["dims"].copy()
        dims[2] = hi - lo
        f.attrs["dims"] = dims
        for name in [k for k in f if k == "HyperCube"]:
            del f[name]


def test_wide_library_is_cropped_with_the_same_hypercube(small_mock, tmp_path, caplog):
    wide = tmp_path / "wide.h5"
    _wide_copy(small_mock, wide)
    with caplog.at_level(logging.INFO, logger="cubefit_mpi.build"):
        build_hypercube(str(wide), comm=SELF)
    with h5py.File(wide) as f:
        lo, hi, T = (int(v) for v in f["/HyperCube"].attrs["templates.range"])
        models_wide = f["/HyperCube/models"][...]
        tem_pix, templates, r_t = f["/TemPix"][...], f["/Templates"][...], f["/R_T"][...]
        losvd, vel = f["/LOSVD"][...], f["/VelPix"][...]
    assert T == 303 + 2 * PAD and PAD <= lo < PAD + 20 and PAD + 283 < hi <= PAD + 303   # inside the mock's own grid
    assert any("templates cropped to pixels" in r.getMessage() for r in caplog.records)
    # the same bytes as a file whose library was already cut to that range (nothing to crop there)
    cut = tmp_path / "cut.h5"
    _cropped_copy(wide, cut, lo, hi)
    build_hypercube(str(cut), comm=SELF)
    with h5py.File(cut) as f:
        assert tuple(f["/HyperCube"].attrs["templates.range"]) == (0, hi - lo, hi - lo)
        assert f["/HyperCube/models"][...].tobytes() == models_wide.tobytes()
        assert f["/HyperCube/models"].nbytes == models_wide.nbytes
    # and the values of the full, uncropped convolution (direct shift-and-add over all T pixels)
    interp, shifts = interpolation_matrix(vel, tem_pix[1] - tem_pix[0])
    kernels, _ = unit_kernels(losvd[:5], interp)
    amp = losvd_amplitude(losvd[:5], vel)
    full = convolve_direct(templates[None, None], kernels[:, :, None], shifts)       # (5, C, P, T)
    reference = np.maximum(np.einsum("scpt,tl->scpl", full, r_t) * amp[:, :, None, None], 0)
    np.testing.assert_allclose(models_wide[:5], reference, rtol=2e-6, atol=1e-6 * reference.max())
