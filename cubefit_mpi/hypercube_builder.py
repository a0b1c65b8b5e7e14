"""The spec's import path ``cubefit_mpi.hypercube_builder``: see :mod:`cubefit_mpi.stages.build`."""
from .stages.build import build_hypercube  # noqa: F401
from .stages.convert_norm import convert_hypercube_norm  # noqa: F401
