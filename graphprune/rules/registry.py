"""The table of channel rules, keyed by module class, function object or method name.

A rule is ``fn(b: Builder, node: fx.Node, module: nn.Module | None) -> info`` and returns the
channel info of the node's output (a ``TInfo``, a tuple of them, or None). A *resizer* updates a
module's attributes (``out_channels``, ``num_groups``...) after its parameters were sliced.
Module rules match by class, then by the first registered base class in the MRO, so a subclass
such as timm's ``Conv2dSame`` gets the ``Conv2d`` rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch import nn

RuleFn = Callable[..., Any]
ResizeFn = Callable[..., None]

_MODULES: dict[type, RuleFn] = {}
_CALLABLES: dict[Any, RuleFn] = {}  # function objects and method names
_RESIZERS: dict[type, ResizeFn] = {}


def module_rule(*types: type) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn`` as the channel rule of modules of these classes (and their subclasses)."""

    def deco(fn: RuleFn) -> RuleFn:
        for t in types:
            _MODULES[t] = fn
        return fn

    return deco


def op_rule(*targets: Any) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn`` for call_function targets (objects) and call_method names (strings)."""

    def deco(fn: RuleFn) -> RuleFn:
        for t in targets:
            if t is not None:
                _CALLABLES[t] = fn
        return fn

    return deco


def resizer(*types: type) -> Callable[[ResizeFn], ResizeFn]:
    """Register ``fn(module, in_shape)`` that refreshes a module's size attributes."""

    def deco(fn: ResizeFn) -> ResizeFn:
        for t in types:
            _RESIZERS[t] = fn
        return fn

    return deco


def _by_mro(table: dict[type, Any], cls: type) -> Any:
    for k in cls.__mro__:
        if k in table:
            return table[k]
    return None


def module_rule_for(m: nn.Module) -> RuleFn | None:
    return _by_mro(_MODULES, type(m))


def resizer_for(m: nn.Module) -> ResizeFn | None:
    return _by_mro(_RESIZERS, type(m))


def rule_for(node: fx.Node, modules: dict[str, nn.Module]
             ) -> tuple[RuleFn | None, nn.Module | None]:
    """The rule that applies to ``node`` (None if no rule is registered) and its module."""
    if node.op == "call_module":
        m = modules[node.target]
        return module_rule_for(m), m
    if node.op in ("call_function", "call_method"):
        try:
            return _CALLABLES.get(node.target), None
        except TypeError:  # unhashable target
            return None, None
    return None, None


def registered() -> dict[str, list[str]]:
    """Names of everything that has a rule, for docs and error messages."""
    def name(t: Any) -> str:
        if isinstance(t, str):
            return f"Tensor.{t}"
        mod = getattr(t, "__module__", None) or ""
        return f"{mod}.{getattr(t, '__name__', str(t))}".lstrip(".")

    return {
        "modules": sorted(f"{t.__module__}.{t.__name__}" for t in _MODULES),
        "ops": sorted({name(t) for t in _CALLABLES}),
    }


def describe_target(node: fx.Node, modules: dict[str, nn.Module] | None = None) -> str:
    """A readable name of what a node calls: 'Conv2d layer1.0.conv1', 'torch.matmul', ..."""
    if node.op == "call_module":
        m = (modules or {}).get(node.target)
        return f"{type(m).__name__} '{node.target}'" if m is not None else f"module '{node.target}'"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    t = node.target
    mod = getattr(t, "__module__", None)
    nm = getattr(t, "__name__", str(t))
    if mod in (None, "_operator", "builtins"):
        return f"operator.{nm}" if mod == "_operator" else nm
    return f"{mod}.{nm}"
