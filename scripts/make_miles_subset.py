#!/usr/bin/env python
"""Regenerate ``cubefit_mpi/data/miles_ssp_subset.npz``, the MILES SSP subset shipped with the package.

Source: the 636 MILES SSPs of ``../shared/data/miles_ssp.npz`` (Vazdekis et al. 2010, MNRAS 404,
1639; Vazdekis et al. 2015, MNRAS 449, 1177; BaSTI isochrones, Kroupa-like IMF slope 1.30, base
[α/Fe]; FWHM 2.51 Å; λ = 3540.5 + 0.9 i Å, air).  The subset keeps

* the 4 metallicities ``METALLICITIES`` (all 53 ages of each), sorted by (age, [M/H]);
* the pixels with centres in ``LAM_RANGE`` (Å), the range the demo needs (observed 4800-5412 Å
  at the default 600 pixels of 60 km/s, plus the velocity guard), unchanged (no resampling);
* the values as float32, exactly as in the source.

It is written in the pPXF-style layout that ``ingest --templates`` reads: ``templates (T0, n_age,
n_met)`` float32, ``lam (T0,)`` Å, ``ages (n_age,)`` Gyr, ``metals (n_met,)`` [M/H], plus
``fwhm`` (Å) and ``citation`` (ignored by ingest, used by ``mock --templates miles``).

Usage (from the repository root; only this script needs the shared file)::

    python scripts/make_miles_subset.py [--source ../shared/data/miles_ssp.npz] \
        [--out cubefit_mpi/data/miles_ssp_subset.npz]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METALLICITIES = (-1.26, -0.66, -0.25, 0.26)
LAM_RANGE = (4750.0, 5450.0)
FWHM = 2.51
CITATION = ("MILES SSPs (Vazdekis et al. 2010, MNRAS 404, 1639; Vazdekis et al. 2015, MNRAS 449, 1177), "
            "BaSTI isochrones, IMF slope 1.30 (Kroupa-like), base [alpha/Fe]; FWHM 2.51 A; subset of 4 [M/H] "
            "x 53 ages, 4750-5450 A, made by scripts/make_miles_subset.py")


def subset(source: Path) -> dict:
    """The arrays of the shipped file, from the full library at ``source``."""
    with np.load(source) as z:
        flux, lam, age, met = z["flux"], z["lam"], z["age"], z["met"]
    keep = np.isin(met, METALLICITIES)
    if not set(METALLICITIES) <= set(met[keep].tolist()):
        raise SystemExit(f"{source}: not every metallicity of {METALLICITIES} is present")
    flux, age, met = flux[keep], age[keep], met[keep]
    order = np.lexsort((met, age))                       # by age, then [M/H]
    flux, age, met = flux[order], age[order], met[order]
    ages, metals = np.unique(age), np.unique(met)
    if ages.size * metals.size != age.size:
        raise SystemExit(f"{source}: the selected SSPs do not form a full age x [M/H] grid")
    pix = (lam >= LAM_RANGE[0]) & (lam <= LAM_RANGE[1])
    grid = flux[:, pix].astype(np.float32).reshape(ages.size, metals.size, -1)   # (n_age, n_met, T0)
    # (T0, n_age, n_met) as ingest reads it, stored in Fortran order: each spectrum is contiguous on disk,
    # which deflate compresses better (566 kB instead of 605 kB); np.load returns the same array
    return {"templates": np.asfortranarray(np.moveaxis(grid, 2, 0)), "lam": lam[pix].astype(np.float64),
            "ages": ages, "metals": metals, "fwhm": np.float64(FWHM), "citation": np.array(CITATION)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "miles_ssp.npz")
    parser.add_argument("--out", type=Path, default=ROOT / "cubefit_mpi" / "data" / "miles_ssp_subset.npz")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        print(f"{args.source}: no such file (the full MILES library, see ../shared/data/README.md)", file=sys.stderr)
        return 2
    arrays = subset(args.source)
    np.savez_compressed(args.out, **arrays)
    t = arrays["templates"]
    print(f"wrote {args.out}: templates {t.shape} {t.dtype}, {arrays['lam'][0]:.1f}-{arrays['lam'][-1]:.1f} A, "
          f"{args.out.stat().st_size / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
