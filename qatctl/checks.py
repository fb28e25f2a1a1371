"""Range checks for numbers read from flags, files and requests: one line naming the option."""

from __future__ import annotations

import math

from qatctl.errors import QatctlError


def finite(name: str, value, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """`value` as a finite float within [lo, hi] (lo excluded with lo_open); else a QatctlError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise QatctlError(f"{name} {value!r}: not a number") from None
    if not math.isfinite(v):
        raise QatctlError(f"{name} {value}: must be a finite number")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise QatctlError(f"{name} {value}: must be {'>' if lo_open else '>='} {lo:g}")
    if hi is not None and v > hi:
        raise QatctlError(f"{name} {value}: must be <= {hi:g}")
    return v


def at_least(minimum: int, **flags) -> None:
    """Each integer option (its flag name, underscores for dashes: max_new_tokens=5) is >= minimum;
    None means unset and passes. The error names the first that is not."""
    for name, value in flags.items():
        if value is not None and value < minimum:
            raise QatctlError(f"--{name.replace('_', '-')} {value}: must be >= {minimum}")


def fields_at_least(config, minimum: int, *names: str) -> None:
    """at_least over a stage config's fields (named as their flags)."""
    at_least(minimum, **{n: getattr(config, n) for n in names})
