"""Fail loudly unless h5py is a parallel build and mpi4py and h5py use the same MPI library.

Run by ``make setup``; prints one line per check and exits 1 with the fix on failure.
"""
import os
import re
import subprocess
import sys


def fail(msg):
    print(f"check_mpi_stack: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def linked_mpi(path):
    """Return the set of libmpi*/libmpich* sonames an extension module links."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    return set(re.findall(r"(libmpi\w*\.so[.\d]*)\s*=>\s*(\S+)", out))


def main():
    try:
        import h5py
    except ImportError as exc:
        fail(f"h5py does not import ({exc}); run `make setup`")
    if not h5py.get_config().mpi:
        fail("h5py is not an MPI build. Fix: rm -rf .venv && make setup "
             "(h5py must be built with CC=mpicc HDF5_MPI=ON HDF5_PKGCONFIG_NAME=hdf5-mpich --no-binary=h5py)")
    import mpi4py
    from mpi4py import MPI
    lib = MPI.Get_library_version()
    if "MPICH" not in lib:
        fail(f"mpi4py uses {lib.splitlines()[0]!r}, not MPICH. Fix: rm -rf .venv && make setup")
    h5_libs = set()
    for mod in ("h5py.defs", "h5py._conv", "h5py.h5f"):
        m = __import__(mod, fromlist=["x"])
        h5_libs |= {p for _, p in linked_mpi(m.__file__)}
    mpi_libs = {p for _, p in linked_mpi(MPI.__file__)}
    if not h5_libs:
        fail("h5py's extensions link no MPI library; it is not the parallel build")
    real = lambda paths: {os.path.realpath(p) for p in paths}  # noqa: E731
    if mpi_libs and not (real(h5_libs) & real(mpi_libs)):
        fail(f"mpi4py links {sorted(mpi_libs)} but h5py links {sorted(h5_libs)}: "
             "rebuild both with `rm -rf .venv && make setup`")
    print(f"check_mpi_stack: OK  h5py {h5py.version.version} (HDF5 {h5py.version.hdf5_version}, mpi=True), "
          f"mpi4py {mpi4py.__version__} ({lib.splitlines()[0].strip()})")


if __name__ == "__main__":
    main()
