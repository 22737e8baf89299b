"""Fold eval-mode BatchNorm into the convolution or Linear layer that feeds it (deployment,
quantization and coding all want fewer, exact tensors): W' = W*gamma/sigma per output channel,
b' = (b - mean)*gamma/sigma + beta, and the BatchNorm becomes an Identity."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .cost import layer_of
from .capture import trace

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def fold_batchnorm(model: nn.Module, example_inputs: Any, *, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (eval semantics) with every BatchNorm that alone reads a conv/Linear
    output folded into it. Returns the folded model; the original is untouched.

    Example:
        >>> folded = graphprune.fold_batchnorm(r.model, x)   # before quantizing or coding
    """
    g = trace(model, example_inputs)
    t = g.traced[0]
    target = model if inplace else copy.deepcopy(model)
    mods = dict(target.named_modules())
    layer_nodes = [(n, layer_of(n, t.params)) for n in t.graph.nodes
                   if n.op in ("call_module", "call_function")]
    layer_nodes = [(n, p) for n, p in layer_nodes if p in mods]
    calls: dict[str, int] = {}
    for _, path in layer_nodes:
        calls[path] = calls.get(path, 0) + 1
    path_of = dict(layer_nodes)
    for n, path in layer_nodes:
        if calls[path] != 1 or len(n.users) != 1:
            continue
        (user,) = n.users
        bn_path = path_of.get(user)
        layer, bn = mods.get(path), mods.get(bn_path) if bn_path else None
        if (calls.get(bn_path) != 1 or not isinstance(layer, _FOLDABLE) or user.args[0] is not n
                or not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None):
            continue
        _fold(layer, bn)
        owner, _, attr = bn_path.rpartition(".")
        setattr(mods[owner] if owner else target, attr, nn.Identity())
    return target


@torch.no_grad()
def _fold(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    w = layer.weight
    layer.weight.copy_(w * scale.view(-1, *([1] * (w.ndim - 1))))
    b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    new_b = (b - bn.running_mean) * scale + beta
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b.to(w.dtype))
    else:
        layer.bias.copy_(new_b)
