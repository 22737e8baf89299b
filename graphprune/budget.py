"""How many channels each group keeps: uniform sparsity, NNI-style config lists, global ranking
across groups, or a target in MACs / parameters.

Global ranking pools the units of every prunable group, each score divided by the mean score of
its group (so groups of different scales compare), and removes the lowest first, never more than
``max_group_sparsity`` of a group. A MACs or parameter target is met by bisection on the (uniform
or global) sparsity, counting the cost of each candidate exactly from the shapes it implies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ._validate import check_fraction
from .apply.shrink import expected_shapes, kept_indices
from .cost import node_macs
from .errors import ConfigError
from .graph import ChannelGraph
from .plan import GroupPlan, Plan, comp_keep_for, group_sparsities, keep_count
from .sparsity import n_kept, n_pruned


def uniform_amounts(graph: ChannelGraph, sparsity: float, config: Sequence[Any] | None,
                    ignore: Sequence[Any], round_to: int) -> dict[str, int]:
    """Channels kept per prunable group at ``sparsity`` (config entries override)."""
    targets = group_sparsities(graph, sparsity, config, ignore)
    return {g.name: keep_count(g.size, targets[g.name][0], round_to)
            for g in graph.prunable_groups if g.name in targets}


def global_amounts(graph: ChannelGraph, scores: Mapping[str, np.ndarray], sparsity: float,
                   allowed: Mapping[str, bool], round_to: int,
                   max_group_sparsity: float) -> dict[str, int]:
    """Remove ``sparsity`` of all prunable units, lowest normalised score first."""
    names, vals, owner = [], [], []
    for g in graph.prunable_groups:
        if not allowed.get(g.name, False):
            continue
        s = np.asarray(scores[g.name], dtype=np.float64)
        names.append(g.name)
        vals.append(s / (np.abs(s).mean() + 1e-30))
        owner.append(np.full(g.size, len(names) - 1))
    if not names:
        return {}
    v, o = np.concatenate(vals), np.concatenate(owner)
    sizes = np.array([graph.group(n).size for n in names])
    floor = np.array([n_kept(int(s), max_group_sparsity) for s in sizes])
    budget = n_pruned(int(v.size), sparsity)
    keep = sizes.copy()
    for i in np.argsort(v, kind="stable"):
        if budget <= 0:
            break
        if keep[o[i]] > floor[o[i]]:
            keep[o[i]] -= 1
            budget -= 1
    return {n: keep_count(int(s), 1 - k / s, round_to) if round_to > 1 else int(k)
            for n, s, k in zip(names, sizes, keep)}


def plan_cost(graph: ChannelGraph, amounts: Mapping[str, int]) -> tuple[int, int]:
    """(MACs, parameters) of the model if each group kept ``amounts[g]`` channels."""
    plan = Plan({n: GroupPlan(graph.group(n).size, tuple(range(k)))
                 for n, k in amounts.items() if k < graph.group(n).size})
    ck = comp_keep_for(graph, plan)
    shapes = expected_shapes(graph, ck)
    sh = {name: s for (k, name), s in shapes.items() if k == 0}
    macs = sum(node_macs(n, graph.modules, sh, {}) for n in graph.traced[0].graph.nodes)
    kept = kept_indices(graph, ck)
    params = 0
    seen = set()
    for alias, canon in graph.aliases.items():
        if canon in seen or not _is_param(graph, alias):
            continue
        seen.add(canon)
        shape = list(graph.params[canon].shape)
        for d, idx in kept.get(canon, {}).items():
            shape[d] = len(idx)
        params += math.prod(shape)
    return macs, params


def _is_param(graph: ChannelGraph, name: str) -> bool:
    import torch

    return isinstance(graph.params[graph.aliases[name]], torch.nn.Parameter)


def amounts_for_target(graph: ChannelGraph, make: Callable[[float], dict[str, int]],
                       what: str, target: float) -> dict[str, int]:
    """Bisect the sparsity handed to ``make`` until the kept fraction of ``what`` ('macs' or
    'params') is at most ``target``."""
    check_fraction(target, f"target_{what}", "prune", allow_one=True)
    i = 0 if what == "macs" else 1
    base = plan_cost(graph, {})[i]
    if base == 0:
        raise ConfigError(f"target_{what} is set but the model has no {what} to count.")
    hi_amounts = make(0.999)
    best = plan_cost(graph, hi_amounts)[i] / base
    if best > target + 1e-9:
        frozen = [g.name for g in graph.groups if not g.prunable][:3]
        raise ConfigError(
            f"target_{what}={target:g} cannot be reached: pruning every prunable group as far as "
            f"allowed keeps {best:.3f} of the {what} (frozen groups such as "
            f"{', '.join(frozen) or 'none'} stay whole). Raise the target or unfreeze groups.")
    lo, hi = 0.0, 0.999
    result = hi_amounts
    for _ in range(30):
        mid = (lo + hi) / 2
        a = make(mid)
        frac = plan_cost(graph, a)[i] / base
        if frac <= target:
            hi, result = mid, a
        else:
            lo = mid
        if hi - lo < 1e-4:
            break
    return result
