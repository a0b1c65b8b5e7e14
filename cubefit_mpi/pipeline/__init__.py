"""The pipeline: the YAML configuration, ``run`` (every step, resumable) and the spec's
``PipelineRunner``."""
