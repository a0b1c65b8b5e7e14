"""Which operator a file gets: ``--operator auto|factored|hypercube``.

``auto`` uses the factors unless they are not exact for this file, i.e. unless the builder's
``max(0, ·)`` could clip (negative template values or ``/R_T`` weights: the reason is logged)
or the file's hypercube was made by another tool (no ``inputs.fingerprint``: it is then used
as stored).  A file that holds only the inputs (and ``/R_T``) needs no ``build``.  When the file
has a hypercube, ``auto`` first requires it to be usable (a cube half-way through
``convert-norm`` is refused with the command that finishes it: its normalisation is what the
factors take), and ``prefer_stored`` (Kaczmarz: reading a tile is cheaper than its GEMM) then
takes the stored hypercube.  The normalisation of factored models is that of the file's own
hypercube when it has one, else ``norm_mode``/``amp_mode`` (the builder's defaults when not given).
"""
from __future__ import annotations

import logging

import numpy as np

from ..config.errors import InputError
from ..io import layout as lay
from ..io.h5file import open_h5
from ..io.hypercube_state import require_usable_models
from ..io.model_inputs import ModelInputs
from ..numerics.factored import factors_are_exact
from ..numerics.kernels import DEFAULT_AMP
from ..numerics.normalization import DEFAULT_NORM
from ..numerics.support import support_map
from .base import OPERATOR_CHOICES, Operator
from .factored import FactoredOperator
from .hypercube import HypercubeOperator

_LOG = logging.getLogger("cubefit_mpi.operators")


def open_operator(path: str, requested: str = "auto", *, norm_mode: str | None = None,
                  amp_mode: str | None = None, prefer_stored: bool = False, comm) -> Operator:
    """The operator for ``path``.  Collective over comm.

    Raises
    ------
    InputError
        An unknown choice; ``hypercube`` on a file whose hypercube is not usable (the usable-
        hypercube rule names the repair); ``factored`` where the factors are not exact (with the
        reason); ``auto`` where neither works.
    """
    if requested not in OPERATOR_CHOICES:
        raise InputError(f"--operator {requested}: expected one of {', '.join(OPERATOR_CHOICES)}")
    with open_h5(path, "r", comm) as f:
        has_cube = lay.MODELS in f
        attrs = dict(f[lay.HYPERCUBE].attrs) if lay.HYPERCUBE in f else {}
        foreign = has_cube and "inputs.fingerprint" not in attrs
        if requested == "hypercube" or (requested == "auto" and has_cube):
            models = require_usable_models(f, comm)
            if requested == "hypercube" or foreign or prefer_stored:
                return HypercubeOperator(path, models, f[lay.HYPERCUBE].attrs, stored_support(f, models))
        norm = norm_mode or (str(attrs["norm.mode"]) if has_cube and "norm.mode" in attrs else DEFAULT_NORM)
        amp = amp_mode or (str(attrs["amp.mode"]) if has_cube and "amp.mode" in attrs else DEFAULT_AMP)
        inputs = ModelInputs.read(f, norm, amp, comm)
        reason = factors_are_exact(inputs.templates, inputs.rebin_lt, inputs.template_range[0])
        if reason is None:
            return FactoredOperator(path, inputs)
        if requested == "factored":
            raise InputError(f"--operator factored: {reason}; use --operator hypercube (after `cubefit_mpi build "
                             f"{path}`)")
        if not has_cube:
            raise InputError(f"{reason}: this file needs its hypercube; run `cubefit_mpi build {path}` first")
        _LOG.info("operator: %s; using the hypercube as stored", reason)
        return HypercubeOperator(path, models, f[lay.HYPERCUBE].attrs, stored_support(f, models))


def stored_support(f, models):
    """``(S, C) bool`` lit (s, c) of a hypercube built here (``/HyperCube/norm/losvd_amp > 0``), or
    None (every pair is taken as lit) for a hypercube made elsewhere.  Local."""
    if lay.LOSVD_AMP not in f or f[lay.LOSVD_AMP].shape != models.shape[:2]:
        return None
    return support_map(np.asarray(f[lay.LOSVD_AMP][...]))
