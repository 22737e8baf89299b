"""Data-driven pruning with reconstruction, group by group (He et al., ICCV 2017, sec. 3.3).

Groups are processed in the order of their producers. For each group, the inputs of its
consumers are sampled from a working copy of the model in which every earlier group is already
pruned (its channels zeroed, its consumers refitted), while the targets are the ORIGINAL model's
outputs, so errors do not accumulate. The group's channels are chosen (LASSO / greedy from the
sampled contributions, or any score criterion), then every consumer is refitted by least squares.
The result is a plan plus the refitted full-size tensors; ``apply_plan`` slices them.
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

from .reconstruct import refit
from ..calibration import Calibration
from .collect import Samples, sample_layers, supported
from ..cost import layer_of
from ..criteria import Criterion, ScoreContext, get_criterion, score_group
from .select import GroupStats, consumer_stats
from ..graph import ChannelGraph, Group
from ..plan import GroupPlan, Plan

MEMORY_BUDGET = 256 << 20  # bytes of sampled activations held at once (documented default)
ROWS_MAX = 2048  # samples per layer (positions x images)


@dataclass
class DataDrivenResult:
    plan: Plan
    weights: dict[str, torch.Tensor]  # canonical name -> full-size refitted tensor
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-group figures
    timings: dict[str, float] = field(default_factory=dict)


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


def _mask_group(work_params: dict[str, torch.Tensor], group: Group, removed: np.ndarray) -> None:
    """Zero every parameter slice of the removed units in the working copy."""
    gone = np.zeros(group.size, dtype=bool)
    gone[removed] = True
    with torch.no_grad():
        for m in group.members:
            sel = gone[m.unit]
            if sel.any():
                t = work_params[m.param]
                idx = torch.as_tensor(np.unique(m.index[sel]), dtype=torch.long)
                t.index_fill_(m.dim, idx, 0)


def run(graph: ChannelGraph, calib: Calibration, crit: Criterion, amounts: dict[str, int], *,
        reconstruct: bool = True, sequential: bool = True, fallback: str = "l1", seed: int = 0,
        meta: dict[str, Any] | None = None, progress: Callable[[str, int, int], None] | None = None,
        fixed: Plan | None = None) -> DataDrivenResult:
    """Choose the channels of every group in ``amounts`` (group -> channels kept) and refit the
    consumers; with ``fixed``, the channels are the plan's and only the refit happens. See the
    module docstring."""
    t0 = time.perf_counter()
    model = graph.model
    work = copy.deepcopy(model).eval()
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
    targets = sample_layers(model, calib, all_paths, rows=rows, want_inputs=False,
                            want_outputs=True, stop_early=True) if all_paths else {}
    inputs0 = None
    if not sequential and all_paths:
        inputs0 = sample_layers(model, calib, all_paths, rows=rows, want_inputs=True,
                                want_outputs=False)
    t1 = time.perf_counter()
    alive = {p: torch.ones(mods[p].weight.shape[1] * (1 if isinstance(mods[p], nn.Linear)
                                                      else mods[p].groups), dtype=torch.bool)
             for p in all_paths}
    ctx = ScoreContext(params=graph.params, rng=np.random.default_rng(seed), calibration=calib,
                       graph=graph)
    fb = get_criterion(fallback)
    plan_groups: dict[str, GroupPlan] = {}
    touched: set[str] = set()
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
            samples = (sample_layers(work, calib, list(c), rows=rows, want_inputs=True,
                                     want_outputs=False) if sequential else
                       {p: inputs0[p] for p in c})
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
        _mask_group(wparams, g, removed)
        gone_units = np.zeros(g.size, dtype=bool)
        gone_units[removed] = True
        for p, (units, chans) in c.items():
            alive[p][torch.as_tensor(chans[gone_units[units]], dtype=torch.long)] = False
        if reconstruct and not g.value_coupled:
            errs = []
            for p in c:
                m = mods[p]
                kind = _intercept_kind(graph, p, mods)
                r = refit(m, samples[p], targets[p].Y, alive[p],
                          None if kind is None else ("bias" if kind == "bias" else "bn"))
                with torch.no_grad():
                    m.weight.copy_(r.weight)
                    if r.bias is not None:
                        m.bias.copy_(r.bias)
                    if r.shift is not None:
                        bn = mods[kind[3:]]
                        bn.running_mean.sub_(r.shift)
                        touched.add(graph.aliases[f"{kind[3:]}.running_mean"])
                touched.add(graph.aliases[f"{p}.weight"])
                if m.bias is not None:
                    touched.add(graph.aliases[f"{p}.bias"])
                errs.append({"layer": p, "rel_err_removed": r.err_before,
                             "rel_err_refit": r.err_after, "cos_refit": r.cos_after,
                             **({"note": r.note} if r.note else {})})
            info["consumers_refit"] = errs
        td = time.perf_counter()
        t_col, t_sel, t_fit = t_col + tb - ta, t_sel + tc - tb, t_fit + td - tc
        report[g.name] = info
    weights = {n: wparams[n].detach().clone() for n in touched}
    plan = Plan(groups=plan_groups, meta=dict(meta or {}))
    timings = {"targets": t1 - t0, "collect": t_col, "select": t_sel, "refit": t_fit}
    return DataDrivenResult(plan, weights, report, timings)


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


def output_fidelity(a: nn.Module, b: nn.Module, calib: Calibration) -> dict[str, float]:
    """Relative error and cosine of ``b``'s outputs vs ``a``'s on the calibration batches."""
    num = den = dot = na = nb = 0.0
    with torch.no_grad():
        for xs, _ in calib:
            ya, yb = a(*xs), b(*xs)
            ya = ya[0] if isinstance(ya, (tuple, list)) else ya
            yb = yb[0] if isinstance(yb, (tuple, list)) else yb
            ya, yb = ya.double().flatten(), yb.double().flatten()
            num += float(((ya - yb) ** 2).sum())
            den += float((ya * ya).sum())
            dot += float((ya * yb).sum())
            na += float((ya * ya).sum())
            nb += float((yb * yb).sum())
    return {"rel_err": (num / den) ** 0.5 if den else 0.0,
            "cosine": dot / ((na * nb) ** 0.5) if na and nb else 1.0}


__all__ = ["DataDrivenResult", "output_fidelity", "run"]
