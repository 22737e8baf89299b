"""Channel rules for torch's attention modules: ``nn.MultiheadAttention`` (whole heads, and the
embedding dim) and ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` (heads, the
feed-forward hidden dim and the residual stream), traced as leaves.

torch's attention requires ``embed_dim == num_heads * head_dim``; once heads are removed the
module becomes a ``PrunedMultiheadAttention`` (same class hierarchy, same call signature) that
computes attention with its own inner width.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .elements import Builder, TInfo
from .common import out_spec
from .registry import module_rule, resizer


def _last(b: Builder, x: Any, size: int, node: fx.Node, what: str) -> np.ndarray:
    """Elements of the last dim of ``x`` (frozen private ones if it is not a channel)."""
    info = b.info(x) if isinstance(x, fx.Node) else None
    spec = b.spec(x)
    e = b.along(info, spec.ndim - 1) if info is not None else None
    if e is None or e.size != size:
        a = b.new_axis(f"{node.name}:{what}", (spec.ndim - 1,), (size,))
        e = a.elems()
        b.freeze(e, f"{what} of '{node.target}' is not a channel")
    if info is not None:
        for a in info.axes:
            if spec.ndim - 1 not in a.dims:
                b.freeze(a.elems(), f"sequence/batch dim through attention '{node.target}'")
    return e


def mha_members(b: Builder, path: str, m: nn.MultiheadAttention, eq: np.ndarray, ek: np.ndarray,
                ev: np.ndarray, eo: np.ndarray, node: fx.Node, weights_used: bool) -> None:
    """Heads of ``m`` as units (q/k/v rows and out-projection columns of each head go together),
    its input channels ``eq``/``ek``/``ev`` and output channels ``eo``."""
    E, H = m.embed_dim, m.num_heads
    hd = E // H
    heads = b.new_axis(f"{node.name}:heads", (0,), (H,))
    h = heads.elems()
    b.source(h)
    if m.bias_k is not None or weights_used:
        b.freeze(h, f"'{path}' adds key/value biases or returns per-head weights")
    per_head = np.repeat(h, hd)  # element of each inner row h*hd + j
    if m._qkv_same_embed_dim:
        rows = np.concatenate([per_head] * 3)
        b.member(f"{path}.in_proj_weight", 0, rows, np.arange(3 * E), role="out", module=path)
        if m.in_proj_bias is not None:
            b.member(f"{path}.in_proj_bias", 0, rows, np.arange(3 * E), role="out", module=path)
        b.couple(eq, ek)
        b.couple(eq, ev)
        b.member(f"{path}.in_proj_weight", 1, eq, role="in", module=path)
    else:
        for name, e in (("q_proj_weight", eq), ("k_proj_weight", ek), ("v_proj_weight", ev)):
            b.member(f"{path}.{name}", 0, per_head, role="out", module=path)
            b.member(f"{path}.{name}", 1, e, role="in", module=path)
        if m.in_proj_bias is not None:
            b.member(f"{path}.in_proj_bias", 0, np.concatenate([per_head] * 3), np.arange(3 * E),
                     role="out", module=path)
    b.member(f"{path}.out_proj.weight", 1, per_head, role="in", module=f"{path}.out_proj")
    b.member(f"{path}.out_proj.weight", 0, eo, role="out", module=f"{path}.out_proj")
    if m.out_proj.bias is not None:
        b.member(f"{path}.out_proj.bias", 0, eo, role="out", module=f"{path}.out_proj")
    b.source(eo)


def _weights_used(node: fx.Node) -> bool:
    for u in node.users:
        if u.op == "call_function" and getattr(u.target, "__name__", "") == "getitem" \
                and u.args[1] == 1 and u.users:
            return True
        if not (u.op == "call_function" and getattr(u.target, "__name__", "") == "getitem"):
            return True  # the whole tuple escapes
    return False


@module_rule(nn.MultiheadAttention)
def multihead_attention(b: Builder, node: fx.Node, m: nn.MultiheadAttention) -> Any:
    q = node.args[0]
    k = node.args[1] if len(node.args) > 1 else node.kwargs.get("key", q)
    v = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", k)
    spec = out_spec(b, node)
    eq = _last(b, q, m.embed_dim, node, "query")
    ek = _last(b, k, m.kdim, node, "key")
    ev = _last(b, v, m.vdim, node, "value")
    out_shape = spec[0].shape
    oa = b.new_axis(node.name, (len(out_shape) - 1,), (m.embed_dim,))
    mha_members(b, node.target, m, eq, ek, ev, oa.elems(), node, _weights_used(node))
    return (TInfo(out_shape, [oa]), None if spec[1] is None else TInfo(spec[1].shape))


@module_rule(nn.TransformerEncoderLayer)
def encoder_layer(b: Builder, node: fx.Node, m: nn.TransformerEncoderLayer) -> Any:
    return _encoder_layer(b, node, node.target, m, _last(b, node.args[0], m.linear1.in_features,
                                                          node, "input"))[1]


def _encoder_layer(b: Builder, node: fx.Node, path: str, m: nn.TransformerEncoderLayer,
                   e: np.ndarray) -> tuple[np.ndarray, TInfo]:
    """The residual stream keeps its channels through the layer: one set of elements ``e``."""
    spec = out_spec(b, node)
    shape = spec.shape if not isinstance(spec, (tuple, list)) else spec[0].shape
    mha_members(b, f"{path}.self_attn", m.self_attn, e, e, e, e, node, False)
    hidden = b.new_axis(f"{node.name}:{path}:ffn", (0,), (m.linear1.out_features,)).elems()
    b.source(hidden)
    b.member(f"{path}.linear1.weight", 0, hidden, role="out", module=f"{path}.linear1")
    if m.linear1.bias is not None:
        b.member(f"{path}.linear1.bias", 0, hidden, role="out", module=f"{path}.linear1")
    b.member(f"{path}.linear1.weight", 1, e, role="in", module=f"{path}.linear1")
    b.member(f"{path}.linear2.weight", 1, hidden, role="in", module=f"{path}.linear2")
    b.member(f"{path}.linear2.weight", 0, e, role="out", module=f"{path}.linear2")
    if m.linear2.bias is not None:
        b.member(f"{path}.linear2.bias", 0, e, role="out", module=f"{path}.linear2")
    for norm in ("norm1", "norm2"):
        for p in ("weight", "bias"):
            if getattr(getattr(m, norm), p, None) is not None:
                b.member(f"{path}.{norm}.{p}", 0, e, role="param", module=f"{path}.{norm}")
    b.mark_value_coupled(e, f"'{path}' normalizes the residual stream (LayerNorm)")
    out = b.new_axis(node.name, (len(shape) - 1,), (shape[-1],))
    b.couple(out.elems(), e)
    return e, TInfo(shape, [out])


@module_rule(nn.TransformerEncoder)
def encoder(b: Builder, node: fx.Node, m: nn.TransformerEncoder) -> Any:
    e = _last(b, node.args[0], m.layers[0].linear1.in_features, node, "input")
    info = None
    for i, layer in enumerate(m.layers):
        e, info = _encoder_layer(b, node, f"{node.target}.layers.{i}", layer, e)
    if m.norm is not None:
        for p in ("weight", "bias"):
            if getattr(m.norm, p, None) is not None:
                b.member(f"{node.target}.norm.{p}", 0, e, role="param",
                         module=f"{node.target}.norm")
    return info


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """A ``MultiheadAttention`` whose heads were pruned: ``num_heads * head_dim`` may differ
    from ``embed_dim``. Same arguments and outputs as ``nn.MultiheadAttention.forward``."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        bf = self.batch_first
        if not bf:
            query, key, value = (t.transpose(0, 1) if t.dim() == 3 else t for t in (query, key, value))
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query[None], key[None], value[None]
        H, hd = self.num_heads, self.head_dim
        inner = H * hd
        if self._pruned_packed:
            w, bias = self.in_proj_weight, self.in_proj_bias
            wq, wk, wv = w[:inner], w[inner:2 * inner], w[2 * inner:]
            bq, bk, bv = (bias[:inner], bias[inner:2 * inner], bias[2 * inner:]) if bias is not None \
                else (None, None, None)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            bq, bk, bv = (self.in_proj_bias[:inner], self.in_proj_bias[inner:2 * inner],
                          self.in_proj_bias[2 * inner:]) if self.in_proj_bias is not None \
                else (None, None, None)
        B, L, S = query.shape[0], query.shape[1], key.shape[1]
        q = F.linear(query, wq, bq).view(B, L, H, hd).transpose(1, 2)
        k = F.linear(key, wk, bk).view(B, S, H, hd).transpose(1, 2)
        v = F.linear(value, wv, bv).view(B, S, H, hd).transpose(1, 2)
        mask = None
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dtype == torch.bool else attn_mask
            if mask.dim() == 3:
                mask = mask.view(B, H, L, S)
            if mask.dtype == torch.bool:
                mask = ~mask  # torch MHA: True = masked out; sdpa: True = keep
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(B, 1, 1, S)
            kpm = ~kpm if kpm.dtype == torch.bool else kpm
            if mask is None:
                mask = kpm
            elif mask.dtype == torch.bool and kpm.dtype == torch.bool:
                mask = mask & kpm
            else:
                mask = (mask if mask.dtype != torch.bool else
                        torch.zeros_like(mask, dtype=q.dtype).masked_fill(~mask, float("-inf"))) + (
                    kpm if kpm.dtype != torch.bool else
                    torch.zeros_like(kpm, dtype=q.dtype).masked_fill(~kpm, float("-inf")))
        p = self.dropout if self.training else 0.0
        scale = 1.0 / (hd ** 0.5)
        scores = (q @ k.transpose(-2, -1)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
                else scores + mask
        elif is_causal:
            causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        attn = F.dropout(scores.softmax(-1), p)
        out = (attn @ v).transpose(1, 2).reshape(B, L, inner)
        out = self.out_proj(out)
        if unbatched:
            out = out[0]
        elif not bf:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.mean(1) if average_attn_weights else attn
            if unbatched:
                weights = weights[0]
        return out, weights


@resizer(nn.MultiheadAttention)
def resize_mha(m: nn.MultiheadAttention, in_shape: Any) -> None:
    hd = m.head_dim
    packed = m._qkv_same_embed_dim
    inner = (m.in_proj_weight.shape[0] // 3) if packed else m.q_proj_weight.shape[0]
    m.num_heads = inner // hd
    m.embed_dim = m.out_proj.weight.shape[0]
    m.out_proj.in_features, m.out_proj.out_features = m.out_proj.weight.shape[1], m.embed_dim
    if packed:
        m.kdim = m.vdim = m.in_proj_weight.shape[1]
    else:
        m.kdim, m.vdim = m.k_proj_weight.shape[1], m.v_proj_weight.shape[1]
    if inner != m.embed_dim or type(m) is PrunedMultiheadAttention:
        m.__class__ = PrunedMultiheadAttention
        m._pruned_packed = packed
        m._qkv_same_embed_dim = False  # keeps torch's fused fast paths (which assume E = H*hd) off
