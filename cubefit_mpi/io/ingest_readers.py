"""Readers of an astronomer's input files for ``ingest`` (Local, no MPI except where a ``comm``
is passed to share one read): MUSE-like FITS cubes (header, wavelength axis, units), bin maps,
template libraries (pPXF-style ``.npz`` or a directory of 1-D FITS spectra), LOSVD files
(``.npz`` / ``.h5``), and the provenance (names, sizes, sha256) of each input.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..config.errors import InputError
from .blocks import read_block
from .h5file import open_h5

_LOG = logging.getLogger("cubefit_mpi.stages.ingest")
UNITS_TO_AA = {"Angstrom": 1.0, "nm": 10.0, "um": 1e4, "micron": 1e4, "m": 1e10}
MILES_NAME = re.compile(r"Z([mp])(\d+(?:\.\d+)?)T(\d+(?:\.\d+)?)")


# ---------------------------------------------------------------------------------------------
# readers (Local)
# ---------------------------------------------------------------------------------------------
def _wavelengths(header, axis: int, n: int, what: str, *, unit_required: bool) -> tuple[np.ndarray, str]:
    """λ (Å) of the pixel centres of FITS axis ``axis`` (1-based) and its CTYPE, via astropy WCS."""
    import astropy.units as u
    from astropy.wcs import WCS

    key = f"CUNIT{axis}"
    raw = str(header.get(key, "")).strip()
    if not raw and unit_required:
        raise InputError(f"{what}: {key} missing; expected Angstrom or nm")
    if raw:
        try:
            unit = u.Unit(raw, parse_strict="raise")
        except ValueError:
            unit = None
        if unit is None or not any(unit == u.Unit(name) for name in ("Angstrom", "nm", "um")):
            raise InputError(f"{what}: {key}={raw!r} is not a wavelength unit; expected Angstrom or nm")
    _require_spectral_wcs(header, axis, what)
    ctype = str(header.get(f"CTYPE{axis}", "")).strip().upper()
    if ctype.split("-")[0] not in ("AWAV", "WAVE", "LINEAR", ""):
        raise InputError(f"{what}: CTYPE{axis}={ctype!r}; expected a wavelength axis (AWAV or WAVE)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wcs = WCS(header).sub([axis])
            world = np.asarray(wcs.all_pix2world(np.arange(n, dtype=np.float64), 0)[0], dtype=np.float64)
    except Exception as exc:  # astropy raises many types for a bad WCS
        raise InputError(f"{what}: cannot read the spectral WCS of axis {axis} "
                         f"({str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__})") from None
    out_unit = wcs.wcs.cunit[0]
    name = out_unit.to_string() if out_unit != u.dimensionless_unscaled else (raw or "Angstrom")
    factor = UNITS_TO_AA.get(name, None) or u.Unit(name).to(u.AA)
    lam = world * factor
    if not np.all(np.isfinite(lam)) or lam[0] <= 0 or np.any(np.diff(lam) <= 0):
        raise InputError(f"{what}: wavelengths must be positive and increasing along axis {axis}")
    return lam, ctype


@contextmanager
def _quiet():
    """No warnings (astropy's about a damaged file: the caller refuses it with one line).  Local."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _require_whole_data(hdu, path: str, what: str) -> None:
    """The file holds all the bytes of ``hdu``'s data (a truncated FITS file is refused).  Local."""
    need = int(np.prod(hdu.shape, dtype=np.int64)) * abs(int(hdu.header.get("BITPIX", 8))) // 8
    start = int(hdu.fileinfo()["datLoc"])
    have = os.path.getsize(path)
    if start + need > have:
        raise InputError(f"{what}: truncated: extension {hdu.name or 'PRIMARY'} needs {start + need} bytes, the "
                         f"file has {have}")


def _require_spectral_wcs(header, axis: int, what: str) -> None:
    """The header gives the spectral step (``CDi_i``, else ``CDELTi``), reference pixel (``CRPIXi``)
    and value (``CRVALi``) of axis ``i``: no default (1 Å per pixel, pixel 0) is ever assumed.  Local."""
    cd, cdelt = f"CD{axis}_{axis}", f"CDELT{axis}"
    key = cd if cd in header else cdelt if cdelt in header else None
    if key is None:
        raise InputError(f"{what}: {cdelt} (or {cd}) missing from the header; the spectral step per pixel "
                         f"is needed (no 1 per pixel default is assumed)")
    try:
        step = float(header[key])
    except (TypeError, ValueError):
        step = float("nan")
    if not np.isfinite(step) or step == 0.0:
        raise InputError(f"{what}: {key}={header[key]!r}; expected a finite, non-zero spectral step per pixel")
    for ref in (f"CRPIX{axis}", f"CRVAL{axis}"):
        if ref not in header:
            raise InputError(f"{what}: {ref} missing from the header; the spectral reference "
                             f"{'pixel' if ref.startswith('CRPIX') else 'wavelength'} is needed")


@dataclass
class CubeInfo:
    """What the cube header says (every rank reads it)."""

    path: str
    data_ext: int
    stat_ext: int | None
    shape: tuple            # (L_lin, ny, nx)
    lam: np.ndarray         # (L_lin,) Å, pixel centres
    ctype: str
    bunit: str
    stat_bunit: str
    wcs_header: str
    xy_scale: tuple         # (sx, sy, x_ref, y_ref, unit) for /Spaxels/xy


def read_cube_header(path: str) -> CubeInfo:
    """Find the DATA/STAT extensions of a FITS cube and read its spectral WCS.  Local."""
    from astropy.io import fits
    from astropy.wcs import WCS

    what = f"--cube {path}"
    if not os.path.isfile(path):
        raise InputError(f"{what}: no such file")
    try:
        with _quiet(), fits.open(path, memmap=True, lazy_load_hdus=False) as hdul:    # truncation: refused below
            names = [h.name.upper() for h in hdul]
            if "DATA" in names:
                data_ext = names.index("DATA")
            elif hdul[0].header.get("NAXIS", 0) == 3:
                data_ext = 0
            else:
                raise InputError(f"{what}: no DATA extension and no 3-D primary image")
            hdu = hdul[data_ext]
            if len(hdu.shape) != 3:
                raise InputError(f"{what}: DATA has shape {hdu.shape}; expected 3-D (NAXIS3=wavelength, NAXIS2, NAXIS1)")
            stat_ext = names.index("STAT") if "STAT" in names else None
            if stat_ext is not None and hdul[stat_ext].shape != hdu.shape:
                raise InputError(f"{what}: STAT shape {hdul[stat_ext].shape} differs from DATA {hdu.shape}")
            for ext in (data_ext, stat_ext):
                if ext is not None:
                    _require_whole_data(hdul[ext], path, what)
            header = hdu.header.copy()
            stat_bunit = str(hdul[stat_ext].header.get("BUNIT", "")) if stat_ext is not None else ""
            shape = tuple(int(n) for n in hdu.shape)
    except OSError as exc:
        raise InputError(f"{what}: not a readable FITS file ({str(exc).splitlines()[0]})") from None
    lam, ctype = _wavelengths(header, 3, shape[0], what, unit_required=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wcs = WCS(header)
        wcs_text = wcs.to_header_string(relax=True)
        xy_scale = (1.0, 1.0, (shape[2] - 1) / 2.0, (shape[1] - 1) / 2.0, "pixel")
        if wcs.has_celestial:
            from astropy.wcs.utils import proj_plane_pixel_scales

            sx, sy = (float(v) * 3600.0 for v in proj_plane_pixel_scales(wcs.celestial))
            xref, yref = (float(v) - 1.0 for v in wcs.celestial.wcs.crpix)
            xy_scale = (sx, sy, xref, yref, "arcsec")
    return CubeInfo(path, data_ext, stat_ext, shape, lam, ctype, str(header.get("BUNIT", "")),
                    stat_bunit, wcs_text, xy_scale)


def read_bin_map(path: str, shape: tuple) -> np.ndarray:
    """A bin map ``(ny, nx) int64`` (-1 = unused) from ``.npy`` or a FITS image.  Local."""
    what = f"--bins {path}"
    if not os.path.isfile(path):
        raise InputError(f"{what}: no such file")
    if path.endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
    else:
        from astropy.io import fits

        try:
            with fits.open(path) as hdul:
                arr = next((h.data for h in hdul if h.data is not None and h.data.ndim == 2), None)
                arr = None if arr is None else np.array(arr)
        except OSError:
            raise InputError(f"{what}: expected a .npy file or a FITS image") from None
        if arr is None:
            raise InputError(f"{what}: no 2-D image found")
    if arr.shape != tuple(shape):
        raise InputError(f"{what}: bin map shape {arr.shape} does not match the cube's spatial shape "
                         f"{tuple(shape)} (NAXIS2, NAXIS1)")
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
        raise InputError(f"{what}: expected integer bin ids (-1 = unused)")
    arr = arr.astype(np.int64)
    if arr.min() < -1 or arr.max() < 0:
        raise InputError(f"{what}: expected bin ids >= 0 for used spaxels and -1 for unused ones")
    return arr


def _npz(path: str, what: str):
    import zipfile

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{what}: not a readable .npz file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def read_templates(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """``lam (T0,)`` Å, ``templates (P, T0)`` and ``{"pop_shape", "log_age", "metallicity"}``.  Local."""
    what = f"--templates {path}"
    if os.path.isdir(path):
        return _templates_from_fits_dir(path, what)
    if not os.path.isfile(path) or not path.endswith(".npz"):
        raise InputError(f"{what}: expected a .npz file or a directory of FITS spectra")
    with _npz(path, what) as z:
        files = set(z.files)
        for key in ("templates", "lam"):
            if key not in files:
                raise InputError(f"{what}: key {key!r} missing (found {', '.join(sorted(files))})")
        tem, lam = np.asarray(z["templates"], dtype=np.float64), np.asarray(z["lam"], dtype=np.float64)
        ages = np.asarray(z["ages"], dtype=np.float64) if "ages" in files else None
        metals = np.asarray(z["metals"], dtype=np.float64) if "metals" in files else None
    ignored = files - {"templates", "lam", "ages", "metals"}
    if ignored:
        _LOG.info("templates: ignoring keys %s of %s", ", ".join(sorted(ignored)), path)
    if tem.ndim not in (2, 3) or lam.ndim != 1 or tem.shape[0] != lam.size:
        raise InputError(f"{what}: expected templates (T0, n_age, n_met) or (T0, P) with lam (T0,), "
                         f"got {tem.shape} and {lam.shape}")
    pop_shape = tem.shape[1:]
    n_pop = int(np.prod(pop_shape))
    if tem.ndim == 3:
        for key, arr, n in (("ages", ages, pop_shape[0]), ("metals", metals, pop_shape[1])):
            if arr is not None and arr.shape != (n,):
                raise InputError(f"{what}: {key} must have shape ({n},) for templates {tem.shape}")
        log_age = np.repeat(np.log10(ages * 1e9), pop_shape[1]) if ages is not None else np.full(n_pop, np.nan)
        metal = np.tile(metals, pop_shape[0]) if metals is not None else np.full(n_pop, np.nan)
    else:
        for key, arr in (("ages", ages), ("metals", metals)):
            if arr is not None and arr.shape != (n_pop,):
                raise InputError(f"{what}: {key} must have shape ({n_pop},) for templates {tem.shape}")
        log_age = np.log10(ages * 1e9) if ages is not None else np.full(n_pop, np.nan)
        metal = metals if metals is not None else np.full(n_pop, np.nan)
    return lam, tem.reshape(lam.size, n_pop).T.copy(), {"pop_shape": tuple(int(n) for n in pop_shape),
                                                         "log_age": log_age, "metallicity": metal}


def _templates_from_fits_dir(path: str, what: str):
    from astropy.io import fits

    files = sorted(f for pat in ("*.fits", "*.fit", "*.fits.gz") for f in glob.glob(os.path.join(path, pat)))
    if not files:
        raise InputError(f"{what}: no *.fits files in the directory")
    spectra, lam0 = [], None
    for name in files:
        try:
            with fits.open(name) as hdul:
                hdu = next((h for h in hdul if h.data is not None and h.data.ndim == 1), None)
                if hdu is None:
                    raise InputError(f"{what}: {os.path.basename(name)} holds no 1-D spectrum")
                data, header = np.array(hdu.data, dtype=np.float64), hdu.header
        except OSError:
            raise InputError(f"{what}: {os.path.basename(name)} is not a readable FITS file") from None
        lam, _ = _wavelengths(header, 1, data.size, f"{what}: {os.path.basename(name)}", unit_required=False)
        if lam0 is None:
            lam0 = lam
        elif lam.shape != lam0.shape or not np.allclose(lam, lam0, rtol=1e-10, atol=0):
            raise InputError(f"{what}: {os.path.basename(name)} has a different wavelength grid from "
                             f"{os.path.basename(files[0])}; all templates must share one grid")
        spectra.append(data)
    names = [os.path.basename(f) for f in files]
    parsed = [MILES_NAME.search(n) for n in names]
    n_pop = len(files)
    info = {"pop_shape": (n_pop,), "log_age": np.full(n_pop, np.nan), "metallicity": np.full(n_pop, np.nan)}
    order = list(range(n_pop))
    if all(parsed):
        met = np.array([(-1 if m.group(1) == "m" else 1) * float(m.group(2)) for m in parsed])
        age = np.array([float(m.group(3)) for m in parsed])
        order = sorted(order, key=lambda i: (age[i], met[i]))
        age, met = age[order], met[order]
        ages, mets = np.unique(age), np.unique(met)
        grid = ages.size * mets.size == n_pop and np.array_equal(age, np.repeat(ages, mets.size)) \
            and np.array_equal(met, np.tile(mets, ages.size))
        info = {"pop_shape": (ages.size, mets.size) if grid else (n_pop,),
                "log_age": np.log10(age * 1e9), "metallicity": met}
    return lam0, np.stack([spectra[i] for i in order]), info


def read_losvd_meta(path: str, comm) -> tuple[np.ndarray, tuple]:
    """``vel (V,)`` and the shape ``(n_bins, V, C)`` of an LOSVD file.  Collective over comm."""
    what = f"--losvd {path}"
    if not os.path.isfile(path):
        raise InputError(f"{what}: no such file")
    if path.endswith(".npz"):
        with _npz(path, what) as z:
            for key in ("losvd", "vel"):
                if key not in z.files:
                    raise InputError(f"{what}: key {key!r} missing (found {', '.join(sorted(z.files))})")
            vel, shape = np.asarray(z["vel"], dtype=np.float64), z["losvd"].shape
    else:
        with open_h5(path, "r", comm) as f:
            for key in ("losvd", "vel"):
                if key not in f:
                    raise InputError(f"{what}: dataset {key!r} missing")
            vel, shape = np.asarray(f["vel"][...], dtype=np.float64), f["losvd"].shape
    if len(shape) == 2:
        shape = shape + (1,)
    if len(shape) != 3 or vel.ndim != 1 or shape[1] != vel.size:
        raise InputError(f"{what}: expected losvd (n_bins, V, C) and vel (V,), got {shape} and {vel.shape}")
    return vel, tuple(int(n) for n in shape)


def read_losvd_rows(path: str, start: int, stop: int, shape: tuple, comm) -> np.ndarray:
    """Rows ``[start, stop)`` of the LOSVD file as ``(n, V, C)`` float64.  Collective over comm."""
    if path.endswith(".npz"):
        with _npz(path, f"--losvd {path}") as z:
            return np.asarray(z["losvd"][start:stop], dtype=np.float64).reshape((stop - start,) + shape[1:])
    with open_h5(path, "r", comm) as f:
        dset = f["losvd"]
        n = stop - start
        block = read_block(dset, (start,) + (0,) * (dset.ndim - 1), (n,) + dset.shape[1:] if n else None,
                           dtype=np.float64)
    return (np.zeros((0,) + shape[1:]) if block is None else block).reshape((n,) + shape[1:])


def file_provenance(role: str, path: str) -> dict:
    """Name, absolute path, size and sha256 of an input (a directory: of its FITS files).  Local."""
    paths = sorted(f for pat in ("*.fits", "*.fit", "*.fits.gz") for f in glob.glob(os.path.join(path, pat))) \
        if os.path.isdir(path) else [path]
    digest, size = hashlib.sha256(), 0
    for name in paths:
        one = hashlib.sha256()
        with open(name, "rb") as fh:
            for block in iter(lambda: fh.read(16 * 2**20), b""):
                one.update(block)
        size += os.path.getsize(name)
        if len(paths) == 1 and not os.path.isdir(path):
            digest = one
        else:
            digest.update(f"{os.path.basename(name)} {one.hexdigest()}\n".encode())
    entry = {"role": role, "name": os.path.basename(os.path.normpath(path)), "path": os.path.abspath(path),
             "bytes": size, "sha256": digest.hexdigest()}
    if os.path.isdir(path):
        entry["files"] = len(paths)
    return entry




def read_fwhm(value, option: str):
    """A resolution option: a FWHM in Å, or a two-column text file of λ (Å) and FWHM (Å).  Local.

    ``value`` is a number (or a string holding one) or the path of a text file (whitespace- or
    comma-separated columns, ``#`` comments; instrument LSF tables come like this).  Returns
    the number as ``float`` or the table as ``(lam (m,), fwhm (m,))`` float64 with ``lam``
    strictly increasing.  Errors name ``option``.
    """
    what = f"{option} {value}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is not None:
        if not (np.isfinite(number) and number > 0):
            raise InputError(f"{what}: expected a positive FWHM in Angstrom or a two-column file (lambda, FWHM)")
        return number
    path = os.fspath(value)
    if not os.path.isfile(path):
        raise InputError(f"{what}: neither a number nor an existing file (expected a FWHM in Angstrom or "
                         f"a two-column text file of lambda, FWHM)")
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{what}: not a readable text file ({exc})") from None
    table = []
    for lineno, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].replace(",", " ").split()
        if not fields:
            continue
        try:
            if len(fields) != 2:
                raise ValueError
            table.append([float(v) for v in fields])
        except ValueError:
            raise InputError(f"{what}: line {lineno}: expected two numbers (lambda in Angstrom, FWHM in "
                             f"Angstrom), got {line.strip()!r}") from None
    table = np.array(table, dtype=np.float64).reshape(-1, 2)
    if table.shape[0] < 2:
        raise InputError(f"{what}: expected at least 2 rows (lambda in Angstrom, FWHM in Angstrom), "
                         f"got {table.shape[0]}")
    lam, fwhm = table[:, 0], table[:, 1]
    if not np.all(np.isfinite(table)) or np.any(np.diff(lam) <= 0) or lam[0] <= 0 or np.any(fwhm <= 0):
        raise InputError(f"{what}: expected strictly increasing positive wavelengths and positive FWHM")
    return lam, fwhm
