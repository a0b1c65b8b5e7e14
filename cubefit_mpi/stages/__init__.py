"""One user-visible step each (mock, ingest, build, hypercube maintenance, λ-weights, recon,
plots, status, the fit tracker and watch): they orchestrate numerics, io and parallel."""
