"""The spec's import path ``cubefit_mpi.hypercube_utils``: see :mod:`cubefit_mpi.stages.convert_norm`
and :mod:`cubefit_mpi.stages.hypercube_maintenance`."""
from .stages.convert_norm import convert_hypercube_norm  # noqa: F401
from .stages.hypercube_maintenance import done_map, invalidate_tiles, recompress, recompute_col_energy  # noqa: F401
