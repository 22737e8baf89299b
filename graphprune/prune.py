"""The one-call entry point: trace -> groups -> scores -> plan -> apply -> report."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .apply import apply_plan
from .criteria import ScoreContext, get_criterion, score_group
from .errors import ConfigError
from .graph import ChannelGraph, trace
from .plan import (
    Plan, check_round_to, check_sparsity, group_sparsities, keep_count, plan_from_scores,
)
from .report import Report, build_report


class PruneResult:
    """What ``prune`` returns.

    - ``model``: the physically smaller ``nn.Module`` (train it, save it, export it);
    - ``masks``: state_dict name of the ORIGINAL model -> bool tensor of the original shape,
      False where a channel was removed;
    - ``plan``: the kept channels per group (JSON-serialisable, replayable);
    - ``report``: channels per group, params/MACs/bytes before and after, timings;
    - ``graph``: the channel graph of the original model.
    """

    def __init__(self, model: nn.Module, applied: Any, plan: Plan, graph: ChannelGraph,
                 timings: dict[str, float]):
        self.model, self.plan, self.graph = model, plan, graph
        self._applied = applied
        self._timings = timings
        self._report: Report | None = None

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return self._applied.masks

    @property
    def report(self) -> Report:
        if self._report is None:  # counted on first access, off the pruning path
            self._report = build_report(self.graph, self.model, self.plan, self._applied.shapes,
                                        self._timings, dict(self.plan.meta))
        return self._report

    def __repr__(self) -> str:
        p0, p1 = self.report.params
        return f"PruneResult({type(self.model).__name__}: params {p0:,} -> {p1:,})"


def make_plan(graph: ChannelGraph, *, sparsity: float = 0.5, method: str = "l1",
              round_to: int = 1, ignore: Sequence[Any] = (), config: Sequence[Any] | None = None,
              seed: int = 0, calibration: Any = None) -> Plan:
    """Score every prunable group with ``method`` and keep the best channels of each."""
    sparsity = check_sparsity(sparsity)
    round_to = check_round_to(round_to)
    crit = get_criterion(method)
    if crit.needs_data and calibration is None:
        raise ConfigError(f"method '{method}' chooses channels from data: pass calibration=... "
                          "(a tensor or an iterable of input batches).")
    targets = group_sparsities(graph, sparsity, config, ignore)
    ctx = ScoreContext(params=graph.params, rng=np.random.default_rng(seed),
                       calibration=calibration, graph=graph)
    scores, amounts = {}, {}
    for g in graph.prunable_groups:
        s, _ = targets.get(g.name, (0.0, None))
        n_keep = keep_count(g.size, s, round_to)
        if n_keep < g.size:
            scores[g.name] = score_group(crit, g, ctx)
            amounts[g.name] = n_keep
    meta = {"method": method, "sparsity": sparsity, "round_to": round_to, "seed": seed,
            "model": type(graph.model).__name__}
    return plan_from_scores(graph, scores, amounts, meta)


def prune(model: nn.Module, example_inputs: Any, *, sparsity: float = 0.5, method: str = "l1",
          round_to: int = 1, ignore: Sequence[Any] = (), config: Sequence[Any] | None = None,
          seed: int = 0, plan: Plan | str | None = None, inplace: bool = False,
          verify: bool = True, calibration: Any = None) -> PruneResult:
    """Prune ``sparsity`` of the channels of every prunable group and shrink the model.

    Args:
        model: any ``nn.Module`` torch.fx can trace (untraceable submodules become opaque).
        example_inputs: a tensor, tuple or dict of inputs shaped like real ones (batch first).
        sparsity: fraction of each group's channels to remove, in [0, 1).
        method: scoring criterion (``graphprune.criteria.list_criteria()``): 'l1', 'l2',
            'fpgm', 'random', ...
        round_to: keep channel counts a multiple of this (hardware-friendly widths).
        ignore: modules (paths, classes or objects) whose parameters must not change.
        config: NNI-style list of ``{'sparsity', 'op_types', 'op_names', 'exclude'}`` entries;
            later entries override earlier ones; overrides ``sparsity`` where it matches.
        seed: seed of the 'random' criterion.
        plan: a ``Plan`` (or path to a saved plan) to apply instead of scoring.
        inplace: modify ``model`` itself instead of returning a pruned copy.
        verify: run the pruned model once and check every intermediate shape.

    Example:
        >>> r = graphprune.prune(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224),
        ...                      sparsity=0.5, method="l1")
        >>> print(r.report)
    """
    t0 = time.perf_counter()
    if plan is None:
        check_sparsity(sparsity)
        check_round_to(round_to)
        get_criterion(method)
    graph = trace(model, example_inputs)
    t1 = time.perf_counter()
    if plan is None:
        plan = make_plan(graph, sparsity=sparsity, method=method, round_to=round_to,
                         ignore=ignore, config=config, seed=seed, calibration=calibration)
    elif isinstance(plan, str):
        plan = Plan.load(plan)
    t2 = time.perf_counter()
    applied = apply_plan(graph, plan, inplace=inplace, verify=verify)
    t3 = time.perf_counter()
    return PruneResult(applied.model, applied, plan, graph,
                       {"trace": t1 - t0, "plan": t2 - t1, "apply": t3 - t2})
