"""Additive and multiplicative Legendre polynomials of a fit (pure numerics, as pPXF's ``degree``
and ``mdegree``).

Both live on the observed grid: ``x_i = −1 + 2 i / (L − 1)`` over the L observed pixels (masked
ones included), and ``P_j`` is the Legendre polynomial of degree j.  The model of spectrum s is::

    ŷ_s = g_s ⊙ (A_s x) + Q a_s,     g_s = 1 + Σ_{j=1..D_m} m_sj P_j,     Q = [P_0 … P_{D_a}]  (L, D_a + 1)

**Additive terms, eliminated exactly.**  With ``W`` the mask and λ-weights, the best ``a_s`` for
any x is ``(QᵀWQ)⁻¹QᵀW r_s`` (``r_s = y_s − g_s ⊙ A_s x``), so the fit of x sees
``W' = W(I − Q(QᵀWQ)⁻¹QᵀW)``: in √W-space the orthogonal projection onto the complement of
``span(√W Q)``, the same for every spectrum.  :class:`AdditiveBasis` holds an orthonormal basis
``U`` of that span (``√W Q = U R``, a QR factorisation) and projects weighted vectors; the
coefficients follow as ``a_s = R⁻¹ Uᵀ √W r_s``.

**Multiplicative terms.**  ``g_s² = Σ_{j=0..2D_m} h_sj P_j`` (Legendre linearisation,
:func:`square_coefficients`), which keeps the factored normal equations factored; given x the
coefficients of every spectrum follow from a small weighted linear least-squares problem
(:func:`fit_spectra`).

Local (no MPI, no I/O).  Raises ValueError on inconsistent sizes; callers name the option.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from numpy.polynomial import legendre as _leg

BASIS_DEFINITION = ("Legendre P_j(x), x = -1 + 2 i/(L - 1) over the L observed pixels (masked ones included); "
                    "additive: coefficients of P_0..P_D; multiplicative: g = 1 + sum_j m_j P_j, j = 1..D")


def legendre_x(n_pix: int) -> np.ndarray:
    """``x (L,)``: the observed pixels mapped linearly onto [−1, 1].  Local."""
    return np.linspace(-1.0, 1.0, int(n_pix))


def legendre_basis(n_pix: int, degree: int, first: int = 0) -> np.ndarray:
    """``(L, degree + 1 − first)``: ``P_first … P_degree`` on :func:`legendre_x`.  Local."""
    return _leg.legvander(legendre_x(n_pix), int(degree))[:, int(first):]


@dataclass(frozen=True)
class AdditiveBasis:
    """The additive polynomials of degree ``degree`` on the used pixels, with the orthonormal
    basis of ``span(√W Q)`` that eliminates them.

    Attributes
    ----------
    degree : int, D_a >= 0
    q : (L, D_a + 1) float64, ``P_0 … P_{D_a}`` on every observed pixel (for models)
    u : (L_used, D_a + 1) float64, orthonormal columns, ``√W Q[used] = U R``
    r : (D_a + 1, D_a + 1) float64, upper triangular
    """

    degree: int
    q: np.ndarray
    u: np.ndarray
    r: np.ndarray

    @classmethod
    def make(cls, n_pix: int, degree: int, used: np.ndarray, sqrt_w_used: np.ndarray) -> "AdditiveBasis":
        """The basis for ``used (L_used,)`` pixel indices weighted by ``sqrt_w_used (L_used,)``.  Local.

        Raises ValueError when fewer than ``degree + 1`` pixels are used or the weighted
        polynomials are (numerically) dependent on them.
        """
        degree = int(degree)
        if degree < 0:
            raise ValueError(f"additive degree {degree}: expected >= 0")
        if used.size < degree + 1:
            raise ValueError(f"degree {degree} needs at least {degree + 1} used pixels, {used.size} are used")
        q = legendre_basis(n_pix, degree)
        u, r = np.linalg.qr(q[used] * np.asarray(sqrt_w_used, dtype=np.float64)[:, None])
        d = np.abs(np.diag(r))
        if d.min() <= 1e-12 * d.max():
            raise ValueError(f"degree {degree}: the weighted polynomials are dependent on the {used.size} used pixels")
        return cls(degree, q, np.ascontiguousarray(u), r)

    def project(self, v: np.ndarray) -> np.ndarray:
        """``v − (v U) Uᵀ`` for weighted vectors ``v (..., L_used)``: the part no additive term explains.  Local."""
        v = np.asarray(v, dtype=np.float64)
        flat = v.reshape(-1, v.shape[-1])                                # one GEMM pair for any stack
        return (flat - (flat @ self.u) @ self.u.T).reshape(v.shape)

    def coefficients(self, resid_w: np.ndarray) -> np.ndarray:
        """``a (..., D_a + 1)`` that best fit weighted residuals ``√W r (..., L_used)``: ``R⁻¹ Uᵀ √W r``.  Local."""
        from scipy.linalg import solve_triangular

        alpha = np.asarray(resid_w, dtype=np.float64) @ self.u          # (..., D_a + 1)
        flat = alpha.reshape(-1, alpha.shape[-1])
        return solve_triangular(self.r, flat.T, lower=False).T.reshape(alpha.shape)


def project_out(v: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """``v − (v V) Vᵀ`` for ``v (m, L_used)`` and an orthonormal ``basis V (L_used, k)``.  Local."""
    return v - (v @ basis) @ basis.T


def spectrum_bases(model_w: np.ndarray, mult_basis: np.ndarray, additive: AdditiveBasis | None,
                   rtol: float = 1e-10) -> np.ndarray:
    """Per spectrum, an orthonormal basis ``(n, L_used, k)`` of ``span(√W Q) ∪ span(√W P_j ⊙ m_s)``.  Local.

    The second span holds the directions in which the multiplicative coefficients move spectrum
    s's model ``m_s = A_s x`` (``model_w = √W m_s``, unmultiplied): eliminating them too gives
    the Gauss–Newton step of x (the Schur complement of the coupling between x and the
    coefficients).  The first ``D_a + 1`` columns are the additive ``U``; the rest come from an
    SVD of the directions with the additive part removed, singular values below ``rtol`` of the
    largest dropped (zero columns; a spectrum whose model is zero gets none).
    """
    model_w = np.asarray(model_w, dtype=np.float64)
    z = np.asarray(mult_basis)[None, :, :] * model_w[:, :, None]                 # (n, L_used, D_m)
    if additive is not None:
        z = z - additive.u[None] @ (np.swapaxes(additive.u[None], 1, 2) @ z)
    left, sing, _ = np.linalg.svd(z, full_matrices=False)                       # (n, L_used, D_m), (n, D_m)
    keep = sing > rtol * np.maximum(sing[:, :1], np.finfo(float).tiny)
    left = left * keep[:, None, :]
    if additive is None:
        return left
    return np.concatenate([np.broadcast_to(additive.u, (model_w.shape[0],) + additive.u.shape), left], axis=2)


def mult_factor(coeffs: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """``g (n, len)``: ``1 + coeffs @ basisᵀ`` for ``coeffs (n, D_m)`` and ``basis (len, D_m)`` (P_1..P_D).  Local."""
    return 1.0 + np.asarray(coeffs, dtype=np.float64) @ np.asarray(basis, dtype=np.float64).T


def with_polynomials(model: np.ndarray, add: np.ndarray | None, mult: np.ndarray | None) -> np.ndarray:
    """``g ⊙ model + Q a`` for template models ``(n, L)`` on every observed pixel, with the
    coefficients ``add (n, D_a + 1)`` and ``mult (n, D_m)`` (either None: none).  Local."""
    out = np.asarray(model, dtype=np.float64)
    n_pix = out.shape[1]
    if mult is not None:
        out = out * mult_factor(mult, legendre_basis(n_pix, mult.shape[1], first=1))
    if add is not None:
        out = out + np.asarray(add, dtype=np.float64) @ legendre_basis(n_pix, add.shape[1] - 1).T
    return out


@functools.lru_cache(maxsize=16)
def _linearisation(degree: int) -> np.ndarray:
    """``T (D+1, D+1, 2D+1)`` with ``P_j P_k = Σ_l T[j, k, l] P_l`` (from numpy's ``legmul``)."""
    n = degree + 1
    out = np.zeros((n, n, 2 * degree + 1))
    for j in range(n):
        for k in range(n):
            prod = _leg.legmul(np.eye(n)[j], np.eye(n)[k])
            out[j, k, :prod.size] = prod
    out.setflags(write=False)
    return out


def square_coefficients(coeffs: np.ndarray) -> np.ndarray:
    """``h (n, 2D+1)``: the Legendre coefficients of ``g² = (1 + Σ_j m_j P_j)²`` for ``coeffs (n, D)``.  Local."""
    coeffs = np.atleast_2d(np.asarray(coeffs, dtype=np.float64))
    full = np.concatenate([np.ones((coeffs.shape[0], 1)), coeffs], axis=1)
    return np.einsum("sj,sk,jkl->sl", full, full, _linearisation(coeffs.shape[1]))


def fit_spectra(model_w: np.ndarray, data_w: np.ndarray, mult_basis: np.ndarray | None,
                additive: AdditiveBasis | None, old: np.ndarray | None = None) -> dict:
    """The polynomial coefficients of a tile of spectra given their template model.  Local.

    Minimises, per spectrum, ``‖√W (y − g ⊙ m − Q a)‖²`` over the multiplicative coefficients
    (when ``mult_basis`` is given) and the additive ones (eliminated, then recovered).  A
    spectrum keeps its ``old`` multiplicative coefficients when the new ones are not better.

    Parameters
    ----------
    model_w : (n, L_used) float64, ``√W A_s x`` on the used pixels
    data_w : (n, L_used) float64, ``√W y_s``
    mult_basis : (L_used, D_m) float64 (``P_1 … P_{D_m}`` on the used pixels) or None
    additive : :class:`AdditiveBasis` or None
    old : (n, D_m) float64, the current multiplicative coefficients (default 0: g = 1)

    Returns
    -------
    dict: ``mult (n, D_m)`` or None, ``add (n, D_a + 1)`` or None, ``chi2_before (n,)`` (with
    ``old``) and ``chi2 (n,)`` (with the returned coefficients; never larger), ``resid (n,
    L_used)``: the weighted residual with the returned coefficients (additive span removed);
    float64.
    """
    model_w = np.asarray(model_w, dtype=np.float64)
    data_w = np.asarray(data_w, dtype=np.float64)
    project = additive.project if additive is not None else (lambda v: v)
    mult = None
    if mult_basis is None:
        chi2_before = chi2 = _chi2(data_w - model_w, project)
        resid = data_w - model_w
    else:
        old = np.zeros((model_w.shape[0], mult_basis.shape[1])) if old is None else np.asarray(old, dtype=np.float64)
        chi2_before = _chi2(data_w - mult_factor(old, mult_basis) * model_w, project)
        target = project(data_w - model_w)                                   # (n, L_used)
        new = np.empty_like(old)
        for s in range(model_w.shape[0]):
            z = project((mult_basis * model_w[s][:, None]).T).T              # (L_used, D_m)
            new[s] = np.linalg.lstsq(z, target[s], rcond=None)[0]
        chi2_new = _chi2(data_w - mult_factor(new, mult_basis) * model_w, project)
        better = chi2_new < chi2_before                                       # the same formula for both
        mult = np.where(better[:, None], new, old)
        chi2 = np.where(better, chi2_new, chi2_before)
        resid = data_w - mult_factor(mult, mult_basis) * model_w
    add = additive.coefficients(resid) if additive is not None else None
    return {"mult": mult, "add": add, "chi2_before": chi2_before, "chi2": chi2, "resid": project(resid)}


def _chi2(resid_w: np.ndarray, project) -> np.ndarray:
    """``‖P⊥ √W r‖²`` per row of weighted residuals ``(n, L_used)``: the one formula of the objective."""
    r = project(resid_w)
    return np.einsum("ij,ij->i", r, r)
