"""Stage 2 of the flow, the value: a ``ChannelGraph`` of coupled channel groups.

Every channel axis of every traced tensor is a range of integer *elements*; the channel rules
(``rules/``) state which elements must be removed together, and ``grouping`` turns that relation
into *units* (connected components, usually one channel) and *groups* (units that touch exactly
the same tensors: the channels of one conv, its BatchNorm and consumers; one slice of a concat;
the residual stream of a stage). A ``ChannelGraph`` is built once and not mutated afterwards:
freezing groups (the export probe, a caller's decision) returns a new graph.

How a model is captured (torch.fx, torch.export, the probe) lives in ``capture``; how elements
become groups, in ``grouping``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .trace import Traced
from ._np import unique


@dataclass
class GroupMember:
    """One parameter slice of a group: unit ``unit[i]`` owns index ``index[i]`` along ``dim``."""

    param: str
    dim: int
    role: str  # 'out' (a produced channel), 'in' (a consumer's input), 'param' (norm, scale...)
    module: str
    unit: np.ndarray
    index: np.ndarray
    pos: np.ndarray = field(default=None, repr=False)  # channel of each entry in the activation
    _n_index: int = -1

    @property
    def n_index(self) -> int:
        """Distinct parameter indices (== len(index) when there is one index per entry)."""
        if self._n_index < 0:
            self._n_index = int(unique(self.index).size)
        return self._n_index

    def distinct_kept(self, kept_units: np.ndarray) -> int:
        """Distinct parameter indices that survive when only ``kept_units`` are kept."""
        k = kept_units[self.unit]
        if self.n_index == self.index.size:
            return int(np.count_nonzero(k))
        return int(unique(self.index[k]).size)

    def label(self) -> str:
        tag = {"out": "out", "in": "in"}.get(self.role)
        return f"{self.param}[{tag}]" if tag else self.param


@dataclass(frozen=True)
class Group:
    """Channels that are removed together. ``size`` is the number of removable units.

    Example:
        >>> g = graphprune.trace(model, x)
        >>> print(g.group("layer1.0.conv1"))   # Group 'layer1.0.conv1' (64 channels, prunable): ...
        >>> [m.label() for m in g.group("layer1.0.conv1").members]
    """

    id: int
    name: str
    size: int
    prunable: bool
    reason: str | None
    members: list[GroupMember]
    comps: np.ndarray = field(repr=False)  # component id of each unit
    value_coupled: str | None = None  # why removing a channel changes the others' values

    @property
    def modules(self) -> list[str]:
        seen: dict[str, None] = {}
        for m in self.members:
            seen.setdefault(m.module, None)
        return list(seen)

    @property
    def sources(self) -> list[GroupMember]:
        return [m for m in self.members if m.role == "out"]

    def __str__(self) -> str:
        head = f"Group '{self.name}' ({self.size} channels, "
        head += "prunable" if self.prunable else f"frozen: {self.reason}"
        head += ")"
        outs = [m.label() for m in self.members if m.role == "out"]
        params = [m.label() for m in self.members if m.role == "param"]
        ins = [m.label() for m in self.members if m.role == "in"]
        parts = [", ".join(p) for p in (outs, params, ins) if p]
        return head + (": " + " => ".join(parts) if parts else "")


@dataclass(frozen=True)
class ElementIndex:
    """The element space after grouping, in flat arrays (what plans and apply need).

    ``comp[e]`` is the unit (component) of element ``e``; ``comp_group`` / ``comp_unit`` give the
    group and the unit's index in it (-1 for components that produce no channel); the member
    arrays list, for every parameter slice, element -> (``member_keys[m_key]``, ``m_index``).
    """

    comp: np.ndarray
    ncomp: int
    comp_group: np.ndarray
    comp_unit: np.ndarray
    member_keys: list[tuple[str, int]]
    m_elems: np.ndarray
    m_index: np.ndarray
    m_key: np.ndarray


class ChannelGraph:
    """The channel-dependency graph of a model (a value: built by ``graphprune.trace``).

    Attributes: ``model`` (the caller's model, never modified), ``groups`` (every ``Group``),
    ``params`` (canonical parameter/buffer name -> tensor), ``aliases`` (every state_dict name ->
    canonical name), ``modules`` (path -> module), ``traced`` (the captured fx graph(s) with every
    value's shape), ``infos`` (fx node -> its channel axes), ``unsupported`` (op -> the nodes it
    froze), ``tracer`` / ``tracer_reason``.

    Example:
        >>> g = graphprune.trace(model, torch.randn(1, 3, 32, 32))
        >>> print(g.summary())
        >>> print(g.groups[0])   # Group 'conv1' (16 channels, prunable): conv1.weight[out] => ...
    """

    def __init__(self, model: nn.Module, traced: list[Traced], groups: list[Group], *,
                 params: dict[str, torch.Tensor], aliases: dict[str, str],
                 modules: dict[str, nn.Module], index: ElementIndex, infos: Mapping[Any, Any],
                 attr_sizes: list[tuple[Any, ...]], members: list[Any],
                 unsupported: dict[str, list[str]]):
        self.model = model
        self.traced = traced
        self.groups = groups
        self.params = params
        self.aliases = aliases
        self.modules = modules  # module path -> module (the model's own)
        self.index = index
        self.infos = infos  # fx node -> channel axes of its value
        self.attr_sizes = attr_sizes  # (module path, attribute, node, dim[, divisor]) refreshed on apply
        self.members = members  # every parameter slice the rules recorded
        self.unsupported = unsupported  # op -> nodes it froze
        self._by_name = {g.name: g for g in groups}

    # the flat element arrays, under their historical names
    comp = property(lambda self: self.index.comp)
    ncomp = property(lambda self: self.index.ncomp)
    comp_group = property(lambda self: self.index.comp_group)
    comp_unit = property(lambda self: self.index.comp_unit)
    member_keys = property(lambda self: self.index.member_keys)
    m_elems = property(lambda self: self.index.m_elems)
    m_index = property(lambda self: self.index.m_index)
    m_key = property(lambda self: self.index.m_key)

    @functools.cached_property
    def flat_layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every member entry's unit (``comp[m_elems]``), the start of each (param, dim) key in
        one flat index space over all parameter dims (plus its end), and every entry's flat
        position: what ``apply`` reads for every plan, computed once."""
        sizes = np.array([self.params[p].shape[d] for p, d in self.member_keys], dtype=np.int64)
        offset = np.concatenate([[0], np.cumsum(sizes)])
        return self.comp[self.m_elems], offset, offset[self.m_key] + self.m_index

    def with_frozen(self, reasons: Mapping[str, str]) -> ChannelGraph:
        """A new graph in which the named groups are frozen with the given reasons.

        Example:
            >>> g2 = g.with_frozen({"layer1.0.conv1": "kept for accuracy"})
        """
        if not reasons:
            return self
        unknown = [n for n in reasons if n not in self._by_name]
        if unknown:
            from .errors import unknown_name

            raise unknown_name("group", unknown[0], self._by_name)
        groups = [dataclasses.replace(g, prunable=False, reason=reasons[g.name])
                  if g.name in reasons else g for g in self.groups]
        new = object.__new__(ChannelGraph)
        new.__dict__.update(self.__dict__)
        new.groups = groups
        new._by_name = {g.name: g for g in groups}
        return new

    # ------------------------------------------------------------------ queries
    def group(self, name: str) -> Group:
        try:
            return self._by_name[name]
        except KeyError:
            from .errors import unknown_name

            raise unknown_name("group", name, self._by_name) from None

    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    @property
    def leaves(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for t in self.traced:
            out.update(t.leaves)
        return out

    @property
    def tracer(self) -> str:
        """'torch.fx', 'torch.export', or 'regions' (traceable submodules, see ``regions``)."""
        if any(hasattr(t, "region_inputs") for t in self.traced):
            return "regions"
        return self.traced[0].tracer

    @property
    def tracer_reason(self) -> str:
        """Why torch.export or regions were used instead of torch.fx ('' for fx)."""
        return self.traced[0].why

    @property
    def prunable_channels(self) -> int:
        return sum(g.size for g in self.prunable_groups)

    def summary(self, max_rows: int = 60) -> str:
        """A text table of the groups: name, channels, prunable / why not, members."""
        from .report import graph_table

        return graph_table(self, max_rows=max_rows)

    def to_networkx(self):
        """A networkx DiGraph: nodes are the channel axes of tensors (``'node:dims'``) and
        parameters; edges follow the data flow. Node attribute ``groups`` lists group names."""
        from .viz import to_networkx

        return to_networkx(self)

    def to_dot(self) -> str:
        """Graphviz DOT text of ``to_networkx()`` with prunable groups coloured."""
        from .viz import to_dot

        return to_dot(self)

    def __repr__(self) -> str:
        return (f"ChannelGraph({type(self.model).__name__}: {len(self.groups)} groups, "
                f"{len(self.prunable_groups)} prunable)")


def param_table(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Canonical name -> tensor for every parameter/buffer, and every name -> canonical name."""
    params: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    named = list(model.named_parameters(remove_duplicate=False))
    named += [(n, b) for n, b in model.named_buffers(remove_duplicate=False) if b is not None]
    for name, t in named:
        canon = first.setdefault(id(t), name)
        aliases[name] = canon
        params.setdefault(canon, t)
    return params, aliases
