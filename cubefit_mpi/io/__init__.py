"""HDF5 and file I/O: the layout's dataset names, opening files (MPI-IO), collective block I/O,
``H5Manager``, input validation, the usable-hypercube check, read-ahead, the readers of
external inputs (FITS, npz) and the fit-tracker sidecar format."""
