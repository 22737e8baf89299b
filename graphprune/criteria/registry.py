"""The criteria registry.

Two kinds, one table:

- a *score* criterion is a pure function ``fn(group, ctx) -> np.ndarray`` returning one finite
  score per unit of ``group`` (higher = keep); those that need data declare ``needs_data=True``
  and read ``ctx.calibration``;
- a *selector* is ``fn(group, stats, n_keep) -> (kept indices, scores)``: it chooses the channels
  from ``GroupStats`` (sampled contributions of the group's channels to its consumers' outputs).

None of them touches global state or installs hooks.
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
    fn: Callable[..., Any]
    needs_data: bool = False
    doc: str = ""
    kind: str = "score"  # 'score' or 'select'


@dataclass
class ScoreContext:
    """What a criterion may read: parameters by canonical name, a seeded RNG, calibration data."""

    params: dict[str, torch.Tensor]
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    calibration: Any = None
    graph: Any = None
    cache: dict[str, Any] = field(default_factory=dict)  # shared work across groups


_CRITERIA: dict[str, Criterion] = {}


def criterion(name: str, *, needs_data: bool = False) -> Callable[[ScoreFn], ScoreFn]:
    """Register a scoring function under ``name``: ``fn(group, ctx) -> scores`` with one
    finite score per unit of the group (higher = keep).

    Example:
        >>> @graphprune.criterion("abs_bias")
        ... def abs_bias(group, ctx):
        ...     return sum(np.bincount(m.unit, ctx.params[m.param].abs().numpy()[m.index],
        ...                            minlength=group.size)
        ...                for m in group.members if m.param.endswith(".bias"))
        >>> graphprune.prune(model, x, method="abs_bias")
    """

    def deco(fn: ScoreFn) -> ScoreFn:
        _CRITERIA[name] = Criterion(name, fn, needs_data, (fn.__doc__ or "").strip())
        return fn

    return deco


def selector(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a data-driven channel selector under ``name`` (always needs data)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _CRITERIA[name] = Criterion(name, fn, True, (fn.__doc__ or "").strip(), "select")
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
    """Registered criterion names -> first line of their docstring.

    Example:
        >>> sorted(graphprune.list_criteria())   # ['bn_scale', 'fpgm', 'greedy', 'l1', ...]
    """
    return {k: " ".join(v.doc.split("\n\n")[0].split()) for k, v in sorted(_CRITERIA.items())}


def score_group(crit: Criterion, group: Group, ctx: ScoreContext) -> np.ndarray:
    """Run ``crit`` on ``group`` and check that it returned one finite score per unit."""
    if crit.kind != "score":
        raise ConfigError(f"'{crit.name}' selects channels from consumer statistics; it has no "
                          "per-group score.")
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
