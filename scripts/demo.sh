#!/usr/bin/env bash
# The main job on the built-in synthetic galaxy, under mpiexec -n NP.
set -euo pipefail
cd "$(dirname "$0")/.."
FILE=${1:-demo/galaxy.h5}
NP=${2:-2}
PY=.venv/bin/python
RUN="mpiexec -n $NP $PY -m mpi4py -m cubefit_mpi"
mkdir -p "$(dirname "$FILE")"
echo "== 1. synthetic galaxy (mock) on $NP ranks"
$RUN mock "$FILE" --spaxels 900 --components 3 --populations 24 --wavelengths 800 --seed 1 --noise 60 --masked-pixels 12
echo "== 2. hypercube build on $NP ranks (resumable; rerunning it is a no-op)"
$RUN build "$FILE" --norm model
$RUN done "$FILE"
echo "== status"
$PY -m cubefit_mpi status "$FILE"
echo
echo "demo done: results in $FILE"
