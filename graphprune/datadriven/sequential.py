"""Data-driven pruning with reconstruction, group by group (He et al., ICCV 2017, sec. 3.3).

Groups are processed in the order of their producers. For each group, the inputs of its
consumers are sampled from a working copy of the model in which every earlier group is already
pruned (its channels zeroed, its consumers refitted), while the targets are the ORIGINAL model's
outputs, so errors do not accumulate. The group's channels are chosen (LASSO / greedy from the
sampled contributions, or any score criterion); then every consumer that reads no later group
(all inputs of a layer after a concat are decided) is refitted by least squares, once. The
result is a plan plus the refitted full-size tensors; ``apply_plan`` slices them.

Cost: one pass of the original model over the calibration data samples every consumer's target;
the working copy is then replayed from a cached frontier (``frontier``): values before a group's
first touched node cannot change when the group is pruned, so each group only re-runs the span
from there to its last consumer. Models whose graph cannot be replayed (torch.export graphs)
re-run the working copy from the inputs for every group (``block_cache=False`` forces this).
Everything runs on the device of the model's parameters (or ``device``); solves in float64.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..calibration import Calibration
from ..cost import layer_of
from ..criteria import Criterion, ScoreContext, get_criterion, score_group
from ..graph import ChannelGraph, Group
from ..plan import GroupPlan, Plan
from .collect import Samples, batch_inputs, sample_layers, supported
from .frontier import FrontierRunner
from .reconstruct import refit
from .select import GroupStats, consumer_stats

MEMORY_BUDGET = 256 << 20  # bytes of sampled activations held at once (documented default)
ROWS_MAX = 2048  # samples per layer (positions x images)
REFERENCE_BYTES = 64 << 20  # the original model's outputs are kept for the fidelity up to this


@dataclass
class DataDrivenResult:
    plan: Plan
    weights: dict[str, torch.Tensor]  # canonical name -> full-size refitted tensor
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-group figures
    timings: dict[str, float] = field(default_factory=dict)
    # the original model's output on each calibration batch (None if larger than REFERENCE_BYTES)
    reference: list[Any] | None = None


def _consumers(group: Group, mods: dict[str, nn.Module]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Module path -> (unit of each entry, input channel of each entry) for the group's consumers
    whose inputs can be sampled and refitted."""
    out: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for m in group.members:
        if m.role != "in" or not m.param.endswith(".weight"):
            continue
        mod = mods.get(m.module)
        if mod is None or not supported(mod) or m.param != f"{m.module}.weight":
            continue
        u, p = out.setdefault(m.module, ([], []))
        u.append(m.unit)
        p.append(m.pos)
    return {k: (np.concatenate(u), np.concatenate(p)) for k, (u, p) in out.items()}


def _layer_calls(graph: ChannelGraph) -> list[tuple[int, str]]:
    """(graph position, module path) of every layer call, for fx and torch.export graphs."""
    t = graph.traced[0]
    out = []
    for i, n in enumerate(t.graph.nodes):
        if n.op == "call_module" or n.op == "call_function":
            path = layer_of(n, t.params)
            if path is not None:
                out.append((i, path))
    return out


def _node_order(graph: ChannelGraph) -> dict[str, int]:
    order: dict[str, int] = {}
    for i, path in _layer_calls(graph):
        order.setdefault(path, i)
    return order


def _call_counts(graph: ChannelGraph) -> dict[str, int]:
    c: dict[str, int] = {}
    for _, path in _layer_calls(graph):
        c[path] = c.get(path, 0) + 1
    return c


def _intercept_kind(graph: ChannelGraph, path: str, mods: dict[str, nn.Module]) -> str | None:
    """Where a refit intercept can go: the layer's bias, or a BatchNorm that alone reads it."""
    m = mods[path]
    if m.bias is not None:
        return "bias"
    nodes = [n for n in graph.traced[0].graph.nodes if n.op == "call_module" and n.target == path]
    if len(nodes) == 1 and len(nodes[0].users) == 1:
        (user,) = nodes[0].users
        if user.op == "call_module" and isinstance(mods.get(user.target),
                                                   nn.modules.batchnorm._BatchNorm):
            bn = mods[user.target]
            if bn.track_running_stats and bn.running_mean is not None:
                return "bn:" + user.target
    return None


def _mask_group(work_params: dict[str, torch.Tensor], group: Group, removed: np.ndarray,
                zeroed: dict[str, list[tuple[int, torch.Tensor]]]) -> None:
    """Zero every parameter slice of the removed units in the working copy (and remember them in
    ``zeroed``: a later refit of the same tensor must not bring them back)."""
    gone = np.zeros(group.size, dtype=bool)
    gone[removed] = True
    with torch.no_grad():
        for m in group.members:
            sel = gone[m.unit]
            if sel.any():
                t = work_params[m.param]
                idx = torch.as_tensor(np.unique(m.index[sel]), dtype=torch.long, device=t.device)
                t.index_fill_(m.dim, idx, 0)
                zeroed.setdefault(m.param, []).append((m.dim, idx))


def _touched(graph: ChannelGraph, g: Group, cons: dict[str, Any],
             mods: dict[str, nn.Module]) -> set[str]:
    """Canonical names of the tensors whose change by processing ``g`` can change a value in a
    kept channel: its consumers' weights (inputs zeroed, or refitted), their biases and intercept
    BatchNorms. Zeroing the removed channels' own slices (producers' rows, their norms) only
    changes the removed channels, which every consumer ignores from then on; for a value-coupled
    group it changes the others too, so every member counts."""
    out = {m.param for m in g.members if m.role == "in" or g.value_coupled}
    for p in cons:
        out.update(graph.aliases.get(f"{p}.{k}", f"{p}.{k}") for k in ("weight", "bias"))
        kind = _intercept_kind(graph, p, mods)
        if kind is not None and kind.startswith("bn:"):
            out.add(graph.aliases.get(f"{kind[3:]}.running_mean", f"{kind[3:]}.running_mean"))
    return out


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model without any."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class _Collector:
    """Samples consumers on the working copy: from the cached frontier when the graph can be
    replayed, else by running the working copy from the inputs."""

    def __init__(self, graph: ChannelGraph, work: nn.Module, calib: Calibration,
                 device: torch.device, rows: int, block_cache: bool):
        self.work, self.calib, self.device, self.rows = work, calib, device, rows
        self.runner = FrontierRunner.build(graph, work, calib, device) if block_cache else None

    def targets(self, paths: list[str], start: int, inputs: bool
                ) -> tuple[dict[str, Samples], list[Any]]:
        """Outputs (and with ``inputs`` also inputs) of the untouched working copy, and the
        model's output for every batch."""
        if self.runner is not None:
            try:
                got = self.runner.collect(paths, start, self.rows, inputs=inputs, outputs=True,
                                          to_end=True)
                return got, self.runner.outputs
            except Exception:  # the graph does not replay on these batches: run the model
                self.runner = None
        outs: list[Any] = []
        got = sample_layers(self.work, self.calib, paths, rows=self.rows, want_inputs=inputs,
                            want_outputs=True, stop_early=False, device=self.device,
                            model_outputs=outs)
        return got, outs

    def inputs(self, paths: list[str], start: int) -> dict[str, Samples]:
        if self.runner is not None:
            return self.runner.collect(paths, start, self.rows)
        return sample_layers(self.work, self.calib, paths, rows=self.rows, want_inputs=True,
                             want_outputs=False, device=self.device)

    def start(self, touched: set[str]) -> int:
        return self.runner.first_read(touched) if self.runner is not None else 0


def run(graph: ChannelGraph, calib: Calibration, crit: Criterion, amounts: dict[str, int], *,
        reconstruct: bool = True, sequential: bool = True, fallback: str = "l1", seed: int = 0,
        meta: dict[str, Any] | None = None, progress: Callable[[str, int, int], None] | None = None,
        fixed: Plan | None = None, device: torch.device | str | None = None,
        block_cache: bool = True) -> DataDrivenResult:
    """Choose the channels of every group in ``amounts`` (group -> channels kept) and refit the
    consumers; with ``fixed``, the channels are the plan's and only the refit happens. The work
    happens on ``device`` (default: where the model's parameters are); the refitted tensors come
    back on the model's device. See the module docstring."""
    t0 = time.perf_counter()
    model = graph.model
    home = model_device(model)
    device = home if device is None else torch.device(device)
    work = copy.deepcopy(model).to(device).eval()
    mods = dict(work.named_modules(remove_duplicate=False))
    wparams = {n: t for n, t in list(work.named_parameters(remove_duplicate=False))
               + list(work.named_buffers(remove_duplicate=False))}
    wparams = {graph.aliases[n]: t for n, t in wparams.items() if n in graph.aliases}
    order = _node_order(graph)
    calls = _call_counts(graph)
    todo = [g for g in graph.groups if g.prunable and amounts.get(g.name, g.size) < g.size]
    cons = {g.name: {p: v for p, v in _consumers(g, mods).items() if calls.get(p, 0) == 1}
            for g in todo}
    all_paths = sorted({p for c in cons.values() for p in c}, key=lambda p: order.get(p, 0))
    rows = _rows(mods, all_paths)
    # one solve per consumer: after the last group it reads from (a concat reads several)
    last_of = {p: g.name for g in todo if not g.value_coupled for p in cons[g.name]}
    col = _Collector(graph, work, calib, device, rows, block_cache)
    touched = {g.name: _touched(graph, g, cons[g.name], mods) for g in todo}
    first = min((col.start(touched[g.name]) for g in todo if cons[g.name]), default=0)
    targets, outputs = col.targets(all_paths, first, not sequential) if all_paths else ({}, [])
    t1 = time.perf_counter()
    alive = {p: torch.ones(mods[p].weight.shape[1] * (1 if isinstance(mods[p], nn.Linear)
                                                      else mods[p].groups), dtype=torch.bool,
                           device=device)
             for p in all_paths}
    ctx = ScoreContext(params=graph.params, rng=np.random.default_rng(seed), calibration=calib,
                       graph=graph)
    fb = get_criterion(fallback)
    plan_groups: dict[str, GroupPlan] = {}
    refitted: set[str] = set()
    zeroed: dict[str, list[tuple[int, torch.Tensor]]] = {}
    report: dict[str, dict[str, Any]] = {}
    t_sel = t_fit = t_col = 0.0
    for i, g in enumerate(todo):
        if progress is not None:
            progress(g.name, i, len(todo))
        k = amounts[g.name]
        c = cons[g.name]
        info: dict[str, Any] = {"consumers": len(c)}
        samples: dict[str, Samples] = {}
        ta = time.perf_counter()
        select = crit.kind == "select" and fixed is None
        if c and (select or reconstruct):
            samples = (col.inputs(list(c), col.start(touched[g.name])) if sequential else
                       {p: targets[p] for p in c})
        tb = time.perf_counter()
        if fixed is not None:
            keep = np.asarray(fixed.groups[g.name].keep)
            info["method"] = "plan"
        elif select and c and not g.value_coupled:
            stats = _stats(g, c, samples, targets, mods, alive)
            keep, _ = crit.fn(g, stats, k)
            info["method"] = crit.name
        else:
            use = crit if crit.kind == "score" else fb
            if crit.kind == "select":
                info["note"] = ("no consumer to sample (" + ("value-coupled group" if g.value_coupled
                                                            else "no Conv/Linear consumer")
                                + f"): chose by {fb.name}")
            s = score_group(use, g, ctx)
            keep = np.sort(np.lexsort((np.arange(g.size), -s))[:k])
            info["method"] = use.name
        tc = time.perf_counter()
        keep = np.asarray(keep, dtype=np.int64)
        plan_groups[g.name] = GroupPlan(g.size, tuple(int(x) for x in keep))
        removed = np.setdiff1d(np.arange(g.size), keep)
        _mask_group(wparams, g, removed, zeroed)
        gone_units = np.zeros(g.size, dtype=bool)
        gone_units[removed] = True
        for p, (units, chans) in c.items():
            alive[p][torch.as_tensor(chans[gone_units[units]], dtype=torch.long, device=device)] = False
        if reconstruct and not g.value_coupled:
            info["consumers_refit"] = [_refit_one(graph, p, mods, samples[p], targets[p].Y,
                                                  alive[p], wparams, zeroed, refitted)
                                       for p in c if last_of[p] == g.name]
        td = time.perf_counter()
        t_col, t_sel, t_fit = t_col + tb - ta, t_sel + tc - tb, t_fit + td - tc
        report[g.name] = info
    weights = {n: wparams[n].detach().to(graph.params[n].device).clone() for n in refitted}
    plan = Plan(groups=plan_groups, meta=dict(meta or {}))
    timings = {"targets": t1 - t0, "collect": t_col, "select": t_sel, "refit": t_fit}
    small = sum(t.numel() * t.element_size() for y in outputs for t in _flat(y)) <= REFERENCE_BYTES
    return DataDrivenResult(plan, weights, report, timings, outputs if outputs and small else None)


def _flat(y: Any) -> list[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, (list, tuple)):
        return [t for v in y for t in _flat(v)]
    if isinstance(y, dict):
        return [t for v in y.values() for t in _flat(v)]
    return []


def _refit_one(graph: ChannelGraph, p: str, mods: dict[str, nn.Module], samples: Samples,
               target: torch.Tensor, alive: torch.Tensor, wparams: dict[str, torch.Tensor],
               zeroed: dict[str, list[tuple[int, torch.Tensor]]], refitted: set[str]
               ) -> dict[str, Any]:
    """Refit the consumer at ``p`` in the working copy; returns its report entry."""
    m = mods[p]
    kind = _intercept_kind(graph, p, mods)
    r = refit(m, samples, target, alive, None if kind is None else ("bias" if kind == "bias"
                                                                     else "bn"))
    names = [graph.aliases[f"{p}.weight"]]
    with torch.no_grad():
        m.weight.copy_(r.weight)
        if r.bias is not None:
            m.bias.copy_(r.bias)
            names.append(graph.aliases[f"{p}.bias"])
        if r.shift is not None:
            mods[kind[3:]].running_mean.sub_(r.shift)
            names.append(graph.aliases[f"{kind[3:]}.running_mean"])
        for n in names:  # slices removed with earlier groups stay removed
            for dim, idx in zeroed.get(n, ()):
                wparams[n].index_fill_(dim, idx, 0)
    refitted.update(names)
    return {"layer": p, "rel_err_removed": r.err_before, "rel_err_refit": r.err_after,
            "cos_refit": r.cos_after, **({"note": r.note} if r.note else {})}


def _rows(mods: dict[str, nn.Module], paths: list[str]) -> int:
    # the targets of every consumer are held together, the inputs of one group at a time
    return rows_for_targets(mods, paths, MEMORY_BUDGET // 2) if paths else ROWS_MAX


def rows_for_targets(mods: dict[str, nn.Module], paths: list[str], budget: int) -> int:
    per_row = 0
    for p in paths:
        m = mods[p]
        per_row += m.out_features if isinstance(m, nn.Linear) else m.out_channels
    return int(max(128, min(ROWS_MAX, budget // max(1, 4 * per_row))))


def _stats(g: Group, cons: dict[str, tuple[np.ndarray, np.ndarray]], samples: dict[str, Samples],
           targets: dict[str, Samples], mods: dict[str, nn.Module],
           alive: dict[str, torch.Tensor]) -> GroupStats:
    G = np.zeros((g.size, g.size))
    xy = np.zeros(g.size)
    rows = 0
    for p, (units, chans) in cons.items():
        Gj, xyj, r = consumer_stats(mods[p], samples[p], targets[p].Y, units, chans, g.size,
                                    alive[p], p)
        G += Gj
        xy += xyj
        rows += r
    return GroupStats(G, xy, rows)


def output_fidelity(a: nn.Module, b: nn.Module, calib: Calibration,
                    reference: list[Any] | None = None) -> dict[str, float]:
    """Relative error and cosine of ``b``'s outputs vs ``a``'s on the calibration batches
    (``reference``: ``a``'s outputs per batch, if already known; each model runs on its own
    device)."""
    num = den = dot = na = nb = 0.0
    da, db = model_device(a), model_device(b)

    def first(y: Any) -> torch.Tensor:
        return y[0] if isinstance(y, (tuple, list)) else y

    with torch.no_grad():
        for i, (xs, _) in enumerate(calib):
            ya = reference[i] if reference is not None else a(*batch_inputs(xs, da))
            yb = b(*batch_inputs(xs, db))
            ya, yb = first(ya).double().flatten().cpu(), first(yb).double().flatten().cpu()
            num += float(((ya - yb) ** 2).sum())
            den += float((ya * ya).sum())
            dot += float((ya * yb).sum())
            na += float((ya * ya).sum())
            nb += float((yb * yb).sum())
    return {"rel_err": (num / den) ** 0.5 if den else 0.0,
            "cosine": dot / ((na * nb) ** 0.5) if na and nb else 1.0}


__all__ = ["DataDrivenResult", "model_device", "output_fidelity", "run"]
