"""The parallel layer: the communicator and the launcher's variables, who owns which tiles,
collectives (float64 reductions, broadcasts, one verdict for all ranks), rank-0 output, timers,
BLAS threads per rank.  No HDF5, no numerics."""
