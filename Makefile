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

.PHONY: setup demo demo-config test test-serial test-mpi clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh "$(DEMO)" "$(NP)"

# the same pipeline driven by a configuration file (init-config -> run)
demo-config: setup
	@bash scripts/demo_config.sh demo/config_run "$(NP)"

test: setup test-serial test-mpi

test-serial:
	$(PY) -m pytest $(PYTEST_FLAGS) tests --ignore=tests/mpi

# the MPI suite at 2 and 3 ranks (3 oversubscribes this 2-core machine and catches uneven splits)
test-mpi:
	$(MPIEXEC) -n 2 $(PY) -m mpi4py -m pytest $(PYTEST_FLAGS) --with-mpi tests/mpi
	$(MPIEXEC) -n 3 $(PY) -m mpi4py -m pytest $(PYTEST_FLAGS) --with-mpi tests/mpi

include mk/hpc.mk
include mk/docs.mk

clean:
	rm -rf demo/ .pytest_cache build *.egg-info
