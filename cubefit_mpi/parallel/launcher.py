"""The launcher's variables, read in this one place: ranks and rank announced by ``mpiexec``,
Open MPI or Slurm before MPI starts, and the command that launches a job (``srun`` inside a
Slurm allocation, else ``mpiexec``)."""
from __future__ import annotations

import os
import shutil

RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS", "MPI_LOCALNRANKS")
# thread counts a hybrid launch sets per rank: when any is present, BLAS threads are left as launched
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
# what a child job must not inherit from the job that launches it (MPICH/Hydra, Open MPI's PMI)
LAUNCH_PREFIXES = ("PMI_", "PMIX_", "MPIR_", "HYDRA", "MPI_LOCAL", "OMPI_COMM_WORLD")


def _int_variable(names) -> int | None:
    for var in names:
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return None


def launcher_rank() -> int:
    """This process's rank as announced by the launcher (0 without one), without starting MPI.  Local."""
    rank = _int_variable(RANK_VARIABLES)
    return 0 if rank is None else rank


def world_size_hint() -> int:
    """Number of ranks as announced by the launcher, without starting MPI.  Local.

    Used by code that must decide something (e.g. which driver to use) before MPI starts.
    Returns 1 when no launcher variable is present.
    """
    size = _int_variable(SIZE_VARIABLES)
    return 1 if size is None else size


def launch_command(ranks: int) -> list[str]:
    """``srun -n N --mpi=pmi2`` inside a Slurm allocation (with srun on PATH), else ``mpiexec -n N``.  Local."""
    if os.environ.get("SLURM_JOB_ID") and shutil.which("srun"):
        return ["srun", "-n", str(ranks), "--mpi=pmi2"]
    return ["mpiexec", "-n", str(ranks)]


def child_environment(extra: dict | None = None) -> dict:
    """This process's environment without the launcher's variables, for a job started from it.  Local."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_PREFIXES)}
    env.update(extra or {})
    return env
