"""``python -m cubefit_mpi``: see :mod:`cubefit_mpi.cli`."""
from .cli import run

if __name__ == "__main__":
    run()
