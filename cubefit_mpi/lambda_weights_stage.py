"""The spec's import path ``cubefit_mpi.lambda_weights_stage``: see :mod:`cubefit_mpi.stages.weights`."""
from .stages.weights import ensure_lambda_weights, read_lambda_weights  # noqa: F401
