"""The package version (``cubefit_mpi.__version__``)."""

VERSION = "0.1.0"
