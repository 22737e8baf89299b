"""Shape-only calls: the meta run of stage 1 (``trace.record_shapes``) and the stand-ins of a
verification forward (``apply.shrink.verify_layers``).

On ``meta`` tensors most ops cost a shape function, but a few common ones go through Python
decompositions that cost more than the real kernel at batch 1 (BatchNorm ~2 ms, ReLU6 ~4 ms,
cat ~1 ms a call). For those, when the module is exactly a stock ``torch.nn`` class called plainly
(no hooks, one floating-point tensor) or the function gets plain contiguous tensors of one dtype,
the output is what the op is documented to return: a tensor of the input's shape, dtype and
layout (the input itself where the real op returns it: ``Identity``, in-place activations,
dropout in eval mode, ``+=``), the broadcast shape of a binary op, the concatenated shape of a
``cat``. Anything else returns ``None`` and the op runs on the meta tensors.

``stock_output`` is the layer part on any device: where a model's shapes and control flow do not
depend on values (its shapes were recorded on meta tensors), checking the shapes of a pruned
model does not need the arithmetic of its stock layers.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module

# elementwise layers: output shape, dtype and layout are the input's
_ELEMENTWISE = frozenset((
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.Hardtanh, nn.Mish, nn.Softplus,
))
_PASS = frozenset((nn.Identity,))  # return their input
_DROPOUT = frozenset((nn.Dropout, nn.AlphaDropout))  # return their input in eval mode
_BATCHNORM = frozenset((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
# the classes ``stock_output`` knows
STOCK_LAYERS = _ELEMENTWISE | _PASS | _DROPOUT | _BATCHNORM | {nn.AdaptiveAvgPool2d, nn.Conv2d, nn.Linear}
_BINARY = frozenset((operator.add, operator.mul, operator.sub, operator.truediv, torch.add,
                     torch.mul, torch.sub))
_INPLACE = frozenset((operator.iadd, operator.imul, operator.isub))


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks)


def _new(shape: Any, x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` like ``x`` (filling it would cost what a stand-in
    saves: its values are never read for anything that matters)."""
    return torch.empty(shape, dtype=x.dtype, device=x.device)


def _like(x: torch.Tensor) -> torch.Tensor:
    if x.is_contiguous():
        return _new(x.shape, x)
    return torch.empty_like(x)  # keeps the layout (channels_last), which a later view may need


def _bn_fits(m: nn.Module, x: torch.Tensor) -> bool:
    """Eval-mode BatchNorm with running statistics whose every tensor matches the input's
    channels and dtype (anything else runs the kernel, which raises where the real one would)."""
    if m.training or m.running_mean is None or x.ndim < 2:
        return False
    try:
        m._check_input_dim(x)
    except ValueError:
        return False
    c = x.shape[1]
    return all(t is None or (tuple(t.shape) == (c,) and t.dtype == x.dtype)
               for t in (m.weight, m.bias, m.running_mean, m.running_var))


def patched(m: nn.Module) -> bool:
    """Whether the instance overrides what its class's forward runs."""
    d = m.__dict__
    return "forward" in d or "_conv_forward" in d


def shape_only_call(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The output of ``m(*args, **kwargs)`` on meta tensors without running it, or None."""
    if kwargs or len(args) != 1 or _hooked(m) or patched(m):
        return None
    x = args[0]
    if not isinstance(x, torch.Tensor) or x.device.type != "meta":
        return None
    return stock_output(m, x)


def stock_output(m: nn.Module, x: Any) -> Any:
    """What the stock layer ``m`` (its own class's forward, called on the tensor ``x``) returns,
    as far as its shape, dtype, device and layout go (an uninitialised tensor, or ``x`` itself
    where the layer returns its input), computed from attributes; None when ``m`` is not such a
    layer or anything about it is unusual (then only running it says what it does)."""
    cls = type(m)
    if cls not in STOCK_LAYERS or not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    if cls in _PASS or (cls in _DROPOUT and not m.training):
        return x
    if cls in _ELEMENTWISE:
        return x if getattr(m, "inplace", False) else _like(x)
    if cls in _BATCHNORM and _bn_fits(m, x):
        return _like(x)
    if cls is nn.Conv2d:
        return _conv2d(m, x)
    if cls is nn.Linear:
        return _linear(m, x)
    if cls is nn.AdaptiveAvgPool2d and x.ndim in (3, 4) and x.is_contiguous() and \
            all(s > 0 for s in x.shape[-3:]):
        size = (m.output_size,) * 2 if isinstance(m.output_size, int) else tuple(m.output_size)
        out = tuple(x.shape[-2 + i] if s is None else int(s) for i, s in enumerate(size))
        return _new((*x.shape[:-2], *out), x)
    return None


def _linear(m: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
    """The shape of ``x @ weight.T + bias``, for a contiguous input whose last dim and dtype fit
    the weight."""
    w, bias = m.weight, m.bias
    if x.ndim < 1 or not x.is_contiguous() or w.dtype != x.dtype or w.ndim != 2 \
            or tuple(w.shape) != (m.out_features, m.in_features) or x.shape[-1] != m.in_features \
            or (bias is not None and (tuple(bias.shape) != (m.out_features,) or bias.dtype != x.dtype)):
        return None
    return _new((*x.shape[:-1], m.out_features), x)


def _conv2d(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor | None:
    """A batched, zero-padded Conv2d whose weight and bias fit the input: the output size formula
    of ``nn.Conv2d``'s documentation (anything unusual runs the kernel's shape function)."""
    w, bias = m.weight, m.bias
    if m.padding_mode != "zeros" or x.ndim != 4 or 0 in x.shape[1:] or not x.is_contiguous() \
            or w.dtype != x.dtype or not w.is_contiguous() \
            or tuple(w.shape[:2]) != (m.out_channels, m.in_channels // m.groups) \
            or x.shape[1] != m.in_channels or m.in_channels % m.groups \
            or m.out_channels % m.groups \
            or (bias is not None and (tuple(bias.shape) != (m.out_channels,) or bias.dtype != x.dtype)):
        return None
    if m.padding == "same":
        out = x.shape[2:]
    else:
        pad = (0, 0) if m.padding == "valid" else m.padding
        out = tuple((x.shape[2 + i] + 2 * pad[i] - m.dilation[i] * (w.shape[2 + i] - 1) - 1)
                    // m.stride[i] + 1 for i in range(2))
        if min(out) < 1:
            return None
    return _new((x.shape[0], m.out_channels, *out), x)


def _plain(ts: Any) -> bool:
    """Contiguous floating meta tensors of one dtype."""
    return all(isinstance(t, torch.Tensor) and t.device.type == "meta" and t.is_floating_point()
               and t.is_contiguous() and t.dtype == ts[0].dtype for t in ts)


def shape_only_function(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The output of ``fn(*args, **kwargs)`` on meta tensors without running it, or None."""
    if fn in _BINARY or fn in _INPLACE:
        if kwargs or len(args) != 2 or not _plain(args):
            return None
        a, b = args
        try:
            shape = torch.broadcast_shapes(a.shape, b.shape)
        except RuntimeError:
            return None
        if fn in _INPLACE:
            return a if shape == a.shape else None
        return _new(shape, a)
    if fn is torch.cat:
        ts = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if len(args) > 2 or set(kwargs) - {"tensors", "dim"} or not isinstance(ts, (list, tuple)) \
                or not ts or not isinstance(dim, int) or not _plain(ts):
            return None
        nd = ts[0].ndim
        if nd == 0 or not -nd <= dim < nd or any(t.ndim != nd for t in ts):
            return None
        dim %= nd
        rest = [s for i, s in enumerate(ts[0].shape) if i != dim]
        if any([s for i, s in enumerate(t.shape) if i != dim] != rest for t in ts):
            return None
        shape = list(ts[0].shape)
        shape[dim] = sum(t.shape[dim] for t in ts)
        return _new(shape, ts[0])
    return None
