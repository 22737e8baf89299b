"""What happened, in numbers: per-group channels, per-layer params/MACs, totals, timings."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torch import nn

from .cost import count_bytes, count_params, layer_of, node_macs, spec_shapes
from .graph import ChannelGraph, Group


@dataclass
class GroupReport:
    name: str
    channels_before: int
    channels_after: int
    prunable: bool
    reason: str | None
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    members: int


@dataclass
class LayerReport:
    module: str
    type: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int


@dataclass
class Report:
    """Before/after figures of a pruning run (``str(report)`` prints the table).

    Example:
        >>> r.report.params, r.report.macs      # (before, after)
        >>> print(r.report)                       # groups, layers, fidelity, frozen ops
    """

    params: tuple[int, int]
    macs: tuple[int, int]
    bytes: tuple[int, int]
    groups: list[GroupReport]
    layers: list[LayerReport]
    tracer: str = "torch.fx"
    tracer_reason: str = ""  # why torch.export was used instead of torch.fx
    leaves: dict[str, str] = field(default_factory=dict)
    unsupported: dict[str, list[str]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)

    def ratio(self, what: str = "macs") -> float:
        before, after = getattr(self, what)
        return after / before if before else 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self, max_groups: int = 40) -> str:
        rows = [("", "before", "after", "ratio")]
        for k in ("params", "macs", "bytes"):
            b, a = getattr(self, k)
            rows.append((k, f"{b:,}", f"{a:,}", f"{a / b:.3f}" if b else "-"))
        out = [_fmt(rows)]
        g = [("group", "channels", "kept", "params", "MACs", "note")]
        for r in self.groups[:max_groups]:
            note = "" if r.prunable else (r.reason or "")
            g.append((r.name, str(r.channels_before), str(r.channels_after),
                      f"{r.params_before:,} -> {r.params_after:,}",
                      f"{_h(r.macs_before)} -> {_h(r.macs_after)}", note[:60]))
        if len(self.groups) > max_groups:
            g.append((f"... {len(self.groups) - max_groups} more groups", "", "", "", "", ""))
        out.append(_fmt(g))
        s = self.settings or {}
        if s.get("latency_predicted") is not None:
            line = (f"onnxruntime latency vs dense ({s.get('latency_clock')} clock): predicted "
                    f"{s['latency_predicted']:.3f}")
            if s.get("latency_measured") is not None:
                line += f", measured {s['latency_measured']:.3f}"
            if s.get("target_latency") is not None:
                line += f" (target {s['target_latency']:.3f})"
            out.append(line)
            if s.get("latency_warning"):
                out.append(f"warning: {s['latency_warning']}")
        tot = self.fidelity.get("total") if self.fidelity else None
        if tot:
            out.append(f"output vs original on the calibration data: relative error "
                       f"{tot['rel_err']:.4f}, cosine {tot['cosine']:.5f}")
        if self.unsupported:
            out.append("ops without a channel rule (their channels were frozen): " + ", ".join(
                f"{k} x{len(v)}" for k, v in self.unsupported.items()))
        if self.leaves:
            out.append("opaque modules (could not be traced): " + ", ".join(self.leaves))
        if self.tracer_reason:
            out.append(f"traced with {self.tracer}: {self.tracer_reason[:300]}")
        return "\n\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _h(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [c.ljust(w) if i == 0 or i == len(r) - 1 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------- cost per layer / group
def layer_costs(graph: ChannelGraph, model: nn.Module, shapes: dict[tuple[int, str], Any] | None
                ) -> dict[str, tuple[str, int, int]]:
    """module path -> (type, params, MACs) for the given model and value shapes (None = traced)."""
    t = graph.traced[0]
    sh = spec_shapes(t.values) if shapes is None else {n: s for (k, n), s in shapes.items() if k == 0}
    mods = dict(model.named_modules())
    macs: dict[str, int] = defaultdict(int)
    for node in t.graph.nodes:
        m = node_macs(node, mods, sh, {})
        if m:
            macs[layer_of(node, t.params) or node.name] += m
    out = {}
    for name, m in mods.items():
        p = sum(x.numel() for x in m.parameters(recurse=False))
        if p or name in macs:
            out[name] = (type(m).__name__, p, macs.get(name, 0))
    for k, v in macs.items():
        if k not in out:
            out[k] = ("op", 0, v)
    return out


def _group_cost(g: Group, params: dict[str, Any], costs: dict[str, tuple[str, int, int]],
                new_shapes: dict[str, tuple[int, ...]] | None, kept: np.ndarray | None) -> tuple[int, int]:
    """(parameters in the slices this group touches, MACs of the layers it touches).

    A parameter sliced along several dims by the same group (a residual stream's in- and out-
    channels of one layer) counts each element once."""
    untouched: dict[str, float] = {}
    numel: dict[str, int] = {}
    for m in g.members:
        shape = params[m.param].shape if new_shapes is None else new_shapes[m.param]
        n = int(np.prod(shape)) if len(shape) else 1
        size = max(shape[m.dim], 1) if len(shape) else 1
        n_idx = m.n_index if kept is None else m.distinct_kept(kept)
        numel[m.param] = n
        untouched[m.param] = untouched.get(m.param, 1.0) * max(0.0, 1 - n_idx / size)
    p = int(round(sum(numel[k] * (1 - u) for k, u in untouched.items())))
    macs = sum(costs.get(mod, ("", 0, 0))[2] for mod in {m.module for m in g.members
                                                         if m.role in ("out", "in")})
    return p, macs


def build_report(graph: ChannelGraph, new_model: nn.Module, plan: Any,
                 shapes: dict[tuple[int, str], Any], timings: dict[str, float],
                 settings: dict[str, Any]) -> Report:
    before = layer_costs(graph, graph.model, None)
    after = layer_costs(graph, new_model, shapes)
    new_params = dict(new_model.named_parameters(remove_duplicate=False))
    new_params.update(dict(new_model.named_buffers(remove_duplicate=False)))
    new_shapes = {c: tuple(new_params[a].shape) for a, c in graph.aliases.items() if a in new_params}
    groups = []
    for g in graph.groups:
        gp = plan.groups.get(g.name)
        kept = np.ones(g.size, dtype=bool)
        if gp is not None:
            kept[:] = False
            kept[list(gp.keep)] = True
        pb, mb = _group_cost(g, graph.params, before, None, None)
        pa, ma = _group_cost(g, graph.params, after, new_shapes, kept)
        groups.append(GroupReport(g.name, g.size, int(kept.sum()), g.prunable, g.reason,
                                  pb, pa, mb, ma, len(g.members)))
    layers = []
    for name, (typ, p, m) in before.items():
        _, p2, m2 = after.get(name, (typ, 0, 0))
        layers.append(LayerReport(name, typ, p, p2, m, m2))
    return Report(
        params=(count_params(graph.model), count_params(new_model)),
        macs=(sum(v[2] for v in before.values()), sum(v[2] for v in after.values())),
        bytes=(count_bytes(graph.model), count_bytes(new_model)),
        groups=groups, layers=layers, tracer=graph.tracer,
        tracer_reason=graph.tracer_reason, leaves=graph.leaves,
        unsupported=dict(graph.unsupported), timings=timings, settings=settings)


def graph_table(graph: ChannelGraph, max_rows: int = 60) -> str:
    """Text table of a graph's groups (what ``ChannelGraph.summary()`` prints)."""
    costs = layer_costs(graph, graph.model, None)
    total_p = max(1, count_params(graph.model))
    total_m = max(1, sum(v[2] for v in costs.values()))
    rows = [("group", "channels", "members", "prunable", "params %", "MACs %", "reason")]
    for g in graph.groups[:max_rows]:
        p, m = _group_cost(g, graph.params, costs, None, None)
        rows.append((g.name, str(g.size), str(len(g.members)), "yes" if g.prunable else "no",
                     f"{100 * p / total_p:.1f}", f"{100 * m / total_m:.1f}",
                     (g.reason or g.value_coupled or "")[:70]))
    if len(graph.groups) > max_rows:
        rows.append((f"... {len(graph.groups) - max_rows} more", "", "", "", "", "", ""))
    head = (f"{type(graph.model).__name__}: {len(graph.groups)} groups, "
            f"{len(graph.prunable_groups)} prunable, traced with {graph.tracer}")
    extra = []
    if graph.unsupported:
        extra.append("ops without a channel rule (channels frozen): " + ", ".join(
            f"{k} x{len(v)}" for k, v in graph.unsupported.items()))
    if graph.leaves:
        extra.append("opaque modules: " + ", ".join(f"{k} ({v})" for k, v in graph.leaves.items()))
    if graph.tracer_reason:
        extra.append(f"why {graph.tracer}: {graph.tracer_reason[:300]}")
    return "\n".join([head, _fmt(rows), *extra])
