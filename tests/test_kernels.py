import numpy as np
import pytest

from cubefit_mpi.numerics.constants import SPEED_OF_LIGHT_KMS as C_KMS
from cubefit_mpi.numerics.convolve import convolve_direct
from cubefit_mpi.numerics.kernels import (
    interpolation_matrix, kernel_shifts, losvd_amplitude, shift_to_velocity, unit_kernels, velocity_to_shift
)

DLN = 30.0 / C_KMS   # 30 km/s template pixels


def test_shift_velocity_roundtrip():
    v = np.array([-500.0, 0.0, 123.0, 900.0])
    np.testing.assert_allclose(shift_to_velocity(velocity_to_shift(v, DLN), DLN), v, atol=1e-9)
    assert velocity_to_shift(300.0, DLN) > 0


def test_kernel_shifts_cover_grid():
    vel = np.linspace(-400, 400, 21)
    k = kernel_shifts(vel, DLN)
    assert shift_to_velocity(k[0], DLN) <= -400 + 1e-9 and shift_to_velocity(k[-1], DLN) >= 400 - 1e-9


def test_interpolation_is_linear_and_zero_outside():
    vel = np.linspace(-400, 400, 21)
    M, shifts = interpolation_matrix(vel, DLN)
    vk = shift_to_velocity(shifts, DLN)
    line = 2.0 + vel / 100.0
    inside = (vk >= vel[0]) & (vk <= vel[-1])
    np.testing.assert_allclose((M @ line)[inside], 2.0 + vk[inside] / 100.0, rtol=1e-12)
    assert np.all(M[~inside] == 0)


def test_unit_kernels_and_empty_rows():
    vel = np.linspace(-400, 400, 21)
    M, _ = interpolation_matrix(vel, DLN)
    losvd = np.zeros((2, 21, 2))
    losvd[0, :, 0] = np.exp(-0.5 * (vel / 100) ** 2)
    kernels, empty = unit_kernels(losvd, M)
    np.testing.assert_allclose(kernels[0, 0].sum(), 1.0)
    assert empty.tolist() == [[False, True], [True, True]]
    assert np.all(kernels[empty] == 0)


def test_amplitudes():
    vel = np.linspace(-100, 100, 5)
    losvd = np.ones((1, 5, 1))
    assert losvd_amplitude(losvd, vel, "sum")[0, 0] == 5
    assert losvd_amplitude(losvd, vel, "trapz")[0, 0] == pytest.approx(200.0)
    with pytest.raises(ValueError, match="amplitude mode"):
        losvd_amplitude(losvd, vel, "max")


def test_delta_at_whole_pixel_velocities_shifts_redward_with_unit_area():
    vel = shift_to_velocity(np.arange(-8, 9), DLN)       # grid on whole-pixel velocities
    M, shifts = interpolation_matrix(vel, DLN)
    spectrum = np.zeros(200)
    spectrum[100] = 1.0
    for n_pix in (0, 5, -3):
        losvd = np.zeros((1, 17, 1))
        losvd[0, n_pix + 8, 0] = 2.5
        kernels, _ = unit_kernels(losvd, M)
        out = convolve_direct(spectrum, kernels[0, 0], shifts)
        assert out.sum() == pytest.approx(1.0)             # unit area
        assert out[100 + n_pix] == pytest.approx(1.0)      # positive v -> redward


def test_convolve_direct_matches_numpy_convolve():
    rng = np.random.default_rng(0)
    spec = rng.uniform(size=300)
    kern = rng.uniform(size=11)
    shifts = np.arange(-5, 6)
    full = np.convolve(spec, kern)                        # full[m] = sum_j kern[j] spec[m-j]
    np.testing.assert_allclose(convolve_direct(spec, kern, shifts), full[5:305], rtol=1e-12)
