"""ATen-level rules (graphs from ``torch.export``): the same rules as for functions and methods,
registered for the ops the exporter emits, with argument orders adapted where ATen differs."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

import numpy as np

from . import functional_layers as functional, matmul, torch_ops as functions
from .elements import Builder, TInfo
from .common import SPLIT_SIZE_ATTRS, _enclosing_modules, broadcast, keep_axes, out_spec, spatial
from .registry import op_rule

aten = torch.ops.aten


def _ops(*names: str) -> list[Any]:
    out = []
    for n in names:
        packet, _, overload = n.partition(".")
        p = getattr(aten, packet, None)
        o = getattr(p, overload or "default", None) if p is not None else None
        if o is not None:
            out.append(o)
    return out


op_rule(*_ops("conv1d.default", "conv2d.default", "conv3d.default"))(functional.conv_fn)
op_rule(*_ops("linear.default"))(functional.linear_fn)
op_rule(*_ops("group_norm.default"))(functional.group_norm_fn)
op_rule(*_ops("layer_norm.default"))(functions.layer_norm_fn)
op_rule(*_ops("matmul.default", "bmm.default"))(matmul.matmul)
op_rule(*_ops("scaled_dot_product_attention.default"))(matmul.sdpa)
op_rule(*_ops("cat.default", "concat.default"))(functions.cat)
op_rule(*_ops("stack.default"))(functions.stack)
op_rule(*_ops("softmax.int", "log_softmax.int", "_softmax.default"))(functions.softmax)
op_rule(*_ops("chunk.default", "unbind.int", "split_with_sizes.default"))(functions.split)
op_rule(*_ops("reshape.default", "view.default", "expand.default", "_unsafe_view.default"))(
    functions.view)
op_rule(*_ops("unflatten.int"))(functions.unflatten)
op_rule(*_ops("permute.default", "transpose.int", "flatten.using_ints", "unsqueeze.default",
              "squeeze.dim", "squeeze.dims", "squeeze.default", "t.default", "repeat.default"))(
    functions.permute)
op_rule(*_ops("mean.dim", "sum.dim_IntList", "amax.default", "amin.default", "std.correction",
              "var.correction"))(functions.reduction)
op_rule(*_ops("constant_pad_nd.default", "pad.default"))(functions.pad)
op_rule(*_ops(
    "relu.default", "relu_.default", "gelu.default", "gelu_.default", "silu.default",
    "silu_.default", "hardswish.default", "hardswish_.default", "hardsigmoid.default",
    "hardsigmoid_.default", "sigmoid.default", "sigmoid_.default", "tanh.default", "tanh_.default",
    "dropout.default", "dropout_.default", "alias.default", "clone.default", "detach.default",
    "hardtanh.default", "hardtanh_.default", "leaky_relu.default", "leaky_relu_.default",
    "elu.default", "elu_.default", "mish.default", "softplus.default", "clamp.default",
    "clamp_.default", "abs.default", "neg.default", "exp.default", "sqrt.default",
    "rsqrt.default", "contiguous.default", "_to_copy.default", "to.dtype", "erf.default",
    "relu6.default", "to.dtype_layout", "to.device", "log.default", "sin.default", "cos.default",
    "reciprocal.default", "square.default", "lift_fresh_copy.default"))(functions.unary)
op_rule(*_ops("add.Tensor", "add_.Tensor", "sub.Tensor", "sub_.Tensor", "mul.Tensor",
              "mul_.Tensor", "div.Tensor", "div_.Tensor", "where.self", "maximum.default",
              "minimum.default", "pow.Tensor_Tensor", "add.Scalar", "mul.Scalar", "div.Scalar",
              "sub.Scalar", "pow.Tensor_Scalar", "masked_fill.Scalar", "masked_fill.Tensor",
              "where.ScalarOther", "where.ScalarSelf", "where.Scalar"))(
    functions.binary)


def _spatial2(b: Builder, node: fx.Node, m: Any = None) -> Any:
    return spatial(b, node, b.info(node.args[0]), out_spec(b, node).ndim - 2
                   if not isinstance(out_spec(b, node), (tuple, list)) else 2)


op_rule(*_ops("adaptive_avg_pool2d.default", "max_pool2d.default", "avg_pool2d.default",
              "adaptive_avg_pool1d.default", "max_pool1d.default", "avg_pool1d.default",
              "adaptive_max_pool2d.default", "upsample_nearest2d.vec", "upsample_bilinear2d.vec",
              "upsample_bicubic2d.vec", "max_pool2d_with_indices.default"))(_spatial2)


@op_rule(*_ops("batch_norm.default", "_native_batch_norm_legit_no_training.default"))
def batch_norm(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """aten.batch_norm(input, weight, bias, running_mean, running_var, ...)."""
    x = b.info(node.args[0])
    e = b.along(x, 1) if x is not None and x.ndim > 1 else None
    for i, name in enumerate(("weight", "bias", "running_mean", "running_var"), start=1):
        p = node.args[i] if len(node.args) > i else None
        functional._link_param(b, node, p, 0, e, name)
    if "no_training" not in str(node.target):
        functional.stats_coupling(b, node, x, node.args[5] if len(node.args) > 5 else False)
    spec = out_spec(b, node)
    if isinstance(spec, (tuple, list)):  # (out, save_mean, save_invstd)
        return (x,) + tuple(TInfo(s.shape) if hasattr(s, "shape") else None for s in spec[1:])
    return x


@op_rule(*_ops("select.int"))
def select(b: Builder, node: fx.Node, m: Any = None) -> Any:
    x, dim, index = b.info(node.args[0]), node.args[1], node.args[2]
    spec = out_spec(b, node)
    if x is None:
        return TInfo(spec.shape)
    dim = dim % x.ndim
    return functions._index(b, node, x, tuple([slice(None)] * dim + [index]), spec)


@op_rule(*_ops("slice.Tensor"))
def slice_(b: Builder, node: fx.Node, m: Any = None) -> Any:
    x = b.info(node.args[0])
    spec = out_spec(b, node)
    if x is None:
        return TInfo(spec.shape)
    dim = (node.args[1] if len(node.args) > 1 else 0) % x.ndim
    size = b.spec(node.args[0]).shape[dim]
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    if isinstance(end, int) and end >= size:
        end = None
    if start == 0:
        start = None
    return functions._index(b, node, x, tuple([slice(None)] * dim + [slice(start, end, step)]),
                            spec)


@op_rule(*_ops("embedding.default"))
def embedding(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """aten.embedding(weight, indices): the embedding dim is produced by the weight's columns."""
    w, idx = node.args[0], node.args[1]
    spec = out_spec(b, node)
    out = keep_axes(b, node, b.info(idx), range(spec.ndim - 1), spec.shape, "")
    cols = b.along(b.info(w), 1)
    if cols is None:
        return out
    oa = b.new_axis(node.name, (spec.ndim - 1,), (spec.shape[-1],))
    b.couple(oa.elems(), cols)
    b.source(oa.elems())
    out.axes.append(oa)
    return out


# ------------------------------------------------------------------ affine matrix products
def _weight_of(b: Builder, n: Any) -> tuple[fx.Node, dict[int, int]] | None:
    """(parameter node, operand dim -> parameter dim) if matrix operand ``n`` is a 2-d
    parameter, possibly transposed (``addmm(bias, x, weight.t())`` of a decomposed linear)."""
    if not isinstance(n, fx.Node) or b.spec(n) is None or b.spec(n).ndim != 2:
        return None
    if n in b.param_nodes:
        return n, {0: 0, 1: 1}
    base = getattr(n.target, "__name__", str(n.target)).split(".")[0]
    swaps = base in ("t", "transpose") or (base == "permute" and list(n.args[1]) == [1, 0])
    if swaps and n.args[0] in b.param_nodes:
        return n.args[0], {0: 1, 1: 0}
    return None


@op_rule(*_ops("addmm.default", "mm.default", "baddbmm.default"), torch.addmm, torch.mm,
         torch.baddbmm, "addmm", "mm", "baddbmm")
def addmm(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """``addmm(input, mat1, mat2)`` = ``beta * input + alpha * mat1 @ mat2`` (``mm`` without
    ``input``; ``baddbmm`` batched). As transformers' ``Conv1D`` it is a linear layer whose
    weight is ``mat2`` (in, out): its columns produce the output channels."""
    spec = out_spec(b, node)
    with_input = functions.base_name(node) != "mm"
    a, c = node.args[int(with_input)], node.args[int(with_input) + 1]
    prod = matmul._product(b, node, b.info(a), b.spec(a).shape, b.info(c), b.spec(c).shape, spec,
                           False)
    w = _weight_of(b, c) if spec.ndim == 2 else None
    if w is not None:  # a weight (in, out): its columns produce the output's channels
        e = b.along(prod, 1)
        if e is not None:
            b.source(e)
        b.set_roles(w[0], {w[1][0]: "in", w[1][1]: "out"})
    if not with_input or not isinstance(node.args[0], fx.Node):
        return prod
    if w is not None:
        b.set_roles(node.args[0], {0: "out"})  # the bias of the layer
    # ``input`` broadcasts against the product: an elementwise sum of the two (the product is
    # handed to ``broadcast`` as the info of this node itself)
    b.infos[node] = prod
    return broadcast(b, node, [node, node.args[0]])


@op_rule(*_ops("split.Tensor"))
def split(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """``split(x, size, dim)`` whose literal ``size`` is a split-size attribute of the module
    (GPT-2's fused ``c_attn`` output split in q, k and v by ``self.split_size``): the pieces are
    equal and stay equal, so the same local channel goes in every piece, and the attribute is
    refreshed after pruning. Any other split is the general rule's."""
    spec = out_spec(b, node)
    x = b.info(node.args[0])
    size = node.args[1] if len(node.args) > 1 else None
    d = (node.args[2] if len(node.args) > 2 else 0) % spec[0].ndim if spec else 0
    first = next((u for u in node.users if getattr(u.target, "__name__", "") == "getitem"
                  and u.args[1] == 0), None)
    owner = next(((p, a) for p, mod in _enclosing_modules(b, node)[:2] for a in SPLIT_SIZE_ATTRS
                  if isinstance(size, int) and getattr(mod, a, None) == size), None)
    ax = x.axis_at(d) if x is not None else None
    if owner is None or first is None or ax is None or len(ax.dims) > 1 or \
            len({p.shape[d] for p in spec}) != 1:
        return functions.split(b, node)
    rows = b.along(x, d).reshape(len(spec), -1)
    b.couple(np.repeat(rows[:1], len(spec) - 1, axis=0), rows[1:])
    b.attr_sizes.append((owner[0], owner[1], first, d))
    others = [o for o in x.axes if d not in o.dims]
    out = []
    for k, p in enumerate(spec):
        na = b.new_axis(f"{node.name}[{k}]", (d,), (p.shape[d],))
        b.couple(na.elems(), rows[k])
        out.append(TInfo(p.shape, list(others) + [na]))
    return tuple(out)
