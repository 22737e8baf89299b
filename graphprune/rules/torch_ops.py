"""Channel rules for functions (``torch.cat``, ``operator.add``...) and Tensor methods."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..trace import TensorSpec
from .elements import Builder, TInfo
from .common import (
    HEAD_COUNT_ATTRS, _enclosing_modules, arg, base_name, broadcast, concrete, empty_like_spec,
    keep_axes, movement, norm_dim, out_spec, reduce, spatial,
)
from .registry import op_rule

# ------------------------------------------------------------------ elementwise
_UNARY = [
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.elu, F.selu, F.celu, F.gelu, F.silu,
    F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.softplus, F.logsigmoid,
    F.tanhshrink, F.softsign, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.feature_alpha_dropout, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg,
    torch.sqrt, torch.rsqrt, torch.square, torch.erf, torch.clamp, torch.clip, torch.sin,
    torch.cos, torch.log, torch.reciprocal, torch.sign, F.sigmoid, F.tanh, operator.neg,
    operator.pos, torch.nan_to_num, torch.detach,
    torch._C._nn.gelu, torch._C._nn.silu if hasattr(torch._C._nn, "silu") else None,
    torch._C._nn.hardsigmoid, torch._C._nn.hardswish, torch._C._nn.elu, torch._C._nn.leaky_relu,
    torch._C._nn.relu6 if hasattr(torch._C._nn, "relu6") else None, torch._C._nn.hardtanh,
    torch._C._nn.softplus, torch._C._nn.mish if hasattr(torch._C._nn, "mish") else None,
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "sqrt", "rsqrt",
    "square", "clamp", "clamp_", "clip", "contiguous", "clone", "detach", "float", "half",
    "double", "bfloat16", "to", "type", "cpu", "cuda", "requires_grad_", "erf", "sin", "cos", "log",
    "reciprocal", "sign", "exp_", "nan_to_num", "hardswish", "hardsigmoid", "gelu", "silu",
]
_UNARY.append("torchvision.ops.stochastic_depth.stochastic_depth")  # by name: imports nothing


@op_rule(*_UNARY)
def unary(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """Elementwise op of one tensor (other args are scalars): channels pass through."""
    tensors = [a for a in node.args[1:] if isinstance(b.spec(a), TensorSpec)]
    if tensors:  # e.g. clamp(x, min=tensor): treat as broadcasting
        return broadcast(b, node, list(node.args))
    spec = out_spec(b, node)
    x = b.info(node.args[0])
    if x is None or not isinstance(spec, TensorSpec):
        return empty_like_spec(spec)
    return x if x.shape == spec.shape else broadcast(b, node, [node.args[0]])


_BINARY = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.iadd,
    operator.isub, operator.imul, operator.itruediv, operator.pow, operator.mod, torch.add,
    torch.sub, torch.mul, torch.div, torch.true_divide, torch.maximum, torch.minimum, torch.pow,
    torch.where, torch.lerp, torch.addcmul, torch.addcdiv, torch.fmod, torch.remainder,
    torch.hypot, torch.atan2,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "maximum",
    "minimum", "pow", "where", "lerp", "addcmul", "addcdiv", "masked_fill", "masked_fill_",
]


@op_rule(*_BINARY)
def binary(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """Elementwise op with broadcasting (residual add, squeeze-and-excitation gating...)."""
    ops = list(node.args) + [v for k, v in node.kwargs.items() if k in ("other", "input", "tensor1",
                                                                         "tensor2", "end", "mask")]
    return broadcast(b, node, ops)


_CREATE = (torch.zeros, torch.ones, torch.full, torch.empty, "new_zeros", "new_ones", "new_full",
           "new_empty", *(getattr(torch.ops.aten, n).default for n in (
               "zeros", "ones", "full", "new_zeros", "new_ones", "new_full")),
           torch.ops.aten.empty.memory_format, torch.ops.aten.new_empty.default)


@op_rule(*_CREATE)
def created(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """A tensor made from sizes: a dim whose size is a head count the enclosing attention module
    holds (T5's zero position bias ``zeros((1, self.n_heads, q, k))``) follows the heads (the
    attribute is refreshed after pruning); every other dim is not a channel."""
    spec = out_spec(b, node)
    if not isinstance(spec, TensorSpec):
        return empty_like_spec(spec)
    out = TInfo(spec.shape)
    for d, n in enumerate(spec.shape):
        if n <= 1:
            continue
        owner = next(((p, a) for p, mod in _enclosing_modules(b, node)[:2]
                      for a in HEAD_COUNT_ATTRS if getattr(mod, a, None) == n), None)
        if owner is not None and not out.axes:
            out.axes.append(b.new_axis(node.name, (d,), (n,)))
            b.attr_sizes.append((owner[0], owner[1], node, d))
    return out


@op_rule(torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like,
         torch.randn_like, "expand_as", "type_as", "view_as",
         "reshape_as")
def like(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """Ops whose output is shaped like another tensor: channels of both stay the same size."""
    if node.op == "call_method" and node.target in ("expand_as", "view_as", "reshape_as"):
        x, other = node.args[0], node.args[1]
        if node.target == "expand_as":
            out = broadcast(b, node, [x, other])
            return out
        res = movement(b, node, lambda t: t.reshape(b.values[other].shape),
                       sizes=[None] * len(out_spec(b, node).shape))
        # the shape comes from ``other``: its channels must match
        if isinstance(res, TInfo):
            for a in res.axes:
                for d in a.dims:
                    b.link(b.along(res, d), b.info(other), d,
                           f"view_as a tensor whose dim {d} is not a channel at '{node.name}'")
        return res
    if node.op == "call_method" and node.target == "type_as":
        return unary(b, node)
    return broadcast(b, node, [node.args[0]])


# ------------------------------------------------------------------ softmax / norms
@op_rule(F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax, "softmax",
         "log_softmax")
def softmax(b: Builder, node: fx.Node, m: Any = None) -> Any:
    x = b.info(node.args[0])
    d = arg(node, 1, "dim")
    if x is not None:
        if d is None:
            b.freeze_info(x, f"softmax without dim at '{node.name}'")
        else:
            d = norm_dim(d, x.ndim)
            a = x.axis_at(d)
            if a is not None and len(a.dims) > 1:
                # over one dim of a (paths, C/paths) axis: every entry along it goes together,
                # so the softmax only mixes entries of the same unit
                g = a.grid()
                p = a.dims.index(d)
                rows = np.moveaxis(g, p, -1).reshape(-1, g.shape[p])
                b.couple(np.repeat(rows[:, :1], rows.shape[1] - 1, axis=1), rows[:, 1:])
            elif a is not None:
                b.freeze(a.elems(), f"softmax across channels at '{node.name}'")
    return x


@op_rule(F.layer_norm, F.rms_norm if hasattr(F, "rms_norm") else None)
def layer_norm_fn(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """Functional layer norm over the last dim, with weight/bias from parameters."""
    x = b.info(node.args[0])
    shape = arg(node, 1, "normalized_shape")
    w, bias = arg(node, 2, "weight"), arg(node, 3, "bias")
    if x is None:
        return x
    nd = len(shape) if isinstance(shape, (list, tuple)) else 1
    # the literal normalized_shape is refreshed only if it belongs to an nn.LayerNorm we resize
    owner_ok = isinstance(w, fx.Node) and w in b.param_nodes and \
        _owned_by_layernorm(b, b.param_nodes[w])
    if nd != 1 or not owner_ok:
        for a in x.axes:
            if any(d >= x.ndim - nd for d in a.dims):
                b.freeze(a.elems(), f"layer_norm with a literal normalized_shape at '{node.name}'")
        return x
    e = b.along(x, x.ndim - 1)
    if e is None:
        return x
    b.mark_value_coupled(e, f"layer_norm at '{node.name}' normalizes across channels")
    for p in (w, bias):
        if isinstance(p, fx.Node):
            b.link(e, b.info(p), 0, f"layer_norm parameter of another size at '{node.name}'")
    return x


def _owned_by_layernorm(b: Builder, target: str) -> bool:
    owner = target.rpartition(".")[0]
    m = b.modules.get(owner)
    return isinstance(m, (torch.nn.LayerNorm, getattr(torch.nn, "RMSNorm", torch.nn.LayerNorm)))


# ------------------------------------------------------------------ cat / stack / split
@op_rule(torch.cat, torch.concat, torch.concatenate)
def cat(b: Builder, node: fx.Node, m: Any = None) -> Any:
    tensors = list(arg(node, 0, "tensors"))
    spec = out_spec(b, node)
    d = norm_dim(arg(node, 1, "dim", 0), spec.ndim)
    infos = [b.info(t) or TInfo(b.spec(t).shape) for t in tensors]
    out = TInfo(spec.shape)
    # dims other than the cat dim: every input must keep the same size there
    first = infos[0]
    for a in first.axes:
        if d in a.dims:
            continue
        out.axes.append(a)
        for info in infos[1:]:
            match = [x for x in info.axes if x.dims == a.dims]
            if match and match[0].sizes == a.sizes:
                b.couple(a.elems(), match[0].elems())
            else:
                for dd in a.dims:
                    b.link(b.along(out, dd), info, dd, f"cat of tensors with different channel "
                           f"structure at '{node.name}'")
    for info in infos[1:]:
        for a in info.axes:
            if not set(a.dims) & {d} and not any(set(a.dims) & set(o.dims) for o in out.axes):
                b.freeze(a.elems(), f"cat with a tensor whose dim is not a channel at '{node.name}'")
    multi = [i.axis_at(d) for i in infos]
    if any(a is not None and len(a.dims) > 1 for a in multi):
        out.axes.append(_cat_within(b, node, infos, d, spec.shape))
        return out
    # the cat dim: each input's channels are a slice of the output axis
    ca = b.new_axis(node.name, (d,), (spec.shape[d],))
    off = 0
    for t, info in zip(tensors, infos):
        size = b.spec(t).shape[d]
        sl = ca.elems()[off:off + size]
        a = info.axis_at(d)
        if a is not None and len(a.dims) > 1:
            b.freeze(a.elems(), f"cat along one dim of a multi-dim channel axis at '{node.name}'")
            b.freeze(sl, f"cat along one dim of a multi-dim channel axis at '{node.name}'")
        else:
            b.link(sl, info, d, f"cat input {t.name} has no channel axis at dim {d} "
                                f"(node '{node.name}')")
        off += size
    out.axes.append(ca)
    return out


def _cat_within(b: Builder, node: fx.Node, infos: list[TInfo], d: int,
                shape: tuple[int, ...]) -> Any:
    """cat along one dim of a multi-dim channel axis (``cat((-x2, x1), -1)`` rebuilding a head
    from its halves): if every input has an axis over the same dims whose other sizes agree, the
    output axis is the concatenation of their grids, element by element; otherwise frozen."""
    axes = [i.axis_at(d) for i in infos]
    ref = next(a for a in axes if a is not None and len(a.dims) > 1)
    p = ref.dims.index(d)
    rest = [s for j, s in enumerate(ref.sizes) if j != p]
    ok = all(a is not None and a.dims == ref.dims
             and [s for j, s in enumerate(a.sizes) if j != p] == rest for a in axes)
    if not ok:
        why = f"cat along one dim of a multi-dim channel axis at '{node.name}'"
        for a in axes:
            if a is not None:
                b.freeze(a.elems(), why)
        return _frozen_axis(b, node, d, shape, why)
    grid = np.concatenate([a.grid() for a in axes], axis=p)
    na = b.new_axis(node.name, ref.dims, grid.shape)
    b.couple(na.elems(), grid.ravel())
    return na


def _frozen_axis(b: Builder, node: fx.Node, d: int, shape: tuple[int, ...], why: str) -> Any:
    a = b.new_axis(node.name, (d,), (shape[d],))
    b.freeze(a.elems(), why)
    return a


@op_rule(torch.stack)
def stack(b: Builder, node: fx.Node, m: Any = None) -> Any:
    tensors = list(arg(node, 0, "tensors"))
    spec = out_spec(b, node)
    d = norm_dim(arg(node, 1, "dim", 0), spec.ndim)
    dim_map = {i: (i if i < d else i + 1) for i in range(spec.ndim - 1)}
    infos = [b.info(t) or TInfo(b.spec(t).shape) for t in tensors]
    first = infos[0]
    out = keep_axes(b, node, first, dim_map, spec.shape, "", dim_map)
    for info in infos[1:]:
        for a0, a in zip(first.axes, out.axes):
            match = [x for x in info.axes if x.dims == a0.dims and x.sizes == a0.sizes]
            if match:  # the same structure: element by element
                b.couple(a0.elems(), match[0].elems())
                continue
            for dd in a.dims:
                src = next(k for k, v in dim_map.items() if v == dd)
                b.link(b.along(out, dd), info, src, f"stack of tensors with different channels "
                       f"at '{node.name}'")
    return out


@op_rule(torch.chunk, torch.split, torch.tensor_split, torch.unbind, "chunk", "split",
         "tensor_split", "unbind", "split_with_sizes")
def split(b: Builder, node: fx.Node, m: Any = None) -> Any:
    spec = out_spec(b, node)
    x = b.info(node.args[0])
    name = base_name(node)
    pieces = list(spec)
    if x is None:
        return empty_like_spec(spec)
    if name == "unbind":
        d = norm_dim(arg(node, 1, "dim", 0), x.ndim)
        dim_map = {i: (i if i < d else i - 1) for i in range(x.ndim) if i != d}
        reason = f"unbind over channels at '{node.name}'"
        a = x.axis_at(d)
        if a is not None and len(a.dims) > 1:  # q, k, v = qkv.unbind(0) of (3, heads, hd)
            outs = []
            for k, p in enumerate(pieces):
                out = keep_axes(b, node, x, dim_map, p.shape, reason, dim_map, consumed=a.dims)
                _pick(b, node, a, {d: k}, {}, dim_map, out)
                outs.append(out)
            return tuple(outs)
        return tuple(keep_axes(b, node, x, dim_map, p.shape, reason, dim_map) for p in pieces)
    d = norm_dim(arg(node, 2, "dim", 0), x.ndim)
    size_arg = arg(node, 1, "split_size_or_sections" if name == "split" else "chunks")
    a = x.axis_at(d)
    others = [o for o in x.axes if d not in o.dims]
    if a is None:
        return tuple(TInfo(p.shape, list(others)) for p in pieces)
    sizes = [p.shape[d] for p in pieces]
    equal = len(set(sizes)) == 1
    # chunk(n) and sizes computed at run time split evenly after pruning too: the same local
    # index must go in every piece. Literal sizes would not follow the pruning: freeze.
    dynamic = name == "chunk" or isinstance(size_arg, fx.Node)
    if len(a.dims) > 1 or not (dynamic and equal):
        b.freeze(a.elems(), f"{name} with fixed sizes along channels at '{node.name}'")
        return tuple(TInfo(p.shape, list(others)) for p in pieces)
    e = b.along(x, d)
    rows = e.reshape(len(pieces), -1)
    b.couple(np.repeat(rows[:1], len(pieces) - 1, axis=0), rows[1:])
    out = []
    for k, p in enumerate(pieces):
        na = b.new_axis(f"{node.name}[{k}]", (d,), (sizes[k],))
        b.couple(na.elems(), rows[k])
        out.append(TInfo(p.shape, list(others) + [na]))
    return tuple(out)


# ------------------------------------------------------------------ indexing
@op_rule(operator.getitem)
def getitem(b: Builder, node: fx.Node, m: Any = None) -> Any:
    base, idx = node.args
    info = b.infos.get(base) if isinstance(base, fx.Node) else None
    if isinstance(info, (tuple, list)):
        return info[idx] if isinstance(idx, int) else type(info)(info[idx])
    if isinstance(info, dict):
        return info.get(idx)
    spec = out_spec(b, node)
    if not isinstance(spec, TensorSpec):
        return empty_like_spec(spec)
    if not isinstance(info, TInfo):
        return TInfo(spec.shape)
    return _index(b, node, info, idx, spec)


def _index(b: Builder, node: fx.Node, x: TInfo, idx: Any, spec: TensorSpec) -> TInfo:
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) or i is True or i is False for i in items
           if not isinstance(i, slice)):
        # advanced indexing: channels may be gathered/reordered
        b.freeze_info(x, f"advanced indexing at '{node.name}'")
        return TInfo(spec.shape)
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        k = items.index(Ellipsis)
        items = items[:k] + [slice(None)] * (x.ndim - n_real) + items[k + 1:]
    items += [slice(None)] * (x.ndim - sum(1 for i in items if i is not None))
    dim_map: dict[int, int] = {}
    sliced: dict[int, slice] = {}
    picked: dict[int, int] = {}
    src, dst = 0, 0
    for it in items:
        if it is None:
            dst += 1
            continue
        if isinstance(it, int):
            picked[src] = it
        else:
            dim_map[src] = dst
            if it != slice(None):
                sliced[src] = it
            dst += 1
        src += 1
    out = TInfo(spec.shape)
    for a in x.axes:
        if set(a.dims) & set(picked):
            _pick(b, node, a, picked, sliced, dim_map, out)
            continue
        cut = [d for d in a.dims if d in sliced]
        if not cut:
            out.axes.extend(keep_axes(b, node, TInfo(x.shape, [a]), dim_map, spec.shape, "",
                                      dim_map).axes)
            continue
        if len(a.dims) > 1 and len(cut) < len(a.dims):
            _slice_within(b, node, a, {d: sliced[d] for d in cut}, dim_map, out)
            continue
        if len(a.dims) > 1 or any(not _slice_ok(sliced[d]) for d in cut):
            b.freeze(a.elems(), f"slicing channels with a step or a computed bound at '{node.name}'")
            continue
        d = cut[0]
        s = sliced[d]
        n = a.size
        e = a.elems()
        # bounds are literal: one counted from the start pins every channel before it, one
        # counted from the end pins every channel after it
        for bound in (s.start, s.stop):
            if bound is None:
                continue
            if bound >= 0:
                b.freeze(e[:min(bound, n)], f"slice boundary {bound} at '{node.name}'")
            else:
                b.freeze(e[max(n + bound, 0):], f"slice boundary {bound} at '{node.name}'")
        kept = e[s]
        na = b.new_axis(node.name, (dim_map[d],), (kept.size,))
        b.couple(na.elems(), kept)
        out.axes.append(na)
    return out


def _pick(b: Builder, node: fx.Node, a: Any, picked: dict[int, int], sliced: dict[int, slice],
          dim_map: dict[int, int], out: TInfo) -> None:
    """``x[..., i]`` on one dim of a multi-dim channel axis (a (pairs, 2) split of a head, say):
    every position along that dim goes together, so the pick stays the same entry after pruning.
    A plain channel dim indexed by a fixed position is frozen."""
    rest = [d for d in a.dims if d not in picked]
    if not rest or any(d in sliced for d in rest):
        b.freeze(a.elems(), f"indexing a channel with a fixed position at '{node.name}'")
        return
    g = a.grid()
    for d in a.dims:
        if d in picked:
            p = a.dims.index(d)
            m = np.moveaxis(g, p, -1).reshape(-1, g.shape[p])
            b.couple(np.repeat(m[:, :1], m.shape[1] - 1, axis=1), m[:, 1:])
    sel = tuple(picked[d] if d in picked else slice(None) for d in a.dims)
    sub = g[sel]
    dims = tuple(dim_map[d] for d in rest)
    order = np.argsort(dims)
    na = b.new_axis(node.name, tuple(np.asarray(dims)[order]),
                    tuple(np.asarray(sub.shape)[order]))
    b.couple(na.elems(), np.transpose(sub, order).ravel())
    out.axes.append(na)


def _slice_within(b: Builder, node: fx.Node, a: Any, cut: dict[int, slice],
                  dim_map: dict[int, int], out: TInfo) -> None:
    """``x[..., :d // 2]`` on one dim of a multi-dim channel axis (the head_dim of (heads,
    head_dim), as rotary embeddings do): the sliced dims are pinned (every position along them
    goes together, so they never shrink and the bounds stay right after pruning, whether literal
    or computed) and the output carries the sub-grid of the axis."""
    g = a.grid()
    sel = []
    for d, n in zip(a.dims, a.sizes):
        if d in cut:
            s = cut[d]
            bounds = [b.spec(v) if isinstance(v, fx.Node) else v for v in (s.start, s.stop, s.step)]
            if not all(v is None or isinstance(v, int) for v in bounds):
                b.freeze(a.elems(), f"slicing channels with an unknown bound at '{node.name}'")
                return
            p = a.dims.index(d)
            m = np.moveaxis(g, p, -1).reshape(-1, n)
            if n > 1:
                b.couple(np.repeat(m[:, :1], n - 1, axis=1), m[:, 1:])
            sel.append(slice(*bounds))
        else:
            sel.append(slice(None))
    sub = g[tuple(sel)]
    if sub.size == 0:
        return
    dims = tuple(dim_map[d] for d in a.dims)
    order = np.argsort(dims)
    na = b.new_axis(node.name, tuple(np.asarray(dims)[order]),
                    tuple(np.asarray(sub.shape)[order]))
    b.couple(na.elems(), np.transpose(sub, order).ravel())
    out.axes.append(na)


def _slice_ok(s: slice) -> bool:
    return (s.step in (None, 1) and all(v is None or isinstance(v, int) for v in (s.start, s.stop)))


@op_rule(torch.narrow, "narrow")
def narrow(b: Builder, node: fx.Node, m: Any = None) -> Any:
    x = b.info(node.args[0])
    spec = out_spec(b, node)
    if x is None:
        return TInfo(spec.shape)
    d = norm_dim(arg(node, 1, "dim"), x.ndim)
    start, length = arg(node, 2, "start"), arg(node, 3, "length")
    if not (isinstance(start, int) and isinstance(length, int)):
        b.freeze_info(x, f"narrow with computed bounds at '{node.name}'")
        return TInfo(spec.shape)
    idx = tuple([slice(None)] * d + [slice(start, start + length)])
    return _index(b, node, x, idx, spec)


# ------------------------------------------------------------------ reshapes and permutes
def _shape_args(node: fx.Node, first: int) -> list[Any]:
    rest = list(node.args[first:])
    if not rest and "size" in node.kwargs:
        rest = [node.kwargs["size"]]
    if not rest and "shape" in node.kwargs:
        rest = [node.kwargs["shape"]]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return list(rest[0])
    if len(rest) == 1 and isinstance(rest[0], fx.Node):
        return [rest[0]] * 64  # a whole shape read at run time: every dim is computed
    return rest


def _call(b: Builder, node: fx.Node):
    args = [concrete(b, v) for v in node.args[1:]]
    kwargs = {k: concrete(b, v) for k, v in node.kwargs.items()}
    if node.op == "call_method":
        return lambda t: getattr(t, node.target)(*args, **kwargs)
    return lambda t: node.target(t, *args, **kwargs)


@op_rule("view", "reshape", torch.reshape, "expand")
def view(b: Builder, node: fx.Node, m: Any = None) -> Any:
    sizes = _shape_args(node, 1)
    if base_name(node) == "expand":
        sizes = [None if s == -1 else s for s in sizes]
    return movement(b, node, _call(b, node), sizes=sizes)


@op_rule("unflatten", torch.unflatten)
def unflatten(b: Builder, node: fx.Node, m: Any = None) -> Any:
    spec = out_spec(b, node)
    x_nd = b.spec(node.args[0]).ndim
    d = norm_dim(arg(node, 1, "dim"), x_nd)
    new = list(arg(node, 2, "sizes"))
    sizes: list[Any] = [None] * d + new + [None] * (spec.ndim - d - len(new))
    return movement(b, node, _call(b, node), sizes=sizes)


@op_rule(torch.flatten, "flatten", torch.permute, "permute", torch.transpose, "transpose",
         torch.swapaxes, "swapaxes", torch.swapdims, "swapdims", torch.movedim, "movedim",
         torch.moveaxis, "moveaxis", "t", torch.t, torch.squeeze, "squeeze", torch.unsqueeze,
         "unsqueeze", "repeat", torch.tile, "tile", torch.roll, "roll", torch.flip, "flip",
         torch.ravel, "ravel", "mT")
def permute(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """Data movement whose output sizes follow the input: channels map through."""
    return movement(b, node, _call(b, node))


@op_rule(torch.channel_shuffle, torch.native_channel_shuffle, F.pixel_shuffle, F.pixel_unshuffle,
         torch.pixel_shuffle, torch.pixel_unshuffle)
def shuffle(b: Builder, node: fx.Node, m: Any = None) -> Any:
    return channel_regroup(b, node, node.target, arg(node, 1, "groups",
                                                     arg(node, 1, "upscale_factor")))


def channel_regroup(b: Builder, node: fx.Node, fn: Any, k: int) -> Any:
    """channel_shuffle(g) and pixel_(un)shuffle(r) split the channel dim into fixed factors."""
    spec = out_spec(b, node)
    x = b.info(node.args[0])
    if x is None:
        return TInfo(spec.shape)
    name = getattr(fn, "__name__", str(fn))
    e = b.along(x, 1)
    if e is None:
        return keep_axes(b, node, x, [0], spec.shape, "")
    c = e.size
    out = keep_axes(b, node, x, [0], spec.shape, f"{name} of a non-channel dim at '{node.name}'",
                    consumed=[1])
    if "channel_shuffle" in name:
        grid = e.reshape(k, c // k)  # (g, C/g): column j goes to out channels j*g .. j*g+g-1
        b.couple(np.repeat(grid[:1], k - 1, axis=0), grid[1:])
        na = b.new_axis(node.name, (1,), (c,))
        b.couple(na.elems(), grid.T.ravel())
    elif "unshuffle" in name:  # C -> C*r*r: each input channel becomes r*r output channels
        na = b.new_axis(node.name, (1,), (c * k * k,))
        b.couple(na.elems(), np.repeat(e, k * k))
    else:  # C*r*r -> C: r*r consecutive input channels form one output channel
        rows = e.reshape(-1, k * k)
        b.couple(np.repeat(rows[:, :1], k * k - 1, axis=1), rows[:, 1:])
        na = b.new_axis(node.name, (1,), (c // (k * k),))
        b.couple(na.elems(), rows[:, 0])
    out.axes.append(na)
    return out


# ------------------------------------------------------------------ reductions / pooling
@op_rule(torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.prod,
         torch.logsumexp, torch.norm, torch.max, torch.min, torch.any, torch.all, torch.argmax,
         torch.argmin, "mean", "sum", "amax", "amin", "std", "var", "prod", "logsumexp", "norm",
         "max", "min", "any", "all", "argmax", "argmin")
def reduction(b: Builder, node: fx.Node, m: Any = None) -> Any:
    x = b.info(node.args[0])
    name = base_name(node)
    if len(node.args) > 1 and isinstance(b.spec(node.args[1]), TensorSpec):
        return broadcast(b, node, list(node.args[:2]))  # torch.max(a, b) is elementwise
    pos = 2 if name == "norm" else 1
    dims = arg(node, pos, "dim")
    keepdim = bool(arg(node, pos + 1, "keepdim", False))
    return reduce(b, node, x, dims, keepdim)


_SPATIAL = {
    1: [F.avg_pool1d, F.max_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d,
        F.lp_pool1d, torch.avg_pool1d, torch.max_pool1d],
    2: [F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.lp_pool2d,
        torch._C._nn.avg_pool2d, torch._C._nn.adaptive_avg_pool2d, torch.max_pool2d],
    3: [F.avg_pool3d, F.max_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d,
        torch._C._nn.avg_pool3d],
}


def _spatial_rule(k: int):
    def rule(b: Builder, node: fx.Node, m: Any = None) -> Any:
        return spatial(b, node, b.info(node.args[0]), k)
    return rule


for _k, _fns in _SPATIAL.items():
    op_rule(*_fns)(_spatial_rule(_k))


@op_rule(F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear, F.grid_sample)
def interpolate(b: Builder, node: fx.Node, m: Any = None) -> Any:
    spec = out_spec(b, node)
    if node.target is F.grid_sample and b.info(arg(node, 1, "grid")) is not None:
        b.freeze_info(b.info(arg(node, 1, "grid")), f"grid of grid_sample at '{node.name}'")
    return spatial(b, node, b.info(node.args[0]), spec.ndim - 2)


@op_rule(F.pad, torch.constant_pad_nd)
def pad(b: Builder, node: fx.Node, m: Any = None) -> Any:
    x = b.info(node.args[0])
    spec = out_spec(b, node)
    p = list(arg(node, 1, "pad"))
    if x is None:
        return TInfo(spec.shape)
    padded = {x.ndim - 1 - i for i in range(len(p) // 2) if p[2 * i] or p[2 * i + 1]}
    keep = [d for d in range(x.ndim) if d not in padded]
    return keep_axes(b, node, x, keep, spec.shape, f"padding a channel dim at '{node.name}'")
