"""The op table of the rule conformance suite: one one-op case per function / method with a
channel rule (``graphprune.rules.registered()["ops"]``, ATen excepted), the registered ops
exempted (with why), the cases that fail today (xfail) and the ops that must freeze."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .cases import Body, Case, binary, make, module_case, optional, unary

torch.fx.wrap("pack_padded_sequence")  # fx cannot trace into them (torch.as_tensor on a proxy)
torch.fx.wrap("pad_packed_sequence")

_SWIN = "torchvision.models.swin_transformer"


def _pos(t: torch.Tensor) -> torch.Tensor:
    return t * t + 1.0


def _mask(x: torch.Tensor) -> torch.Tensor:
    """A (B, 1, H, W) condition computed from the input: broadcasts over the channels."""
    return x[:, :1] > 0


def _attention(mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Case:
    """scores = q k^T (q and k channels contracted together), softmax over keys, @ v."""
    def body(n: nn.Module, x: torch.Tensor) -> torch.Tensor:
        q, k, v = n.a(x), n.b(x), n.c(x)
        return mm(torch.softmax(mm(q, k.transpose(1, 2)), -1), v)
    return Case(body, layout="nlc")


def _einsum_attention(n: nn.Module, x: torch.Tensor) -> torch.Tensor:
    q, k, v = n.a(x), n.b(x), n.c(x)
    s = torch.einsum("bnc,bmc->bnm", q, k).softmax(-1)
    return torch.einsum("bnm,bmc->bnc", s, v)


def _packed(n: nn.Module, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    p = pack_padded_sequence(n.a(tokens), lengths, batch_first=True, enforce_sorted=False)
    y, _ = pad_packed_sequence(n.mid(p)[0], batch_first=True, total_length=tokens.shape[1])
    return y


def _view(n: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = n.a(x)
    b, c, hh, w = h.shape
    return h.view(b, c, hh * w)


def _reshape_fn(n: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = n.a(x)
    return torch.reshape(h, (h.shape[0], h.shape[1], -1))


def _pair(pieces: Any, op: Callable[[Any, Any], Any]) -> torch.Tensor:
    return op(pieces[0], pieces[1])


def _swap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b, a], 1)


def _split(n: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = n.a(x)
    pieces = torch.split(h, h.shape[1] // 2, 1)  # sizes computed at run time: equal halves
    return torch.cat([pieces[1], pieces[0]], 1)


def _layer_norm(fn: Callable[..., torch.Tensor]) -> Body:
    def body(n: nn.Module, x: torch.Tensor) -> torch.Tensor:
        h = n.a(x)
        if fn is F.layer_norm:
            return fn(h, n.mid.normalized_shape, n.mid.weight, n.mid.bias)
        return fn(h, n.mid.normalized_shape, n.mid.weight)
    return body


def _grid_sample(n: nn.Module, x: torch.Tensor) -> torch.Tensor:
    grid = x[:, :2].permute(0, 2, 3, 1).tanh()  # (B, H, W, 2) from the input, not a channel
    return F.grid_sample(n.a(x), grid, align_corners=False)


def _stochastic_depth() -> nn.Module:
    from torchvision.ops import StochasticDepth  # calls the fx-wrapped stochastic_depth

    return StochasticDepth(0.5, "row")


C_NN = torch._C._nn

class _FunctionalGroupNorm(nn.GroupNorm):
    """A GroupNorm computing itself with F.group_norm, as timm's GroupNorm1 does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class _TorchGroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


OP_CASES: dict[str, Case] = {
    # elementwise, one tensor
    **{f"torch.{f.__name__}": unary(f) for f in (
        torch.abs, torch.cos, torch.sin, torch.exp, torch.erf, torch.neg, torch.sigmoid,
        torch.tanh, torch.sign, torch.square, torch.nan_to_num, torch.detach, torch.relu,
        torch.relu_)},
    **{f"torch.{f.__name__}": unary(lambda h, f=f: f(_pos(h))) for f in (
        torch.sqrt, torch.rsqrt, torch.log, torch.reciprocal)},
    "torch.clamp": unary(lambda h: torch.clamp(h, -0.5, 0.5)),
    "torch.clip": unary(lambda h: torch.clip(h, max=0.3)),
    **{f"torch.nn.functional.{f.__name__}": unary(f) for f in (
        F.relu, F.relu6, F.elu, F.selu, F.celu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
        F.hardtanh, F.leaky_relu, F.tanhshrink, F.softsign)},
    **{f"torch.nn.functional.{f.__name__}": unary(lambda h, f=f: f(h, 0.5, training=False),
                                                   lay)
       for f, lay in ((F.dropout, "nchw"), (F.dropout1d, "ncl"), (F.dropout2d, "nchw"),
                      (F.dropout3d, "ncdhw"), (F.alpha_dropout, "nchw"),
                      (F.feature_alpha_dropout, "nchw"))},
    **{f"torch._C._nn.{f.__name__}": unary(f) for f in (
        C_NN.gelu, C_NN.silu, C_NN.hardsigmoid, C_NN.hardswish, C_NN.elu, C_NN.leaky_relu,
        C_NN.relu6, C_NN.hardtanh, C_NN.softplus, C_NN.mish, C_NN.log_sigmoid)},
    "_operator.neg": unary(operator.neg),
    "_operator.pos": unary(operator.pos),
    "torchvision.ops.stochastic_depth.stochastic_depth": module_case(_stochastic_depth),
    **{f"Tensor.{m}": unary(lambda h, m=m: getattr(h, m)()) for m in (
        "abs", "clone", "contiguous", "cos", "cpu", "detach", "erf", "exp", "exp_", "float",
        "nan_to_num", "neg", "relu", "relu_", "sigmoid", "sigmoid_", "sign", "sin", "square",
        "tanh", "tanh_")},
    **{f"Tensor.{m}": unary(lambda h, m=m: getattr(_pos(h), m)()) for m in (
        "log", "reciprocal", "rsqrt", "sqrt")},
    **{f"Tensor.{m}": unary(lambda h, m=m: getattr(h, m)().float()) for m in (
        "double", "half", "bfloat16")},
    "Tensor.clamp": unary(lambda h: h.clamp(-0.5, 0.5)),
    "Tensor.clamp_": unary(lambda h: h.clamp_(min=-0.2)),
    "Tensor.clip": unary(lambda h: h.clip(-0.5, 0.5)),
    "Tensor.to": unary(lambda h: h.to(torch.float64).to(torch.float32)),
    "Tensor.type": unary(lambda h: h.type(torch.float32)),
    "Tensor.requires_grad_": unary(lambda h: h.requires_grad_(False)),
    "Tensor.type_as": Case(lambda n, x: n.a(x).type_as(x)),
    # elementwise, two tensors (coupled one to one) or a tensor and a scalar
    **{f"_operator.{op.__name__}": binary(op) for op in (
        operator.add, operator.sub, operator.mul)},
    "_operator.truediv": binary(lambda a, b: a / _pos(b)),
    "_operator.floordiv": unary(lambda h: h // 0.25),
    "_operator.mod": unary(lambda h: h % 0.25),
    "_operator.pow": unary(lambda h: h ** 2),
    **{f"torch.{f.__name__}": binary(f) for f in (
        torch.add, torch.sub, torch.mul, torch.maximum, torch.minimum, torch.hypot, torch.atan2)},
    "torch.div": binary(lambda a, b: torch.div(a, _pos(b))),
    "torch.true_divide": binary(lambda a, b: torch.true_divide(a, _pos(b))),
    "torch.pow": unary(lambda h: torch.pow(h, 2)),
    "torch.fmod": unary(lambda h: torch.fmod(h, 0.3)),
    "torch.remainder": unary(lambda h: torch.remainder(h, 0.3)),
    "torch.lerp": binary(lambda a, b: torch.lerp(a, b, 0.3)),
    "torch.addcmul": binary(lambda a, b: torch.addcmul(a, b, b, value=0.5)),
    "torch.addcdiv": binary(lambda a, b: torch.addcdiv(a, b, _pos(b))),
    "torch.where": Case(lambda n, x: torch.where(_mask(x), n.a(x), n.b(x))),
    **{f"Tensor.{m}": binary(lambda a, b, m=m: getattr(a, m)(b)) for m in (
        "add", "add_", "sub", "sub_", "mul", "mul_", "maximum", "minimum")},
    **{f"Tensor.{m}": binary(lambda a, b, m=m: getattr(a, m)(_pos(b))) for m in (
        "div", "div_", "true_divide")},
    "Tensor.pow": unary(lambda h: h.pow(3)),
    "Tensor.lerp": binary(lambda a, b: a.lerp(b, 0.7)),
    "Tensor.addcmul": binary(lambda a, b: a.addcmul(b, b)),
    "Tensor.addcdiv": binary(lambda a, b: a.addcdiv(b, _pos(b))),
    "Tensor.where": Case(lambda n, x: n.a(x).where(_mask(x), n.b(x))),
    "Tensor.masked_fill": Case(lambda n, x: n.a(x).masked_fill(_mask(x), 0.5)),
    "Tensor.masked_fill_": Case(lambda n, x: n.a(x).masked_fill_(_mask(x), -1.0)),
    # shaped like another tensor
    "torch.zeros_like": unary(lambda h: h + torch.zeros_like(h)),
    "torch.ones_like": unary(lambda h: h * torch.ones_like(h)),
    "torch.full_like": unary(lambda h: h * torch.full_like(h, 2.0)),
    "torch.rand_like": unary(lambda h: h + 0.0 * torch.rand_like(h)),
    "torch.randn_like": unary(lambda h: h + 0.0 * torch.randn_like(h)),
    "Tensor.expand_as": binary(lambda a, b: a * b.mean((2, 3), keepdim=True).expand_as(a)),
    "Tensor.view_as": binary(lambda a, b: a.flatten(2).view_as(b)),
    "Tensor.reshape_as": binary(lambda a, b: a.flatten(2).reshape_as(b)),
    # made from sizes (no channel): broadcast against the channels
    # (sizes read from the batch dim, so that fx records the call instead of a constant)
    "torch.zeros": unary(lambda h: h + torch.zeros((h.shape[0], 1, 6, 6))),
    "torch.ones": unary(lambda h: h * torch.ones((h.shape[0], 1, 1, 6))),
    "torch.full": unary(lambda h: h * torch.full((h.shape[0], 1, 1, 6), 0.5)),
    "torch.empty": unary(lambda h: h + torch.empty((h.shape[0], 1, 6, 1)).zero_()),
    "Tensor.new_zeros": unary(lambda h: h + h.new_zeros(1, 1, 6, 6)),
    "Tensor.new_ones": unary(lambda h: h * h.new_ones(6)),
    "Tensor.new_full": unary(lambda h: h * h.new_full((1, 1, 1, 6), 0.5)),
    "Tensor.new_empty": unary(lambda h: h - h.new_empty(1, 1, 6, 6).zero_()),
    # softmax over a spatial dim, norms
    **{f"torch.nn.functional.{f.__name__}": unary(lambda h, f=f: f(h, dim=-1)) for f in (
        F.softmax, F.log_softmax, F.softmin)},
    "torch.softmax": unary(lambda h: torch.softmax(h, -1)),
    "torch.log_softmax": unary(lambda h: torch.log_softmax(h, -1)),
    "Tensor.softmax": unary(lambda h: h.softmax(-1)),
    "Tensor.log_softmax": unary(lambda h: h.log_softmax(dim=-1)),
    "torch.nn.functional.normalize": unary(lambda h: F.normalize(h, dim=-1)),
    "torch.nn.functional.layer_norm": Case(_layer_norm(F.layer_norm), make(nn.LayerNorm, 8),
                                           "nlc"),
    "torch.nn.functional.rms_norm": Case(_layer_norm(F.rms_norm), make(nn.RMSNorm, 8), "nlc"),
    "torch.nn.functional.batch_norm": Case(
        lambda n, x: F.batch_norm(n.a(x), n.mid.running_mean, n.mid.running_var, n.mid.weight,
                                  n.mid.bias, False), make(nn.BatchNorm2d, 8)),
    "torch.nn.functional.instance_norm": Case(
        lambda n, x: F.instance_norm(n.a(x), weight=n.mid.weight, bias=n.mid.bias),
        make(nn.InstanceNorm2d, 8, affine=True)),
    "torch.nn.functional.group_norm": Case(lambda n, x: n.mid(n.a(x)),
                                           make(_FunctionalGroupNorm, 4, 16), width=16),
    "torch.group_norm": Case(lambda n, x: n.mid(n.a(x)), make(_TorchGroupNorm, 4, 16),
                             width=16),
    # functional layers with a module's parameters
    "torch._C._nn.linear": Case(lambda n, x: F.linear(n.a(x), n.mid.weight, n.mid.bias),
                                make(nn.Linear, 8, 10), "nlc"),
    "torch.conv1d": Case(lambda n, x: F.conv1d(n.a(x), n.mid.weight, n.mid.bias, padding=1),
                         make(nn.Conv1d, 8, 6, 3), "ncl"),
    "torch.conv2d": Case(lambda n, x: F.conv2d(n.a(x), n.mid.weight, n.mid.bias),
                         make(nn.Conv2d, 8, 6, 3)),
    "torch.conv3d": Case(lambda n, x: F.conv3d(n.a(x), n.mid.weight, n.mid.bias),
                         make(nn.Conv3d, 8, 6, 1), "ncdhw"),
    # concatenation, stacking, splitting
    **{f"torch.{f.__name__}": binary(lambda a, b, f=f: f([a, b], 1)) for f in (
        torch.cat, torch.concat, torch.concatenate)},
    "torch.stack": binary(lambda a, b: torch.stack([a, b], 2).mean(2)),
    # the pieces swapped, not combined elementwise (which would couple them by itself)
    "torch.chunk": unary(lambda h: _pair(torch.chunk(h, 2, 1), _swap)),
    "Tensor.chunk": unary(lambda h: _pair(h.chunk(4, dim=1), _swap)),
    "torch.functional.split": Case(_split),
    "Tensor.split": unary(lambda h: _pair(h.split(3, dim=2), operator.add)),  # spatial
    "Tensor.split_with_sizes": unary(lambda h: h.split_with_sizes([2, 4], dim=3)[1]),
    "torch.tensor_split": unary(lambda h: torch.tensor_split(h, 2, dim=2)[0]),
    "Tensor.tensor_split": unary(lambda h: h.tensor_split([1, 4], dim=3)[2]),
    "torch.unbind": unary(lambda h: _pair(torch.unbind(h, 2), operator.add)),
    "Tensor.unbind": unary(lambda h: h.unbind(-1)[0]),
    # indexing
    "_operator.getitem": unary(lambda h: h[:, :, 1:-1, ::2]),
    "torch.narrow": unary(lambda h: torch.narrow(h, 2, 1, 4)),
    "Tensor.narrow": unary(lambda h: h.narrow(-1, 0, 3)),
    # reshaping and moving data
    "Tensor.view": Case(_view),
    "Tensor.reshape": unary(lambda h: h.reshape(h.shape[0], h.shape[1], 3, -1)),
    "torch.reshape": Case(_reshape_fn),
    "Tensor.expand": unary(lambda h: h.mean(-1, keepdim=True).expand(-1, -1, -1, 5)),
    "torch.unflatten": unary(lambda h: torch.unflatten(h.flatten(2), 2, (3, 12))),
    "Tensor.unflatten": unary(lambda h: h.flatten(2).unflatten(-1, (6, 6))),
    "torch.flatten": unary(lambda h: torch.flatten(h, 1)),  # into a Linear
    "Tensor.flatten": unary(lambda h: h.flatten(2)),
    "torch.ravel": unary(lambda h: torch.ravel(h[0]), "nc"),
    "Tensor.ravel": unary(lambda h: h[1].ravel(), "nc"),
    "torch.permute": unary(lambda h: torch.permute(h, (0, 2, 3, 1)), post="last"),
    "Tensor.permute": unary(lambda h: h.permute(0, 3, 2, 1), post="last"),
    "torch.transpose": unary(lambda h: torch.transpose(h, 1, 3), post="last"),
    "Tensor.transpose": unary(lambda h: h.transpose(-1, 1), post="last"),
    "torch.swapaxes": unary(lambda h: torch.swapaxes(h, 1, 3), post="last"),
    "Tensor.swapaxes": unary(lambda h: h.swapaxes(1, 3), post="last"),
    "torch.swapdims": unary(lambda h: torch.swapdims(h, 1, 3), post="last"),
    "Tensor.swapdims": unary(lambda h: h.swapdims(3, 1), post="last"),
    "torch.movedim": unary(lambda h: torch.movedim(h, 1, -1), post="last"),
    "Tensor.movedim": unary(lambda h: h.movedim(1, 3), post="last"),
    "torch.moveaxis": unary(lambda h: torch.moveaxis(h, 1, -1), post="last"),
    "Tensor.moveaxis": unary(lambda h: h.moveaxis(1, 3), post="last"),
    "torch.t": unary(lambda h: torch.t(h).relu().t(), "nc"),
    "Tensor.t": unary(lambda h: h.t().sigmoid().t(), "nc"),
    "Tensor.mT": unary(lambda h: h.mT.tanh().mT, "nlc"),
    "torch.squeeze": unary(lambda h: torch.squeeze(h.unsqueeze(2), 2)),
    "Tensor.squeeze": unary(lambda h: h[:, :, :1].squeeze(2), post="first"),
    "torch.unsqueeze": unary(lambda h: torch.unsqueeze(h, -1), "ncl"),
    "Tensor.unsqueeze": unary(lambda h: h.unsqueeze(2), "ncl"),
    "Tensor.repeat": unary(lambda h: h.repeat(1, 1, 2, 1)),
    "torch.tile": unary(lambda h: torch.tile(h, (1, 1, 1, 2))),
    "Tensor.tile": unary(lambda h: h.tile((2, 1))),
    "torch.roll": unary(lambda h: torch.roll(h, 1, 2)),
    "Tensor.roll": unary(lambda h: h.roll(-2, -1)),
    "torch.flip": unary(lambda h: torch.flip(h, [2])),
    "Tensor.flip": unary(lambda h: h.flip(-1)),
    "torch.channel_shuffle": unary(lambda h: torch.channel_shuffle(h, 2)),
    "torch.native_channel_shuffle": unary(lambda h: torch.native_channel_shuffle(h, 4)),
    "torch.pixel_shuffle": unary(lambda h: torch.pixel_shuffle(h, 2), width=16),
    "torch.pixel_unshuffle": unary(lambda h: torch.pixel_unshuffle(h, 2)),
    # reductions over spatial dims (the channel dim stays)
    **{f"torch.{f.__name__}": unary(lambda h, f=f: f(h, -1)) for f in (
        torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.prod,
        torch.logsumexp)},
    **{f"Tensor.{m}": unary(lambda h, m=m: getattr(h, m)(-1)) for m in (
        "mean", "sum", "amax", "amin", "std", "var", "prod", "logsumexp")},
    "torch.functional.norm": unary(lambda h: torch.norm(h, dim=(2, 3))),
    "Tensor.norm": unary(lambda h: h.norm(2, -1)),
    "torch.max": binary(lambda a, b: torch.max(a, -1)[0] + torch.max(a, b).mean(-1)),
    "torch.min": binary(lambda a, b: torch.min(a, dim=2)[0] + torch.min(a, b).mean(2)),
    "Tensor.max": unary(lambda h: h.max(-1)[0]),
    "Tensor.min": unary(lambda h: h.min(dim=2)[0]),
    "torch.any": unary(lambda h: h * torch.any(h.relu(), -1, keepdim=True)),
    "torch.all": unary(lambda h: h * torch.all(h.relu(), -1, keepdim=True)),
    "Tensor.any": unary(lambda h: h * h.relu().any(-1, keepdim=True)),
    "Tensor.all": unary(lambda h: h * h.sigmoid().all(-1, keepdim=True)),
    "torch.argmax": unary(lambda h: h + torch.argmax(h, -1, keepdim=True)),
    "torch.argmin": unary(lambda h: h + torch.argmin(h, -1, keepdim=True)),
    "Tensor.argmax": unary(lambda h: h + h.argmax(-1, keepdim=True)),
    "Tensor.argmin": unary(lambda h: h - h.argmin(dim=-1, keepdim=True)),
    # pooling, resampling, padding
    "torch.nn.functional.max_pool1d": unary(lambda h: F.max_pool1d(h, 2), "ncl"),
    "torch.adaptive_avg_pool1d": unary(lambda h: F.adaptive_avg_pool1d(h, 3), "ncl"),
    "torch.nn.functional.adaptive_max_pool1d": unary(lambda h: F.adaptive_max_pool1d(h, 3),
                                                      "ncl"),
    "torch.nn.functional.lp_pool1d": unary(lambda h: F.lp_pool1d(h, 2, 2), "ncl"),
    "torch.avg_pool1d": unary(lambda h: torch.avg_pool1d(h, 2), "ncl"),
    "torch.max_pool1d": unary(lambda h: torch.max_pool1d(h, 2), "ncl"),
    "torch._C._nn.avg_pool2d": unary(lambda h: F.avg_pool2d(h, 2)),
    "torch.nn.functional.max_pool2d": unary(lambda h: F.max_pool2d(h, 3, 1, 1)),
    "torch.nn.functional.adaptive_avg_pool2d": unary(lambda h: F.adaptive_avg_pool2d(h, 2)),
    "torch._C._nn.adaptive_avg_pool2d": unary(lambda h: C_NN.adaptive_avg_pool2d(h, 1)),
    "torch.nn.functional.adaptive_max_pool2d": unary(lambda h: F.adaptive_max_pool2d(h, 2)),
    "torch.nn.functional.lp_pool2d": unary(lambda h: F.lp_pool2d(h, 2, 2)),
    "torch.max_pool2d": unary(lambda h: torch.max_pool2d(h, 2)),
    "torch._C._nn.avg_pool3d": unary(lambda h: F.avg_pool3d(h, 2), "ncdhw"),
    "torch.nn.functional.max_pool3d": unary(lambda h: F.max_pool3d(h, 2), "ncdhw"),
    "torch.nn.functional.adaptive_avg_pool3d": unary(lambda h: F.adaptive_avg_pool3d(h, 1),
                                                      "ncdhw"),
    "torch.nn.functional.adaptive_max_pool3d": unary(lambda h: F.adaptive_max_pool3d(h, 2),
                                                      "ncdhw"),
    "torch.nn.functional.interpolate": unary(lambda h: F.interpolate(h, size=(5, 7),
                                                                      mode="bilinear")),
    "torch.nn.functional.grid_sample": Case(_grid_sample),
    "torch.nn.functional.pad": unary(lambda h: F.pad(h, (1, 2, 0, 1), mode="reflect")),
    "torch.constant_pad_nd": unary(lambda h: torch.constant_pad_nd(h, (1, 1), 0.5)),
    # products and attention
    "_operator.matmul": _attention(operator.matmul),
    "torch.matmul": _attention(torch.matmul),
    "torch.bmm": _attention(torch.bmm),
    "Tensor.matmul": _attention(lambda a, b: a.matmul(b)),
    "Tensor.bmm": _attention(lambda a, b: a.bmm(b)),
    "torch._C._nn.scaled_dot_product_attention": Case(
        lambda n, x: F.scaled_dot_product_attention(n.a(x), n.b(x), n.c(x)), layout="nlc"),
    "torch.mm": unary(lambda h: torch.mm(h, h.t()), "nc"),  # (3, 8) @ (8, 3): contracted
    "Tensor.mm": Case(lambda n, x: n.a(x).mm(n.mid.weight.t()), make(nn.Linear, 8, 5), "nc"),
    "torch.addmm": Case(lambda n, x: torch.addmm(n.mid.bias, n.a(x), n.mid.weight.t()),
                        make(nn.Linear, 8, 5), "nc"),
    "Tensor.addmm": Case(lambda n, x: n.mid.bias.addmm(n.a(x), n.mid.weight.t()),
                         make(nn.Linear, 8, 5), "nc"),
    "torch.baddbmm": _attention(lambda a, b: torch.baddbmm(a[:, :1, :1] * 0.0, a, b)),
    "Tensor.baddbmm": _attention(lambda a, b: a[:, :1, :1].baddbmm(a, b, beta=0.5)),
    "torch.functional.einsum": Case(_einsum_attention, layout="nlc"),
    # torchvision's Swin functions (fx-wrapped), called by its modules
    f"{_SWIN}.shifted_window_attention": module_case(
        optional(f"{_SWIN}.ShiftedWindowAttention", 8, [2, 2], [1, 1], 2), "nhwc"),
    f"{_SWIN}._get_relative_position_bias": module_case(
        optional(f"{_SWIN}.ShiftedWindowAttention", 8, [2, 2], [0, 0], 4), "nhwc"),
    f"{_SWIN}._patch_merging_pad": module_case(optional(f"{_SWIN}.PatchMerging", 8), "nhwc"),
    # recurrent helpers
    "torch.nn.utils.rnn.pack_padded_sequence": Case(
        _packed, make(nn.LSTM, 8, 6, batch_first=True), "tokens",
        inputs=lambda: (torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(1)),
                        torch.tensor([5, 2, 4]))),
}
OP_CASES["torch.nn.utils.rnn.pad_packed_sequence"] = OP_CASES[
    "torch.nn.utils.rnn.pack_padded_sequence"]

# Registered non-ATen ops without a one-op case here, and why.
OP_EXEMPT: dict[str, str] = {
    "Tensor.cuda": "needs a CUDA device",
    "torch.empty_like": "uninitialised values: nothing to compare (the rule is the one of "
                        "zeros_like, covered)",
    **{f"Tensor.{m}": "not a Tensor method in this torch: never appears in a graph"
       for m in ("gelu", "hardsigmoid", "hardswish", "silu")},
    # Python functions fx traces through: the graph records what they call, which has a case
    "torch.nn.functional.sigmoid": "fx traces through it: the graph calls Tensor.sigmoid",
    "torch.nn.functional.tanh": "fx traces through it: the graph calls Tensor.tanh",
    **{f"torch.nn.functional.{f}": "fx traces through it: the graph calls "
       "torch.nn.functional.interpolate" for f in ("upsample", "upsample_nearest", "upsample_bilinear")},
    # fx records `x += y` (and operator.iadd(x, y)) as operator.add on proxies
    **{f"_operator.i{op}": f"fx records it as _operator.{op}"
       for op in ("add", "sub", "mul", "truediv")},
    "Tensor.__matmul__": "fx records it as _operator.matmul",
    "graphprune.rules.tv_layers.shifted_window_attention": (
        "graphprune's head-width-aware replacement, called only by the PrunedShiftedWindowAttention "
        "that pruning the shifted_window_attention case builds: its rule runs when that pruned "
        "model is traced again (full verification, apply_masks replay)"),
}

# Cases that fail today because of a library bug, with the reason (marked xfail(strict=True)).
OP_XFAIL: dict[str, str] = {
    "Tensor.mT": "fx records `x.mT` as builtins.getattr(x, 'mT'), not call_method 'mT': the "
                 "registered Tensor.mT rule never runs and the channels freeze ('no channel rule "
                 "for getattr')",
}

# Nets on which graphprune silently builds a wrong model today: (case, op, why); xfail(strict=True).
KNOWN_WRONG: dict[str, tuple[Case, str, str]] = {}

# Rules that must freeze (correct by construction): the case, and text of the expected reason.
FREEZE_CASES: dict[str, Case] = {
    "softmax over channels": module_case(make(nn.Softmax, 1), prunes=False, freezes="softmax"),
    "functional softmax over channels": unary(lambda h: F.softmax(h, 1), prunes=False,
                                               freezes="softmax"),
    "view to a literal channel count": unary(lambda h: h.view(2, 8, 36), prunes=False,
                                              freezes="literal"),
    "split with literal sizes": unary(lambda h: h.split([3, 5], 1)[0], prunes=False,
                                       freezes="split"),
    "slice with a step over channels": unary(lambda h: h[:, ::2], prunes=False,
                                              freezes="slicing channels"),
    "channel picked by index": unary(lambda h: h[:, 3:4] + h, prunes=True,
                                      freezes="slice boundary"),
    "op without a rule": unary(lambda h: torch.cumsum(h, 1), prunes=False,
                                freezes="torch.cumsum"),
    # a group count written in another module's forward is a literal, even when it equals the
    # GroupNorm's attribute (fx and torch.export cannot tell them apart): the width is fixed
    "group_norm with a literal group count": Case(
        lambda n, x: F.group_norm(n.a(x), 4, n.mid.weight, n.mid.bias), make(nn.GroupNorm, 4, 16),
        width=16, prunes=False, freezes="literal group count"),
    "grouped functional conv": Case(lambda n, x: F.conv2d(n.a(x), n.mid.weight, groups=2),
                                    make(nn.Conv2d, 8, 6, 3, groups=2, bias=False),
                                    prunes=False, freezes="functional convolution"),
}
