"""One-op nets for the rule conformance suite: producer(s) -> the op under test -> consumer.

A ``Case`` describes only what sits between the producers and the consumer (``body``) and, for a
module, the module itself (``mid``); ``build`` adds the producers for the chosen ``layout`` and a
1x1 conv / Linear consumer sized from the body's output. The tables: ``module_cases`` (keyed by
module class, or by dotted name for classes of optional libraries, imported only when the case
runs) and ``op_cases`` (keyed by the name ``graphprune.rules.registered()`` gives the op).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..conftest import healthy_init

Body = Callable[..., torch.Tensor]

# layout -> (example input shape, producer factory, channel dim of the producers' output)
_CONV = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}
LAYOUTS: dict[str, tuple[tuple[int, ...], Callable[[int], nn.Module], int]] = {
    "nchw": ((2, 3, 6, 6), lambda c: nn.Conv2d(3, c, 1), 1),
    "ncl": ((2, 3, 8), lambda c: nn.Conv1d(3, c, 1), 1),
    "ncdhw": ((2, 3, 4, 4, 4), lambda c: nn.Conv3d(3, c, 1), 1),
    "nlc": ((2, 5, 6), lambda c: nn.Linear(6, c), -1),
    "nhwc": ((2, 4, 4, 6), lambda c: nn.Linear(6, c), -1),
    "nc": ((3, 6), lambda c: nn.Linear(6, c), -1),
    "tokens": ((2, 5), lambda c: nn.Embedding(20, c), -1),
}


@dataclass(frozen=True)
class Case:
    """``body(net, *inputs)`` computes the consumer's input from the producers ``net.a``,
    ``net.b``, ``net.c`` (same shape) and the module under test ``net.mid``.

    ``prunes``: some group must shrink (params decrease); ``freezes``: a group must be frozen
    with a reason containing this text; ``post``: 'first' / 'last', the consumer's channel dim
    (default: that of the layout); ``inputs``: a factory of custom example inputs.
    """

    body: Body
    mid: Callable[[], nn.Module] | None = None
    layout: str = "nchw"
    width: int = 8
    prunes: bool = True
    freezes: str | None = None
    post: str | None = None
    inputs: Callable[[], tuple[Any, ...]] | None = None


class OpNet(nn.Module):
    def __init__(self, case: Case, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        make = LAYOUTS[case.layout][1]
        self.a, self.b, self.c = make(case.width), make(case.width), make(case.width)
        if case.mid is not None:
            self.mid = case.mid()
        self.body = case.body
        used: set[str] = set()
        hooks = [getattr(self, k).register_forward_hook(lambda *_, k=k: used.add(k)) for k in "bc"]
        with torch.no_grad():
            h = self.body(self.eval(), *example_inputs(case))
        for k, hook in zip("bc", hooks):
            hook.remove()
            if k not in used:  # an unused producer would make trace look for training-only code
                delattr(self, k)
        first = (case.post or ("first" if LAYOUTS[case.layout][2] == 1 else "last")) == "first"
        if first and h.ndim in _CONV:
            self.post = _CONV[h.ndim](h.shape[1], 4, 1)
        else:
            self.post = nn.Linear(h.shape[-1], 4)

    def forward(self, x):
        return self.post(self.body(self, x))


class OpNet2(OpNet):
    """For cases with two inputs (fx cannot trace ``*args``)."""

    def forward(self, x, y):
        return self.post(self.body(self, x, y))


def example_inputs(case: Case) -> tuple[Any, ...]:
    if case.inputs is not None:
        return case.inputs()
    g = torch.Generator().manual_seed(7)
    shape = LAYOUTS[case.layout][0]
    if case.layout == "tokens":
        return (torch.randint(0, 20, shape, generator=g),)
    return (torch.randn(*shape, generator=g),)


def build(case: Case, seed: int = 0) -> nn.Module:
    cls = OpNet if len(example_inputs(case)) == 1 else OpNet2
    return healthy_init(cls(case, seed).eval(), seed)


# ---------------------------------------------------------------------- helpers for the tables
def module_case(mid: Callable[[], nn.Module], layout: str = "nchw", **kw: Any) -> Case:
    """producer -> mid -> consumer."""
    return Case(lambda n, x: n.mid(n.a(x)), mid, layout, **kw)


def first_output(mid: Callable[[], nn.Module], layout: str, **kw: Any) -> Case:
    """producer -> mid(...)[0] -> consumer (modules returning a tuple)."""
    return Case(lambda n, x: n.mid(n.a(x))[0], mid, layout, **kw)


def make(cls: type, *a: Any, **kw: Any) -> Callable[[], nn.Module]:
    """A factory of ``cls(*a, **kw)`` (every case builds fresh modules)."""
    return lambda: cls(*a, **kw)


def optional(qualname: str, *a: Any, **kw: Any) -> Callable[[], nn.Module]:
    """A module of an optional library, imported when the case is built."""
    def build_it() -> nn.Module:
        mod, _, name = qualname.rpartition(".")
        return getattr(importlib.import_module(mod), name)(*a, **kw)
    return build_it


def unary(fn: Callable[[torch.Tensor], torch.Tensor], layout: str = "nchw", **kw: Any) -> Case:
    """producer -> fn -> consumer."""
    return Case(lambda n, x: fn(n.a(x)), layout=layout, **kw)


def binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], **kw: Any) -> Case:
    """Two producers combined elementwise: their channels are coupled one to one."""
    return Case(lambda n, x: fn(n.a(x), n.b(x)), **kw)
