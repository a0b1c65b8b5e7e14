"""Configuration readable by every layer: exception types (exit codes), the ``CUBEFIT_*`` knobs,
and the helpers that keep each option's default in one place.  Imports nothing of cubefit_mpi
outside this package."""
