"""Solvers for the global non-negative weights x (C*P,): ``exact`` (Gram matrix + active-set NNLS,
with a working-set variant when the Gram matrix does not fit) and ``kaczmarz`` (the spec's
iterative method)."""
