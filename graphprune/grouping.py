"""Stage 2 of the flow, the algorithm: run the channel rules over a captured graph and group the
channel elements they couple into units and groups (the ``ChannelGraph`` value).

The rules write into a private ``Builder`` (``rules/elements.py``): couplings, freezes, sources
and parameter members. Connected components of the coupling relation are *units*; units that
touch the same set of channel axes (and are frozen alike) form a *group*.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.fx as fx
from scipy.sparse.csgraph import connected_components
from torch import nn

from .errors import GraphPruneError
from .graph import ChannelGraph, ElementIndex, Group, GroupMember, param_table
from .rules import builtin  # noqa: F401  (registers the built-in rules)
from .rules.common import (
    NO_RULE, empty_like_spec, freeze_inputs, freeze_size_deps, has_tensor, out_spec,
)
from .rules.elements import Builder, TInfo
from .rules.nn_modules import opaque
from .rules.registry import describe_target, module_rule_for, rule_for
from .trace import TensorSpec, Traced
from ._np import unique

# ops whose size arguments the movement rules check themselves
SIZE_AWARE = {"view", "reshape", "expand", "unflatten", "repeat", "chunk", "split"}
SIZE_AWARE_FNS = {torch.reshape, torch.unflatten, torch.chunk, torch.split}

# node.meta keys set by graphprune.regions on the traces of a model captured in regions: a
# placeholder whose value is a node of an earlier trace (its channels continue across the
# boundary), and why an output value is frozen (None: it feeds another region, not frozen)
CHANNELS_FROM = "graphprune_channels_from"
OUTPUT_REASON = "graphprune_output_reason"


def _flat_members(b: Builder) -> tuple[dict[tuple[str, int], int], np.ndarray, np.ndarray,
                                        np.ndarray, np.ndarray]:
    """Every member in flat arrays: the (param, dim) keys in first-seen order, each member's
    offset into the arrays, and per entry its element, parameter index and key id."""
    keys: dict[tuple[str, int], int] = {}
    kid = [keys.setdefault((m.param, m.dim), len(keys)) for m in b.members]
    sizes = np.fromiter((m.elems.size for m in b.members), dtype=np.int64, count=len(b.members))
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    if not b.members:
        z = np.zeros(0, dtype=np.int64)
        return keys, offsets, z, z, z
    m_elems = np.concatenate([m.elems for m in b.members])
    m_index = np.concatenate([m.index for m in b.members])
    m_key = np.repeat(np.asarray(kid, dtype=np.int64), sizes)
    return keys, offsets, m_elems, m_index, m_key


def _tie_members(b: Builder, m_elems: np.ndarray, m_index: np.ndarray, m_key: np.ndarray) -> None:
    """Elements that remove the same index of the same parameter are one unit (weight tying,
    a module called twice, the same local index of every conv group)."""
    if not m_key.size:
        return
    span = int(m_index.max()) + 1
    if m_index.min() >= 0 and (int(m_key.max()) + 1) * span < 2**62:  # one int64 sort key
        order = np.argsort(m_key * span + m_index, kind="stable")
    else:
        order = np.lexsort((m_index, m_key))
    # by key, then index, then recording order
    k, i, e = m_key[order], m_index[order], m_elems[order]
    same = (k[1:] == k[:-1]) & (i[1:] == i[:-1])
    b.couple(e[:-1][same], e[1:][same])


def _group(b: Builder) -> tuple[list[Group], ElementIndex]:
    """Units (connected components) and groups of the element space ``b`` describes."""
    keys, offsets, m_elems, m_index, m_key = _flat_members(b)
    _tie_members(b, m_elems, m_index, m_key)
    n = b.n
    ea, eb = b.edges()
    adj = sp.coo_matrix((np.ones(ea.size, dtype=np.int8), (ea, eb)), shape=(n, n))
    ncomp, comp = connected_components(adj, directed=False)
    fe, fr = b.frozen()
    reason = np.full(ncomp, -1, dtype=np.int64)
    reason[comp[fe[::-1]]] = fr[::-1]  # the first reason recorded wins
    is_src = np.zeros(ncomp, dtype=bool)
    is_src[comp[b.sources()]] = True
    vc = np.full(ncomp, -1, dtype=np.int64)
    vc_reasons: list[str] = []
    for e, why in b.value_coupled:
        vc[comp[e]] = len(vc_reasons)
        vc_reasons.append(why)
    # signature of a unit = the set of axes it touches (+ whether it is frozen)
    bases = np.array([a.base for a in b.axes], dtype=np.int64)
    elem_axis = np.searchsorted(bases, np.arange(n), side="right") - 1
    keep = is_src[comp]
    pairs = unique(comp[keep].astype(np.int64) * len(b.axes) + elem_axis[keep])
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
    # members per group (group range of every member at once; -1: no group, or no entries)
    per_group: list[list[GroupMember]] = [[] for _ in range(order.size)]
    c_all = comp[m_elems]
    g_all, u_all = comp_group[c_all], comp_unit[c_all]
    gmin = np.full(len(b.members), -1, dtype=np.int64)
    gmax = gmin.copy()
    full = np.flatnonzero(offsets[1:] > offsets[:-1])
    if full.size:
        gmin[full] = np.minimum.reduceat(g_all, offsets[full])
        gmax[full] = np.maximum.reduceat(g_all, offsets[full])
    lo, hi, ends = gmin.tolist(), gmax.tolist(), offsets.tolist()
    for j, m in enumerate(b.members):
        if hi[j] < 0:
            continue
        a0, a1 = ends[j], ends[j + 1]
        if lo[j] == hi[j]:  # the usual case: the whole member is in one group
            per_group[hi[j]].append(GroupMember(m.param, m.dim, m.role, m.module,
                                                u_all[a0:a1], m.index, m.pos))
            continue
        c, g = c_all[a0:a1], g_all[a0:a1]
        for gg in unique(g[g >= 0]):
            s = g == gg
            per_group[gg].append(GroupMember(m.param, m.dim, m.role, m.module,
                                             comp_unit[c[s]], m.index[s], m.pos[s]))
    # all members flattened (``_flat_members``), for applying plans in one vectorised pass
    index = ElementIndex(comp, int(ncomp), comp_group, comp_unit, list(keys), m_elems, m_index,
                         m_key)
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
            value_coupled=vc_reasons[v.max()] if (v >= 0).any() else None,
        ))
    return groups, index


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


def _run_node(b: Builder, node: fx.Node, t: Traced, strict: bool) -> None:
    spec = b.values.get(node)
    if node.op == "placeholder":
        src = node.meta.get(CHANNELS_FROM)
        if src is not None:  # a region's input is a value of an earlier trace: same channels
            b.infos[node] = b.infos.get(src)
            return
        fqn = t.params.get(node.name)
        b.infos[node] = _get_attr(b, node, fqn) if fqn else empty_like_spec(spec)
        return
    if node.op == "get_attr":
        b.infos[node] = _get_attr(b, node)
        return
    if node.op == "output":
        for n in _nodes_in(node.args[0]):
            why = n.meta.get(OUTPUT_REASON, "model output")
            if why:  # None: a region output whose channels continue in another region
                b.freeze_info(b.infos.get(n), why)
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
        if strict:
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


def build_graph(model: nn.Module, traced: list[Traced], *, strict: bool = False,
                gqa: str = "group") -> ChannelGraph:
    """Run the channel rules over one or more traces of ``model`` and group the channels.

    With ``strict`` a rule that crashes raises (a graphprune bug to report); otherwise the
    channels the failing node touches are frozen and the reason is recorded. ``gqa``: see
    ``graphprune.trace``.
    """
    params, aliases = param_table(model)
    b = Builder(params, aliases, gqa)
    b.modules = dict(model.named_modules(remove_duplicate=False))
    for k, t in enumerate(traced):
        b.prefix = "" if k == 0 else f"{t.mode}:"
        b.exported = t.tracer == "torch.export"
        b.values.update(t.values)
        for node in t.graph.nodes:
            _run_node(b, node, t, strict)
    groups, index = _group(b)
    return ChannelGraph(model, traced, groups, params=b.params, aliases=b.aliases,
                        modules=b.modules, index=index, infos=b.infos, attr_sizes=b.attr_sizes,
                        members=b.members, unsupported=b.unsupported)
