"""Which modules an NNI-style config-list entry selects, shared by pruning, quantization and the
training-time methods: ``op_types`` are class names ('default' = the convolution and linear
layers, subclasses included; None = any class), ``op_names`` module paths with shell globs (empty
= any path). An entry without ``op_types`` selects any class when it names ``op_names``, the
default layers otherwise; later entries override earlier ones, ``exclude`` takes modules out.
``resolve_config`` applies a whole list to a model (the training methods); ``Selector`` is one
entry's selection (the channel plan matches groups by their producers with it)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import ConfigError, did_you_mean

DEFAULT_CLASSES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                   nn.ConvTranspose3d, nn.Linear)
DEFAULT_TYPES = tuple(c.__name__ for c in DEFAULT_CLASSES)
SELECTION_KEYS = ("op_types", "op_names", "exclude")
T = TypeVar("T")


def op_matches(path: str, type_name: str, op_types: Collection[str] | None, op_names: Sequence[str],
               default: Collection[str] | Callable[[str], bool]) -> bool:
    """Does the module at ``path`` of class ``type_name`` match the entry?"""
    is_default = default if callable(default) else default.__contains__
    type_ok = op_types is None or type_name in op_types or ("default" in op_types
                                                        and is_default(type_name))
    return type_ok and (not op_names or any(fnmatch.fnmatchcase(path, p) for p in op_names))


@dataclass(frozen=True)
class Selector:
    """The modules one config list entry selects (see the module docstring for the defaults)."""

    op_types: tuple[str, ...] | None  # None: any class
    op_names: tuple[str, ...]
    exclude: bool = False

    @classmethod
    def from_entry(cls, e: Mapping[str, Any], where: str) -> Selector:
        """Read the selection keys of entry ``e`` (``where`` names it in errors)."""
        names = _str_tuple(e.get("op_names", ()), "op_names", where)
        types: tuple[str, ...] | None = _str_tuple(e.get("op_types", ()), "op_types", where)
        if not types:  # omitted (or empty): any class if op_names are given, else the defaults
            types = None if names else ("default",)
        exclude = e.get("exclude", False)
        if not isinstance(exclude, bool):
            raise ConfigError(f"'exclude' in {where} must be True or False. Got {exclude!r} instead.")
        return cls(types, names, exclude)

    def selects(self, path: str, module: nn.Module) -> bool:
        return op_matches(path, type(module).__name__, self.op_types, self.op_names,
                          lambda _name: isinstance(module, DEFAULT_CLASSES))


def _str_tuple(v: Any, key: str, where: str) -> tuple[str, ...]:
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, Sequence) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"'{key}' in {where} must be a list of str. Got {v!r} instead.")
    return tuple(v)


def has_weight_matrix(path: str, module: nn.Module) -> bool:
    """The training methods' notion of a compressible layer: a weight of >= 2 dimensions."""
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.ndim >= 2


def resolve_config(model: nn.Module, config_list: Any, parse: Callable[[Mapping[str, Any], str], T],
                   *, keys: Collection[str], owner: str, example: str,
                   eligible: Callable[[str, nn.Module], bool] = has_weight_matrix) -> dict[str, T]:
    """Module path -> ``parse(entry, where)`` of the last entry selecting it, in model order.

    ``keys`` are the entry keys the method reads besides the selection keys; ``parse`` validates
    them (it runs on every non-exclude entry, whether it selects anything or not). Only
    ``eligible`` modules are selected.

    Example:
        >>> resolve_config(net, [{"sparsity": 0.5}], lambda e, w: e["sparsity"],
        ...                keys=["sparsity"], owner="LevelPruner", example="[{'sparsity': 0.5}]")
        {'conv1': 0.5, 'conv2': 0.5, 'fc': 0.5}

    Raises:
        ConfigError: not a non-empty list of dicts, an unknown key, an unknown class name in
            ``op_types``, an entry with ``op_names`` selecting nothing, or nothing selected at all.
    """
    if (not isinstance(config_list, Sequence) or isinstance(config_list, (str, bytes))
            or not config_list):
        raise ConfigError(f"The config list of {owner} must be a non-empty list of dicts such as "
                          f"{example}. Got {config_list!r} instead.")
    mods = [(n, m) for n, m in model.named_modules() if eligible(n, m)]
    all_types = {type(m).__name__ for _, m in model.named_modules()}
    allowed = set(keys) | set(SELECTION_KEYS)
    chosen: dict[str, T] = {}
    for i, e in enumerate(config_list):
        where = f"entry {i} of the config list of {owner}"
        if not isinstance(e, Mapping):
            raise ConfigError(f"{where[0].upper()}{where[1:]} must be a dict such as {example}. Got "
                              f"{e!r} instead.")
        for k in e:
            if k not in allowed:
                raise ConfigError(f"Unknown key '{k}' in {where}. Allowed: "
                                  f"{', '.join(sorted(allowed))}.{did_you_mean(k, allowed)}")
        sel = Selector.from_entry(e, where)
        for t in sel.op_types or ():
            if t != "default" and t not in all_types and not hasattr(nn, t):
                raise ConfigError(f"'op_types' in {where} names class '{t}', which is neither in "
                                  f"{type(model).__name__} nor in torch.nn.{did_you_mean(t, all_types)}")
        value = None if sel.exclude else parse(e, where)
        hit = [n for n, m in mods if sel.selects(n, m)]
        if not hit and sel.op_names and not sel.exclude:
            paths = [n for n, _ in mods]
            raise ConfigError(
                f"{where[0].upper()}{where[1:]} selects no layer: no module with a weight matrix "
                f"matches op_names {list(sel.op_names)}"
                f"{'' if sel.op_types is None else f' and op_types {list(sel.op_types)}'} "
                f"(module paths such as {', '.join(paths[:4])}).{did_you_mean(sel.op_names[0], paths)}")
        for n in hit:
            if sel.exclude:
                chosen.pop(n, None)
            else:
                chosen[n] = value  # type: ignore[assignment]
    if not chosen:
        raise ConfigError(
            f"The config list of {owner} matches no layer of {type(model).__name__} with a weight "
            f"matrix (op_types are class names such as {', '.join(sorted(all_types)[:5])}; "
            "op_names are module paths).")
    order = {n: k for k, (n, _) in enumerate(mods)}
    return dict(sorted(chosen.items(), key=lambda kv: order[kv[0]]))
