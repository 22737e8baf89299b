"""The one-call entry point: trace -> groups -> amounts -> scores/selection -> plan -> apply
(-> reconstruct) -> report."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ._validate import check_fraction
from .apply import apply_plan
from .budget import amounts_for_target, global_amounts, uniform_amounts
from .calibration import Calibration, as_calibration
from .criteria import Criterion, ScoreContext, get_criterion, score_group
from .errors import ConfigError
from .graph import ChannelGraph, trace
from .plan import Plan, check_round_to, check_sparsity, group_sparsities, plan_from_scores
from .report import Report, build_report


class PruneResult:
    """What ``prune`` returns.

    - ``model``: the physically smaller ``nn.Module`` (train it, save it, export it);
    - ``masks``: state_dict name of the ORIGINAL model -> bool tensor of the original shape,
      False where a channel was removed;
    - ``plan``: the kept channels per group (JSON-serialisable, replayable);
    - ``report``: channels per group, params/MACs/bytes before and after, timings, and (with
      calibration data) the output fidelity;
    - ``graph``: the channel graph of the original model.
    """

    def __init__(self, model: nn.Module, applied: Any, plan: Plan, graph: ChannelGraph,
                 timings: dict[str, float], fidelity: dict[str, Any] | None = None):
        self.model, self.plan, self.graph = model, plan, graph
        self._applied = applied
        self._timings = timings
        self._fidelity = fidelity or {}
        self._report: Report | None = None

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return self._applied.masks

    @property
    def report(self) -> Report:
        if self._report is None:  # counted on first access, off the pruning path
            self._report = build_report(self.graph, self.model, self.plan, self._applied.shapes,
                                        self._timings, dict(self.plan.meta))
            self._report.fidelity = self._fidelity
        return self._report

    def __repr__(self) -> str:
        p0, p1 = self.report.params
        return f"PruneResult({type(self.model).__name__}: params {p0:,} -> {p1:,})"


def _ranking_scores(graph: ChannelGraph, crit: Criterion, ctx: ScoreContext) -> dict[str, np.ndarray]:
    """Scores used to compare groups (global ranking): the method's own if it scores, else l1."""
    use = crit if crit.kind == "score" and (not crit.needs_data or ctx.calibration is not None) \
        else get_criterion("l1")
    return {g.name: score_group(use, g, ctx) for g in graph.prunable_groups}


def compute_amounts(graph: ChannelGraph, crit: Criterion, ctx: ScoreContext, *, sparsity: float,
                    config: Sequence[Any] | None, ignore: Sequence[Any], round_to: int,
                    global_pruning: bool, max_group_sparsity: float,
                    target_macs: float | None, target_params: float | None) -> dict[str, int]:
    """Channels kept per prunable group."""
    targets = group_sparsities(graph, sparsity, config, ignore)
    allowed = {n: why is None for n, (_, why) in targets.items()}
    if global_pruning:
        scores = _ranking_scores(graph, crit, ctx)

        def make(s: float) -> dict[str, int]:
            return global_amounts(graph, scores, s, allowed, round_to, max_group_sparsity)
    else:
        def make(s: float) -> dict[str, int]:
            if target_macs is None and target_params is None:
                return uniform_amounts(graph, s, config, ignore, round_to)
            # with a target, config entries only exclude; one sparsity is searched for the rest
            return {n: v for n, v in uniform_amounts(graph, s, None, ignore, round_to).items()
                    if allowed.get(n, False)}
    if target_macs is not None:
        return amounts_for_target(graph, make, "macs", target_macs)
    if target_params is not None:
        return amounts_for_target(graph, make, "params", target_params)
    return make(sparsity)


def prune(model: nn.Module, example_inputs: Any, *, sparsity: float | None = None,
          method: str = "l1", round_to: int = 1, ignore: Sequence[Any] = (),
          config: Sequence[Any] | None = None, seed: int = 0, plan: Plan | str | None = None,
          calibration: Any = None, reconstruct: bool = False, sequential: bool = True,
          global_pruning: bool = False, max_group_sparsity: float = 0.9,
          target_macs: float | None = None, target_params: float | None = None,
          inplace: bool = False, verify: bool | str = True, tracer: str = "auto",
          progress: Callable[[str, int, int], None] | None = None) -> PruneResult:
    """Prune the channels of every prunable group and shrink the model physically.

    Args:
        model: any ``nn.Module`` torch.fx can trace (untraceable submodules become opaque).
        example_inputs: a tensor, tuple or dict of inputs shaped like real ones (batch first).
        sparsity: fraction of each group's channels to remove, in [0, 1) (default 0.5).
        method: 'l1', 'l2', 'fpgm', 'random', 'bn_scale' (data-free); 'taylor' (needs labelled
            or unlabelled calibration data); 'lasso', 'greedy' (choose channels by their effect on
            the next layers' outputs on calibration data). ``graphprune.list_criteria()``.
        round_to: keep channel counts a multiple of this (hardware-friendly widths).
        ignore: modules (paths, classes or objects) whose parameters must not change.
        config: NNI-style list of ``{'sparsity', 'op_types', 'op_names', 'exclude'}`` entries;
            later entries override earlier ones.
        plan: a ``Plan`` (or a path to a saved one) to apply instead of choosing channels.
        calibration: inputs for data-driven methods and reconstruction: a tensor, an iterable of
            tensors or of ``(x, y)`` pairs, or a DataLoader (at most 256 samples are used).
        reconstruct: refit every consumer of a pruned group by least squares so that its output
            matches the original model's on the calibration data (He et al. 2017).
        sequential: take the consumers' inputs from the model pruned so far (targets always from
            the original), so errors do not accumulate; ``False`` is faster.
        global_pruning: rank channels across groups (scores normalised by their group's mean)
            instead of the same sparsity everywhere; no group loses more than
            ``max_group_sparsity`` of its channels.
        target_macs / target_params: keep this fraction of the MACs / parameters instead of
            giving a sparsity (the sparsity is searched for).
        inplace: modify ``model`` itself instead of returning a pruned copy.
        verify: run the pruned model once and check every layer's shapes ('full': every value).
        tracer: 'auto' (torch.fx, falling back to torch.export), 'fx' or 'export'; see ``trace``.
        progress: ``fn(group, i, n)`` called before each group of a data-driven run.

    Example:
        >>> r = graphprune.prune(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224),
        ...                      sparsity=0.5, method="l1")
        >>> print(r.report)
    """
    t0 = time.perf_counter()
    given_sparsity = sparsity
    sparsity = check_sparsity(0.5 if sparsity is None else sparsity)
    round_to = check_round_to(round_to)
    crit = get_criterion(method)
    check_fraction(max_group_sparsity, "max_group_sparsity", "prune")
    if given_sparsity is not None and (target_macs is not None or target_params is not None):
        raise ConfigError("Give either 'sparsity' or a target ('target_macs'/'target_params'), "
                          "not both: the target decides the sparsity.")
    if target_macs is not None and target_params is not None:
        raise ConfigError("Give 'target_macs' or 'target_params', not both.")
    needs_data = (crit.needs_data and plan is None) or reconstruct
    if needs_data and calibration is None:
        what = f"method '{method}' chooses channels from data" if crit.needs_data else \
            "reconstruct=True refits layers on data"
        raise ConfigError(f"{what}: pass calibration=... (a tensor of inputs, a list of batches "
                          "or (inputs, labels) pairs, or a DataLoader).")
    calib: Calibration | None = None
    if calibration is not None:
        calib = as_calibration(calibration, example_inputs)
    graph = trace(model, example_inputs, tracer=tracer)
    t1 = time.perf_counter()
    ctx = ScoreContext(params=graph.params, rng=np.random.default_rng(seed), calibration=calib,
                       graph=graph)
    meta = {"method": method, "sparsity": sparsity, "round_to": round_to, "seed": seed,
            "model": type(model).__name__, "reconstruct": reconstruct,
            **({"target_macs": target_macs} if target_macs is not None else {}),
            **({"target_params": target_params} if target_params is not None else {}),
            **({"global_pruning": True} if global_pruning else {})}
    weights, fidelity, extra_t = None, {}, {}
    if isinstance(plan, str):
        plan = Plan.load(plan)
    if plan is not None:
        plan.validate(graph)
        if reconstruct:
            from .datadriven import sequential as seq

            fixed = {n: len(gp.keep) for n, gp in plan.groups.items()}
            dd = seq.run(graph, calib, crit, fixed, reconstruct=True, sequential=sequential,
                         seed=seed, meta=dict(plan.meta), progress=progress, fixed=plan)
            weights, fidelity["groups"], extra_t = dd.weights, dd.groups, dd.timings
    else:
        amounts = compute_amounts(graph, crit, ctx, sparsity=sparsity, config=config,
                                  ignore=ignore, round_to=round_to, global_pruning=global_pruning,
                                  max_group_sparsity=max_group_sparsity, target_macs=target_macs,
                                  target_params=target_params)
        if crit.kind == "select" or reconstruct:
            from .datadriven import sequential as seq

            dd = seq.run(graph, calib, crit, amounts, reconstruct=reconstruct,
                         sequential=sequential, seed=seed, meta=meta, progress=progress)
            plan, weights, fidelity["groups"], extra_t = dd.plan, dd.weights, dd.groups, dd.timings
        else:
            scores = {n: score_group(crit, graph.group(n), ctx)
                      for n, k in amounts.items() if k < graph.group(n).size}
            plan = plan_from_scores(graph, scores, amounts, meta)
    t2 = time.perf_counter()
    applied = apply_plan(graph, plan, inplace=inplace, verify=verify, weights=weights)
    t3 = time.perf_counter()
    timings = {"trace": t1 - t0, "plan": t2 - t1, "apply": t3 - t2, **extra_t}
    if calib is not None:
        from .datadriven.sequential import output_fidelity

        fidelity["total"] = output_fidelity(graph.model, applied.model, calib)
    return PruneResult(applied.model, applied, plan, graph, timings, fidelity)


def make_plan(graph: ChannelGraph, *, sparsity: float = 0.5, method: str = "l1",
              round_to: int = 1, ignore: Sequence[Any] = (), config: Sequence[Any] | None = None,
              seed: int = 0, calibration: Any = None, global_pruning: bool = False,
              max_group_sparsity: float = 0.9, target_macs: float | None = None,
              target_params: float | None = None) -> Plan:
    """Choose the channels to keep (no reconstruction): the planning half of ``prune``."""
    sparsity = check_sparsity(sparsity)
    round_to = check_round_to(round_to)
    crit = get_criterion(method)
    if crit.needs_data and calibration is None:
        raise ConfigError(f"method '{method}' chooses channels from data: pass calibration=... "
                          "(a tensor or an iterable of input batches).")
    calib = None
    if calibration is not None:
        t = graph.traced[0]
        calib = as_calibration(calibration, t.inputs[0])
    ctx = ScoreContext(params=graph.params, rng=np.random.default_rng(seed), calibration=calib,
                       graph=graph)
    amounts = compute_amounts(graph, crit, ctx, sparsity=sparsity, config=config, ignore=ignore,
                              round_to=round_to, global_pruning=global_pruning,
                              max_group_sparsity=max_group_sparsity, target_macs=target_macs,
                              target_params=target_params)
    meta = {"method": method, "sparsity": sparsity, "round_to": round_to, "seed": seed,
            "model": type(graph.model).__name__}
    if crit.kind == "select":
        from .datadriven import sequential as seq

        return seq.run(graph, calib, crit, amounts, reconstruct=False, seed=seed, meta=meta).plan
    scores = {n: score_group(crit, graph.group(n), ctx)
              for n, k in amounts.items() if k < graph.group(n).size}
    return plan_from_scores(graph, scores, amounts, meta)
