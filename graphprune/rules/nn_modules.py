"""Channel rules and resizers for torch.nn modules that fx keeps as leaves."""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .elements import Builder, TInfo
from .common import empty_like_spec, keep_axes, movement, out_spec, spatial
from .registry import module_rule, resizer

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _input(b: Builder, node: fx.Node) -> TInfo | None:
    return b.info(node.args[0]) if node.args else None


def _channel(b: Builder, x: TInfo | None, dim: int, size: int, node: fx.Node, what: str):
    """Elements of channel ``dim`` of ``x``; a frozen private axis if ``x`` has none there."""
    e = b.along(x, dim)
    if e is None or e.size != size:
        a = b.new_axis(node.name + ":" + what, (dim,), (size,))
        e = a.elems()
        b.freeze(e, f"{what} of '{node.target}' are fed by a dim that is not a channel "
                    "(a model input or an op without a channel rule)")
    return e


def _params(m: nn.Module, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if getattr(m, n, None) is not None]


# ------------------------------------------------------------------ conv / linear / embedding
def _conv_like(b: Builder, node: fx.Node, m: nn.Module, transposed: bool) -> TInfo:
    x = _input(b, node)
    spec = out_spec(b, node)
    path = node.target
    cdim = spec.ndim - (m.weight.ndim - 1)  # 1 when batched, 0 when unbatched
    g, cin, cout = m.groups, m.in_channels, m.out_channels
    ipg, opg = cin // g, cout // g
    if x is not None:
        for a in x.axes:
            if cdim not in a.dims:
                b.freeze(a.elems(), f"spatial/batch dim of a convolution at '{path}'")
    oa = b.new_axis(node.name, (cdim,), (cout,))
    o = oa.elems()
    i = _channel(b, x, cdim, cin, node, "input channels")
    b.source(o)
    if m.bias is not None:
        b.member(f"{path}.bias", 0, o, role="out", module=path)
    # weight is (C_out, C_in/g, *k) for conv and (C_in, C_out/g, *k) for transposed conv
    depthwise = g > 1 and ipg == 1
    if not transposed:
        b.member(f"{path}.weight", 0, o, role="out", module=path)
        if not depthwise:
            b.member(f"{path}.weight", 1, i, np.arange(cin) % ipg, role="in", module=path)
    else:
        b.member(f"{path}.weight", 0, i, role="in", module=path)
        if not depthwise:
            b.member(f"{path}.weight", 1, o, np.arange(cout) % opg, role="out", module=path)
    if depthwise:
        # input channel k and its opg outputs form one conv group, removed as a whole
        b.couple(np.repeat(i, opg), o)
    elif g > 1:
        # keep every group the same width: the same local index goes in every group
        for e, per in ((o, opg), (i, ipg)):
            rows = e.reshape(g, per)
            b.couple(np.repeat(rows[:1], g - 1, axis=0), rows[1:])
    return TInfo(spec.shape, [oa])


@module_rule(*_CONV)
def conv(b: Builder, node: fx.Node, m: nn.Module) -> TInfo:
    return _conv_like(b, node, m, transposed=False)


@module_rule(*_CONVT)
def conv_transpose(b: Builder, node: fx.Node, m: nn.Module) -> TInfo:
    return _conv_like(b, node, m, transposed=True)


@resizer(*_CONV, *_CONVT)
def resize_conv(m: nn.Module, in_shape: tuple[int, ...] | None) -> None:
    transposed = isinstance(m, _CONVT)
    depthwise = m.groups > 1 and m.in_channels // m.groups == 1
    if in_shape is not None:
        cin = in_shape[len(in_shape) - (m.weight.ndim - 1)]
    elif transposed:
        cin = m.weight.shape[0]
    elif depthwise:  # weight (C_out, 1, k): whole groups went, opg outputs each
        cin = m.weight.shape[0] // (m.out_channels // m.groups)
    else:
        cin = m.weight.shape[1] * m.groups
    if depthwise:
        m.groups = cin
    m.in_channels = cin
    m.out_channels = m.weight.shape[1] * m.groups if isinstance(m, _CONVT) else m.weight.shape[0]


@module_rule(nn.Linear)
def linear(b: Builder, node: fx.Node, m: nn.Linear) -> TInfo:
    x = _input(b, node)
    spec = out_spec(b, node)
    last = spec.ndim - 1
    path = node.target
    out = keep_axes(b, node, x, range(last), spec.shape,
                    f"channel axis spanning the features of '{path}'", consumed=[last])
    oa = b.new_axis(node.name, (last,), (m.out_features,))
    b.source(oa.elems())
    b.member(f"{path}.weight", 0, oa.elems(), role="out", module=path)
    if m.bias is not None:
        b.member(f"{path}.bias", 0, oa.elems(), role="out", module=path)
    i = _channel(b, x, last, m.in_features, node, "input features")
    b.member(f"{path}.weight", 1, i, role="in", module=path)
    out.axes.append(oa)
    return out


@resizer(nn.Linear)
def resize_linear(m: nn.Linear, in_shape: tuple[int, ...] | None) -> None:
    m.out_features, m.in_features = m.weight.shape


@module_rule(nn.Embedding)
def embedding(b: Builder, node: fx.Node, m: nn.Embedding) -> TInfo:
    x = _input(b, node)
    spec = out_spec(b, node)
    out = keep_axes(b, node, x, range(spec.ndim - 1), spec.shape, "")
    oa = b.new_axis(node.name, (spec.ndim - 1,), (m.embedding_dim,))
    b.source(oa.elems())
    b.member(f"{node.target}.weight", 1, oa.elems(), role="out", module=node.target)
    out.axes.append(oa)
    return out


@resizer(nn.Embedding)
def resize_embedding(m: nn.Embedding, in_shape: tuple[int, ...]) -> None:
    m.embedding_dim = m.weight.shape[1]


# ------------------------------------------------------------------ normalization
def _norm_members(b: Builder, node: fx.Node, m: nn.Module, e: np.ndarray) -> None:
    for name in _params(m, ("weight", "bias", "running_mean", "running_var")):
        b.member(f"{node.target}.{name}", 0, e, role="param", module=node.target)


def _per_channel(b: Builder, node: fx.Node, m: nn.Module, cdim: int, size: int) -> TInfo | None:
    x = _input(b, node)
    e = _channel(b, x, cdim, size, node, "channels")
    _norm_members(b, node, m, e)
    return x


@module_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
def batchnorm(b: Builder, node: fx.Node, m: nn.Module) -> TInfo | None:
    return _per_channel(b, node, m, 1, m.num_features)


@module_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def instancenorm(b: Builder, node: fx.Node, m: nn.Module) -> TInfo | None:
    spec = out_spec(b, node)
    batched = {nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4, nn.InstanceNorm3d: 5}
    nd = next(v for k, v in batched.items() if isinstance(m, k))
    return _per_channel(b, node, m, 1 if spec.ndim == nd else 0, m.num_features)


@resizer(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def resize_bn(m: nn.Module, in_shape: tuple[int, ...] | None) -> None:
    for t in (getattr(m, "weight", None), getattr(m, "running_mean", None)):
        if t is not None:
            m.num_features = t.shape[0]
            return
    if in_shape is None:
        return
    nd = 1 if len(in_shape) > 1 else 0
    if isinstance(m, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
        nd = 1 if len(in_shape) == {nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4}.get(type(m), 5) else 0
    m.num_features = in_shape[nd]


@module_rule(nn.GroupNorm)
def groupnorm(b: Builder, node: fx.Node, m: nn.GroupNorm) -> TInfo | None:
    x = _input(b, node)
    e = _channel(b, x, 1, m.num_channels, node, "channels")
    rows = e.reshape(m.num_groups, -1)
    if rows.shape[1] > 1:
        b.couple(np.repeat(rows[:, :1], rows.shape[1] - 1, axis=1), rows[:, 1:])
    _norm_members(b, node, m, e)
    return x


@resizer(nn.GroupNorm)
def resize_groupnorm(m: nn.GroupNorm, in_shape: tuple[int, ...] | None) -> None:
    per_group = m.num_channels // m.num_groups
    m.num_channels = m.weight.shape[0] if m.weight is not None else in_shape[1]
    m.num_groups = m.num_channels // per_group


@module_rule(nn.LayerNorm, nn.RMSNorm)
def layernorm(b: Builder, node: fx.Node, m: nn.Module) -> TInfo | None:
    x = _input(b, node)
    spec = out_spec(b, node)
    shape = tuple(m.normalized_shape)
    if len(shape) != 1:
        if x is not None:
            for a in x.axes:
                if any(d >= spec.ndim - len(shape) for d in a.dims):
                    b.freeze(a.elems(), f"normalized over several dims at '{node.target}'")
        return x
    e = _channel(b, x, spec.ndim - 1, shape[0], node, "features")
    b.mark_value_coupled(e, f"{type(m).__name__} '{node.target}' normalizes across channels")
    for name in _params(m, ("weight", "bias")):
        b.member(f"{node.target}.{name}", 0, e, role="param", module=node.target)
    return x


@resizer(nn.LayerNorm, nn.RMSNorm)
def resize_layernorm(m: nn.Module, in_shape: tuple[int, ...] | None) -> None:
    if len(m.normalized_shape) == 1:
        w = getattr(m, "weight", None)
        m.normalized_shape = (w.shape[0],) if w is not None else (in_shape[-1],)


@module_rule(nn.PReLU)
def prelu(b: Builder, node: fx.Node, m: nn.PReLU) -> TInfo | None:
    x = _input(b, node)
    if m.num_parameters > 1:
        spec = out_spec(b, node)
        e = _channel(b, x, 1 if spec.ndim > 1 else 0, m.num_parameters, node, "channels")
        b.member(f"{node.target}.weight", 0, e, role="param", module=node.target)
    return x


@resizer(nn.PReLU)
def resize_prelu(m: nn.PReLU, in_shape: tuple[int, ...]) -> None:
    m.num_parameters = m.weight.shape[0]


# ------------------------------------------------------------------ value-preserving modules
_ELEMENTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink,
    nn.RReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


@module_rule(*_ELEMENTWISE)
def elementwise(b: Builder, node: fx.Node, m: nn.Module) -> TInfo | None:
    return _input(b, node)


@module_rule(nn.Softmax, nn.LogSoftmax, nn.Softmin)
def softmax(b: Builder, node: fx.Node, m: nn.Module) -> TInfo | None:
    x = _input(b, node)
    if x is not None and m.dim is not None:
        a = x.axis_at(m.dim % x.ndim)
        if a is not None:
            b.freeze(a.elems(), f"softmax across channels at '{node.target}'")
    return x


_POOL = {
    1: (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d),
    2: (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
        nn.FractionalMaxPool2d, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
    3: (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d,
        nn.FractionalMaxPool3d),
}
_PAD = {
    1: (nn.ZeroPad1d, nn.ConstantPad1d, nn.ReflectionPad1d, nn.ReplicationPad1d, nn.CircularPad1d),
    2: (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d),
    3: (nn.ZeroPad3d, nn.ConstantPad3d, nn.ReflectionPad3d, nn.ReplicationPad3d, nn.CircularPad3d),
}


@module_rule(*_POOL[1], *_POOL[2], *_POOL[3], *_PAD[1], *_PAD[2], *_PAD[3])
def pool(b: Builder, node: fx.Node, m: nn.Module) -> object:
    k = next(k for t in (_POOL, _PAD) for k, v in t.items() if isinstance(m, v))
    return spatial(b, node, _input(b, node), k)


@module_rule(nn.Upsample)
def upsample(b: Builder, node: fx.Node, m: nn.Module) -> object:
    spec = out_spec(b, node)
    return spatial(b, node, _input(b, node), spec.ndim - 2)


@module_rule(nn.Flatten)
def flatten_module(b: Builder, node: fx.Node, m: nn.Flatten) -> TInfo | None:
    return movement(b, node, lambda t: m(t))


@module_rule(nn.Unflatten)
def unflatten_module(b: Builder, node: fx.Node, m: nn.Unflatten) -> TInfo | None:
    spec = out_spec(b, node)
    d = m.dim % (spec.ndim - len(m.unflattened_size) + 1)
    sizes = [None] * d + list(m.unflattened_size) + [None] * spec.ndim
    return movement(b, node, lambda t: m(t), sizes=sizes[: spec.ndim])


@module_rule(nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
def shuffle_module(b: Builder, node: fx.Node, m: nn.Module) -> TInfo | None:
    from .torch_ops import channel_regroup

    fn = {nn.PixelShuffle: F.pixel_shuffle, nn.PixelUnshuffle: F.pixel_unshuffle}.get(
        type(m), torch.channel_shuffle)
    k = getattr(m, "upscale_factor", None) or getattr(m, "downscale_factor", None) or m.groups
    return channel_regroup(b, node, fn, k)


def opaque(b: Builder, node: fx.Node, m: nn.Module | None) -> object:
    """Output of an op we cannot see into: same structure, no channel axes."""
    return empty_like_spec(out_spec(b, node))
