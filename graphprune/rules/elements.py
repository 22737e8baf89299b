"""The element space the channel rules write into.

Every channel axis of every traced tensor is a range of integer *elements*. A channel axis may
span several tensor dims (a channel dim split by ``view`` into ``(groups, per_group)``); its
elements are then indexed row-major over those dims. Rules state facts about elements:

- ``couple(a, b)``: element ``a[i]`` and ``b[i]`` must be removed together;
- ``freeze(e, reason)``: element ``e`` can never be removed;
- ``source(e)``: removing ``e`` removes a produced channel (a conv filter, a Linear row);
- ``member(param, dim, e, idx)``: removing ``e`` removes index ``idx`` of ``param`` along ``dim``.

The connected components of the coupling relation are the units that are pruned as a whole.
Tensor dims without an axis (batch, spatial, token) are never pruned; a rule that needs a channel
where there is none freezes its own side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.fx as fx



class Axis:
    """A channel axis of one tensor: ``dims`` (sorted), their ``sizes`` and the first element."""

    __slots__ = ("dims", "sizes", "base", "size", "node")

    def __init__(self, dims: tuple[int, ...], sizes: tuple[int, ...], base: int, node: str):
        self.dims, self.sizes, self.base, self.node = dims, sizes, base, node
        self.size = math.prod(sizes)  # 1 for no dims

    def elems(self) -> np.ndarray:
        return np.arange(self.base, self.base + self.size, dtype=np.int64)

    def grid(self) -> np.ndarray:
        """Elements shaped like the axis' dims."""
        return self.elems().reshape(self.sizes)

    def __repr__(self) -> str:
        return f"Axis({self.node}, dims={self.dims}, sizes={self.sizes})"


class TInfo:
    """The channel axes of one tensor value (dims not covered by an axis are not channels)."""

    __slots__ = ("shape", "axes")

    def __init__(self, shape: tuple[int, ...], axes: list[Axis] | None = None):
        self.shape = tuple(shape)
        self.axes: list[Axis] = axes or []

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def axis_at(self, dim: int) -> Axis | None:
        for a in self.axes:
            if dim in a.dims:
                return a
        return None

    def __repr__(self) -> str:
        return f"TInfo({self.shape}, {self.axes})"


@dataclass
class Member:
    """Removing element ``elems[i]`` removes index ``index[i]`` of ``param`` along ``dim``."""

    param: str  # canonical state_dict key
    dim: int
    elems: np.ndarray
    index: np.ndarray
    role: str  # 'out', 'in' or 'param'
    module: str  # module path that owns the parameter
    pos: np.ndarray | None = None  # channel position of each entry in the activation (in order)

    def __post_init__(self) -> None:
        if self.pos is None:
            self.pos = np.arange(self.elems.size)


class Builder:
    """Collects axes, couplings, freezes, sources and members while rules run over a graph."""

    def __init__(self, params: dict[str, Any], aliases: dict[str, str], gqa: str = "group"):
        self.params = params  # canonical name -> tensor
        self.aliases = aliases  # any state_dict name -> canonical name
        self.n = 0
        self.axes: list[Axis] = []
        self._ea: list[np.ndarray] = []
        self._eb: list[np.ndarray] = []
        self._frozen: list[tuple[np.ndarray, int]] = []
        self.reasons: list[str] = []
        self._reason_ids: dict[str, int] = {}
        self._sources: list[np.ndarray] = []
        self.members: list[Member] = []
        self.infos: dict[fx.Node, Any] = {}
        self.values: dict[fx.Node, Any] = {}
        self.prefix = ""
        self.exported = False  # the graph being read comes from torch.export (sizes are literals)
        self.gqa = gqa  # grouped-query heads: "group" (KV head + its queries) or "query"
        self.unsupported: dict[str, list[str]] = {}  # op description -> node names
        self.value_coupled: list[tuple[np.ndarray, str]] = []
        self.modules: dict[str, Any] = {}  # module path -> module
        self.param_nodes: dict[Any, str] = {}  # graph node -> name of the parameter it reads
        self._by_param: dict[str, list[Member]] = {}
        # (module path, attribute, node, dim[, divisor]): attribute = node's new size at dim // divisor
        self.attr_sizes: list[tuple[Any, ...]] = []

    # ---------------------------------------------------------------- element space
    def new_axis(self, node: str, dims: tuple[int, ...], sizes: tuple[int, ...]) -> Axis:
        a = Axis(tuple(dims), tuple(int(s) for s in sizes), self.n, self.prefix + node)
        self.n += a.size
        self.axes.append(a)
        return a

    def couple(self, a: np.ndarray, b: np.ndarray) -> None:
        a = np.asarray(a, dtype=np.int64).ravel()
        b = np.asarray(b, dtype=np.int64).ravel()
        if a.shape != b.shape:
            raise ValueError(f"internal: couple() got {a.shape} and {b.shape}")
        if a.size:
            self._ea.append(a)
            self._eb.append(b)

    def couple_all(self, e: np.ndarray) -> None:
        """Couple every element of ``e`` with each other."""
        e = np.asarray(e, dtype=np.int64).ravel()
        if e.size > 1:
            self.couple(e[:-1], e[1:])

    def freeze(self, e: np.ndarray, reason: str) -> None:
        e = np.asarray(e, dtype=np.int64).ravel()
        if not e.size:
            return
        rid = self._reason_ids.get(reason)
        if rid is None:
            rid = self._reason_ids[reason] = len(self.reasons)
            self.reasons.append(reason)
        self._frozen.append((e, rid))

    def source(self, e: np.ndarray) -> None:
        self._sources.append(np.asarray(e, dtype=np.int64).ravel())

    def member(
        self, param: str, dim: int, elems: np.ndarray, index: np.ndarray | None = None, *,
        role: str = "param", module: str = "",
    ) -> None:
        canon = self.aliases.get(param)
        if canon is None:  # not a parameter/buffer of the model (e.g. a traced constant)
            self.freeze(elems, f"'{param}' is not a parameter or buffer of the model")
            return
        elems = np.asarray(elems, dtype=np.int64).ravel()
        idx = np.arange(elems.size) if index is None else np.asarray(index, dtype=np.int64).ravel()
        self.members.append(Member(canon, dim, elems, idx, role, module))
        self._by_param.setdefault(canon, []).append(self.members[-1])

    def set_roles(self, node: Any, roles: dict[int, str]) -> None:
        """Tag the members of the parameter read at graph node ``node`` by dim (a functional
        layer's weight: dim 0 produces channels ('out'), dim 1 consumes them ('in'))."""
        name = self.param_nodes.get(node)
        canon = self.aliases.get(name) if name is not None else None
        for m in self._by_param.get(canon, []) if canon is not None else []:
            if m.role == "param" and m.dim in roles:
                m.role = roles[m.dim]

    def mark_value_coupled(self, e: np.ndarray, why: str) -> None:
        """Removing one of these channels changes the values of the others (e.g. LayerNorm)."""
        self.value_coupled.append((np.asarray(e, dtype=np.int64).ravel(), why))

    # ---------------------------------------------------------------- tensor infos
    def info(self, x: Any) -> TInfo | None:
        """The channel info of a node argument (None for non-tensors and opaque values)."""
        if isinstance(x, fx.Node):
            v = self.infos.get(x)
            return v if isinstance(v, TInfo) else None
        return None

    def spec(self, x: Any) -> Any:
        """The recorded runtime description of an argument (TensorSpec, int, tuple, ...)."""
        if isinstance(x, fx.Node):
            return self.values.get(x)
        if isinstance(x, (list, tuple)):
            return type(x)(self.spec(v) for v in x)
        return x

    def along(self, info: TInfo | None, dim: int) -> np.ndarray | None:
        """One representative element per index of ``dim`` (None if ``dim`` is not a channel).

        If the axis covering ``dim`` spans several dims, all its elements with the same
        coordinate on ``dim`` are coupled first: they can only go together.
        """
        if info is None:
            return None
        a = info.axis_at(dim)
        if a is None:
            return None
        if len(a.dims) == 1:
            return a.elems()
        g = np.moveaxis(a.grid(), a.dims.index(dim), 0).reshape(a.sizes[a.dims.index(dim)], -1)
        self.couple(np.repeat(g[:, :1], g.shape[1] - 1, axis=1), g[:, 1:])
        return g[:, 0].copy()

    def pin(self, info: TInfo | None, dim: int) -> bool:
        """Keep the size of ``dim`` fixed: in an axis spanning several dims (heads x head_dim),
        couple every position along ``dim`` (for each coordinate of the other dims), so that
        pruning removes whole rows of the other dims and never shrinks ``dim``. Returns False if
        ``dim`` is a plain one-dim channel axis (the caller must freeze it) and True otherwise."""
        a = info.axis_at(dim) if info is not None else None
        if a is None:
            return True
        if len(a.dims) == 1:
            return False
        p = a.dims.index(dim)
        m = np.moveaxis(a.grid(), p, -1).reshape(-1, a.sizes[p])
        if m.shape[1] > 1:
            self.couple(np.repeat(m[:, :1], m.shape[1] - 1, axis=1), m[:, 1:])
        return True

    def link(self, elems: np.ndarray, info: TInfo | None, dim: int, reason: str) -> None:
        """Couple ``elems`` with channel ``dim`` of ``info``, or freeze them if it has none
        (nothing to do when ``elems`` is None: a size-1 dim that carries no channel)."""
        if elems is None:
            return
        other = self.along(info, dim)
        if other is None or other.size != np.asarray(elems).size:
            self.freeze(elems, reason)
        else:
            self.couple(elems, other)

    def freeze_info(self, info: Any, reason: str) -> None:
        """Freeze every axis of a (possibly nested) info value."""
        if isinstance(info, TInfo):
            for a in info.axes:
                self.freeze(a.elems(), reason)
        elif isinstance(info, (list, tuple)):
            for v in info:
                self.freeze_info(v, reason)
        elif isinstance(info, dict):
            for v in info.values():
                self.freeze_info(v, reason)

    def mirror(self, node: str, src: TInfo, shape: tuple[int, ...] | None = None,
               dim_map: dict[int, int] | None = None) -> TInfo:
        """A new info whose axes are copies of ``src``'s axes (dims remapped), coupled 1:1."""
        out = TInfo(src.shape if shape is None else shape)
        for a in src.axes:
            dims = tuple(dim_map[d] if dim_map else d for d in a.dims)
            order = np.argsort(dims)
            na = self.new_axis(node, tuple(np.asarray(dims)[order]), tuple(np.asarray(a.sizes)[order]))
            self.couple(np.transpose(a.grid(), order).ravel(), na.elems())
            out.axes.append(na)
        return out

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._ea:
            z = np.zeros(0, dtype=np.int64)
            return z, z
        return np.concatenate(self._ea), np.concatenate(self._eb)

    def frozen(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._frozen:
            z = np.zeros(0, dtype=np.int64)
            return z, z
        e = np.concatenate([f[0] for f in self._frozen])
        r = np.concatenate([np.full(f[0].size, f[1], dtype=np.int64) for f in self._frozen])
        return e, r

    def sources(self) -> np.ndarray:
        return np.concatenate(self._sources) if self._sources else np.zeros(0, dtype=np.int64)
