"""The state of ``/HyperCube/models``: its version, which spaxels are missing, and the one rule
for "is this hypercube usable?" that every reader applies (:func:`require_usable_models`).

A hypercube is usable when it exists with four dimensions, its build is complete, no
normalisation conversion or recompression was interrupted half-way, and it was built from the
inputs the file holds now (its ``inputs.fingerprint`` equals :func:`.model_inputs.current_fingerprint`).
Each refusal is an :class:`InputError` naming the command that repairs it.
"""
from __future__ import annotations

import numpy as np

from ..config.errors import InputError
from . import layout as lay
from .model_inputs import current_fingerprint

CONVERTING_ATTR = "norm.converting_to"
ENERGY_STALE = "stale"                           # attribute of col_energy: the models changed since
RECOMPRESS_TMP = lay.MODELS + "__recompress"     # the new copy while recompress runs
RECOMPRESS_OLD = lay.MODELS + "__old"            # the old dataset between the two renames of the swap


def mark_models_changed(f, comm) -> None:
    """Give ``/HyperCube/models`` a new ``models.version`` (caches keyed on it go stale).  Collective."""
    import uuid

    f[lay.HYPERCUBE].attrs["models.version"] = comm.bcast(uuid.uuid4().hex if comm.Get_rank() == 0 else None)


def missing_spaxel_ranges(tile_ids, s_chunk: int, n_spaxels: int) -> list[tuple[int, int]]:
    """Merged half-open spaxel ranges ``[(s0, s1), ...]`` of the given S-tile indices.  Local."""
    out = []
    for t in tile_ids:
        lo, hi = int(t) * s_chunk, min((int(t) + 1) * s_chunk, n_spaxels)
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def describe_missing(f, models) -> str:
    """`` (missing spaxels a:b, c:d ...)`` from the done bitmap, or an empty string.  Local."""
    if lay.DONE not in f:
        return ""
    done = np.asarray(f[lay.DONE][...], dtype=bool).all(axis=tuple(range(1, f[lay.DONE].ndim)))
    s_chunk = (models.chunks or models.shape)[0]
    spans = missing_spaxel_ranges(np.flatnonzero(~done), s_chunk, models.shape[0])
    if not spans:
        return ""
    return " (missing spaxels " + ", ".join(f"{a}:{b}" for a, b in spans[:8]) + (" ..." if len(spans) > 8 else "") + ")"


def interrupted_recompress(f) -> str | None:
    """The compression of a recompress killed between its two renames (models is then missing), else None.  Local."""
    if lay.MODELS not in f and RECOMPRESS_OLD in f and RECOMPRESS_TMP in f:
        return str(f[RECOMPRESS_TMP].attrs.get("compression", "none"))
    return None


def require_usable_models(f, comm, *, allow_converting: bool = False, check_inputs: bool = True):
    """``/HyperCube/models`` after checking it is usable (see the module notes).  Collective over comm.

    Parameters
    ----------
    f : an open cube file (every rank of ``comm``)
    allow_converting : bool
        Accept a cube left half-way through ``convert-norm`` (for ``convert-norm`` itself).
    check_inputs : bool
        Compare the stored inputs fingerprint with the file's inputs (reads the LOSVD once).

    Raises
    ------
    InputError
        Naming the dataset and the command that makes it usable.
    """
    path = f.filename
    compression = interrupted_recompress(f)
    if compression is not None:
        raise InputError(f"{lay.MODELS}: a recompression was interrupted half-way; finish it with "
                         f"`cubefit_mpi recompress {path} --compression {compression.replace(':None', '')}`")
    if lay.MODELS not in f:
        raise InputError(f"{lay.MODELS}: dataset missing from {path}; run `cubefit_mpi build {path}` first")
    models = f[lay.MODELS]
    if len(models.shape) != 4:
        raise InputError(f"{lay.MODELS}: expected 4 dimensions (S, C, P, L), got shape {models.shape}")
    attrs = f[lay.HYPERCUBE].attrs
    converting = str(attrs.get(CONVERTING_ATTR, ""))
    if converting and not allow_converting:
        raise InputError(f"{lay.HYPERCUBE}: an interrupted conversion to norm {converting!r} must be finished "
                         f"first: `cubefit_mpi convert-norm {path} --to {converting}`")
    complete = attrs.get("complete")
    if complete is None and lay.DONE in f:
        complete = bool(np.all(np.asarray(f[lay.DONE][...]) != 0))
    if complete is not None and not bool(complete):
        raise InputError(f"{lay.MODELS}: the hypercube is incomplete{describe_missing(f, models)}; finish it "
                         f"with `cubefit_mpi build {path}`")
    stored = attrs.get("inputs.fingerprint")
    if check_inputs and stored is not None:
        if str(stored) != current_fingerprint(f, comm):
            raise InputError(f"{lay.MODELS}: built from other inputs than the file holds now (templates, /R_T, "
                             f"grids or /LOSVD changed); rebuild it with `cubefit_mpi build {path} --force`")
    return models
