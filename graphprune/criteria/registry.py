"""The criteria registry.

A criterion is a pure function ``fn(group, ctx) -> np.ndarray`` returning one finite score per
unit of ``group`` (higher = keep). Criteria that need data declare ``needs_data=True`` and read
``ctx.calibration``; none of them touches global state or hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, unknown_name
from ..graph import Group

ScoreFn = Callable[[Group, "ScoreContext"], np.ndarray]


@dataclass(frozen=True)
class Criterion:
    name: str
    fn: ScoreFn
    needs_data: bool = False
    doc: str = ""


@dataclass
class ScoreContext:
    """What a criterion may read: parameters by canonical name, a seeded RNG, calibration data."""

    params: dict[str, torch.Tensor]
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    calibration: Any = None
    graph: Any = None
    options: dict[str, Any] = field(default_factory=dict)


_CRITERIA: dict[str, Criterion] = {}


def criterion(name: str, *, needs_data: bool = False) -> Callable[[ScoreFn], ScoreFn]:
    """Register a scoring function under ``name``."""

    def deco(fn: ScoreFn) -> ScoreFn:
        _CRITERIA[name] = Criterion(name, fn, needs_data, (fn.__doc__ or "").strip())
        return fn

    return deco


def get_criterion(name: str) -> Criterion:
    if not isinstance(name, str):
        raise ConfigError(f"The 'method' parameter must be a str. Got {type(name).__name__} instead.")
    try:
        return _CRITERIA[name]
    except KeyError:
        raise unknown_name("pruning method", name, _CRITERIA) from None


def list_criteria() -> dict[str, str]:
    """Registered criterion names -> first line of their docstring."""
    return {k: v.doc.splitlines()[0] if v.doc else "" for k, v in sorted(_CRITERIA.items())}


def score_group(crit: Criterion, group: Group, ctx: ScoreContext) -> np.ndarray:
    """Run ``crit`` on ``group`` and check that it returned one finite score per unit."""
    s = np.asarray(crit.fn(group, ctx), dtype=np.float64).ravel()
    if s.shape != (group.size,):
        raise ConfigError(
            f"criterion '{crit.name}' returned {s.shape[0]} scores for group '{group.name}' "
            f"which has {group.size} channels"
        )
    if not np.all(np.isfinite(s)):
        s = np.nan_to_num(s, nan=-np.inf, posinf=np.finfo(np.float64).max, neginf=-np.inf)
        s[~np.isfinite(s)] = np.finfo(np.float64).min
    return s
