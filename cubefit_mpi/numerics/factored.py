"""The hypercube as a product of two small tensors (pure numerics).

By the builder's conventions (kernel taps at integer template-pixel shifts, the shift-and-crop
convolution, one ``/R_T`` for all spaxels)::

    A[s, c, p, λ] = Σ_k κ[s, c, k] · B[k, p, λ]
    κ[s, c, k]    = scale[s, c] · kernel_sc[k]                 (S, C, K)
    B[k, p, :]    = shift_k(T_p) @ R_T                         (K, P, L)

exactly, whenever the builder's ``max(0, ·)`` is inactive (non-negative templates and
``/R_T``: :func:`factors_are_exact`).  Then the normal equations need no pass over ``A``::

    G[(c,p),(c',p')] = Σ_{k,k'} M[c,k,c',k'] · Φ[k,p,k',p']
    M = Σ_s κ_s κ_sᵀ (CK × CK),        Φ = Σ_λ w_λ B[:,:,λ] B[:,:,λ]ᵀ (KP × KP)
    b[c,p]           = Σ_s Σ_k κ[s,c,k] · Σ_λ w_λ B[k,p,λ] y[s,λ]

Here ``w`` holds the λ-weights and the mask (the weighted basis ``B_w = B · √w`` keeps only the
unmasked pixels).  Φ is formed block by block over populations (:func:`gram_block`), so it is
never held whole.  Everything is float64.  Local (no MPI, no I/O).
"""
from __future__ import annotations

import numpy as np


def shift_spectra(spectra: np.ndarray, shift: int) -> np.ndarray:
    """``out[..., i] = spectra[..., i − shift]``, zero outside the range (the convolution's crop).  Local."""
    out = np.zeros_like(spectra)
    n = spectra.shape[-1]
    if shift >= n or -shift >= n:
        return out
    if shift >= 0:
        out[..., shift:] = spectra[..., :n - shift]
    else:
        out[..., :n + shift] = spectra[..., -shift:]
    return out


def template_basis(templates: np.ndarray, shifts: np.ndarray, rebin_lt) -> np.ndarray:
    """``B (K, P, L)``: every template shifted by every kernel tap, rebinned to the observed grid.  Local.

    Parameters
    ----------
    templates : (P, T) float64
    shifts : (K,) int, the kernel taps' pixel shifts (``kernels.kernel_shifts``)
    rebin_lt : scipy.sparse (L, T), ``/R_T`` transposed (observed = ``rebin_lt @ spectrum``)
    """
    templates = np.asarray(templates, dtype=np.float64)
    out = np.empty((len(shifts), templates.shape[0], rebin_lt.shape[0]))
    for k, shift in enumerate(np.asarray(shifts, dtype=int)):
        out[k] = (rebin_lt @ shift_spectra(templates, int(shift)).T).T
    return out


def factors_are_exact(templates: np.ndarray, rebin, first_pixel: int = 0) -> str | None:
    """None when ``A = κ·B`` exactly (the clip ``max(0, ·)`` can never act), else the reason.  Local.

    ``first_pixel``: the template grid's index of ``templates[:, 0]`` (for the message).

    Kernels and scales are non-negative by construction, so non-negative templates and a
    non-negative ``/R_T`` make every convolved, rebinned model non-negative.
    """
    t_min = float(np.min(templates))
    if t_min < 0:
        p, t = np.unravel_index(int(np.argmin(templates)), templates.shape)
        return (f"/Templates has negative values (min {t_min:.3g} at template {p}, pixel {t + first_pixel}): the builder's "
                f"max(0, ·) makes the hypercube differ from the factors")
    r_min = float(rebin.min())            # a dense array or a scipy.sparse matrix
    if r_min < 0:
        return f"/R_T has negative weights (min {r_min:.3g}): the models are not a product of the factors"
    return None


def kernel_weights(kernels: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``κ (n, C, K) = scale[..., None] · kernels``.  Local."""
    return np.asarray(kernels, dtype=np.float64) * np.asarray(scale, dtype=np.float64)[..., None]


def weighted_basis(basis: np.ndarray, sqrt_w_used: np.ndarray, used: np.ndarray) -> np.ndarray:
    """``B_w (K, P, L_used) = B[..., used] · √w``, C-contiguous.  Local."""
    return np.ascontiguousarray(basis[:, :, used] * sqrt_w_used)


def kappa_gram(kappa: np.ndarray) -> np.ndarray:
    """``Σ_s κ_s κ_sᵀ`` of a tile, ``(C·K, C·K)``.  Local."""
    flat = kappa.reshape(kappa.shape[0], -1)
    return flat.T @ flat


def projections(basis_w: np.ndarray, data_w: np.ndarray) -> np.ndarray:
    """``Z[s, k, p] = Σ_λ B_w[k, p, λ] y_w[s, λ]`` for a tile of weighted spectra ``(n, L_used)``.  Local."""
    K, P, _ = basis_w.shape
    return (data_w @ basis_w.reshape(K * P, -1).T).reshape(data_w.shape[0], K, P)


def rhs_contribution(kappa: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``b[c, p] = Σ_s Σ_k κ[s, c, k] Z[s, k, p]`` of a tile, ``(C, P)``.  Local."""
    n, C, K = kappa.shape
    return kappa.transpose(1, 0, 2).reshape(C, n * K) @ z.reshape(n * K, -1)


def population_blocks(n_pop: int, block: int) -> list[tuple[int, int]]:
    """``[(p0, p1), ...]`` covering ``n_pop`` in blocks of ``block``.  Local."""
    block = max(1, int(block))
    return [(p0, min(p0 + block, n_pop)) for p0 in range(0, n_pop, block)]


def gram_block(m_cckk: np.ndarray, basis_w: np.ndarray, pa: tuple[int, int], pb: tuple[int, int],
               pixel_weights: np.ndarray | None = None) -> np.ndarray:
    """``G[:, pa, :, pb]`` as ``(C, |pa|, C, |pb|)``, with ``M`` given as ``(C·C, K·K)`` over
    ``[c, c', k, k']``.  One GEMM for Φ's block, one for the contraction.  Local.

    ``pixel_weights (L_used,)``: Φ weighted once more per pixel, ``Σ_λ r_λ B B ᵀ`` (the
    multiplicative polynomials' terms, :func:`weighted_gram_block`).
    """
    K = basis_w.shape[0]
    a0, a1 = pa
    b0, b1 = pb
    na, nb = a1 - a0, b1 - b0
    left = basis_w[:, a0:a1].reshape(K * na, -1)
    if pixel_weights is not None:
        left = left * pixel_weights
    right = basis_w[:, b0:b1].reshape(K * nb, -1)
    phi = (left @ right.T).reshape(K, na, K, nb).transpose(0, 2, 1, 3).reshape(K * K, na * nb)
    C = int(round(np.sqrt(m_cckk.shape[0])))
    return (m_cckk @ phi).reshape(C, C, na, nb).transpose(0, 2, 1, 3)


def weighted_gram_block(m_terms: np.ndarray, basis_w: np.ndarray, pixel_weights: np.ndarray,
                        pa: tuple[int, int], pb: tuple[int, int]) -> np.ndarray:
    """``Σ_j`` :func:`gram_block` ``(m_terms[j], …, pixel_weights[j])``: G of spectra weighted
    by ``Σ_j h_sj r_j(λ)`` when ``m_terms[j] = Σ_s h_sj κ_s κ_sᵀ`` (each ``(C·C, K·K)``).  Local.

    Parameters
    ----------
    m_terms : (J, C·C, K·K) float64
    basis_w : (K, P, L_used) float64
    pixel_weights : (J, L_used) float64
    """
    out = gram_block(m_terms[0], basis_w, pa, pb, pixel_weights[0])
    for j in range(1, len(m_terms)):
        out += gram_block(m_terms[j], basis_w, pa, pb, pixel_weights[j])
    return out


def spectrum_products(kappa: np.ndarray, basis_w: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``Y[s] = A_wsᵀ V_s`` ``(n, C·P, k)`` for weighted vectors ``V (n, L_used, k)``, where
    ``A_ws[λ, (c,p)] = Σ_k κ[s,c,k] B_w[k,p,λ]``.  Local."""
    n, C, K = kappa.shape
    P, L = basis_w.shape[1], basis_w.shape[2]
    k = vectors.shape[2]
    flat = np.ascontiguousarray(np.swapaxes(vectors, 1, 2)).reshape(n * k, L)
    proj = (flat @ basis_w.reshape(K * P, L).T).reshape(n, k, K, P)        # one GEMM for the tile
    proj = np.ascontiguousarray(proj.transpose(0, 2, 3, 1)).reshape(n, K, P * k)
    return np.matmul(kappa, proj).reshape(n, C * P, k)


def mult_route_costs(S: int, C: int, K: int, P: int, L: int, n_terms: int, n_basis: int) -> tuple[float, float]:
    """Multiply-adds of the normal equations with per-spectrum weights, ``(factored, per spaxel)``.  Local.

    Factored: ``n_terms`` weighted Φ's and contractions, plus the per-spectrum projections'
    correction (``n_basis`` vectors a spectrum); per spaxel: every spaxel's design made from the
    factors (GEMM), projected, and its Gram (SYRK).
    """
    N = C * P
    factored = n_terms * ((K * P) ** 2 * L + (C * K * P) ** 2) + S * (n_basis * (K * P * L + C * K * P + N * N))
    spaxel = S * (C * K * P * L + N * N * L + 2 * N * L * n_basis)
    return float(factored), float(spaxel)


def m_for_contraction(m: np.ndarray, n_comp: int, n_taps: int) -> np.ndarray:
    """``M (C·K, C·K)`` over ``[(c,k), (c',k')]`` reordered to ``(C·C, K·K)`` over ``[c, c', k, k']``.  Local."""
    C, K = n_comp, n_taps
    return np.ascontiguousarray(m.reshape(C, K, C, K).transpose(0, 2, 1, 3).reshape(C * C, K * K))


def gram_diagonal(m: np.ndarray, basis_w: np.ndarray) -> np.ndarray:
    """``diag(G)`` as ``(C, P)``: ``Σ_{k,k'} M[c,k,c,k'] Φ[k,p,k',p]``.  Local."""
    K, P, _ = basis_w.shape
    C = m.shape[0] // K
    m_diag = np.stack([m[c * K:(c + 1) * K, c * K:(c + 1) * K] for c in range(C)])       # (C, K, K)
    phi_diag = np.einsum("kpl,jpl->pkj", basis_w, basis_w)                               # (P, K, K)
    return np.einsum("ckj,pkj->cp", m_diag, phi_diag)


def gram_columns(m: np.ndarray, basis_w: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``G[:, cols]`` as ``(C·P, len(cols))`` (columns indexed row-major over (C, P)).  Local."""
    K, P, _ = basis_w.shape
    C = m.shape[0] // K
    m4 = m.reshape(C, K, C, K)
    out = np.empty((C * P, len(cols)))
    for j, col in enumerate(np.asarray(cols, dtype=int)):
        c_j, p_j = divmod(int(col), P)
        phi_col = np.einsum("kpl,jl->kpj", basis_w, basis_w[:, p_j])                     # (K, P, K)
        out[:, j] = np.einsum("ckj,kpj->cp", m4[:, :, c_j, :], phi_col).reshape(-1)
    return out


def model_spectra(kappa: np.ndarray, basis: np.ndarray, x_cp: np.ndarray) -> np.ndarray:
    """``ŷ[s, λ] = Σ_{c,p} x[c,p] A[s,c,p,λ]`` of a tile, ``(n, L)``, from the factors.  Local.

    ``basis`` may be the plain or the weighted basis (then ŷ is weighted, on the used pixels).
    """
    K, P, L = basis.shape
    u = np.einsum("sck,cp->skp", kappa, x_cp)                          # (n, K, P)
    return u.reshape(kappa.shape[0], K * P) @ basis.reshape(K * P, L)


def model_tile(kappa: np.ndarray, basis: np.ndarray, dtype=np.float32) -> np.ndarray:
    """``A[s, c, p, λ]`` of a tile ``(n, C_t, P, L)`` from ``κ (n, C_t, K)``, clipped at 0 as the
    builder clips (only rounding can make a value negative when the factors are exact).  Local.

    Each (s, c) row is ``κ[s, c] @ B`` with ``B`` as ``(K, P·L)``: one GEMM for the tile.
    """
    n, c, K = kappa.shape
    _, P, L = basis.shape
    out = (kappa.reshape(n * c, K) @ basis.reshape(K, P * L)).reshape(n, c, P, L)
    np.maximum(out, 0.0, out=out)
    return out.astype(dtype, copy=False)


def lit_model_tile(kappa: np.ndarray, basis: np.ndarray, dtype=np.float32) -> np.ndarray:
    """:func:`~cubefit_mpi.numerics.factored.model_tile` for the lit rows of ``κ`` only (the same
    bytes: every row is its own product), zeros elsewhere.  Local."""
    n, c, _ = kappa.shape
    lit = np.flatnonzero(np.any(kappa.reshape(n * c, -1) != 0, axis=1))
    if lit.size == n * c:
        return model_tile(kappa, basis, dtype=dtype)
    out = np.zeros((n * c,) + basis.shape[1:], dtype=dtype)
    if lit.size:
        out[lit] = model_tile(kappa.reshape(n * c, 1, -1)[lit], basis, dtype=dtype)[:, 0]
    return out.reshape((n, c) + basis.shape[1:])
