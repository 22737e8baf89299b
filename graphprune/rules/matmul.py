"""Channel rules for matrix products and attention: ``@``/``matmul``/``bmm`` and
``scaled_dot_product_attention``.

For ``a @ b`` with ``a`` (..., M, K) and ``b`` (..., K, N): channels of the batch dims and of M
(of ``a``) or N (of ``b``) pass to the output; the contracted K channels of ``a`` and ``b`` must
go together, element by element (so a (heads, head_dim) axis of queries couples with the same
axis of keys, and a head removed from both is removed from the product's batch dim too).
In ``scaled_dot_product_attention`` the query/key width also sets the softmax scale, so it may
only shrink by whole heads (a batch dim), never within a head.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from .elements import Axis, Builder, TInfo
from .common import arg, broadcast_infos, out_spec
from .gqa import query_slots
from .registry import op_rule


def _aligned(a: Axis, dmap: dict[int, int]) -> tuple[tuple[int, ...], np.ndarray]:
    """Output-space dims of ``a`` in sorted order, and its element grid in that order."""
    mapped = [dmap[d] for d in a.dims]
    order = np.argsort(mapped)
    return tuple(np.asarray(mapped)[order]), np.transpose(a.grid(), order)


def _product(b: Builder, node: fx.Node, x: TInfo | None, xs: tuple, y: TInfo | None, ys: tuple,
             spec: Any, fixed_k: bool) -> TInfo:
    n = len(spec.shape)
    out = TInfo(spec.shape)
    if len(xs) < 2 or len(ys) < 2:  # vector products: no channel structure kept
        for info in (x, y):
            b.freeze_info(info, f"vector product at '{node.name}'")
        return out
    nb = n - 2
    # a virtual "K" output dim (n) lets both K dims be compared in one space
    amap = {d: d + nb - (len(xs) - 2) for d in range(len(xs) - 2)}
    amap[len(xs) - 2], amap[len(xs) - 1] = n - 2, n
    bmap = {d: d + nb - (len(ys) - 2) for d in range(len(ys) - 2)}
    bmap[len(ys) - 2], bmap[len(ys) - 1] = n, n - 1
    reason = f"matrix product at '{node.name}'"
    placed: dict[tuple[int, ...], Axis] = {}

    def place(dims: tuple[int, ...], grid: np.ndarray, shape: tuple[int, ...], src: TInfo) -> None:
        full = all(shape[i] == spec.shape[d] for i, d in enumerate(dims))
        if not full:
            return  # broadcast along this axis: nothing to couple
        if dims in placed:
            b.couple(placed[dims].elems(), grid.ravel())
            return
        overlap = [a for k, a in placed.items() if set(k) & set(dims)]
        na = b.new_axis(node.name, dims, tuple(spec.shape[d] for d in dims))
        b.couple(na.elems(), grid.ravel())
        if overlap:  # the same dims with another structure (heads vs heads x head_dim)
            for a in overlap:
                for d in set(a.dims) & set(dims):
                    b.couple(b.along(TInfo(spec.shape, [a]), d), b.along(TInfo(spec.shape, [na]), d))
            return
        placed[dims] = na
        out.axes.append(na)

    kx = [a for a in (x.axes if x else []) if n in {amap[d] for d in a.dims}]
    ky = [a for a in (y.axes if y else []) if n in {bmap[d] for d in a.dims}]
    for info, sh, dmap, contracted in ((x, xs, amap, kx), (y, ys, bmap, ky)):
        for a in (info.axes if info else []):
            if a in contracted:
                continue
            dims, grid = _aligned(a, dmap)
            place(dims, grid, tuple(sh[d] for d in sorted(a.dims, key=lambda d: dmap[d])), info)
    pairs = []
    for a in kx:
        dims_a, grid_a = _aligned(a, amap)
        if (n - 2) in dims_a:
            b.freeze(a.elems(), f"{reason}: one channel axis spans both M and K")
            continue
        match = None
        for c in ky:
            dims_c, grid_c = _aligned(c, bmap)
            if dims_c == dims_a and grid_c.shape == grid_a.shape:
                match = (c, grid_c)
        if match is None:
            b.freeze(a.elems(), f"{reason}: contracted channels with no partner")
            continue
        b.couple(grid_a.ravel(), match[1].ravel())
        pairs.append((a, dims_a, grid_a))
    for c in ky:
        if not any(_aligned(c, bmap)[0] == p[1] for p in pairs):
            b.freeze(c.elems(), f"{reason}: contracted channels with no partner")
    for a, dims_a, grid_a in pairs:
        k_pos = dims_a.index(n)
        if fixed_k:  # the width of K is a constant of the op: only whole batch slices may go
            batch = [i for i, d in enumerate(dims_a) if d != n]
            if not batch:
                b.freeze(a.elems(), f"{reason}: the width of the contraction sets the scale")
                continue
        rest = tuple(d for d in dims_a if d != n)
        if rest:  # batch dims of the contracted axis carry on to the output
            moved = np.moveaxis(grid_a, k_pos, -1)
            flat = moved.reshape(-1, moved.shape[-1])
            b.couple(np.repeat(flat[:, :1], flat.shape[1] - 1, axis=1), flat[:, 1:])
            place(rest, moved[..., 0], tuple(spec.shape[d] for d in rest), x)
    return out


@op_rule(torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm", "__matmul__")
def matmul(b: Builder, node: fx.Node, m: Any = None) -> Any:
    spec = out_spec(b, node)
    a, c = node.args[0], node.args[1]
    return _product(b, node, b.info(a), b.spec(a).shape, b.info(c), b.spec(c).shape, spec, False)


@op_rule(F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
def sdpa(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """softmax(q @ k^T * scale + mask) @ v. The mask (a causal mask, T5's relative position bias
    per head) is added to the scores with broadcasting, so a per-head mask couples with the
    heads. With ``enable_gqa`` keys and values have fewer heads: query head ``h`` reads key/value
    head ``h // (Hq / Hkv)``, so a key/value head and the query heads that share it go together."""
    q, k, v = node.args[0], arg(node, 1, "key"), arg(node, 2, "value")
    mask = arg(node, 3, "attn_mask")
    spec = out_spec(b, node)
    qs, ks, vs = b.spec(q).shape, b.spec(k).shape, b.spec(v).shape
    ki, vi = b.info(k), b.info(v)
    if node.kwargs.get("enable_gqa") and len(qs) >= 3 and ks[-3] != qs[-3]:
        n_rep, heads = qs[-3] // ks[-3], len(spec.shape) - 3
        ki, ks = _repeat_heads(b, node, ki, ks, n_rep, heads), (*ks[:-3], qs[-3], *ks[-2:])
        vi, vs = _repeat_heads(b, node, vi, vs, n_rep, heads), (*vs[:-3], qs[-3], *vs[-2:])
    # scores = q @ k^T: transpose k's last two dims in the info
    kt = None
    if ki is not None:
        swap = {d: d for d in range(len(ks))}
        swap[len(ks) - 1], swap[len(ks) - 2] = len(ks) - 2, len(ks) - 1
        kt = TInfo(tuple(ks[:-2]) + (ks[-1], ks[-2]), [])
        for a in ki.axes:
            dims = tuple(swap[d] for d in a.dims)
            order = np.argsort(dims)
            kt.axes.append(Axis(tuple(np.asarray(dims)[order]), tuple(np.asarray(a.sizes)[order]),
                                a.base, a.node))
            if list(order) != sorted(order):  # reorder the grid lazily by coupling a copy
                na = b.new_axis(node.name + ":kT", kt.axes[-1].dims, kt.axes[-1].sizes)
                b.couple(na.elems(), np.transpose(a.grid(), order).ravel())
                kt.axes[-1] = na
    scores_shape = tuple(qs[:-1]) + (ks[-2],)
    sspec = type(spec)(scores_shape, spec.dtype)
    scores = _product(b, node, b.info(q), qs, kt, kt.shape if kt else tuple(ks[:-2]) + (ks[-1], ks[-2]),
                      sspec, True)
    if isinstance(mask, fx.Node):
        ms = b.spec(mask)
        shape = tuple(np.broadcast_shapes(scores_shape, ms.shape)) if ms is not None else None
        if shape == scores_shape:
            scores = broadcast_infos(b, node, scores_shape, [(scores, scores_shape),
                                                            (b.info(mask), ms.shape)])
        else:
            b.freeze_info(b.info(mask), f"attention mask of another shape at '{node.name}'")
    return _product(b, node, scores, scores_shape, vi, vs, spec, False)


def _repeat_heads(b: Builder, node: fx.Node, info: TInfo | None, shape: tuple[int, ...],
                  n_rep: int, out_heads: int) -> TInfo | None:
    """The info of ``x`` with its head dim (-3) repeated ``n_rep`` times per head (GQA); with
    ``gqa="query"`` the copies are channels of their own (``rules.gqa``)."""
    if info is None:
        return None
    hd = len(shape) - 3
    new_shape = (*shape[:hd], shape[hd] * n_rep, *shape[hd + 1:])
    out = TInfo(new_shape)
    for a in info.axes:
        if hd not in a.dims:
            if any(a.dims):
                out.axes.append(a)
            continue
        grid = np.repeat(a.grid(), n_rep, axis=a.dims.index(hd))
        na = b.new_axis(node.name + ":gqa", a.dims, grid.shape)
        if not query_slots(b, node, a, na, grid - a.base, out_heads):
            b.couple(na.elems(), grid.ravel())
        out.axes.append(na)
    return out
