"""The spec's batched Kaczmarz solver on MPI: :mod:`.solver` (rank grid, rounds, epochs),
:mod:`.steps` (the per-band numerics), :mod:`.band_design`, :mod:`.inputs`."""
