"""Grouped-query attention: how the copies of a key/value head relate to the head.

Key/value heads are shared by ``n_rep`` query heads each: HF's ``repeat_kv`` (``expand`` then
``reshape``), ``scaled_dot_product_attention(enable_gqa=True)`` or a hand-written equivalent
repeats every key/value head ``n_rep`` times in a row. By default (``trace(gqa="group")``) a
copy is the head itself, so a key/value head and the query heads that read it are removed
together. With ``gqa="query"`` every key/value head stays and its copies become channels of
their own: the copy in slot ``j`` of every group goes together (as the channels of a grouped
convolution do), so each group loses the same number of query heads and ``num_key_value_groups``
stays an integer; the attention module's ``num_key_value_groups`` is refreshed after pruning.
"""

from __future__ import annotations

import numpy as np
import torch.fx as fx

from .elements import Axis, Builder, TInfo


def _interleaved(sub: np.ndarray) -> tuple[int, int] | None:
    """(dim, n_rep) if ``sub`` repeats its entries ``n_rep`` times in a row along one dim (and
    nowhere else), else None."""
    for d in range(sub.ndim):
        m = np.moveaxis(sub, d, 0)
        col = m.reshape(m.shape[0], -1)[:, 0]
        n_rep = int(np.argmax(col != col[0])) if (col != col[0]).any() else col.size
        if n_rep < 2 or m.shape[0] % n_rep:
            continue
        r = m.reshape(m.shape[0] // n_rep, n_rep, *m.shape[1:])
        if (r == r[:, :1]).all() and np.unique(r[:, 0]).size == r[:, 0].size:
            return d, n_rep
    return None


def _expanded(b: Builder, node: fx.Node, n_rep: int) -> tuple[fx.Node, int] | None:
    """The ``expand`` that ``node`` reshapes and the size-1 dim it broadcast to ``n_rep``
    copies, or None (a view that merges a head axis with a dim that carries no channel repeats
    labels, not data)."""
    x = node.args[0] if node.args else None
    for _ in range(4):
        if not isinstance(x, fx.Node):
            return None
        name = getattr(x.target, "__name__", str(x.target)).split(".")[0]
        if name == "expand" and isinstance(x.args[0], fx.Node):
            before, after = b.spec(x.args[0]), b.spec(x)
            if before is None or after is None or len(before.shape) != len(after.shape):
                return None
            dims = [k for k, (s0, s1) in enumerate(zip(before.shape, after.shape))
                    if s0 == 1 and s1 == n_rep]
            return (x, dims[0]) if len(dims) == 1 else None
        if name not in ("clone", "contiguous", "alias"):
            return None
        x = x.args[0] if x.args else None
    return None


def query_slots(b: Builder, node: fx.Node, src: Axis, out: Axis, sub: np.ndarray,
                heads_dim: int | None = None) -> bool:
    """With ``gqa="query"``: if ``out`` repeats each element of ``src`` in a row (``sub`` gives,
    for every output element, the source element it copies), keep ``src`` whole and couple the
    copies slot by slot. Returns False (nothing done) for any other pattern or mode.

    The enclosing attention module's ``num_key_value_groups`` (HF) is refreshed after pruning
    from the new size of ``node``'s output dim ``heads_dim`` (default: the repeated dim)."""
    if b.gqa != "query":
        return False
    found = _interleaved(sub)
    if found is None:
        return False
    d, n_rep = found
    expand = _expanded(b, node, n_rep) if heads_dim is None else None
    if heads_dim is None and expand is None:
        return False
    b.freeze(src.elems(), f"key/value heads stay with gqa='query' at node '{node.name}'")
    e = np.moveaxis(out.elems().reshape(sub.shape), d, 0)
    e = e.reshape(e.shape[0] // n_rep, n_rep, *e.shape[1:])
    if e.shape[0] > 1:  # slot j of every group goes together
        b.couple(np.broadcast_to(e[:1], e[1:].shape), e[1:])
    if expand is not None:  # the expanded dim counts the slots that remain
        x, k = expand
        slots = b.new_axis(x.name + ":slots", (k,), (n_rep,))
        b.couple(np.repeat(slots.elems(), e[0, 0].size), e[0].reshape(n_rep, -1))
        info = b.infos.get(x)
        b.infos[x] = TInfo(info.shape if info is not None else b.spec(x).shape,
                           [*(info.axes if info is not None else []), slots])
    from .common import _enclosing_modules  # common calls this module

    n_kv = e.shape[0]
    owner = next((p for p, m in _enclosing_modules(b, node)
                  if isinstance(getattr(m, "num_key_value_groups", None), int)), None)
    entry = (owner, "num_key_value_groups", node, out.dims[d] if heads_dim is None else heads_dim,
             n_kv)
    if owner is not None and entry not in b.attr_sizes:  # keys and values name the same count
        b.attr_sizes.append(entry)
    return True
