"""The spec's Python entry point: ``PipelineRunner(path).solve(...)`` and
``PipelineRunner(path).solve_all_mp_batched(...)``.

MPI ranks replace the predecessor's process pool: ``processes`` is accepted and noted in the
log (launch with ``mpiexec -n N`` / ``srun`` instead); ``blas_threads`` sets the BLAS threads of
this rank (threadpoolctl).  The fit tracker is wired up for the iterative solver.
"""
from __future__ import annotations

import logging

import numpy as np

from ..config.errors import InputError
from ..parallel.comm import get_comm

_LOG = logging.getLogger("cubefit_mpi.solve")
METHODS = ("exact", "kaczmarz")


class PipelineRunner:
    """Solve a built cube file.  Every method is collective over ``comm``.

    Parameters
    ----------
    path : str
    comm : MPI communicator, default ``MPI.COMM_WORLD``
    """

    def __init__(self, path, comm=None):
        self.path = str(path)
        self.comm = get_comm(comm)

    def solve(self, method: str = "exact", *, blas_threads: int | None = None, track: bool = True,
              **options) -> tuple[np.ndarray, dict]:
        """Solve with ``method`` ("exact" or "kaczmarz"); returns ``(x (C·P,), stats)``.

        ``options`` go to :func:`cubefit_mpi.solvers.exact.solve_exact` or
        :func:`cubefit_mpi.solvers.kaczmarz.solver.solve_kaczmarz`.
        """
        if method not in METHODS:
            raise InputError(f"--method {method}: expected one of {', '.join(METHODS)}")
        if method == "kaczmarz":
            refuse_polynomials(options.pop("add_degree", None), options.pop("mult_degree", None))
        with _blas_limits(blas_threads):
            if method == "exact":
                from ..solvers.exact import solve_exact

                return solve_exact(self.path, comm=self.comm, **options)
            from ..solvers.kaczmarz.solver import solve_kaczmarz
            from ..stages.tracker import FitTracker

            with FitTracker(self.path, comm=self.comm, method="kaczmarz", enabled=track, lazy=True) as tracker:
                return solve_kaczmarz(self.path, comm=self.comm, tracker=tracker, **options)

    def solve_all_mp_batched(self, epochs: int | None = None, pixels_per_aperture=None, lr: float | None = None,
                             project_nonneg: bool | None = None, processes: int | None = None,
                             blas_threads: int | None = None, orbit_weights=None, **options
                             ) -> tuple[np.ndarray, dict]:
        """The predecessor's call, on MPI: the batched Kaczmarz solver.  Collective over comm.

        Options left out (None) take :func:`~cubefit_mpi.solvers.kaczmarz.solver.solve_kaczmarz`'s
        defaults; ``options`` go to it too (an unknown keyword is a ``TypeError`` naming the
        closest valid one).  ``processes`` and ``pixels_per_aperture`` are accepted and noted.
        """
        if processes is not None and self.comm.Get_rank() == 0:
            _LOG.info("processes=%s ignored: MPI ranks replace the process pool (this run has %d ranks; "
                      "launch with mpiexec -n N or srun)", processes, self.comm.Get_size())
        if pixels_per_aperture is not None and self.comm.Get_rank() == 0:
            _LOG.info("pixels_per_aperture=%s ignored: rows are batched per S-tile", pixels_per_aperture)
        given = dict(epochs=epochs, lr=lr, project_nonneg=project_nonneg, orbit_weights=orbit_weights)
        options.update({k: v for k, v in given.items() if v is not None})
        return self.solve("kaczmarz", blas_threads=blas_threads, **options)


def refuse_polynomials(add_degree, mult_degree) -> None:
    """Kaczmarz fits no polynomials: :class:`InputError` when either is asked for.  Local.

    Its band designs are the float32 blocks as read (or made) and used in place, one product
    with them per step; projecting every spectrum's rows off the polynomials would need a
    float64 copy of each block per visit (the cost the design avoids), and multiplicative
    polynomials change the design between epochs.
    """
    asked = [f"{name} {value}" for name, value, off in (("--add-degree", add_degree, -1), ("--mult-degree", mult_degree, 0))
             if value is not None and value != off]
    if asked:
        raise InputError(f"{', '.join(asked)}: polynomials are fitted by the exact method only (--method exact); "
                         f"the Kaczmarz solver works on the stored models as they are")


class _blas_limits:
    """Context manager limiting BLAS threads when ``threads`` (or ``CUBEFIT_BLAS_THREADS``) is set."""

    def __init__(self, threads):
        from ..config.knobs import get_knobs

        self.threads = threads if threads is not None else (get_knobs().blas_threads or None)
        self.ctx = None

    def __enter__(self):
        if self.threads:
            from threadpoolctl import threadpool_limits

            self.ctx = threadpool_limits(limits=int(self.threads), user_api="blas")
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.unregister()
        return False
