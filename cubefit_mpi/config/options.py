"""Options: one default per option, unknown keywords refused, values checked by one rule each.

* :func:`default_of` reads a default from the Python signature that owns it: the command line
  and the YAML schema take their defaults from there, so the three cannot disagree;
* :func:`keyword_checked` makes a public function refuse an unknown keyword with a
  ``TypeError`` naming it and the closest valid name (a typo such as ``epoch=5`` is never
  silently ignored);
* :func:`check_number` refuses NaN, infinities and values out of range, naming the option;
  :func:`parse_ranges` reads wavelength ranges.

Local (no MPI, no I/O); imports nothing of cubefit_mpi but :mod:`.errors`.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import math
from typing import Any, Callable

from .errors import InputError


def default_of(fn: Callable, name: str) -> Any:
    """The default of parameter ``name`` in ``fn``'s signature.  Local.

    Raises ``KeyError`` when ``fn`` has no such parameter or it has no default.
    """
    param = inspect.signature(inspect.unwrap(fn)).parameters[name]
    if param.default is inspect.Parameter.empty:
        raise KeyError(f"{fn.__qualname__}: parameter {name!r} has no default")
    return param.default


def closest(name: str, valid) -> str:
    """`` (did you mean X?)`` for the closest of ``valid``, or an empty string.  Local."""
    match = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def keyword_checked(fn: Callable) -> Callable:
    """Decorate a public function: an unknown keyword is a ``TypeError`` naming it and the closest
    valid keyword, raised before the function runs.  Local."""
    sig = inspect.signature(fn)
    valid = [n for n, p in sig.parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        unknown = [k for k in kwargs if k not in valid]
        if unknown:
            raise TypeError(f"{fn.__qualname__}(): unknown keyword {unknown[0]!r}{closest(unknown[0], valid)}; "
                            f"valid keywords: {', '.join(valid)}")
        return fn(*args, **kwargs)

    return wrapper


def check_number(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
                 strict_minimum: bool = False, integer: bool = False):
    """``value`` as a float (or int), refusing NaN, ±inf and values out of range.  Local.

    Raises :class:`InputError` naming the option (``name``, e.g. ``--ridge``) and what was expected.
    """
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r}: expected a number") from None
    if not math.isfinite(number):
        raise InputError(f"{name}={value!r}: expected a finite number")
    if integer:
        if number != int(number):
            raise InputError(f"{name}={value!r}: expected an integer")
        number = int(number)
    if minimum is not None and (number < minimum or (strict_minimum and number == minimum)):
        raise InputError(f"{name}={value!r}: expected a value {'>' if strict_minimum else '>='} {minimum:g}")
    if maximum is not None and number > maximum:
        raise InputError(f"{name}={value!r}: expected a value <= {maximum:g}")
    return number


def parse_ranges(value: Any, name: str = "mask_ranges") -> list[list[float]]:
    """Wavelength ranges from ``"lo:hi,lo:hi"``, ``["lo:hi", ...]`` or ``[[lo, hi], ...]`` (Å).  Local."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise InputError(f"{name}: expected a list of LO:HI wavelength ranges in Å, got {value!r}")
    out = []
    for item in items:
        try:
            if isinstance(item, str):
                lo_text, hi_text = item.strip().split(":")
                lo, hi = float(lo_text), float(hi_text)
            elif isinstance(item, (list, tuple)) and len(item) == 2 and not any(isinstance(v, bool) for v in item):
                lo, hi = float(item[0]), float(item[1])
            else:
                raise ValueError
        except (ValueError, TypeError):
            raise InputError(f"{name}: expected LO:HI wavelength ranges in Å (e.g. 5570:5590), got {item!r}") from None
        if not (0 < lo < hi < float("inf")):
            raise InputError(f"{name}: range {item!r} must satisfy 0 < LO < HI (Å)")
        out.append([lo, hi])
    return out
