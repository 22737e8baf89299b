"""Structured (filter/channel) masks over the dependency graph: choose, per group, the channel
units to remove from the current weights, as a Plan; its masks cover every coupled tensor."""

from __future__ import annotations

import numpy as np

from ..criteria import ScoreContext, get_criterion, score_group
from ..graph import ChannelGraph
from ..plan import Plan, plan_from_scores
from ..sparsity import n_kept


def group_plan(graph: ChannelGraph, module_sparsity: dict[str, float], criterion: str,
               seed: int = 0, projected: dict[str, object] | None = None) -> Plan:
    """A plan removing, in every prunable group produced by one of the modules of
    ``module_sparsity``, that fraction of its units by ``criterion`` on the current weights
    (``projected`` may replace parameters, e.g. W + U in ADMM)."""
    crit = get_criterion(criterion)
    params = dict(graph.params)
    if projected:
        params.update(projected)
    ctx = ScoreContext(params=params, rng=np.random.default_rng(seed), graph=graph)
    scores, amounts = {}, {}
    for g in graph.prunable_groups:
        sp = [module_sparsity[m.module] for m in g.sources if m.module in module_sparsity]
        if not sp:
            continue
        k = n_kept(g.size, max(sp))
        if k < g.size:
            scores[g.name] = score_group(crit, g, ctx)
            amounts[g.name] = k
    return plan_from_scores(graph, scores, amounts, {"criterion": criterion})
