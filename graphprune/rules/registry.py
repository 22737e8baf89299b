"""The table of channel rules, keyed by module class, function object or method name.

A rule is ``fn(b: Builder, node: fx.Node, module: nn.Module | None) -> info`` and returns the
channel info of the node's output (a ``TInfo``, a tuple of them, or None). A *resizer* updates a
module's attributes (``out_channels``, ``num_groups``...) after its parameters were sliced.
Module rules match by class, then by the first registered base class in the MRO, so a subclass
such as timm's ``Conv2dSame`` gets the ``Conv2d`` rule. A class of an optional library is
registered by its dotted name (``"transformers.pytorch_utils.Conv1D"``): matching it never
imports that library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch import nn

RuleFn = Callable[..., Any]
ResizeFn = Callable[..., None]

_MODULES: dict[type | str, RuleFn] = {}  # classes, or 'module.QualName' of optional ones
_CALLABLES: dict[Any, RuleFn] = {}  # function objects and method names
_RESIZERS: dict[type | str, ResizeFn] = {}
_LEAVES: set[type | str] = set()  # classes whose rule describes the whole forward (fx leaves)


def module_rule(*types: type | str, leaf: bool = False) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn`` as the channel rule of modules of these classes (and their subclasses).

    A class may be given by its dotted name (``"transformers.pytorch_utils.Conv1D"``) so that
    registering it imports nothing. ``leaf=True`` asks torch.fx to keep modules of exactly
    these classes as leaves, so that the rule sees the call instead of the traced body.
    """

    def deco(fn: RuleFn) -> RuleFn:
        for t in types:
            _MODULES[t] = fn
            if leaf:
                _LEAVES.add(t)
        return fn

    return deco


def op_rule(*targets: Any) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn`` for call_function targets (objects) and call_method names (strings).

    A dotted string names a function of an optional library by its module and qualified name
    (``"torchvision.models.swin_transformer.shifted_window_attention"``), imported by nobody.
    """

    def deco(fn: RuleFn) -> RuleFn:
        for t in targets:
            if t is not None:
                _CALLABLES[t] = fn
        return fn

    return deco


def resizer(*types: type | str) -> Callable[[ResizeFn], ResizeFn]:
    """Register ``fn(module, in_shape)`` that refreshes a module's size attributes (classes may
    be given by dotted name, as for ``module_rule``)."""

    def deco(fn: ResizeFn) -> ResizeFn:
        for t in types:
            _RESIZERS[t] = fn
        return fn

    return deco


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _by_mro(table: dict[Any, Any], cls: type) -> Any:
    for k in cls.__mro__:
        if k in table:
            return table[k]
        name = _qualname(k)
        if name in table:
            return table[name]
    return None


def is_rule_leaf(m: nn.Module) -> bool:
    """True if ``m``'s class asked to stay an fx leaf (``module_rule(..., leaf=True)``)."""
    cls = type(m)
    return cls in _LEAVES or _qualname(cls) in _LEAVES


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
            fn = _CALLABLES.get(node.target)
        except TypeError:  # unhashable target
            return None, None
        if fn is None and node.op == "call_function" and hasattr(node.target, "__qualname__"):
            fn = _CALLABLES.get(f"{getattr(node.target, '__module__', '')}.{node.target.__qualname__}")
        return fn, None
    return None, None


def registered() -> dict[str, list[str]]:
    """Names of everything that has a rule, for docs and error messages."""
    def name(t: Any) -> str:
        if isinstance(t, str):
            return t if "." in t else f"Tensor.{t}"
        mod = getattr(t, "__module__", None) or ""
        return f"{mod}.{getattr(t, '__name__', str(t))}".lstrip(".")

    return {
        "modules": sorted(t if isinstance(t, str) else _qualname(t) for t in _MODULES),
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
