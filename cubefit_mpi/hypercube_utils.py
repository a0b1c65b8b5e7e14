"""The spec's import path ``cubefit_mpi.hypercube_utils``: see :mod:`cubefit_mpi.stages.hypercube_maintenance`."""
from .stages.hypercube_maintenance import (  # noqa: F401
    convert_hypercube_norm, done_map, invalidate_tiles, recompress, recompute_col_energy
)
