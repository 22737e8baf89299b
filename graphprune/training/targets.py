"""Which weights a training-time method compresses: an NNI-style config list resolved against a
model, and the granularities a mask can have.

``element`` masks single weights; ``kernel`` whole k x k kernels (one input channel of one
filter); ``filter`` and ``channel`` remove whole coupled channel units of the dependency graph
(the producing filters, their BatchNorm, the consumers' input channels together), so that the
masked model is exactly the model ``finalize()`` shrinks physically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .._validate import check_choice, check_fraction
from ..opmatch import op_matches
from ..errors import ConfigError, did_you_mean

GRANULARITIES = ("element", "kernel", "filter", "channel")
DEFAULT_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Linear")


@dataclass(frozen=True)
class Target:
    """One compressed layer: its module path, weight name and settings."""

    module: str
    param: str  # state_dict name of the weight
    sparsity: tuple[float, ...]  # one value, or one per stage
    granularity: str


def resolve(model: nn.Module, config_list: Sequence[Mapping[str, Any]], *,
            granularity: str = "element", owner: str = "pruner") -> list[Target]:
    """Targets of ``config_list`` in ``model``; later entries override earlier ones.

    Entry keys: ``sparsity`` (a float or a list of per-stage floats), ``op_types`` (class names,
    'default' = Conv and Linear), ``op_names`` (module paths, globs), ``exclude``, ``granularity``.
    """
    check_choice(granularity, "granularity", owner, GRANULARITIES)
    if not isinstance(config_list, Sequence) or isinstance(config_list, (str, bytes)) or not config_list:
        raise ConfigError(f"{owner} needs a non-empty config list such as [{{'sparsity': 0.8, "
                          f"'op_types': ['default']}}]. Got {config_list!r}.")
    mods = dict(model.named_modules())
    chosen: dict[str, Target] = {}
    allowed = {"sparsity", "op_types", "op_names", "exclude", "granularity"}
    for i, e in enumerate(config_list):
        if not isinstance(e, Mapping):
            raise ConfigError(f"{owner}: config list entry {i} must be a dict. Got {e!r}.")
        for k in e:
            if k not in allowed:
                raise ConfigError(f"Unknown key '{k}' in config list entry {i} of {owner}. "
                                  f"Allowed: {', '.join(sorted(allowed))}.{did_you_mean(k, allowed)}")
        types = list(e.get("op_types", ["default"]))
        names = list(e.get("op_names", []))
        if "op_types" not in e and "op_names" not in e and not e.get("exclude"):
            types = ["default"]
        gran = e.get("granularity", granularity)
        check_choice(gran, "granularity", owner, GRANULARITIES)
        sp: tuple[float, ...] = ()
        if not e.get("exclude"):
            raw = e.get("sparsity")
            if raw is None:
                raise ConfigError(f"{owner}: config list entry {i} needs 'sparsity' (or "
                                  "'exclude': True).")
            sp = tuple(raw) if isinstance(raw, (list, tuple)) else (raw,)
            if not sp:
                raise ConfigError(f"{owner}: config list entry {i} has an empty sparsity list.")
            for s in sp:
                check_fraction(s, "sparsity", owner)
            if any(b < a for a, b in zip(sp, sp[1:])):
                raise ConfigError(f"{owner}: the staged sparsities of entry {i} must not decrease. "
                                  f"Got {list(sp)}.")
        for n, m in mods.items():
            if not op_matches(n, type(m).__name__, types, names, DEFAULT_TYPES):
                continue
            if getattr(m, "weight", None) is None:
                continue
            if e.get("exclude"):
                chosen.pop(n, None)
            else:
                chosen[n] = Target(n, f"{n}.weight" if n else "weight", sp, gran)
    if not chosen:
        raise ConfigError(f"{owner}: the config list matches no layer of {type(model).__name__} "
                          f"(op_types are class names such as "
                          f"{', '.join(sorted({type(m).__name__ for m in mods.values()})[:5])}; "
                          "op_names are module paths).")
    return list(chosen.values())
