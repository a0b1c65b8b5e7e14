"""The spec's import path ``cubefit_mpi.pipeline_runner``: see :mod:`cubefit_mpi.pipeline.runner`."""
from .pipeline.runner import PipelineRunner  # noqa: F401
