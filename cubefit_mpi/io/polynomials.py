"""The fitted polynomials of a solve: ``/Solve/add_poly (S, D_a + 1)`` and ``/Solve/mult_poly
(S, D_m)`` (float64), written by ``solve --add-degree/--mult-degree`` and read by ``recon`` and
``plot``.

Attributes of each: ``degree``, ``basis`` (the definition of the Legendre basis,
:data:`~cubefit_mpi.numerics.polynomials.BASIS_DEFINITION`), ``x_crc32`` (the CRC32 of the
``/X_global`` they belong to: polynomials of another x are not applied) and, on the
multiplicative ones, ``iterations``, ``converged`` and ``objective_history`` of the fit.
"""
from __future__ import annotations

import numpy as np

from ..numerics.polynomials import BASIS_DEFINITION
from ..numerics.reconstruction import x_checksum
from . import layout as lay
from .blocks import write_block
from .h5file import open_h5

NAMES = {"add": lay.ADD_POLY, "mult": lay.MULT_POLY}


def write_polynomials(path: str, x: np.ndarray, coefficients: dict, attrs: dict | None = None, comm=None) -> None:
    """Replace the stored polynomials by ``coefficients`` (``{"add": (S, D_a+1) or None, "mult":
    (S, D_m) or None}``, the same on every rank); None removes one.  Collective over comm.

    ``attrs`` go on the multiplicative coefficients (the fit's iterations and history).
    """
    root = comm.Get_rank() == 0
    with open_h5(path, "r+", comm) as f:
        for key, name in NAMES.items():
            if name in f:
                del f[name]
            values = coefficients.get(key)
            if values is None:
                continue
            dset = f.create_dataset(name, shape=values.shape, dtype="f8")
            write_block(dset, (0, 0) if root else None, values if root else None)
            degree = values.shape[1] - 1 if key == "add" else values.shape[1]
            dset.attrs.update({"degree": int(degree), "basis": BASIS_DEFINITION, "x_crc32": x_checksum(x)})
            if key == "mult":
                dset.attrs.update(attrs or {})


def read_polynomials(f, n_spec: int, x_cp: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """``(add, mult, note)``: the stored coefficients that belong to ``x_cp`` (else None) and a
    word on what was found.  Local (``f`` open on any communicator; small reads)."""
    found, notes = {}, []
    for key, name in NAMES.items():
        if name not in f:
            continue
        dset = f[name]
        if dset.ndim != 2 or dset.shape[0] != n_spec:
            notes.append(f"{name} ignored: expected {n_spec} rows, got shape {dset.shape}")
        elif int(dset.attrs.get("x_crc32", -1)) != x_checksum(x_cp):
            notes.append(f"{name} ignored: it belongs to another x")
        else:
            found[key] = np.asarray(dset[...], dtype=np.float64)
            notes.append(f"{name} (degree {int(dset.attrs['degree'])})")
    return found.get("add"), found.get("mult"), "; ".join(notes) or "no polynomials"
