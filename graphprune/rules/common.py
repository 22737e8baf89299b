"""Building blocks shared by the channel rules: broadcasting, dim remaps, spatial ops, reductions
and the id-tensor trick for pure data-movement ops (view, reshape, flatten, permute...).

The id-tensor trick runs the op itself on a tensor whose entries are the element indices of one
channel axis; where each index lands in the output tells exactly which output positions carry
which input channel, so any combination of reshapes and transposes is mapped without a
hand-written formula per op.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ..trace import TensorSpec
from .elements import Builder, TInfo
from .gqa import query_slots

NO_RULE = "no channel rule for {op} (node '{node}')"


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument ``name`` at position ``i`` of a node."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def base_name(node: fx.Node) -> str:
    """'split' for Tensor.split, torch.split and aten.split.Tensor alike."""
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return name.split(".")[0]


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def out_spec(b: Builder, node: fx.Node) -> Any:
    return b.values.get(node)


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """Every Node among the (nested) args and kwargs of ``node``."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def freeze_inputs(b: Builder, node: fx.Node, reason: str) -> None:
    for n in tensor_args(node):
        b.freeze_info(b.infos.get(n), reason)


def empty_like_spec(spec: Any) -> Any:
    """Output info without channel axes, mirroring the structure of a recorded value."""
    if isinstance(spec, TensorSpec):
        return TInfo(spec.shape)
    if isinstance(spec, (list, tuple)) and not isinstance(spec, torch.Size):
        return type(spec)(empty_like_spec(s) for s in spec)
    return None


def has_tensor(spec: Any) -> bool:
    if isinstance(spec, TensorSpec):
        return True
    if isinstance(spec, (list, tuple)) and not isinstance(spec, torch.Size):
        return any(has_tensor(s) for s in spec)
    if isinstance(spec, dict):
        return any(has_tensor(s) for s in spec.values())
    return False


def keep_axes(b: Builder, node: fx.Node, x: TInfo | None, keep: Iterable[int],
              shape: tuple[int, ...], reason: str, dim_map: dict[int, int] | None = None,
              consumed: Iterable[int] = ()) -> TInfo:
    """Output info carrying ``x``'s axes that lie entirely in ``keep`` (remapped by ``dim_map``).
    Axes entirely in ``consumed`` are handled by the caller; any other axis is frozen."""
    out = TInfo(shape)
    if x is None:
        return out
    keep, consumed = set(keep), set(consumed)
    for a in x.axes:
        if consumed and set(a.dims) <= consumed:
            continue
        if not set(a.dims) <= keep:
            b.freeze(a.elems(), reason)
        elif dim_map is None or all(dim_map[d] == d for d in a.dims):
            out.axes.append(a)  # same dims: share the axis (identity coupling)
        else:
            out.axes.extend(b.mirror(node.name, TInfo(x.shape, [a]), shape, dim_map).axes)
    return out


def broadcast(b: Builder, node: fx.Node, operands: list[Any]) -> TInfo | None:
    """Elementwise op with numpy broadcasting over ``operands`` (nodes or Python scalars)."""
    spec = out_spec(b, node)
    if not isinstance(spec, TensorSpec):
        return None
    given = []
    for a in operands:
        s = b.spec(a)
        if isinstance(s, TensorSpec):
            given.append((b.info(a), s.shape))
    return broadcast_infos(b, node, spec.shape, given)


def broadcast_infos(b: Builder, node: fx.Node, shape: tuple[int, ...],
                    operands: list[tuple[TInfo | None, tuple[int, ...]]]) -> TInfo:
    """Broadcasting of operands given as (channel info, shape) to an output of ``shape``."""
    n = len(shape)
    out = TInfo(shape)
    ops = [(info or TInfo(s), s, n - len(s)) for info, s in operands]
    covered: dict[int, Any] = {}  # out dim -> out axis
    source: dict[int, tuple[tuple[int, ...], int]] = {}  # id(out axis) -> (operand shape, offset)

    def is_table(s: tuple[int, ...], off: int, dims: tuple[int, ...], wide: Any) -> bool:
        """The operand is the same for every row of ``wide`` outside ``dims`` (size 1 there):
        one cos/sin table per head_dim position, broadcast over the heads."""
        return set(dims) < set(wide.dims) and all(d < off or s[d - off] == 1
                                                  for d in wide.dims if d not in dims)

    def place(a: Any, s: tuple[int, ...], off: int, dims: tuple[int, ...]) -> Any:
        na = a if off == 0 else b.mirror(node.name, TInfo(s, [a]), shape,
                                          {d: d + off for d in a.dims}).axes[0]
        out.axes.append(na)
        for d in dims:
            covered[d] = na
        source[id(na)] = (s, off)
        return na

    table_why = f"broadcast over every row of a wider channel axis at node '{node.name}'"
    for info, s, off in ops:
        for a in info.axes:
            dims = tuple(d + off for d in a.dims)
            if any(s[d] != shape[d + off] for d in a.dims):
                continue  # this operand broadcasts along the axis: no constraint
            hit = {id(covered[d]): covered[d] for d in dims if d in covered}
            one = next(iter(hit.values())) if len(hit) == 1 else None
            if not hit:
                place(a, s, off, dims)
            elif one is not None and one.dims == dims:
                b.couple(one.elems(), a.elems())
            elif one is not None and is_table(s, off, dims, one):
                # a table for every row of the wider axis: its dims keep their size, the table
                # stays, whole rows may go
                for d in dims:
                    b.pin(TInfo(shape, [one]), d)
                b.freeze(a.elems(), table_why)
            elif one is not None and is_table(*source[id(one)], one.dims, TInfo(s, [a]).axes[0]
                                              if off == 0 else _shifted(a, off)):
                # the table came first: the wider axis takes its place
                out.axes.remove(one)
                b.freeze(one.elems(), table_why)
                wide = place(a, s, off, dims)
                for d in one.dims:
                    b.pin(TInfo(shape, [wide]), d)
            else:  # different axis structure on the same dims: couple dim by dim; a dim of
                # this axis that no output axis carries keeps its size (``along`` the covered
                # dims ties its positions together)
                for d in dims:
                    if d in covered:
                        b.link(b.along(TInfo(s, [a]), d - off), out, d, "")
    # an operand that is full-size on a channel dim but has no axis there pins its size: a
    # plain channel axis is frozen; in a multi-dim axis that dim just never shrinks (all its
    # positions go together)
    pinned: dict[int, set[int]] = {}
    for info, s, off in ops:
        for d, oa in list(covered.items()):
            j = d - off
            if j >= 0 and s[j] == shape[d] and shape[d] > 1 and info.axis_at(j) is None:
                pinned.setdefault(id(oa), set()).add(d)
    for oa in {id(a): a for a in covered.values()}.values():
        dims = pinned.get(id(oa))
        if not dims:
            continue
        if set(oa.dims) <= dims:
            b.freeze(oa.elems(), f"combined with a tensor of fixed size at node '{node.name}'")
            continue
        g = oa.grid()
        for d in dims:
            p = oa.dims.index(d)
            m = np.moveaxis(g, p, -1).reshape(-1, g.shape[p])
            b.couple(np.repeat(m[:, :1], m.shape[1] - 1, axis=1), m[:, 1:])
    return out


def _shifted(a: Any, off: int) -> Any:
    """A view of axis ``a`` with its dims moved by ``off`` (output space), for comparisons."""
    from .elements import Axis

    return Axis(tuple(d + off for d in a.dims), a.sizes, a.base, a.node)


def spatial(b: Builder, node: fx.Node, x: TInfo | None, n_spatial: int) -> Any:
    """A per-channel op over the last ``n_spatial`` dims (pooling, interpolation)."""
    spec = out_spec(b, node)
    reason = f"pooled/resized dim at node '{node.name}'"
    if isinstance(spec, (tuple, list)):  # (values, indices)
        return type(spec)(
            keep_axes(b, node, x, range(s.ndim - n_spatial), s.shape, reason) for s in spec
        )
    if not isinstance(spec, TensorSpec):
        return None
    return keep_axes(b, node, x, range(spec.ndim - n_spatial), spec.shape, reason)


def reduce(b: Builder, node: fx.Node, x: TInfo | None, dims: Any, keepdim: bool) -> Any:
    """Reduction over ``dims`` (None = all): axes on reduced dims are frozen."""
    spec = out_spec(b, node)
    if x is None:
        return empty_like_spec(spec)
    nd = x.ndim
    if dims is None:
        red = set(range(nd))
    else:
        red = {norm_dim(int(d), nd) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    keep = [d for d in range(nd) if d not in red]
    dim_map = {d: d for d in range(nd)} if keepdim else {d: i for i, d in enumerate(keep)}
    reason = f"reduced over a channel dim at node '{node.name}'"
    if isinstance(spec, (tuple, list)):
        return type(spec)(keep_axes(b, node, x, keep, s.shape, reason, dim_map) for s in spec)
    if not isinstance(spec, TensorSpec):
        return None
    return keep_axes(b, node, x, keep, spec.shape, reason, dim_map)


# --------------------------------------------------------------------------- id-tensor trick
def concrete(b: Builder, v: Any) -> Any:
    """Replace Nodes by their recorded values (tensors by zeros of the recorded shape)."""
    if isinstance(v, fx.Node):
        val = b.values.get(v)
        if isinstance(val, TensorSpec):
            return torch.zeros(val.shape, dtype=val.dtype)
        return val
    if isinstance(v, torch.Size):
        return v
    if isinstance(v, (list, tuple)):
        return type(v)(concrete(b, x) for x in v)
    if isinstance(v, dict):
        return {k: concrete(b, x) for k, x in v.items()}
    return v


def size_source(b: Builder, v: Any) -> tuple[TInfo | None, int] | None:
    """If ``v`` is ``t.size(d)`` / ``t.shape[d]``, return (info of t, d)."""
    if not isinstance(v, fx.Node):
        return None
    if v.op == "call_method" and v.target == "size" and len(v.args) + len(v.kwargs) >= 2:
        t, d = v.args[0], arg(v, 1, "dim")
        spec = b.values.get(t)
        if isinstance(d, int) and isinstance(spec, TensorSpec):
            return b.info(t), norm_dim(d, spec.ndim)
    if v.op == "call_function" and getattr(v.target, "__name__", "") == "getitem":
        base, d = v.args
        if isinstance(base, fx.Node) and isinstance(d, int):
            is_shape = (base.op == "call_function" and getattr(base.target, "__name__", "") == "getattr"
                        and base.args[1] == "shape")
            is_size = base.op == "call_method" and base.target == "size" and len(base.args) == 1
            if is_shape or is_size:
                t = base.args[0]
                spec = b.values.get(t)
                if isinstance(spec, TensorSpec):
                    return b.info(t), norm_dim(d, spec.ndim)
    return None


_ARITH = {"add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos", "getitem", "int",
          "float", "pow", "abs", "max", "min", "ceil", "floor", "sym_int", "sym_max", "sym_min"}


def size_deps(b: Builder, v: Any, depth: int = 12) -> list[tuple[TInfo | None, int]]:
    """Every tensor dim whose size a Python value ``v`` is computed from (through ``size()``,
    ``.shape`` and integer arithmetic)."""
    if depth <= 0 or not isinstance(v, fx.Node):
        if isinstance(v, (list, tuple)):
            return [d for x in v for d in size_deps(b, x, depth - 1)]
        return []
    src = size_source(b, v)
    if src is not None:
        return [src]
    spec = b.values.get(v)
    if isinstance(spec, TensorSpec):
        return []  # a tensor, not a size
    if v.op == "call_method" and v.target == "size" and len(v.args) == 1:
        t = b.values.get(v.args[0])
        return [(b.info(v.args[0]), d) for d in range(t.ndim)] if isinstance(t, TensorSpec) else []
    if v.op == "call_function" and getattr(v.target, "__name__", "") == "getattr" \
            and v.args[1] == "shape":
        t = b.values.get(v.args[0])
        if isinstance(t, TensorSpec):  # a whole shape: all dims
            return [(b.info(v.args[0]), d) for d in range(t.ndim)]
        return []
    if v.op in ("call_function", "call_method") and getattr(v.target, "__name__", str(v.target)) in _ARITH:
        return [d for a in v.all_input_nodes for d in size_deps(b, a, depth - 1)]
    return []


def freeze_size_deps(b: Builder, node: fx.Node, values: Any, reason: str) -> None:
    """Keep the counts ``values`` are computed from: a dim of a multi-dim channel axis (the
    head_dim of (heads, head_dim)) is pinned, so pruning never changes its size; a plain channel
    dim is frozen."""
    for info, d in size_deps(b, values):
        if info is None or b.pin(info, d):
            continue
        e = b.along(info, d)
        if e is not None:
            b.freeze(e, reason)


def _varying_dims(res: np.ndarray) -> list[int]:
    return [d for d in range(res.ndim) if res.shape[d] > 1 and np.any(np.diff(res, axis=d) != 0)]


def movement(b: Builder, node: fx.Node, call: Callable[[torch.Tensor], torch.Tensor],
             sizes: list[Any] | None = None) -> TInfo | None:
    """Rule for a pure data-movement op on ``node.args[0]``.

    ``sizes`` lists, per output dim, how its size is given: an int literal (fixed after pruning),
    a Node (computed at run time), or None/-1 (inferred). ``None`` means no sizes are given.
    """
    spec = out_spec(b, node)
    if not isinstance(spec, TensorSpec):
        return empty_like_spec(spec)
    x = b.info(node.args[0])
    out = TInfo(spec.shape)
    if x is None or not x.axes:
        _pin_size_sources(b, node, out, sizes)
        return out
    claimed: set[int] = set()
    for a in x.axes:
        shape = [1] * x.ndim
        for d, s in zip(a.dims, a.sizes):
            shape[d] = s
        ids = torch.arange(a.size, dtype=torch.float64).reshape(shape).expand(x.shape).contiguous()
        res = call(ids)
        if not isinstance(res, torch.Tensor) or tuple(res.shape) != spec.shape:
            b.freeze(a.elems(), f"could not map channels through node '{node.name}'")
            continue
        res = res.numpy().astype(np.int64)
        dims = _varying_dims(res)
        if not dims or claimed & set(dims):
            b.freeze(a.elems(), f"channels mixed with other dims at node '{node.name}'")
            continue
        claimed |= set(dims)
        sub = res[tuple(slice(None) if d in dims else 0 for d in range(res.ndim))]
        na = b.new_axis(node.name, tuple(dims), tuple(res.shape[d] for d in dims))
        if not (b.gqa == "query" and np.unique(sub).size < sub.size
                and query_slots(b, node, a, na, sub)):
            b.couple(na.elems(), a.base + sub.ravel())
        out.axes.append(na)
        if sizes is not None:
            _constrain_sizes(b, node, out, na, sizes)
    _pin_size_sources(b, node, out, sizes)
    return out


_SIZE_ATTRS = ("out_channels", "in_channels", "out_features", "in_features", "num_features",
               "embedding_dim", "num_channels")


def _managed_literal(b: Builder, node: fx.Node, s: Any) -> bool:
    """A literal that is a size attribute of the module whose parameter is being reshaped
    (``self.weight.reshape(1, self.out_channels, -1)``): graphprune refreshes that attribute."""
    from .registry import resizer_for

    if not isinstance(s, int) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    n = node.args[0]
    for _ in range(8):
        if n in b.param_nodes:
            m = b.modules.get(b.param_nodes[n].rpartition(".")[0])
            return m is not None and resizer_for(m) is not None and any(
                getattr(m, a, None) == s for a in _SIZE_ATTRS)
        ins = n.all_input_nodes
        if len(ins) != 1:
            return False
        n = ins[0]
    return False


# attributes of a module holding the size a fused projection's output is split by (GPT-2's
# ``c_attn(x).split(self.split_size, dim=2)``): refreshed after pruning like head counts
SPLIT_SIZE_ATTRS = ("split_size",)

# attributes of an attention module that hold a head count or the heads' total width; a literal
# equal to one of them in a reshape inside that module is refreshed after pruning
HEAD_COUNT_ATTRS = ("num_heads", "heads", "n_heads")
HEAD_WIDTH_ATTRS = ("attn_dim", "all_head_dim", "inner_dim", "num_heads_x_head_dim")
HEAD_DIM_ATTRS = ("head_dim", "dim_head", "head_size", "key_value_proj_dim")


def _enclosing_modules(b: Builder, node: fx.Node) -> list[tuple[str, Any]]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for v in reversed(list(stack.values())):
        path = v[0] if isinstance(v, tuple) else v
        m = b.modules.get(path)
        if m is not None:
            out.append((path, m))
    return out


def _head_literal(b: Builder, node: fx.Node, sizes: list[Any], d: int) -> bool:
    """``reshape(B, N, 3, self.num_heads, self.head_dim)`` or ``reshape(B, N, self.attn_dim)`` in
    an attention module: the literal is the module's own head count or width, which graphprune
    refreshes after pruning (so whole heads may go). A head count must be followed by the
    module's head_dim, so that ``(3, 3, 64)`` with 3 heads is read unambiguously."""
    s = sizes[d]
    for path, m in _enclosing_modules(b, node)[:2]:
        hd = next((getattr(m, a) for a in HEAD_DIM_ATTRS if isinstance(getattr(m, a, None), int)),
                  None)
        for a in HEAD_COUNT_ATTRS:
            if getattr(m, a, None) == s and hd is not None and d + 1 < len(sizes) \
                    and sizes[d + 1] == hd:
                b.attr_sizes.append((path, a, node, d))
                return True
        for a in HEAD_WIDTH_ATTRS:
            if getattr(m, a, None) == s and d == len(sizes) - 1 and sizes.count(s) == 1:
                b.attr_sizes.append((path, a, node, d))
                return True
    return False


def _inferred_heads(b: Builder, node: fx.Node, sizes: list[Any], d: int, n: int) -> None:
    """``view(B, T, -1, self.head_dim)`` in an attention module whose head count attribute is
    the inferred size ``n``: the attribute follows the heads that remain (GPT-2 keeps
    ``num_heads`` for information; other code may read it)."""
    for path, m in _enclosing_modules(b, node)[:2]:
        hd = next((getattr(m, a) for a in HEAD_DIM_ATTRS if isinstance(getattr(m, a, None), int)),
                  None)
        if hd is None or d + 1 >= len(sizes) or sizes[d + 1] != hd:
            continue
        for a in HEAD_COUNT_ATTRS:
            if getattr(m, a, None) == n:
                b.attr_sizes.append((path, a, node, d))
                return


def _pin_size_sources(b: Builder, node: fx.Node, out: TInfo, sizes: list[Any] | None) -> None:
    """A size read from a channel dim but given to an output dim that is not a channel would
    change after pruning while the data does not: freeze that channel."""
    for d, s in enumerate(sizes or []):
        if d >= len(out.shape) or out.axis_at(d) is not None:
            continue
        freeze_size_deps(b, node, s, f"its size shapes a non-channel dim at node '{node.name}'")


def _own_arithmetic(b: Builder, node: fx.Node, s: fx.Node) -> bool:
    """A computed size that depends only on the reshaped tensor's own channel axes (the
    ``C // groups`` of a channel shuffle), or on no channel at all."""
    x = b.info(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    own = {id(a) for a in x.axes} if isinstance(x, TInfo) else set()
    for info, d in size_deps(b, s):
        a = info.axis_at(d) if isinstance(info, TInfo) else None
        if a is not None and id(a) not in own:
            return False
    return True


def _constrain_sizes(b: Builder, node: fx.Node, out: TInfo, na: Any, sizes: list[Any]) -> None:
    """Literal sizes in a view stay fixed after pruning: only one free dim of an axis may shrink,
    and only if no literal pins it. Sizes read from another tensor couple with that tensor."""
    free = []
    for d in na.dims:
        s = sizes[d] if d < len(sizes) else None
        src = size_source(b, s)
        if src is not None:
            info, sd = src
            other = b.along(info, sd)
            if other is None or other.size != out.shape[d]:
                b.freeze(na.elems(), "size of a channel dim read from a non-channel dim at node "
                                     f"'{node.name}'")
                return
            b.couple(b.along(out, d), other)
            free.append(d)
        elif isinstance(s, fx.Node) and not _own_arithmetic(b, node, s):
            # computed from another tensor's channel count (C // heads with C the *input* width
            # of the layer that made this tensor): that count must stay, and so does this size
            freeze_size_deps(b, node, s, f"its count sizes another tensor at node '{node.name}'")
        elif isinstance(s, fx.Node) or s is None or s == -1 or _managed_literal(b, node, s) or (
                isinstance(s, int) and _head_literal(b, node, sizes, d)) or (
                b.exported and isinstance(s, int)):
            # torch.export wrote every size as a literal, computed or not: the probe checks
            # the model's own code on a pruned copy before the group may be pruned
            free.append(d)
            if s is None or s == -1:
                _inferred_heads(b, node, sizes, d, out.shape[d])
    if not free:
        b.freeze(na.elems(), f"literal channel size in {node.target} at node '{node.name}'")
    elif len(na.dims) > 1:
        b.along(out, free[0])  # the other dims of the axis keep their size: couple along them
