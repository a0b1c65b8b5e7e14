#!/usr/bin/env bash
# Install everything cubefit_mpi needs into ./.venv (idempotent; seconds the second time).
#
#   Debian packages : mpich libmpich-dev libhdf5-mpich-dev libfftw3-dev pkg-config build-essential
#   .venv           : mpi4py and h5py built from source against Debian's MPICH + parallel HDF5,
#                     then numpy, scipy, pyFFTW, pytest, pytest-mpi, pytest-timeout, the package (editable)
#
# Fails loudly if h5py is not an MPI build or mpi4py and h5py link different MPI libraries.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
APT_PKGS="mpich libmpich-dev libhdf5-mpich-dev libfftw3-dev pkg-config build-essential"
STAMP="$VENV/.cubefit-setup-stamp"

say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

# ---- 1. Debian packages -------------------------------------------------------------------
missing=()
for p in $APT_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        || die "apt-get update failed (need network access to Debian's archive)"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        || die "apt-get install ${missing[*]} failed"
fi
command -v mpicc >/dev/null || die "mpicc not found after installing mpich"

# ---- 2. the virtual environment -----------------------------------------------------------
# The stamp records what the venv was built from; a change in any of these rebuilds the Python side.
want=$( { cat pyproject.toml setup.cfg scripts/setup.sh; "$PYTHON" --version; mpichversion 2>/dev/null | head -1; } | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" scripts/check_mpi_stack.py >/dev/null 2>&1; then
    say "up to date ($VENV)"
    exit 0
fi

[ -x "$VENV/bin/python" ] || { say "creating $VENV with $("$PYTHON" --version)"; "$PYTHON" -m venv "$VENV"; }
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install -U pip "setuptools>=77" wheel "cython>=3" pkgconfig "numpy>=1.24"

mpi_ok() { "$VENV/bin/python" -c "import mpi4py.MPI as M, sys; sys.exit(0 if 'MPICH' in M.Get_library_version() else 1)" 2>/dev/null; }
if ! mpi_ok; then
    say "building mpi4py from source against $(command -v mpicc)"
    MPICC=mpicc $PIP install --force-reinstall --no-deps --no-binary=mpi4py --no-build-isolation "mpi4py>=4"
fi
h5_ok() { "$VENV/bin/python" -c "import h5py, sys; sys.exit(0 if h5py.get_config().mpi else 1)" 2>/dev/null; }
if ! h5_ok; then
    say "building h5py from source against parallel HDF5 (hdf5-mpich); this takes a few minutes"
    CC=mpicc HDF5_MPI=ON HDF5_PKGCONFIG_NAME=hdf5-mpich \
        $PIP install --force-reinstall --no-deps --no-binary=h5py --no-build-isolation "h5py>=3.10"
fi

say "installing the package and its test dependencies"
$PIP install -e ".[test]"

"$VENV/bin/python" scripts/check_mpi_stack.py || die "the MPI stack check failed (see above)"
echo "$want" > "$STAMP"
say "done: $VENV is ready"
