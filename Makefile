# cubefit_mpi -- the two commands a newcomer needs:
#   make demo   installs what is missing, makes a galaxy from the shipped MILES SSPs and runs the pipeline
#   make test   installs what is missing and runs the whole suite, serial and MPI
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
NP    ?= 2
DEMO  ?= demo/galaxy.h5
MPIEXEC ?= mpiexec
PYTEST_FLAGS ?= -q -p no:cacheprovider

.PHONY: setup demo demo-config test test-fast test-serial test-mpi clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh "$(DEMO)" "$(NP)"

# the same pipeline driven by a configuration file (init-config -> run)
demo-config: setup
	@bash scripts/demo_config.sh demo/config_run "$(NP)"

test: setup test-serial test-mpi

# the inner loop: everything but the tests marked slow (Slurm, kills, long benchmarks-like runs), MPI at 2 ranks
test-fast: setup
	$(PY) -m pytest $(PYTEST_FLAGS) -m "not slow" tests --ignore=tests/mpi
	$(MPIEXEC) -n 2 $(PY) -m mpi4py -m pytest $(PYTEST_FLAGS) -m "not slow" --with-mpi tests/mpi

test-serial:
	$(PY) -m pytest $(PYTEST_FLAGS) tests --ignore=tests/mpi

# the MPI suite at 1, 2, 3 and 4 ranks (3 and 4 oversubscribe a 2-core machine; 3 catches uneven
# splits and a rank with nothing to do)
test-mpi:
	for n in 1 2 3 4; do $(MPIEXEC) -n $$n $(PY) -m mpi4py -m pytest $(PYTEST_FLAGS) --with-mpi tests/mpi || exit 1; done

include mk/hpc.mk
include mk/docs.mk

clean:
	rm -rf demo/ .pytest_cache build *.egg-info
