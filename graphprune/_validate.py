"""Parameter checks that fail early with one sentence shape:
"The 'sparsity' parameter of prune must be a float in [0, 1). Got 1.5 instead." """

from __future__ import annotations

import numbers
from typing import Any

from .errors import ConfigError


def check_fraction(value: Any, name: str, owner: str, *, allow_one: bool = False) -> float:
    """A float in [0, 1) (or [0, 1] with ``allow_one``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    hi = "1]" if allow_one else "1)"
    if ok:
        v = float(value)
        ok = 0.0 <= v <= 1.0 if allow_one else 0.0 <= v < 1.0
    if not ok:
        raise ConfigError(
            f"The '{name}' parameter of {owner} must be a float in [0, {hi}. Got {value!r} instead.",
            param=name)
    return float(value)


def check_int(value: Any, name: str, owner: str, *, low: int = 0) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ConfigError(
            f"The '{name}' parameter of {owner} must be an int >= {low}. Got {value!r} instead.",
            param=name)
    return int(value)


def check_choice(value: Any, name: str, owner: str, options: tuple[str, ...]) -> str:
    if value not in options:
        from .errors import did_you_mean

        raise ConfigError(
            f"The '{name}' parameter of {owner} must be one of {', '.join(map(repr, options))}. "
            f"Got {value!r} instead.{did_you_mean(str(value), [str(o) for o in options])}",
            param=name)
    return value
