"""λ-weights that emphasise absorption features (pure numerics).

The spec's "λ-feature emphasis": from a **median spectrum** of the cube, a two-scale
**difference of smoothings** (a "difference of Gaussians" built from boxcars) measures how far
each pixel lies below (or above) its local pseudo-continuum; that feature strength is mapped to
weights in ``[min_w, 1]``: featureless continuum gets ``min_w``, the strongest absorption
features get 1.

Method (all windows in pixels of the observed grid):

1. ``s_small`` = the spectrum smoothed by a boxcar of ``small`` pixels, ``s_large`` by a boxcar
   of ``large`` pixels.  Each smoothing applies the boxcar ``passes`` times (2 passes = a
   triangular kernel, 3 = close to a Gaussian).  Boxcars are *renormalised*: invalid (masked or
   non-finite) pixels are left out of every window and the window mean is taken over the valid
   pixels it contains, which interpolates smoothly across masked gaps.
2. ``relative = (s_small - s_large) / |s_large|``: the fractional depth below the local
   pseudo-continuum (negative in absorption).
3. ``strength = max(0, -relative)`` (``features="absorption"``, the default: emission lines are
   not in stellar templates and must not drive the fit) or ``|relative|`` (``features="all"``).
4. ``g = clip(strength / ref, 0, 1)`` with ``ref`` the ``ref_quantile`` quantile of the strength
   over valid pixels (or the maximum, if that quantile is 0), then ``w = min_w + (1 - min_w) g``.
   A spectrum without any feature (no fractional depth above 1e-6) gets ``w = 1`` everywhere
   valid: no emphasis, ordinary least squares.

Invalid pixels (masked, or no finite data) get ``w = min_w``: a valid number that the solvers
ignore anyway because they skip masked pixels.

Local (no MPI, no I/O).
"""
from __future__ import annotations

import numpy as np

METHOD = "median-dog-boxcar/1"      # stored with the weights; bump when the numbers change
DEFAULT_SMALL = 5                   # px, removes pixel noise, keeps line cores
DEFAULT_LARGE = 61                  # px, the pseudo-continuum scale (~4000 km/s at 60-70 km/s/px)
DEFAULT_PASSES = 2                  # boxcar passes per smoothing (triangular kernel)
DEFAULT_MIN_W = 0.1                 # weight of featureless continuum
DEFAULT_REF_QUANTILE = 0.95         # strength quantile that maps to weight 1
MIN_DEPTH = 1e-6                    # fractional depths below this are no feature at all
FEATURES = ("absorption", "all")


# ---------------------------------------------------------------------------------------------
# median spectrum pieces (used by the parallel stage)
# ---------------------------------------------------------------------------------------------
def masked_row_sums(block: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Sum and count of the usable pixels of each spectrum.  Local.

    Parameters
    ----------
    block : (n, L) float, spectra (rows are spaxels)
    mask : (L,) bool or None, True = pixel used

    Returns
    -------
    sums : (n,) float64, sum over pixels that are unmasked and finite
    counts : (n,) int64, number of such pixels

    Each row is reduced on its own, so the result of a row does not depend on which other rows
    are in ``block`` (the parallel stage relies on this for bit-identical results).
    """
    block = np.asarray(block, dtype=np.float64)
    usable = np.isfinite(block)
    if mask is not None:
        usable &= np.asarray(mask, dtype=bool)[None, :]
    sums = np.where(usable, block, 0.0).sum(axis=1)
    return sums, usable.sum(axis=1).astype(np.int64)


def spaxel_norms(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Masked mean flux per spaxel, NaN for spaxels that cannot be used.  Local.

    Parameters
    ----------
    sums : (S,) float64, counts : (S,) int  -- from :func:`masked_row_sums`

    Returns
    -------
    norms : (S,) float64, the masked mean where there is at least one usable pixel and the mean
        is finite and > 0, NaN otherwise (such spaxels are skipped by the median).
    """
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts)
    mean = np.full(sums.shape, np.nan)
    has = counts > 0
    mean[has] = sums[has] / counts[has]
    mean[~(np.isfinite(mean) & (mean > 0))] = np.nan
    return mean


def column_median(values: np.ndarray) -> np.ndarray:
    """Median over axis 0 of the finite values of each column; NaN for columns with none.  Local.

    Parameters
    ----------
    values : (n, w) float64, NaN marks missing values

    Returns
    -------
    median : (w,) float64.  Exact (a sort, no approximation); for an even count it is the mean
        of the two middle values.  Columns are independent, so any split of the columns (over
        ranks, or in slabs) gives bit-identical results.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"column_median: expected a 2-D array, got shape {values.shape}")
    n, width = values.shape
    out = np.full(width, np.nan)
    if n == 0 or width == 0:
        return out
    finite = np.isfinite(values)
    ordered = np.sort(np.where(finite, values, np.nan), axis=0)   # NaN sort to the end
    count = finite.sum(axis=0)
    has = count > 0
    cols = np.nonzero(has)[0]
    k = count[has]
    upper = ordered[k // 2, cols]
    lower = ordered[(k - 1) // 2, cols]
    out[has] = np.where(k % 2 == 1, upper, 0.5 * (lower + upper))
    return out


# ---------------------------------------------------------------------------------------------
# smoothing and feature strength
# ---------------------------------------------------------------------------------------------
def _check_window(width: int, name: str) -> int:
    if int(width) != width or width < 1 or int(width) % 2 == 0:
        raise ValueError(f"{name}={width!r}: expected an odd number of pixels >= 1")
    return int(width)


def boxcar_smooth(y: np.ndarray, valid: np.ndarray, width: int,
                  passes: int = DEFAULT_PASSES) -> np.ndarray:
    """Renormalised boxcar smoothing that skips invalid pixels.  Local.

    Parameters
    ----------
    y : (L,) float, the spectrum (values at invalid pixels are ignored, NaN allowed)
    valid : (L,) bool, True = pixel contributes
    width : int, odd window length in pixels
    passes : int >= 1, how many times the boxcar is applied

    Returns
    -------
    smooth : (L,) float64.  Pass ``i`` averages the defined values of pass ``i-1`` inside the
        window; a pixel with no defined value in its window is NaN.  Near the ends the window
        shrinks symmetrically (pixel ``i`` averages ``i-k .. i+k`` with ``k <= i`` and
        ``k <= L-1-i``), so a straight line stays exactly straight there too.  Every valid
        pixel is defined after every pass.
    """
    width = _check_window(width, "width")
    if passes < 1:
        raise ValueError(f"passes={passes!r}: expected >= 1")
    y = np.asarray(y, dtype=np.float64)
    defined = np.asarray(valid, dtype=bool) & np.isfinite(y)
    n = y.size
    idx = np.arange(n)
    half = np.minimum(width // 2, np.minimum(idx, n - 1 - idx))
    lo, hi = idx - half, idx + half + 1
    current = np.where(defined, y, 0.0)
    for _ in range(passes):
        total = np.concatenate(([0.0], np.cumsum(current)))
        count = np.concatenate(([0], np.cumsum(defined, dtype=np.int64)))
        num, den = total[hi] - total[lo], count[hi] - count[lo]
        defined = den > 0
        current = np.where(defined, num / np.maximum(den, 1), 0.0)
    return np.where(defined, current, np.nan)


def feature_strength(spectrum: np.ndarray, valid: np.ndarray, *, small: int = DEFAULT_SMALL,
                     large: int = DEFAULT_LARGE, passes: int = DEFAULT_PASSES,
                     features: str = "absorption") -> np.ndarray:
    """Fractional feature depth from a difference of two boxcar smoothings.  Local.

    Parameters
    ----------
    spectrum : (L,) float, e.g. the median spectrum of a cube
    valid : (L,) bool, True = usable pixel
    small, large : odd window lengths in pixels, ``small < large``
    passes : boxcar passes per smoothing
    features : ``"absorption"`` (only dips below the pseudo-continuum count) or ``"all"``

    Returns
    -------
    strength : (L,) float64 >= 0; 0 at invalid pixels.
    """
    small = _check_window(small, "small")
    large = _check_window(large, "large")
    if small >= large:
        raise ValueError(f"small={small}, large={large}: expected small < large")
    if features not in FEATURES:
        raise ValueError(f"features={features!r}: expected one of {', '.join(FEATURES)}")
    spectrum = np.asarray(spectrum, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool) & np.isfinite(spectrum)
    strength = np.zeros(spectrum.shape)
    if not valid.any():
        return strength
    s_small = boxcar_smooth(spectrum, valid, small, passes)
    s_large = boxcar_smooth(spectrum, valid, large, passes)
    level = float(np.mean(np.abs(spectrum[valid])))
    scale = np.maximum(np.abs(s_large[valid]), 1e-12 * level if level > 0 else 1e-300)
    relative = (s_small[valid] - s_large[valid]) / scale
    strength[valid] = np.maximum(-relative, 0.0) if features == "absorption" else np.abs(relative)
    return strength


def strength_to_weights(strength: np.ndarray, valid: np.ndarray, *, min_w: float = DEFAULT_MIN_W,
                        ref_quantile: float = DEFAULT_REF_QUANTILE) -> np.ndarray:
    """Map feature strength to weights in ``[min_w, 1]``.  Local.

    Parameters
    ----------
    strength : (L,) float64 >= 0
    valid : (L,) bool
    min_w : float in (0, 1], weight of featureless pixels (and of invalid pixels)
    ref_quantile : float in (0, 1], the strength quantile (over valid pixels) that maps to 1

    Returns
    -------
    weights : (L,) float64.  All ones on valid pixels when no pixel has any strength.
    """
    if not 0.0 < min_w <= 1.0:
        raise ValueError(f"min_w={min_w!r}: expected 0 < min_w <= 1")
    if not 0.0 < ref_quantile <= 1.0:
        raise ValueError(f"ref_quantile={ref_quantile!r}: expected 0 < q <= 1")
    strength = np.asarray(strength, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    weights = np.full(strength.shape, float(min_w))
    if not valid.any():
        return weights
    values = strength[valid]
    ref = float(np.quantile(values, ref_quantile))
    if not ref > MIN_DEPTH:
        ref = float(values.max())
    if not ref > MIN_DEPTH:
        weights[valid] = 1.0
        return weights
    weights[valid] = min_w + (1.0 - min_w) * np.clip(values / ref, 0.0, 1.0)
    return weights


def lambda_weights_from_spectrum(spectrum: np.ndarray, valid: np.ndarray, *, small: int = DEFAULT_SMALL,
                                 large: int = DEFAULT_LARGE, min_w: float = DEFAULT_MIN_W,
                                 passes: int = DEFAULT_PASSES, features: str = "absorption",
                                 ref_quantile: float = DEFAULT_REF_QUANTILE) -> np.ndarray:
    """λ-weights ``(L,)`` float64 in ``[min_w, 1]`` from a (median) spectrum.  Local.

    :func:`feature_strength` followed by :func:`strength_to_weights`; see the module docstring.
    """
    valid = np.asarray(valid, dtype=bool) & np.isfinite(np.asarray(spectrum, dtype=np.float64))
    strength = feature_strength(spectrum, valid, small=small, large=large, passes=passes,
                                features=features)
    return strength_to_weights(strength, valid, min_w=min_w, ref_quantile=ref_quantile)


# ---------------------------------------------------------------------------------------------
# reading side
# ---------------------------------------------------------------------------------------------
def finalize_weights(weights: np.ndarray, mask: np.ndarray | None, floor: float) -> np.ndarray:
    """Floor and mask handling of stored weights, as the solvers use them.  Local.

    Parameters
    ----------
    weights : (L,) float, stored weights (any values at masked pixels, NaN allowed there)
    mask : (L,) bool or None, True = pixel used
    floor : float >= 0, lower bound (protects sqrt(w))

    Returns
    -------
    weights : (L,) float64, ``max(w, floor)`` at unmasked pixels, ``floor`` at masked ones.

    Raises
    ------
    ValueError
        A non-finite or negative weight at an unmasked pixel (the message names the pixel).
    """
    w = np.asarray(weights, dtype=np.float64)
    used = np.ones(w.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    bad = used & ~(np.isfinite(w) & (w >= 0))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"pixel {first} has weight {w[first]!r}; expected a finite value >= 0 "
                         f"at every unmasked pixel")
    return np.where(used, np.maximum(np.where(used, w, floor), floor), float(floor))


def weights_banner(weights: np.ndarray, mask: np.ndarray | None = None) -> str:
    """One line summarising the weights over unmasked pixels, logged at every solver start.  Local.

    Parameters
    ----------
    weights : (L,) float, mask : (L,) bool or None

    Returns
    -------
    str, e.g. ``"lambda-weights: min 0.1 max 1 mean 0.243 over 3801 unmasked pixels"``
    """
    w = np.asarray(weights, dtype=np.float64)
    used = np.ones(w.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    values = w[used]
    if values.size == 0:
        return "lambda-weights: no unmasked pixels"
    return (f"lambda-weights: min {values.min():.3g} max {values.max():.3g} mean {values.mean():.3g} "
            f"over {values.size} unmasked pixels")
