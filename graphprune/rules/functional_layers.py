"""Channel rules for functional layers whose parameters arrive as graph values
(``F.batch_norm``, ``F.group_norm``, ``F.linear``, ``F.conv2d``...), as in timm's BatchNormAct2d,
ScaledStdConv2d or GroupNorm1. A literal argument that fixes a channel count (``groups``,
``num_groups``) is only trusted when it belongs to a module whose attribute graphprune refreshes;
otherwise the channels it pins are frozen."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .elements import Builder, TInfo
from .common import _enclosing_modules, arg, keep_axes, out_spec
from .registry import op_rule


def _owner(b: Builder, w: Any, cls: type | tuple[type, ...]) -> nn.Module | None:
    """The module owning parameter node ``w``, if it is an instance of ``cls``."""
    name = b.param_nodes.get(w) if isinstance(w, fx.Node) else None
    if name is not None:
        m = b.modules.get(name.rpartition(".")[0])
        return m if isinstance(m, cls) else None
    return None


def _link_param(b: Builder, node: fx.Node, p: Any, dim: int, e: Any, what: str) -> None:
    if isinstance(p, fx.Node) and e is not None:
        b.link(e, b.info(p), dim, f"{what} of another size at '{node.name}'")
    elif isinstance(p, fx.Node):
        b.freeze_info(b.info(p), f"{what} at '{node.name}' normalises a non-channel dim")


def stats_coupling(b: Builder, node: fx.Node, x: TInfo | None, training: Any) -> None:
    """A norm computing its statistics from the data (training mode, no running stats, or the
    weight standardisation of NF-nets' ScaledStdConv) averages over every dim but 1: channels on
    those dims change each other's values when removed."""
    if x is None or training is False:
        return
    for a in x.axes:
        if 1 not in a.dims:
            b.mark_value_coupled(a.elems(), f"normalised together (statistics over them) at "
                                            f"'{node.name}'")


@op_rule(F.batch_norm, F.instance_norm)
def batch_norm_fn(b: Builder, node: fx.Node, m: Any = None) -> Any:
    x = b.info(node.args[0])
    e = b.along(x, 1) if x is not None and x.ndim > 1 else None
    names = ("running_mean", "running_var", "weight", "bias")
    start = 1
    for i, name in enumerate(names):
        _link_param(b, node, arg(node, start + i, name), 0, e, name)
    stats_coupling(b, node, x, True if node.target is F.instance_norm
                   else arg(node, 5, "training", False))
    return x


@op_rule(F.group_norm, torch.group_norm)
def group_norm_fn(b: Builder, node: fx.Node, m: Any = None) -> Any:
    x = b.info(node.args[0])
    groups, w, bias = arg(node, 1, "num_groups"), arg(node, 2, "weight"), arg(node, 3, "bias")
    e = b.along(x, 1) if x is not None else None
    owner = _owner(b, w, nn.GroupNorm)
    # the group count is the owner's attribute (refreshed after pruning) only when the owner's
    # own forward makes the call: a literal equal to it elsewhere stays a literal
    inner = _enclosing_modules(b, node)  # innermost first; none: the root's own forward
    called_by_owner = owner is not None and (
        inner[0][1] is owner if inner else b.param_nodes[w].rpartition(".")[0] == "")
    if e is None or not called_by_owner or owner.num_groups != groups:
        # a literal group count that no module attribute refreshes: the width is fixed
        if x is not None:
            b.freeze_info(TInfo(x.shape, [a for a in x.axes if 1 in a.dims]),
                          f"group_norm with a literal group count at '{node.name}'")
        for p in (w, bias):
            if isinstance(p, fx.Node):
                b.freeze_info(b.info(p), f"group_norm parameter at '{node.name}'")
        return x
    rows = e.reshape(groups, -1)
    if rows.shape[1] > 1:
        import numpy as np

        b.couple(np.repeat(rows[:, :1], rows.shape[1] - 1, axis=1), rows[:, 1:])
    for name, p in (("weight", w), ("bias", bias)):
        _link_param(b, node, p, 0, e, name)
    return x


@op_rule(F.linear, torch._C._nn.linear)
def linear_fn(b: Builder, node: fx.Node, m: Any = None) -> Any:
    x, w, bias = b.info(node.args[0]), arg(node, 1, "weight"), arg(node, 2, "bias")
    spec = out_spec(b, node)
    last = spec.ndim - 1
    out = keep_axes(b, node, x, range(last), spec.shape, f"features of '{node.name}'",
                    consumed=[last])
    wi = b.info(w)
    wo = b.along(wi, 0)
    if wo is None:  # a weight that is not a parameter: its output width is fixed
        i = b.along(x, last)
        if i is not None:
            b.freeze(i, f"linear with a constant weight at '{node.name}'")
        return out
    oa = b.new_axis(node.name, (last,), (spec.shape[last],))
    b.couple(oa.elems(), wo)
    b.source(oa.elems())
    b.link(b.along(wi, 1), x, last, f"input features of '{node.name}' are not channels")
    _link_param(b, node, bias, 0, oa.elems(), "bias")
    b.set_roles(w, {0: "out", 1: "in"})
    b.set_roles(bias, {0: "out"})
    out.axes.append(oa)
    return out


@op_rule(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
def conv_fn(b: Builder, node: fx.Node, m: Any = None) -> Any:
    x, w, bias = b.info(node.args[0]), arg(node, 1, "weight"), arg(node, 2, "bias")
    groups = arg(node, 6, "groups", 1)
    spec = out_spec(b, node)
    wi = b.info(w)
    wo = b.along(wi, 0)
    reason = f"functional convolution at '{node.name}'"
    if x is not None:
        for a in x.axes:
            if 1 not in a.dims:
                b.freeze(a.elems(), reason)
    owner = _owner(b, w, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) if isinstance(w, fx.Node) else None
    if owner is None and isinstance(w, fx.Node):  # a computed weight (weight standardisation)
        src = _param_source(w, b.param_nodes)
        owner = _owner(b, src, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) if src is not None else None
    if wo is None or groups != 1 and (owner is None or owner.groups != groups):
        b.freeze_info(TInfo(x.shape, [a for a in x.axes if 1 in a.dims]) if x else None, reason)
        b.freeze_info(wi, reason)
        return TInfo(spec.shape)
    oa = b.new_axis(node.name, (1,), (spec.shape[1],))
    b.couple(oa.elems(), wo)
    b.source(oa.elems())
    cin = b.spec(node.args[0]).shape[1]
    ipg = cin // groups
    i = b.along(x, 1)
    wi_in = b.along(wi, 1)
    if groups == 1 and wi_in is not None:  # a weight with one input channel has no axis there
        b.link(wi_in, x, 1, f"{reason}: its input is not a channel")
    elif ipg == 1:  # depthwise: input channel k and its outputs go together
        import numpy as np

        if i is None:
            b.freeze(oa.elems(), f"{reason}: its input is not a channel")
        else:
            b.couple(np.repeat(i, spec.shape[1] // cin), oa.elems())
    else:
        b.freeze_info(TInfo(x.shape, [a for a in x.axes if 1 in a.dims]), f"{reason} (groups)")
        b.freeze(oa.elems(), f"{reason} (groups)")
    _link_param(b, node, bias, 0, oa.elems(), "bias")
    b.set_roles(w, {0: "out", 1: "in"})
    b.set_roles(bias, {0: "out"})
    return TInfo(spec.shape, [oa])


def _param_source(n: fx.Node, params: dict, depth: int = 8) -> fx.Node | None:
    """The parameter a computed weight is derived from (through reshapes and normalisation)."""
    for _ in range(depth):
        if n in params:
            return n
        inputs = [a for a in n.all_input_nodes]
        if not inputs:
            return None
        n = inputs[0]
    return None


@op_rule(F.normalize)
def normalize_fn(b: Builder, node: fx.Node, m: Any = None) -> Any:
    x = b.info(node.args[0])
    d = arg(node, 2, "dim", 1)
    if x is not None:
        a = x.axis_at(d % x.ndim)
        if a is not None:
            b.freeze(a.elems(), f"normalize across channels at '{node.name}'")
    return x
