"""Fast structural copies of a module tree.

``copy_tree(model, fn)`` copies every module object (attributes copied cheaply, anything unusual
through ``copy.deepcopy``) and maps every parameter, buffer and plain tensor attribute through
``fn``: share them (apply stage, where they are replaced next), or turn them into ``meta``
tensors (shape-only runs that cost no compute).
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

_ATOMIC = frozenset((int, float, bool, str, bytes, type(None), torch.dtype, torch.device, type))
_EMPTYABLE = frozenset((dict, set, list, OrderedDict))
_TREE = frozenset(("_modules", "_parameters", "_buffers"))


def _copy_module(m: nn.Module, memo: dict[int, Any], fn: Callable[[torch.Tensor], Any]) -> nn.Module:
    if id(m) in memo:
        return memo[id(m)]
    cls = type(m)
    if getattr(cls, "__deepcopy__", None) is not None or isinstance(m, torch.jit.ScriptModule):
        return copy.deepcopy(m, memo)
    new = cls.__new__(cls)
    memo[id(m)] = new
    d = m.__dict__.copy()
    for k, v in d.items():
        t = type(v)
        if t in _ATOMIC or k in _TREE:
            continue
        if t in _EMPTYABLE and not v:  # hook tables, mostly empty
            d[k] = t()
        elif isinstance(v, torch.Tensor):
            d[k] = _tensor(v, memo, fn)
        elif not (t is tuple and all(type(x) in _ATOMIC for x in v)):
            d[k] = copy.deepcopy(v, memo)
    d["_modules"] = {n: (_copy_module(c, memo, fn) if c is not None else None)
                     for n, c in m._modules.items()}
    d["_parameters"] = {n: (None if t is None else _tensor(t, memo, fn))
                        for n, t in m._parameters.items()}
    d["_buffers"] = {n: (None if t is None else _tensor(t, memo, fn)) for n, t in m._buffers.items()}
    new.__dict__.update(d)
    return new


def _tensor(t: torch.Tensor, memo: dict[int, Any], fn: Callable[[torch.Tensor], Any]) -> Any:
    if id(t) not in memo:
        memo[id(t)] = fn(t)
    return memo[id(t)]


def copy_tree(model: nn.Module, fn: Callable[[torch.Tensor], Any],
              memo: dict[int, Any] | None = None) -> nn.Module:
    """A new module tree; tensors are mapped through ``fn`` once each (ties stay tied, also across
    calls that share ``memo``: copies of several subtrees of one model)."""
    return _copy_module(model, {} if memo is None else memo, fn)


def copy_tensor(t: torch.Tensor, fn: Callable[[torch.Tensor], Any], memo: dict[int, Any]) -> Any:
    """``fn(t)``, made once per tensor for a given ``memo`` (shared with ``copy_tree``)."""
    return _tensor(t, memo, fn)


def share(t: torch.Tensor) -> torch.Tensor:
    return t


def to_meta(t: torch.Tensor) -> torch.Tensor:
    m = _as_meta(t)
    if isinstance(t, nn.Parameter):
        return nn.Parameter(m, requires_grad=t.requires_grad)
    return m


def _as_meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


def meta_args(v: Any) -> Any:
    """Example inputs with every tensor replaced by a meta tensor of the same shape and dtype
    (any pytree: lists, tuples, NamedTuples, dicts)."""
    return tree_map_only(torch.Tensor, _as_meta, v)


@contextlib.contextmanager
def fake_run(args: Any, kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """Run a model that lives on the meta device as fake tensors: shapes propagate and code that
    inspects values (a mask check in a Hugging Face model) sees a trace instead of failing.
    Yields the example inputs converted to fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(v: Any) -> Any:
        return tree_map_only(torch.Tensor, lambda t: mode.from_tensor(_as_meta(t)), v)

    with mode:
        yield fake(args), fake(kwargs)
