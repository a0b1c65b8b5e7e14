"""The design matrix A behind one interface (:mod:`.base`): read from ``/HyperCube/models``
(:mod:`.hypercube`) or made from its two factors, kernel taps × shifted rebinned templates
(:mod:`.factored`); :mod:`.select` picks one for a file (``--operator auto|factored|hypercube``)."""
