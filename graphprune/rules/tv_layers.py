"""Channel rules for the torchvision functions torch.fx keeps whole (``torch.fx.wrap``): Swin's
``shifted_window_attention``, ``_get_relative_position_bias`` and ``_patch_merging_pad``.

They are registered by dotted name, so importing graphprune never imports torchvision.

torchvision's ``shifted_window_attention`` takes the heads' width from its input
(``C // num_heads``) and reshapes the heads' output back to ``C``: with that forward no head can
go. Inside a ``ShiftedWindowAttention`` module, whole heads are units anyway (their q, k and v
rows of ``qkv``, their columns of ``proj`` and their column of ``relative_position_bias_table``):
once a head is removed, the module becomes a ``PrunedShiftedWindowAttention`` (same class
hierarchy, same call) whose forward computes with its own ``num_heads`` and ``head_dim``.
The block's input/output width stays frozen at this call (see ``swin_attention``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from .common import arg, freeze_inputs, keep_axes, out_spec, _enclosing_modules
from .elements import Builder, TInfo
from .registry import op_rule, resizer

_TV = "torchvision.models.swin_transformer"
_SWAPPABLE = ("ShiftedWindowAttention", "PrunedShiftedWindowAttention")


def shifted_window_attention(
    input: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor,
    relative_position_bias: torch.Tensor, window_size: list[int], num_heads: int,
    shift_size: list[int], attention_dropout: float = 0.0, dropout: float = 0.0,
    qkv_bias: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None, training: bool = True, *, head_dim: int | None = None,
) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` (same arguments) with the heads' width
    ``head_dim`` given instead of read from the input: ``num_heads * head_dim`` may differ from
    the input width ``C`` once heads are pruned. The output has ``proj_weight``'s width."""
    B, H, W, C = input.shape
    hd = C // num_heads if head_dim is None else head_dim
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift_size = shift_size.copy()
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length: 2 * length].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    # (3, B*nW, heads, Ws*Ws, head_dim)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=np.log(100.0)).exp()
    else:
        attn = (q * hd ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift_size) > 0:
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0]: h[1], w[0]: w[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1],
                                   window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), num_heads * hd)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, -1)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


torch.fx.wrap("shifted_window_attention")


def _pruned_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return shifted_window_attention(
        x, self.qkv.weight, self.proj.weight, self.get_relative_position_bias(), self.window_size,
        self.num_heads, shift_size=self.shift_size, attention_dropout=self.attention_dropout,
        dropout=self.dropout, qkv_bias=self.qkv.bias, proj_bias=self.proj.bias,
        training=self.training, head_dim=self.head_dim)


_PRUNED: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """``PrunedShiftedWindowAttention`` is made on first use (it subclasses torchvision's class,
    which graphprune does not import eagerly); this keeps it importable by name (pickling)."""
    if name != "PrunedShiftedWindowAttention":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _PRUNED:
        from torchvision.models.swin_transformer import ShiftedWindowAttention

        _PRUNED[name] = type(name, (ShiftedWindowAttention,), {
            "__module__": __name__, "__qualname__": name, "forward": _pruned_forward,
            "__doc__": "A ``ShiftedWindowAttention`` whose heads were pruned: it attends with "
                       "its own ``num_heads`` and ``head_dim``. Same call as torchvision's."})
    return _PRUNED[name]


@resizer(f"{_TV}.ShiftedWindowAttention")
def resize_swin_attention(m: Any, in_shape: Any) -> None:
    if type(m).__name__ not in _SWAPPABLE:  # Swin V2: its heads are never units (see the rule)
        return
    heads = int(m.relative_position_bias_table.shape[1])
    m.head_dim = (m.qkv.weight.shape[0] // 3) // heads
    m.num_heads = heads
    m.__class__ = __getattr__("PrunedShiftedWindowAttention")


@op_rule(f"{_TV}._get_relative_position_bias")
def relative_position_bias(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """``table[index].view(N, N, -1).permute(2, 0, 1)[None]``: the table's column h (one per
    head) becomes dim 1 of the (1, heads, N, N) bias."""
    spec = out_spec(b, node)
    out = TInfo(spec.shape)
    e = b.along(b.info(node.args[0]), 1)
    if e is not None and e.size == spec.shape[1]:
        na = b.new_axis(node.name, (1,), (spec.shape[1],))
        b.couple(na.elems(), e)
        out.axes.append(na)
    return out


@op_rule(f"{_TV}._patch_merging_pad")
def patch_merging_pad(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """(..., H, W, C) -> (..., H/2, W/2, 4C): four strided samples concatenated on channels."""
    spec = out_spec(b, node)
    x = b.info(node.args[0])
    last = spec.ndim - 1
    out = keep_axes(b, node, x, [], spec.shape, f"spatial dims sampled at '{node.name}'",
                    consumed=[last])
    e = b.along(x, last)
    if e is not None:
        na = b.new_axis(node.name, (last,), (spec.shape[last],))
        b.couple(na.elems(), np.tile(e, 4))
        out.axes.append(na)
    return out


@op_rule(f"{_TV}.shifted_window_attention", shifted_window_attention)
def swin_attention(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """Heads are units (q, k, v rows of ``qkv_weight``, ``proj_weight`` columns, the bias's dim 1,
    ``logit_scale`` rows) when the call belongs to a ``ShiftedWindowAttention`` that can become a
    ``PrunedShiftedWindowAttention``; the input/output width is frozen."""
    spec = out_spec(b, node)
    x, qkv_w, proj_w = arg(node, 0, "input"), arg(node, 1, "qkv_weight"), arg(node, 2, "proj_weight")
    rel, heads = arg(node, 3, "relative_position_bias"), arg(node, 5, "num_heads")
    qkv_b, proj_b = arg(node, 9, "qkv_bias"), arg(node, 10, "proj_bias")
    scale = arg(node, 11, "logit_scale")
    why = f"Swin attention at '{node.name}'"
    wq, wp, xi = b.info(qkv_w), b.info(proj_w), b.info(x)
    rows, cols = b.along(wq, 0), b.along(wp, 1)
    outs = b.along(wp, 0)
    last = spec.ndim - 1
    hd = node.kwargs.get("head_dim") or b.spec(x).shape[-1] // heads
    if rows is None or cols is None or outs is None or rows.size != 3 * heads * hd or \
            cols.size != heads * hd:
        freeze_inputs(b, node, f"{why}: its weights are not parameters of the expected shape")
        return TInfo(spec.shape)
    out = keep_axes(b, node, xi, [], spec.shape, f"{why}: windows mix the spatial dims",
                    consumed=[last])
    # the width of the block: qkv columns, proj rows (torchvision's forward reads head_dim from
    # it: the module's resizer keeps head_dim and num_heads explicit)
    oa = b.new_axis(node.name, (last,), (spec.shape[last],))
    out.axes.append(oa)
    b.couple(oa.elems(), outs)
    b.link(b.along(wq, 1), xi, last, f"{why}: its input is not a channel")
    b.link(oa.elems(), xi, last, f"{why}: its input is not a channel")
    b.source(oa.elems())
    if isinstance(proj_b, fx.Node):
        b.link(oa.elems(), b.info(proj_b), 0, f"{why}: proj bias")
    # heads: every q, k and v row and proj column of a head goes with it
    grid = rows.reshape(3, heads, hd)
    per_head = grid.transpose(1, 0, 2).reshape(heads, -1)
    b.couple(np.repeat(per_head[:, :1], per_head.shape[1] - 1, axis=1), per_head[:, 1:])
    b.couple(grid[2].ravel(), cols)
    h = per_head[:, 0].copy()
    b.source(rows)
    if isinstance(qkv_b, fx.Node):
        b.link(rows, b.info(qkv_b), 0, f"{why}: qkv bias")
    b.link(h, b.info(rel), 1, f"{why}: its relative position bias has no head channel")
    if isinstance(scale, fx.Node):
        b.link(h, b.info(scale), 0, f"{why}: its logit scale has no head channel")
    owner = _enclosing_modules(b, node)[:1]
    if not owner or type(owner[0][1]).__name__ not in _SWAPPABLE:
        b.freeze(h, f"{why}: heads can only go inside torchvision's ShiftedWindowAttention (V1), "
                    "whose forward graphprune replaces")
        # torchvision's own forward splits heads with C // num_heads: the width C is pinned too
        b.freeze(oa.elems(), f"{why}: torchvision's forward reads head_dim as C // num_heads")
    for w in (qkv_w, proj_w):
        b.set_roles(w, {0: "out", 1: "in"})
    for bias in (qkv_b, proj_b):
        b.set_roles(bias, {0: "out"})
    return out
