"""The HDF5 layout: every dataset name of the spec (``CubeFit.md``, "HDF5 layout") and our additions.

Spec datasets keep their spec meaning.  Additions live under new groups (``/Truth``,
``/Solve``, ``/Spaxels``) and never change the meaning of a spec dataset.  Local (no I/O).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

# --- core inputs (spec) ---------------------------------------------------------------------
TEMPLATES = "/Templates"            # (P, T) float64, template spectra on the template grid
TEM_PIX = "/TemPix"                 # (T,)  ln lambda of the template grid (uniform)
OBS_PIX = "/ObsPix"                 # (L,)  ln lambda of the observed grid
R_T = "/R_T"                        # (T, L) rebin operator (flux conserving)
LOSVD = "/LOSVD"                    # (S, V, C) LOSVD histograms
VEL_PIX = "/VelPix"                 # (V,)  velocity bin centres, km/s
DATACUBE = "/DataCube"              # (S, L) float64 observed spectra (ARCHITECTURE addition)
# --- optional inputs ------------------------------------------------------------------------
MASK = "/Mask"                      # (L,) bool, True = pixel used
DATA_FLUX = "/HyperCube/data_flux"  # (S,) masked mean data flux per spaxel
# --- built artifacts ------------------------------------------------------------------------
HYPERCUBE = "/HyperCube"
MODELS = "/HyperCube/models"        # (S, C, P, L) float32
DONE = "/HyperCube/_done"           # (nS_tiles, nC_tiles, nP_tiles) uint8 bitmap
COL_ENERGY = "/HyperCube/col_energy"            # (C, P) float64
LOSVD_AMP = "/HyperCube/norm/losvd_amp"         # (S, C)
LOSVD_AMP_SUM = "/HyperCube/norm/losvd_amp_sum"  # (S,)
LAMBDA_WEIGHTS = "/HyperCube/lambda_weights"    # (L,)
# --- fit outputs ----------------------------------------------------------------------------
X_GLOBAL = "/X_global"              # (C*P,) row-major over (C, P)
# --- additions --------------------------------------------------------------------------------
TRUTH = "/Truth"                    # synthetic galaxies: x_true and generating parameters
TRUTH_X = "/Truth/x"                # (C, P)
SPAXEL_XY = "/Spaxels/xy"           # (S, 2) spaxel coordinates (arcsec), when known
DATA_VAR = "/DataVar"                       # (S, L) float64 variance of /DataCube (ingest)
SPAXELS_YX = "/Spaxels/yx"                  # (S, 2) int64 (y, x) of each spectrum (unbinned)
SPAXELS_BIN_MAP = "/Spaxels/bin_map"        # (ny, nx) int64 bin id used per spaxel (binned), -1 unused
SPAXELS_N_MEMBERS = "/Spaxels/n_members"    # (S,) int64 spaxels combined into each spectrum
SPAXELS_DROPPED = "/Spaxels/dropped_yx"     # (n, 2) int64 spaxels left out: no usable value
SOLVE = "/Solve"                    # exact solver cache & certificate
ADD_POLY = "/Solve/add_poly"        # (S, D_a + 1) float64 additive Legendre coefficients (solve --add-degree)
MULT_POLY = "/Solve/mult_poly"      # (S, D_m) float64 multiplicative Legendre coefficients (solve --mult-degree)
X_EXACT = "/Solve/x_exact"          # (C*P,) the exact /X_global, kept when Kaczmarz overwrites it
UNCERTAINTY = "/Uncertainty"        # bootstrap of the exact fit (solvers.uncertainty)
UNCERTAINTY_REPLICATES = "/Uncertainty/replicates"   # (R, N) float32, row r = replicate r's x
UNCERTAINTY_DONE = "/Uncertainty/_done"              # (R,) uint8, 1 = row r is final



@dataclass(frozen=True)
class H5Dims:
    """Dimensions of a cube file (spec names).

    Parameters
    ----------
    nSpat : int      S, spaxels (or Voronoi bins)
    nLSpec : int     L, observed wavelength pixels
    nTSpec : int     T, template wavelength pixels
    nVel : int       V, LOSVD velocity bins
    nComp : int      C, dynamical components (orbit bundles)
    nPop : int       P, stellar populations (templates)
    """

    nSpat: int
    nLSpec: int
    nTSpec: int
    nVel: int
    nComp: int
    nPop: int

    def __post_init__(self):
        for name, value in asdict(self).items():
            if int(value) != value or value < 1:
                raise ValueError(f"H5Dims.{name}={value!r}: expected a positive integer")

    @property
    def S(self) -> int:
        return self.nSpat

    @property
    def L(self) -> int:
        return self.nLSpec

    @property
    def T(self) -> int:
        return self.nTSpec

    @property
    def V(self) -> int:
        return self.nVel

    @property
    def C(self) -> int:
        return self.nComp

    @property
    def P(self) -> int:
        return self.nPop

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of every core dataset."""
        S, L, T, V, C, P = self.S, self.L, self.T, self.V, self.C, self.P
        return {TEMPLATES: (P, T), TEM_PIX: (T,), OBS_PIX: (L,), R_T: (T, L), LOSVD: (S, V, C),
                VEL_PIX: (V,), DATACUBE: (S, L), MASK: (L,), DATA_FLUX: (S,),
                MODELS: (S, C, P, L), COL_ENERGY: (C, P), LOSVD_AMP: (S, C), LOSVD_AMP_SUM: (S,),
                LAMBDA_WEIGHTS: (L,), X_GLOBAL: (C * P,)}
