"""cubefit_mpi: MPI-parallel LOSVD-convolved stellar-population fitting of IFU data cubes.

Importing the package starts nothing (no MPI, no HDF5).  The spec's public names are
available lazily::

    from cubefit_mpi import H5Manager, H5Dims
"""
from .config.version import VERSION as __version__

_LAZY = {
    "H5Manager": ("io.manager", "H5Manager"),
    "open_h5": ("io.h5file", "open_h5"),
    "H5Dims": ("io.layout", "H5Dims"),
    "InputError": ("config.errors", "InputError"),
    "MockSpec": ("numerics.synthetic_galaxy", "MockSpec"),
    "make_mock": ("stages.mock", "make_mock"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module 'cubefit_mpi' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
