"""The pipeline configuration file (``cubefit.yaml``): schema, defaults, loading and validation.

One YAML file describes a whole run: the cube file, which steps to run, the options of every
step (``ingest``, ``build``, ``weights``, ``solve``, ``recon``, ``plots``) and the environment
knobs (``knobs``: any ``CUBEFIT_*`` variable of :mod:`cubefit_mpi.config.knobs`).  ``SCHEMA`` below is
the single source of truth: :func:`init_config_text` prints it as a commented YAML file and
:func:`load_config` validates against it.

Validation is strict: an unknown key is an :class:`~cubefit_mpi.config.errors.InputError` naming it
with the closest valid key; a value of the wrong type, outside its range or not among its
choices is an error naming the key and what was expected.  Relative paths are resolved against
the directory of the configuration file.

Local (no MPI, no HDF5).
"""
from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from ..config.errors import InputError, KnobError
from ..config.options import default_of, parse_ranges
from ..solvers.exact import solve_exact
from ..solvers.kaczmarz.solver import solve_kaczmarz
from ..solvers.orbit import ORBIT_MODES, ORBIT_TOTALS
from ..stages.build import build_hypercube
from ..stages.plots import make_plots
from ..stages.recon import reconstruct
from ..stages.weights import ensure_lambda_weights
from .runner import PipelineRunner

STEPS = ("ingest", "build", "weights", "solve", "recon", "plots")


@dataclass(frozen=True)
class Option:
    """One configuration key.

    ``kind``: ``int``, ``float``, ``bool``, ``str``, ``path``, ``ranges`` (wavelength ranges in
    Å), ``floats`` (list of numbers), ``steps`` or ``fwhm`` (a positive number, or a path).
    ``example`` is what ``init-config`` writes when it differs from the default (e.g. a
    placeholder file name).
    """

    default: Any
    doc: str
    kind: str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    nullable: bool = False
    example: Any = None


_O = Option
TOP: dict[str, Option] = {
    "file": _O(None, "the cube file (HDF5) every step reads and writes; ingest creates it", "path",
               nullable=True, example="galaxy.h5"),
    "steps": _O(list(STEPS), "steps `run` executes, always in pipeline order "
                "(ingest, build, weights, solve, recon, plots); leave out what is already done", "steps"),
}

SCHEMA: dict[str, dict[str, Option]] = {
    "ingest": {
        "cube": _O(None, "MUSE-like FITS cube: DATA (and STAT) extensions, NAXIS3 = wavelength, CUNIT3 "
                   "Angstrom or nm", "path", nullable=True, example="cube.fits"),
        "bins": _O(None, "optional bin map (FITS image or .npy), shape (NAXIS2, NAXIS1), bin id per "
                   "spaxel, -1 = unused; null = every spaxel with finite data is one spectrum",
                   "path", nullable=True),
        "templates": _O(None, "template library: pPXF-style .npz (templates, lam, ages, metals) or a "
                        "directory of 1-D FITS spectra", "path", nullable=True, example="templates.npz"),
        "losvd": _O(None, "LOSVD file (.npz or .h5) with losvd (n_bins, V, C) and vel (V,) km/s; "
                    "n_bins must equal the number of spectra after binning", "path", nullable=True,
                    example="losvd.npz"),
        "mask_ranges": _O([], "observed-frame wavelength ranges to mask, in Å, e.g. [\"5570:5590\"]", "ranges"),
        "velscale": _O(None, "km/s per observed pixel after log-rebinning; null = keep the pixel count "
                       "(or keep a cube that is already uniform in ln λ as it is)", "float",
                       nullable=True, minimum=1e-6),
        "oversample": _O(2, "template pixels per observed pixel", "int", minimum=1, maximum=64),
        "bin_combine": _O("sum", "how the spaxels of a bin are combined (variances consistently)",
                          "str", choices=("sum", "mean")),
        "flux_density": _O("angstrom", "units of the rebinned spectra: per Å as in the inputs, or per "
                           "unit ln λ (x Δλ/Δlnλ); applied to cube and templates alike", "str",
                           choices=("angstrom", "lnlambda")),
        "rows_per_read": _O(0, "cube rows (NAXIS2) read per slice; 0 = from a 256 MiB budget. The "
                            "result does not depend on it", "int", minimum=0),
        "data_fwhm": _O(None, "the data's spectral resolution: FWHM in Å, or a two-column text file "
                        "(λ, FWHM in Å) as instrument LSF tables come; the templates are broadened to it "
                        "(Gaussian, flux-conserving) before log-rebinning; null = no matching", "fwhm",
                        nullable=True),
        "template_fwhm": _O(None, "the templates' FWHM in Å (MILES: 2.51) or a file as for data_fwhm; "
                            "required with data_fwhm", "fwhm", nullable=True),
    },
    "build": {
        "norm_mode": _O(default_of(build_hypercube, "norm_mode"), "hypercube normalisation: model (LOSVD amplitude) or data (per-spaxel "
                        "data flux split by LOSVD amplitude)", "str", choices=("model", "data")),
        "amp_mode": _O(default_of(build_hypercube, "amp_mode"), "LOSVD amplitude: sum over VelPix or trapezoidal integral", "str",
                       choices=("sum", "trapz")),
        "rebin_mode": _O(default_of(build_hypercube, "rebin_mode"), "/R_T: exact-overlap flux-conserving, or two-tap interpolation "
                         "(the predecessor's)", "str", choices=("overlap", "interp")),
        "s_chunk": _O(0, "spaxels per chunk of /HyperCube/models (0 = automatic)", "int", minimum=0),
        "c_chunk": _O(0, "components per chunk (0 = automatic)", "int", minimum=0),
        "p_chunk": _O(0, "populations per chunk (0 = automatic)", "int", minimum=0),
        "compression": _O("none", "compression of /HyperCube/models", "str", choices=("none", "gzip", "lzf")),
        "resume": _O(True, "keep tiles already marked done in /HyperCube/_done", "bool"),
    },
    "weights": {
        "enable": _O(True, "write /HyperCube/lambda_weights (median spectrum, difference of boxcars)", "bool"),
        "small": _O(default_of(ensure_lambda_weights, "small"), "small boxcar width of the difference of Gaussians, observed pixels", "int", minimum=1),
        "large": _O(default_of(ensure_lambda_weights, "large"), "large boxcar width, observed pixels", "int", minimum=2),
        "min_w": _O(default_of(ensure_lambda_weights, "min_w"), "weight of featureless continuum (weights are mapped to [min_w, 1])", "float",
                    minimum=0.0, maximum=1.0),
    },
    "solve": {
        "method": _O(default_of(PipelineRunner.solve, "method"), "exact (Gram matrix + NNLS to a KKT certificate) or kaczmarz (the "
                     "spec's iterative solver)", "str", choices=("exact", "kaczmarz")),
        "ridge": _O(default_of(solve_exact, "ridge"), "ridge rho (adds rho/2 ||x||^2); null = CUBEFIT_NNLS_L2",
                    "float", minimum=0.0, nullable=True),
        "regul": _O(default_of(solve_exact, "regul"), "smoothness strength over the population grid (pop_shape)", "float", minimum=0.0),
        "regul_order": _O(default_of(solve_exact, "regul_order"), "1 or 2: first or second differences", "int", minimum=1, maximum=2),
        "orbit_weights": _O(None, "optional (C,) target fractions of the component totals", "floats",
                            nullable=True),
        "orbit_mode": _O(default_of(solve_exact, "orbit_mode"), "strict: the component totals are equality constraints "
                         "(met exactly); penalty: a penalty (exact) or nudge (kaczmarz) of strength orbit_strength; "
                         "auto: penalty when orbit_strength is set, else strict", "str", choices=ORBIT_MODES),
        "orbit_totals": _O(default_of(solve_exact, "orbit_totals"), "strict targets as fractions of the total or as "
                           "absolute component totals", "str", choices=ORBIT_TOTALS),
        "orbit_strength": _O(default_of(solve_kaczmarz, "orbit_strength"), "strength of the orbit-weight penalty: mu (exact; required in penalty mode) or the fraction of the way to the targets per tile (kaczmarz; null = 0.1)", "float", minimum=0.0, nullable=True),
        "use_weights": _O(default_of(solve_exact, "use_weights"), "weight pixels by /HyperCube/lambda_weights", "bool"),
        "add_degree": _O(default_of(solve_exact, "add_degree"), "additive Legendre polynomials up to this degree per "
                         "spectrum, eliminated exactly (pPXF's degree; null or -1 = none; exact method only)", "int",
                         minimum=-1, nullable=True),
        "mult_degree": _O(default_of(solve_exact, "mult_degree"), "multiplicative Legendre polynomials of degrees 1..D "
                          "per spectrum (pPXF's mdegree; null or 0 = none; exact method only)", "int", minimum=0,
                          nullable=True),
        "epochs": _O(default_of(solve_kaczmarz, "epochs"), "Kaczmarz epochs", "int", minimum=1),
        "lr": _O(default_of(solve_kaczmarz, "lr"), "Kaczmarz base learning rate", "float", minimum=0.0),
        "warm_start": _O(default_of(solve_kaczmarz, "warm_start"), "Kaczmarz start: zeros, exact, resume or jacobi", "str",
                         choices=("zeros", "exact", "resume", "jacobi")),
    },
    "recon": {
        "enable": _O(True, "reconstruct the model A·x with per-spaxel chi2 and rmse", "bool"),
        "dataset": _O(default_of(reconstruct, "out"), "dataset the reconstruction is written to", "str"),
    },
    "plots": {
        "enable": _O(True, "PNGs: best/worst spectra, population weights, totals, convergence, rmse map", "bool"),
        "outdir": _O("plots", "directory for the figures", "path"),
        "n": _O(default_of(make_plots, "n_spaxels"), "number of best and of worst spaxels to plot", "int", minimum=0),
    },
}


# ---------------------------------------------------------------------------------------------
# the commented template
# ---------------------------------------------------------------------------------------------
def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, float):
        text = repr(value)          # YAML 1.1 (PyYAML) reads 1e-06 as a string: write 1.0e-06
        return text.replace("e", ".0e", 1) if "e" in text and "." not in text else text
    return json.dumps(value)          # strings and lists: JSON is valid YAML


def _describe(opt: Option) -> str:
    parts = [opt.doc.rstrip(".") + "."]
    if opt.choices:
        parts.append(f"One of: {', '.join(opt.choices)}.")
    if opt.minimum is not None or opt.maximum is not None:
        lo = "" if opt.minimum is None else f">= {opt.minimum:g}"
        hi = "" if opt.maximum is None else f"<= {opt.maximum:g}"
        parts.append(f"Range: {' and '.join(p for p in (lo, hi) if p)}.")
    parts.append(f"Default: {_yaml_value(opt.default)}.")
    return " ".join(parts)


def _wrap(text: str, indent: str, width: int = 96) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, initial_indent=indent + "# ", subsequent_indent=indent + "#   ")


def init_config_text() -> str:
    """A commented YAML file with every option of every step and every knob.  Local.

    ``load_config`` accepts it unchanged (placeholder file names are not checked for existence).
    """
    from ..config.knobs import knob_table

    lines = ["# cubefit_mpi pipeline configuration (`cubefit_mpi init-config > cubefit.yaml`).",
             "# Every key is optional unless a step that needs it is listed in `steps`; unknown keys are",
             "# errors.  Relative paths are relative to this file's directory.", ""]
    for key, opt in TOP.items():
        lines += _wrap(_describe(opt), "")
        lines.append(f"{key}: {_yaml_value(opt.example if opt.example is not None else opt.default)}")
    for section, options in SCHEMA.items():
        lines += ["", f"{section}:"]
        for key, opt in options.items():
            lines += _wrap(_describe(opt), "  ")
            lines.append(f"  {key}: {_yaml_value(opt.example if opt.example is not None else opt.default)}")
    lines += ["", "# Environment knobs, exported for every step (the environment itself still wins).",
              "# Uncomment a line to change a value; the values shown are the defaults.", "knobs:"]
    for env, default, doc in knob_table():
        lines.append(f"  # {env}: {_yaml_value(default)}    # {doc}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# loading and validation
# ---------------------------------------------------------------------------------------------
def _unknown(where: str, key: Any, valid) -> InputError:
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
    hint = f" (did you mean {where}{close[0]}?)" if close else f" (valid: {', '.join(valid)})"
    return InputError(f"{where}{key}: unknown key{hint}")


def _check_value(name: str, opt: Option, value: Any, base_dir: str) -> Any:
    if value is None:
        if opt.nullable:
            return None
        raise InputError(f"{name}: expected a value ({opt.kind}), got null")
    kind = opt.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise InputError(f"{name}: expected true or false, got {value!r}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{name}: expected an integer, got {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise InputError(f"{name}: expected a number, got {value!r}")
        value = float(value)
    elif kind in ("str", "path"):
        if not isinstance(value, str) or not value:
            raise InputError(f"{name}: expected a non-empty string, got {value!r}")
        if kind == "path":
            value = os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))
    elif kind == "ranges":
        value = parse_ranges(value, name)
    elif kind == "fwhm":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or value == "":
            raise InputError(f"{name}: expected a FWHM in Å or a file name, got {value!r}")
        if isinstance(value, str):
            value = os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))
        elif not (value > 0 and math.isfinite(value)):
            raise InputError(f"{name}: expected a positive FWHM in Å, got {value!r}")
        else:
            value = float(value)
    elif kind == "floats":
        if not isinstance(value, list) or not value or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                           for v in value):
            raise InputError(f"{name}: expected a non-empty list of numbers, got {value!r}")
        value = [float(v) for v in value]
    elif kind == "steps":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise InputError(f"{name}: expected a list of steps ({', '.join(STEPS)}), got {value!r}")
        for step in value:
            if step not in STEPS:
                close = difflib.get_close_matches(str(step), STEPS, n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]}?)" if close else f" (valid: {', '.join(STEPS)})"
                raise InputError(f"{name}: unknown step {step!r}{hint}")
        value = [s for s in STEPS if s in value]
    if opt.choices is not None and value not in opt.choices:
        raise InputError(f"{name}: expected one of {', '.join(opt.choices)}, got {value!r}")
    if opt.minimum is not None and value < opt.minimum:
        raise InputError(f"{name}: expected a value >= {opt.minimum:g}, got {value!r}")
    if opt.maximum is not None and value > opt.maximum:
        raise InputError(f"{name}: expected a value <= {opt.maximum:g}, got {value!r}")
    return value


def defaults() -> dict:
    """The configuration with every default filled in (no file).  Local."""
    import copy

    cfg = {key: copy.deepcopy(opt.default) for key, opt in TOP.items()}
    cfg.update({section: {k: copy.deepcopy(o.default) for k, o in opts.items()}
                for section, opts in SCHEMA.items()})
    cfg["knobs"] = {}
    return cfg


def validate_config(raw: Any, *, base_dir: str = ".") -> dict:
    """Validate a parsed configuration mapping and fill in the defaults.  Local.

    Returns ``{"file", "steps", "ingest": {...}, ..., "plots": {...}, "knobs": {ENV: text}}``
    where knob values are the strings to export.  Raises :class:`InputError` on the first
    problem (unknown key with the closest valid key, wrong type, value out of range).
    """
    from ..config.knobs import Knobs, knob_table

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"configuration: expected a mapping of keys to values, got {type(raw).__name__}")
    cfg = defaults()
    valid_top = [*TOP, *SCHEMA, "knobs"]
    for key, value in raw.items():
        if key in TOP:
            cfg[key] = _check_value(key, TOP[key], value, base_dir)
        elif key in SCHEMA:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise InputError(f"{key}: expected a mapping of options, got {value!r}")
            for sub, sub_value in value.items():
                if sub not in SCHEMA[key]:
                    raise _unknown(f"{key}.", sub, SCHEMA[key])
                cfg[key][sub] = _check_value(f"{key}.{sub}", SCHEMA[key][sub], sub_value, base_dir)
        elif key == "knobs":
            cfg["knobs"] = _check_knobs(value, [env for env, _, _ in knob_table()], Knobs)
        else:
            raise _unknown("", key, valid_top)
    if "ingest" in cfg["steps"]:
        for key in ("cube", "templates", "losvd"):
            if cfg["ingest"][key] is None:
                raise InputError(f"ingest.{key}: required when steps include ingest")
    if cfg["steps"] and cfg["file"] is None:
        raise InputError("file: required (the cube file the steps work on)")
    return cfg


def _check_knobs(value: Any, valid: list[str], knobs_cls) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"knobs: expected a mapping of CUBEFIT_* names to values, got {value!r}")
    env = {}
    for name, item in value.items():
        if name not in valid:
            raise _unknown("knobs.", name, valid)
        if isinstance(item, (dict, list)) or item is None:
            raise InputError(f"knobs.{name}: expected a single value, got {item!r}")
        env[name] = ("1" if item else "0") if isinstance(item, bool) else str(item)
    try:
        knobs_cls.from_env(env)
    except KnobError as exc:
        raise InputError(f"knobs.{exc}") from None
    return env


def load_config(path) -> dict:
    """Read and validate a YAML configuration file (see :func:`validate_config`).  Local."""
    import yaml

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise InputError(f"{path}: not valid YAML ({problem}{where})") from None
    try:
        return validate_config(raw, base_dir=os.path.dirname(os.path.abspath(path)))
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
