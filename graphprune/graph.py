"""Stage 2 of the flow: traced model -> ChannelGraph of coupled channel groups.

The channel rules run over every node of the fx graph and state which channel elements must be
removed together. Connected components of that relation are *units* (usually one channel);
units that touch exactly the same tensors form a *group* (the channels of one conv and its
BatchNorm and consumers; one slice of a concat; the residual stream of a stage).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.fx as fx
from scipy.sparse.csgraph import connected_components
from torch import nn

from .errors import GraphPruneError, TraceError
from .rules import builtin  # noqa: F401  (registers the built-in rules)
from .rules.elements import Builder, TInfo
from .rules.common import (
    NO_RULE, empty_like_spec, freeze_inputs, freeze_size_deps, has_tensor, out_spec,
)
from .rules.nn_modules import opaque
from .rules.registry import describe_target, module_rule_for, rule_for
from .trace import TensorSpec, Traced, export_trace, trace_model

STRICT = os.environ.get("GRAPHPRUNE_STRICT", "") not in ("", "0")
# ops whose size arguments the movement rules check themselves
SIZE_AWARE = {"view", "reshape", "expand", "unflatten", "repeat", "chunk", "split"}
SIZE_AWARE_FNS = {torch.reshape, torch.unflatten, torch.chunk, torch.split}


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
            self._n_index = int(np.unique(self.index).size)
        return self._n_index

    def distinct_kept(self, kept_units: np.ndarray) -> int:
        """Distinct parameter indices that survive when only ``kept_units`` are kept."""
        k = kept_units[self.unit]
        if self.n_index == self.index.size:
            return int(np.count_nonzero(k))
        return int(np.unique(self.index[k]).size)

    def label(self) -> str:
        tag = {"out": "out", "in": "in"}.get(self.role)
        return f"{self.param}[{tag}]" if tag else self.param


@dataclass
class Group:
    """Channels that are removed together. ``size`` is the number of removable units."""

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


class ChannelGraph:
    """The channel-dependency graph of a model.

    Example:
        >>> g = graphprune.trace(model, torch.randn(1, 3, 32, 32))
        >>> print(g.summary())
        >>> print(g.groups[0])   # Group 'conv1' (16 channels, prunable): conv1.weight[out] => ...
    """

    def __init__(self, model: nn.Module, traced: list[Traced], b: Builder):
        self.model = model
        self.traced = traced
        self.builder = b
        self.params = b.params
        self.aliases = b.aliases
        self.modules: dict[str, nn.Module] = b.modules  # module path -> module (the model's own)
        self.unsupported: dict[str, list[str]] = b.unsupported  # op -> nodes it froze
        self.infos = b.infos  # fx node -> channel axes of its value
        self.attr_sizes = b.attr_sizes  # (module path, attribute, node, dim) refreshed on apply
        self.members = b.members  # every parameter slice the rules recorded
        self._finalize()

    # ------------------------------------------------------------------ construction
    def _tie_members(self) -> None:
        """Elements that remove the same index of the same parameter are one unit (weight tying,
        a module called twice, the same local index of every conv group)."""
        b = self.builder
        by_key: dict[tuple[str, int], list[Any]] = defaultdict(list)
        for m in b.members:
            by_key[(m.param, m.dim)].append(m)
        for ms in by_key.values():
            e = np.concatenate([m.elems for m in ms])
            i = np.concatenate([m.index for m in ms])
            order = np.argsort(i, kind="stable")
            e, i = e[order], i[order]
            same = i[1:] == i[:-1]
            b.couple(e[:-1][same], e[1:][same])

    def _finalize(self) -> None:
        b = self.builder
        self._tie_members()
        n = b.n
        ea, eb = b.edges()
        adj = sp.coo_matrix((np.ones(ea.size, dtype=np.int8), (ea, eb)), shape=(n, n))
        ncomp, comp = connected_components(adj, directed=False)
        self.comp = comp
        self.ncomp = ncomp
        fe, fr = b.frozen()
        reason = np.full(ncomp, -1, dtype=np.int64)
        reason[comp[fe[::-1]]] = fr[::-1]  # the first reason recorded wins
        is_src = np.zeros(ncomp, dtype=bool)
        is_src[comp[b.sources()]] = True
        vc = np.full(ncomp, -1, dtype=np.int64)
        self._vc_reasons = []
        for e, why in b.value_coupled:
            vc[comp[e]] = len(self._vc_reasons)
            self._vc_reasons.append(why)
        # signature of a unit = the set of axes it touches (+ whether it is frozen)
        bases = np.array([a.base for a in b.axes], dtype=np.int64)
        elem_axis = np.searchsorted(bases, np.arange(n), side="right") - 1
        keep = is_src[comp]
        pairs = np.unique(comp[keep].astype(np.int64) * len(b.axes) + elem_axis[keep])
        pc, pa = pairs // len(b.axes), pairs % len(b.axes)
        rnd = np.random.default_rng(0).integers(1, 2**63 - 1, size=len(b.axes), dtype=np.int64)
        h = np.zeros(ncomp, dtype=np.int64)
        np.add.at(h, pc, rnd[pa])
        h = np.where(reason >= 0, h ^ 0x5BD1E995, h)
        src_comps = np.flatnonzero(is_src)  # component labels follow first element order
        uh, first, inv = np.unique(h[src_comps], return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        gid = rank[inv]
        comp_group = np.full(ncomp, -1, dtype=np.int64)
        comp_unit = np.full(ncomp, -1, dtype=np.int64)
        comp_group[src_comps] = gid
        counts = np.zeros(order.size, dtype=np.int64)
        for_units = np.argsort(gid, kind="stable")
        sorted_g = gid[for_units]
        starts = np.searchsorted(sorted_g, np.arange(order.size))
        comp_unit[src_comps[for_units]] = np.arange(for_units.size) - starts[sorted_g]
        np.add.at(counts, gid, 1)
        self.comp_group, self.comp_unit = comp_group, comp_unit
        # members per group
        per_group: list[list[GroupMember]] = [[] for _ in range(order.size)]
        for m in b.members:
            c = comp[m.elems]
            g = comp_group[c]
            if not g.size or g.max() < 0:
                continue
            if g.min() == g.max():  # the usual case: the whole member is in one group
                per_group[g[0]].append(GroupMember(m.param, m.dim, m.role, m.module,
                                                   comp_unit[c], m.index, m.pos))
                continue
            for gg in np.unique(g[g >= 0]):
                s = g == gg
                per_group[gg].append(GroupMember(m.param, m.dim, m.role, m.module,
                                                 comp_unit[c[s]], m.index[s], m.pos[s]))
        # all members flattened, for applying plans in one vectorised pass
        keys: dict[tuple[str, int], int] = {}
        kid = [keys.setdefault((m.param, m.dim), len(keys)) for m in b.members]
        self.member_keys = list(keys)
        if b.members:
            self.m_elems = np.concatenate([m.elems for m in b.members])
            self.m_index = np.concatenate([m.index for m in b.members])
            self.m_key = np.repeat(np.asarray(kid, dtype=np.int64), [m.elems.size for m in b.members])
        else:
            self.m_elems = self.m_index = self.m_key = np.zeros(0, dtype=np.int64)
        groups: list[Group] = []
        used: dict[str, int] = {}
        comps_by_group = np.split(src_comps[for_units], starts[1:])
        for k in range(order.size):
            comps = comps_by_group[k]
            members = per_group[k]
            outs = [m for m in members if m.role == "out"]
            base = outs[0].module if outs else (members[0].param if members else f"group{k}")
            used[base] = used.get(base, 0) + 1
            name = base if used[base] == 1 else f"{base}#{used[base]}"
            r = reason[comps[0]]
            v = vc[comps]
            groups.append(Group(
                id=k, name=name, size=int(counts[k]), prunable=bool(r < 0 and counts[k] > 1),
                reason=(b.reasons[r] if r >= 0 else ("a single channel" if counts[k] <= 1 else None)),
                members=members, comps=comps,
                value_coupled=self._vc_reasons[v.max()] if (v >= 0).any() else None,
            ))
        self.groups = groups
        self._by_name = {g.name: g for g in groups}

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
        """'torch.fx' or 'torch.export'."""
        return self.traced[0].tracer

    @property
    def tracer_reason(self) -> str:
        """Why torch.export was used instead of torch.fx ('' for fx)."""
        return self.traced[0].why

    @property
    def prunable_channels(self) -> int:
        return sum(g.size for g in self.prunable_groups)

    def unit_keep_elements(self, comp_keep: np.ndarray) -> np.ndarray:
        """Per element: kept (True) or removed, given a keep flag per component."""
        return comp_keep[self.comp]

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


# ---------------------------------------------------------------------- driver
def _get_attr(b: Builder, node: fx.Node, name: str | None = None) -> Any:
    """Axes of a parameter or buffer read in the graph (``get_attr``, or an export placeholder)."""
    spec = out_spec(b, node)
    if not isinstance(spec, TensorSpec):
        return empty_like_spec(spec)
    name = name or node.target
    b.param_nodes[node] = name
    out = TInfo(spec.shape)
    if name not in b.aliases:
        return out
    owner = name.rpartition(".")[0]
    for d, s in enumerate(spec.shape):
        if s > 1:
            a = b.new_axis(node.name, (d,), (s,))
            b.member(name, d, a.elems(), role="param", module=owner)
            out.axes.append(a)
    return out


def _check(info: Any, spec: Any) -> bool:
    if isinstance(spec, TensorSpec):
        if info is None:
            return True
        if not isinstance(info, TInfo) or info.shape != spec.shape:
            return False
        return all(tuple(spec.shape[d] for d in a.dims) == a.sizes for a in info.axes)
    if isinstance(spec, (list, tuple)) and not isinstance(spec, torch.Size):
        if info is None:
            return True
        if not isinstance(info, (list, tuple)) or len(info) != len(spec):
            return False
        return all(_check(i, s) for i, s in zip(info, spec))
    return True


def _run_node(b: Builder, node: fx.Node, t: Traced) -> None:
    spec = b.values.get(node)
    if node.op == "placeholder":
        fqn = t.params.get(node.name)
        b.infos[node] = _get_attr(b, node, fqn) if fqn else empty_like_spec(spec)
        return
    if node.op == "get_attr":
        b.infos[node] = _get_attr(b, node)
        return
    if node.op == "output":
        b.freeze_info(b.infos.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None,
                      "model output")
        for n in _nodes_in(node.args[0]):
            b.freeze_info(b.infos.get(n), "model output")
        return
    if node.op == "call_function" and isinstance(node.target, type) and issubclass(
            node.target, tuple):  # a namedtuple of outputs: channels pass through unchanged
        b.infos[node] = tuple(b.infos.get(a) if isinstance(a, fx.Node) else None
                              for a in (*node.args, *node.kwargs.values()))
        return
    rule, module = rule_for(node, b.modules)
    if has_tensor(spec) and not (node.op == "call_method" and node.target in SIZE_AWARE) and \
            not (node.op == "call_function" and node.target in SIZE_AWARE_FNS):
        # a channel count flowing into an op that does not follow it (zeros(B, C), a reshape of
        # an opaque tensor...) would stay stale after pruning: freeze that channel
        freeze_size_deps(b, node, [a for a in node.all_input_nodes
                                   if not isinstance(b.values.get(a), TensorSpec)],
                         f"its size feeds {describe_target(node, b.modules)} at node '{node.name}'")
    if node.op == "call_module" and node.target in t.leaves:
        if module_rule_for(module) is None:
            freeze_inputs(b, node, f"module '{node.target}' could not be traced "
                                   f"({t.leaves[node.target]})")
            b.infos[node] = opaque(b, node, module)
            return
    if rule is None:
        if has_tensor(spec):
            op = describe_target(node, b.modules)
            reason = NO_RULE.format(op=op, node=node.name)
            freeze_inputs(b, node, reason)
            b.unsupported.setdefault(op, []).append(node.name)
        b.infos[node] = empty_like_spec(spec)
        return
    try:
        info = rule(b, node, module)
        if not _check(info, spec):
            raise GraphPruneError(f"rule produced {info!r} for value {spec!r}")
    except Exception as e:
        op = describe_target(node, b.modules)
        if STRICT:
            raise GraphPruneError(
                f"internal: the channel rule for {op} failed at node '{node.name}' "
                f"({node.format_node()}): {e}") from e
        reason = f"the channel rule for {op} failed at node '{node.name}': {e}"
        freeze_inputs(b, node, reason)
        b.unsupported.setdefault(op, []).append(node.name)
        info = empty_like_spec(spec)
    b.infos[node] = info


def _nodes_in(a: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(a, lambda n: found.append(n) or n)
    return found


def build_graph(model: nn.Module, traced: list[Traced]) -> ChannelGraph:
    """Run the channel rules over one or more traces of ``model`` and group the channels."""
    params, aliases = param_table(model)
    b = Builder(params, aliases)
    b.modules = dict(model.named_modules(remove_duplicate=False))
    for k, t in enumerate(traced):
        b.prefix = "" if k == 0 else f"{t.mode}:"
        b.values.update(t.values)
        for node in t.graph.nodes:
            _run_node(b, node, t)
    return ChannelGraph(model, traced, b)


def _unreached(model: nn.Module, traced: Traced) -> list[str]:
    """Modules with parameters that the trace never calls (nor any ancestor) nor reads."""
    used: set[str] = set()
    for node in traced.graph.nodes:
        if node.op == "call_module":
            used.add(node.target)
        elif node.op == "get_attr":
            used.add(node.target.rpartition(".")[0])
    out = []
    for name, m in model.named_modules():
        if m._parameters and any(p is not None for p in m._parameters.values()):
            parts = name.split(".")
            if not any(".".join(parts[:i]) in used for i in range(1, len(parts) + 1)):
                out.append(name)
    return out


TRACERS = ("auto", "fx", "export")


def _frozen_leaves(model: nn.Module, t: Traced) -> list[str]:
    """Opaque fx leaves with parameters and no module rule: their channels would be frozen."""
    mods = dict(model.named_modules())
    return [p for p in t.leaves if p in mods and module_rule_for(mods[p]) is None
            and any(True for _ in mods[p].parameters())]


def _export_graph(model: nn.Module, example_inputs: Any, why: str) -> ChannelGraph:
    from .probe import probe_export_graph

    g = build_graph(model, [export_trace(model, example_inputs, why=why)])
    probe_export_graph(g)
    return g


def trace(model: nn.Module, example_inputs: Any, *, tracer: str = "auto") -> ChannelGraph:
    """Trace ``model`` into its channel-dependency graph.

    ``example_inputs`` is a tensor, a tuple of positional inputs or a dict of keyword inputs
    (batch first). The model is traced in eval mode; if some of its parameterised modules run only
    in training mode (an auxiliary classifier), the training graph is traced too and both are
    honoured. The model itself is not modified.

    ``tracer``: ``"fx"`` (torch.fx symbolic tracing; module-level graph), ``"export"``
    (``torch.export``; ATen-level graph, follows shape-dependent Python control flow on the example
    inputs) or ``"auto"`` (fx, falling back to torch.export when fx cannot trace the model's own
    forward, or when modules fx could not trace would freeze channels that torch.export can see
    through). ``graph.tracer`` and ``graph.tracer_reason`` say which was used and why.

    Example:
        >>> g = graphprune.trace(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
        >>> len(g.prunable_groups)
    """
    if tracer not in TRACERS:
        from .errors import ConfigError

        raise ConfigError(f"tracer must be one of {', '.join(TRACERS)}. Got {tracer!r}.")
    if tracer == "export":
        return _export_graph(model, example_inputs, "requested")
    try:
        traced = [trace_model(model, example_inputs, mode="eval")]
    except TraceError as e:
        if tracer == "fx" or not isinstance(model, nn.Module):
            raise
        try:
            return _export_graph(model, example_inputs, f"torch.fx failed: {e}")
        except TraceError as e2:
            raise TraceError(f"{e}\n{e2}") from e
    if _unreached(model, traced[0]):
        try:
            t2 = trace_model(model, example_inputs, mode="train")
        except GraphPruneError:
            t2 = None
        if t2 is not None and len(_unreached(model, t2)) < len(_unreached(model, traced[0])):
            traced.append(t2)
    g = build_graph(model, traced)
    frozen = _frozen_leaves(model, traced[0]) if tracer == "auto" else []
    if frozen:
        try:
            why = (f"torch.fx could not trace {len(frozen)} module(s) with parameters "
                   f"({', '.join(frozen[:3])}{', ...' if len(frozen) > 3 else ''})")
            g2 = _export_graph(model, example_inputs, why)
        except GraphPruneError:
            return g
        if g2.prunable_channels > g.prunable_channels:
            return g2
    return g
