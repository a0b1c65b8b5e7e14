"""The factored numerics: κ·B reproduces the built hypercube, and G, b, diag(G), columns and models
from the factors equal the dense products over A."""
import h5py
import numpy as np
import pytest
from mpi4py import MPI

from cubefit_mpi.io.h5file import open_h5
from cubefit_mpi.io.model_inputs import ModelInputs
from cubefit_mpi.numerics import factored as fa
from cubefit_mpi.numerics.kernels import unit_kernels
from cubefit_mpi.numerics.synthetic_galaxy import MockSpec
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.mock import make_mock

SELF = MPI.COMM_SELF


@pytest.fixture(scope="module")
def cube(tmp_path_factory):
    path = tmp_path_factory.mktemp("factored") / "g.h5"
    make_mock(str(path), MockSpec(spaxels=14, components=3, populations=5, wavelengths=80, seed=9, snr=30,
                                  masked_pixels=5), SELF)
    build_hypercube(str(path), S_chunk=3, comm=SELF)
    with open_h5(path, "r", SELF) as f:
        inp = ModelInputs.read(f, "model", "sum", SELF)
        losvd = np.asarray(f["/LOSVD"][...])
        models = np.asarray(f["/HyperCube/models"][...])
        data = np.asarray(f["/DataCube"][...])
        mask = np.asarray(f["/Mask"][...], dtype=bool)
    kernels, _ = unit_kernels(losvd, inp.interp)
    kappa = fa.kernel_weights(kernels, inp.scale)
    basis = fa.template_basis(inp.templates, inp.shifts, inp.rebin_lt)
    return inp, kappa, basis, models, data, mask


def test_the_factors_reproduce_the_built_hypercube(cube):
    inp, kappa, basis, models, _, _ = cube
    assert fa.factors_are_exact(inp.templates, inp.rebin_lt.toarray()) is None
    tile = fa.model_tile(kappa, basis, dtype=np.float64)
    scale = np.abs(models).max()
    np.testing.assert_allclose(tile, models, rtol=0, atol=3e-7 * scale)       # the float32 rounding of A
    assert fa.model_tile(kappa[2:5, 1:3], basis).tobytes() == fa.model_tile(kappa, basis)[2:5, 1:3].tobytes()


def test_normal_equations_from_the_factors_equal_the_dense_pass(cube):
    inp, kappa, basis, _, data, mask = cube
    S, C, K = kappa.shape
    P, L = basis.shape[1], basis.shape[2]
    rng = np.random.default_rng(1)
    w = rng.uniform(0.2, 1.0, L)
    used = np.flatnonzero(mask)
    sqrt_w = np.sqrt(w[used])
    a = fa.model_tile(kappa, basis, dtype=np.float64)[..., used] * sqrt_w      # (S, C, P, Lu), no clip acted
    design = a.reshape(S, C * P, -1)
    y_w = data[:, used] * sqrt_w
    gram = np.einsum("sil,sjl->ij", design, design)
    rhs = np.einsum("sil,sl->i", design, y_w)
    basis_w = fa.weighted_basis(basis, sqrt_w, used)
    m = fa.kappa_gram(kappa)
    m_cc = fa.m_for_contraction(m, C, K)
    got = np.zeros((C, P, C, P))
    for pa in fa.population_blocks(P, 2):
        for pb in fa.population_blocks(P, 2):
            got[:, pa[0]:pa[1], :, pb[0]:pb[1]] = fa.gram_block(m_cc, basis_w, pa, pb)
    got = got.reshape(C * P, C * P)
    np.testing.assert_allclose(got, gram, rtol=1e-11, atol=1e-11 * np.abs(gram).max())
    b = fa.rhs_contribution(kappa, fa.projections(basis_w, y_w)).reshape(-1)
    np.testing.assert_allclose(b, rhs, rtol=1e-11, atol=1e-11 * np.abs(rhs).max())
    np.testing.assert_allclose(fa.gram_diagonal(m, basis_w).reshape(-1), np.diag(gram), rtol=1e-11)
    cols = np.array([0, 7, C * P - 1])
    np.testing.assert_allclose(fa.gram_columns(m, basis_w, cols), gram[:, cols], rtol=1e-11,
                               atol=1e-11 * np.abs(gram).max())
    x = rng.uniform(0, 1, (C, P))
    np.testing.assert_allclose(fa.model_spectra(kappa, basis_w, x), np.einsum("sil,i->sl", design, x.reshape(-1)),
                               rtol=1e-11, atol=1e-12)


def test_negative_templates_or_weights_are_not_exact():
    templates = np.ones((2, 5))
    templates[1, 3] = -0.5
    assert "negative values (min -0.5 at template 1, pixel 3)" in fa.factors_are_exact(templates, np.eye(5))
    rebin = np.eye(5)
    rebin[0, 1] = -1e-3
    assert "/R_T has negative weights" in fa.factors_are_exact(np.ones((2, 5)), rebin)


@pytest.mark.parametrize("shift", [-3, 0, 2, 9])
def test_shift_is_the_convolutions_crop(shift):
    from cubefit_mpi.numerics.convolve import convolve_direct

    spectra = np.arange(1.0, 17.0).reshape(2, 8)
    kernel = np.array([1.0])
    np.testing.assert_array_equal(fa.shift_spectra(spectra, shift), convolve_direct(spectra, kernel, np.array([shift])))
