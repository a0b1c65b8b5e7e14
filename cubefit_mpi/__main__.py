"""``python -m cubefit_mpi``: see :mod:`cubefit_mpi.cli.main`."""
from .cli.main import run

if __name__ == "__main__":
    run()
