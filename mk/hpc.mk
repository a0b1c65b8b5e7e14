# Supercomputer proofs (included from the Makefile).  Both need root; see docs/hpc.md.
#   make slurm-test        start a single-node Slurm (installs slurm-wlm/munge when missing), run the
#                          jobscripts on it (tests/test_slurm.py, ~1-3 minutes), stop it
#   make container-check   replay containers/cubefit_mpi.def in a debootstrap chroot: %files, %post,
#                          %environment, %test, %runscript (~10 minutes, mostly compiling h5py);
#                          the debootstrapped base is cached in $(DEFROOT)
.PHONY: slurm-test container-check

PY           ?= .venv/bin/python
PYTEST_FLAGS ?= -q -p no:cacheprovider
DEFROOT      ?= .cache/defroot

slurm-test:
	$(PY) -m pytest $(PYTEST_FLAGS) tests/test_slurm.py

container-check:
	bash scripts/validate_def.sh containers/cubefit_mpi.def . $(DEFROOT)
