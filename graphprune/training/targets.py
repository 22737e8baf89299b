"""Which weights a training-time method compresses: an NNI-style config list resolved against a
model (``graphprune.opmatch.resolve_config``, the one resolver of the mask pruners, ADMM and the
joint budgets), and the granularities a mask can have.

A config list is a list of dicts; each selects modules and says what to do with them. Later
entries override earlier ones; ``"exclude": True`` takes the modules it selects out again.

- ``op_types``: class names (``"Conv2d"``); ``"default"`` = the convolution and linear layers
  (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, ``nn.Linear`` and their subclasses).
- ``op_names``: module paths, shell globs allowed (``"layer3.*"``).
- Omitted ``op_types``: any class when ``op_names`` is given, else ``["default"]``; omitted
  ``op_names``: any path. Only modules with a weight of two or more dimensions are compressed.

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
from ..errors import ConfigError
from ..opmatch import (  # noqa: F401  (re-exported: the resolver's home is opmatch)
    DEFAULT_CLASSES, DEFAULT_TYPES, SELECTION_KEYS, Selector, has_weight_matrix, resolve_config,
)

GRANULARITIES = ("element", "kernel", "filter", "channel")


def weight_name(module_path: str) -> str:
    """The state_dict name of a module's weight."""
    return f"{module_path}.weight" if module_path else "weight"


# ---------------------------------------------------------------------- mask pruner targets
@dataclass(frozen=True)
class Target:
    """One compressed layer: its module path, weight name and settings."""

    module: str
    param: str  # state_dict name of the weight
    sparsity: tuple[float, ...]  # one value, or one per stage
    granularity: str


def resolve(model: nn.Module, config_list: Sequence[Mapping[str, Any]], *,
            granularity: str = "element", owner: str = "pruner") -> list[Target]:
    """Targets of ``config_list`` in ``model`` (entry keys: the selection keys, ``sparsity`` — a
    float or a non-decreasing list of per-stage floats — and ``granularity``).

    Example:
        >>> [t.param for t in resolve(net, [{"sparsity": 0.5, "op_types": ["Conv2d"]}])]
        ['conv1.weight', 'conv2.weight']

    Raises:
        ConfigError: see ``resolve_config``; a sparsity outside [0, 1), a decreasing schedule, an
            unknown granularity.
    """
    check_choice(granularity, "granularity", owner, GRANULARITIES)

    def parse(e: Mapping[str, Any], where: str) -> tuple[tuple[float, ...], str]:
        raw = e.get("sparsity")
        if raw is None:
            raise ConfigError(f"{where[0].upper()}{where[1:]} needs 'sparsity' (or "
                              "'exclude': True).")
        sp = tuple(raw) if isinstance(raw, (list, tuple)) else (raw,)
        if not sp:
            raise ConfigError(f"{where[0].upper()}{where[1:]} has an empty sparsity list.")
        sp = tuple(check_fraction(s, "sparsity", owner) for s in sp)
        if any(b < a for a, b in zip(sp, sp[1:])):
            raise ConfigError(f"The staged sparsities of {where} must not decrease. Got {list(sp)}.")
        gran = e.get("granularity", granularity)
        check_choice(gran, "granularity", owner, GRANULARITIES)
        return sp, gran

    chosen = resolve_config(model, config_list, parse, keys=("sparsity", "granularity"),
                            owner=owner, example="[{'sparsity': 0.8, 'op_types': ['default']}]")
    return [Target(n, weight_name(n), sp, gran) for n, (sp, gran) in chosen.items()]
