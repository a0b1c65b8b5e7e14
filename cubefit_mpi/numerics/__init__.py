"""Pure numerics: functions of NumPy arrays, no MPI, no I/O (kernels, convolution, rebinning,
λ-weights, NNLS and its certificate, regularisation, synthetic galaxies, digests)."""
