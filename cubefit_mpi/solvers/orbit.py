"""Orbit weights: targets of the component totals ``T_c = Σ_p x_cp``, as a penalty or as constraints.

``--orbit-weights t`` gives one target per component; ``--orbit-mode``

* ``penalty``: the exact solve adds ``½μ Σ_c (T_c − t_c Σx)²`` (``--orbit-strength μ``,
  required); Kaczmarz moves the totals a fraction η (``--orbit-strength``, default 0.1) of
  the way to the targets after every tile;
* ``strict``: the totals are constraints: ``T_c = t_c Σx`` (``--orbit-totals fractions``, t
  normalised to sum 1) or ``T_c = m_c`` (``--orbit-totals absolute``, the values as given,
  masses in the units of x).  The exact solve adds them to the NNLS
  (:func:`~cubefit_mpi.numerics.nnls_equality.nnls_equality`) and certifies the result with
  their multipliers; Kaczmarz rescales each component's block to its target after every tile
  (an exact, mass-preserving projection for fractions);
* ``auto`` (the default): ``penalty`` when ``--orbit-strength`` is given, else ``strict``.

Local (no MPI) except where noted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..config.errors import ConsistencyError, InputError

ORBIT_MODES = ("auto", "strict", "penalty")
ORBIT_TOTALS = ("fractions", "absolute")
DEFAULT_ORBIT_MODE = "auto"
DEFAULT_ORBIT_TOTALS = "fractions"


def parse_orbit_weights(spec, n_comp: int, path: str | None = None, *, normalise: bool = True
                        ) -> np.ndarray | None:
    """Orbit-weight targets (C,) from an array, a dataset of ``path`` ("/..."), a .npy/.txt file or
    "a,b,c"; normalised to sum 1 unless ``normalise`` is False.  Local.  Raises
    :class:`InputError` on a wrong length or sign."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if os.path.isfile(spec):           # an existing file wins, even an absolute path such as /data/w.npy
            try:
                values = np.load(spec).ravel() if spec.endswith(".npy") else np.loadtxt(spec).ravel()
            except (OSError, ValueError) as exc:
                raise InputError(f"--orbit-weights {spec}: not a readable .npy or text file of numbers "
                                 f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        elif spec.startswith("/"):
            import h5py

            with h5py.File(path, "r") as f:
                if spec not in f:
                    raise InputError(f"--orbit-weights {spec}: no such dataset in {path}")
                values = np.asarray(f[spec][...], dtype=np.float64).ravel()
        else:
            try:
                values = np.array([float(v) for v in spec.split(",")])
            except ValueError:
                raise InputError(f"--orbit-weights {spec}: expected a dataset (/...), a .npy/.txt file or "
                                 f"comma-separated numbers") from None
    else:
        values = np.asarray(spec, dtype=np.float64).ravel()
    if values.size != n_comp:
        raise InputError(f"--orbit-weights: expected {n_comp} values (one per component), got {values.size}")
    if not np.all(np.isfinite(values)) or np.any(values < 0) or values.sum() <= 0:
        raise InputError("--orbit-weights: expected finite non-negative values with a positive sum")
    return values / values.sum() if normalise else values


@dataclass(frozen=True)
class OrbitSpec:
    """The orbit-weight settings of one solve.

    Attributes
    ----------
    mode : "strict", "penalty" or "none" (no orbit weights)
    totals : "fractions" or "absolute"
    targets : (C,) float64 or None: fractions summing to 1, or the absolute totals m_c
    strength : float or None, ``--orbit-strength`` as given
    """

    mode: str
    totals: str
    targets: np.ndarray | None
    strength: float | None

    @property
    def strict(self) -> bool:
        return self.mode == "strict"

    @property
    def fractions(self) -> np.ndarray | None:
        """The targets as fractions of Σ x (what plots show).  Local."""
        return None if self.targets is None else self.targets / self.targets.sum()


def orbit_spec(orbit_weights, n_comp: int, path: str | None = None, *, mode: str = DEFAULT_ORBIT_MODE,
               totals: str = DEFAULT_ORBIT_TOTALS, strength: float | None = None) -> OrbitSpec:
    """Check the orbit options together and resolve ``auto``.  Local (reads ``path`` for a dataset).

    Raises :class:`InputError` for an unknown mode or totals, strict/penalty or absolute without
    targets, ``--orbit-strength`` with strict, or absolute totals with the penalty.
    """
    if mode not in ORBIT_MODES:
        raise InputError(f"--orbit-mode {mode}: expected one of {', '.join(ORBIT_MODES)}")
    if totals not in ORBIT_TOTALS:
        raise InputError(f"--orbit-totals {totals}: expected one of {', '.join(ORBIT_TOTALS)}")
    if orbit_weights is None:
        if mode != DEFAULT_ORBIT_MODE or totals != DEFAULT_ORBIT_TOTALS:
            raise InputError(f"--orbit-mode {mode} / --orbit-totals {totals}: need --orbit-weights")
        return OrbitSpec("none", totals, None, strength)
    targets = parse_orbit_weights(orbit_weights, n_comp, path, normalise=totals == "fractions")
    if mode == "auto":
        mode = "penalty" if strength is not None else "strict"
    if mode == "strict" and strength is not None:
        raise InputError("--orbit-strength: not used by --orbit-mode strict (the totals are met exactly); "
                         "drop it, or use --orbit-mode penalty")
    if mode == "penalty" and totals == "absolute":
        raise InputError("--orbit-totals absolute: needs --orbit-mode strict (the penalty and the Kaczmarz "
                         "nudge act on fractions of the total)")
    return OrbitSpec(mode, totals, targets, strength)


def orbit_constraints(spec: OrbitSpec, n_pop: int) -> tuple[np.ndarray, np.ndarray]:
    """``(M (C, C·P), d (C,))`` of the strict constraints ``M x = d``.  Local.

    Fractions: ``M = E − t 1ᵀ``, ``d = 0`` (E sums each component's block); absolute: ``M = E``,
    ``d = m``.
    """
    from ..numerics.regularization import orbit_factor

    C = spec.targets.size
    if spec.totals == "fractions":
        return orbit_factor(C, n_pop, spec.targets, 1.0), np.zeros(C)
    return np.kron(np.eye(C), np.ones((1, n_pop))), spec.targets.copy()


def check_lit(spec: OrbitSpec, diag: np.ndarray, n_pop: int) -> None:
    """A component with a positive target must have a column with light.  Local.

    Raises :class:`InputError` naming the first such component (its weights would not be
    determined by the data, and for fractions the constraints would force x = 0).
    """
    from ..numerics.certificate import zero_column_mask

    lit = (~zero_column_mask(np.asarray(diag, dtype=np.float64))).reshape(-1, n_pop).any(axis=1)
    dark = np.flatnonzero((spec.targets > 0) & ~lit)
    if dark.size:
        c = int(dark[0])
        raise InputError(f"--orbit-weights: component {c} has no light (its columns of A are all zero) but its "
                         f"target is {spec.targets[c]:.6g}; strict orbit weights cannot be met (give it 0, or use "
                         f"--orbit-mode penalty)")


def strict_nnls(total: np.ndarray, rhs: np.ndarray, spec: OrbitSpec, n_pop: int, *, tol: float = 1e-10,
                x0=None, solver=None):
    """The exact NNLS of ``(total, rhs)`` under the strict orbit constraints, certified.  Local.

    Returns ``(x (N,), multipliers (C,), certificate, result)``; the certificate is
    :func:`~cubefit_mpi.numerics.certificate.certify` of ``(total, rhs − Mᵀλ, x)``.  Raises
    :class:`InputError` for targets no x ≥ 0 meets and :class:`ConsistencyError` when the
    result cannot be certified (KKT with the multipliers, and ``‖Mx − d‖`` within
    ``CONSTRAINT_RTOL``).
    """
    from ..numerics.certificate import certify
    from ..numerics.nnls_equality import CONSTRAINT_RTOL, InfeasibleConstraints, nnls_equality

    check_lit(spec, total.diagonal(), n_pop)
    M, d = orbit_constraints(spec, n_pop)
    try:
        result = nnls_equality(total, rhs, M, d, solver=solver, tol=tol, x0=x0)
    except InfeasibleConstraints as exc:
        raise InputError(f"--orbit-weights: {exc}") from None
    cert = certify(total, rhs - M.T @ result.multipliers, result.x)
    if not (cert.ok and result.constraint_residual <= CONSTRAINT_RTOL):
        raise ConsistencyError(f"strict orbit weights: the solution could not be certified (KKT "
                               f"{'ok' if cert.ok else 'not met'}: dual_min {cert.dual_min:.3g}, passive "
                               f"{cert.passive_stationarity:.3g}, tol {cert.tol:.3g}; constraint residual "
                               f"{result.constraint_residual:.3g} > {CONSTRAINT_RTOL:g}; {result.message}); "
                               f"/X_global was not written")
    return result.x, result.multipliers, cert, result
