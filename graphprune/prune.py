"""The one-call entry point: trace -> groups -> amounts -> scores/selection -> plan -> apply
(-> reconstruct) -> report. Every setting is a field of ``PruneConfig`` (``config.py``)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from ._heap import frozen_heap
from .apply import apply_plan
from .budget import amounts_for_target, global_amounts, uniform_amounts
from .calibration import Calibration, as_calibration
from .criteria import Criterion, ScoreContext, get_criterion, score_group
from .capture import trace
from .config import PruneConfig, resolve
from .errors import ConfigError
from .graph import ChannelGraph
from .plan import Plan, group_sparsities, plan_from_scores
from .report import Report, build_report


class PruneResult:
    """What ``prune`` returns.

    - ``model``: the physically smaller ``nn.Module`` (train it, save it, export it);
    - ``masks``: state_dict name of the ORIGINAL model -> bool tensor of the original shape,
      False where a channel was removed;
    - ``plan``: the kept channels per group (JSON-serialisable, replayable);
    - ``report``: channels per group, params/MACs/bytes before and after, timings, and (with
      calibration data) the output fidelity;
    - ``graph``: the channel graph of the original model (of its copy on ``device``, if the run
      moved it there);
    - ``latency``: with a latency table (``target_latency``, ``latency_table``), a
      ``graphprune.latency.LatencyReport``: predicted (and, under a target, measured) latency vs
      the dense model's, channels per group, MACs, parameters; else None.

    Example:
        >>> r = graphprune.prune(model, x, sparsity=0.5)
        >>> print(r.report); r.plan.save("plan.json"); r.model(x)
    """

    def __init__(self, model: nn.Module, applied: Any, plan: Plan, graph: ChannelGraph,
                 timings: dict[str, float], fidelity: dict[str, Any] | None = None,
                 latency: Any = None):
        self.model, self.plan, self.graph, self.latency = model, plan, graph, latency
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


def compute_amounts(graph: ChannelGraph, crit: Criterion, ctx: ScoreContext,
                    cfg: PruneConfig) -> dict[str, int]:
    """Channels kept per prunable group under ``cfg`` (sparsity, config list, global ranking,
    or a MACs / parameter target; ``round_to`` an int; see ``plan_amounts`` for latency)."""
    sparsity, config = cfg.effective_sparsity, cfg.config
    allowed = _allowed(graph, cfg)
    if cfg.global_pruning:
        scores = _ranking_scores(graph, crit, ctx)

        def make(s: float) -> dict[str, int]:
            return global_amounts(graph, scores, s, allowed, cfg.round_to, cfg.max_group_sparsity)
    else:
        def make(s: float) -> dict[str, int]:
            if cfg.target is None:
                return uniform_amounts(graph, s, config, cfg.ignore, cfg.round_to)
            # with a target, config entries only exclude; one sparsity is searched for the rest
            return {n: v for n, v in uniform_amounts(graph, s, None, cfg.ignore, cfg.round_to).items()
                    if allowed.get(n, False)}
    if cfg.target is not None:
        return amounts_for_target(graph, make, *cfg.target)
    return make(sparsity)


def _allowed(graph: ChannelGraph, cfg: PruneConfig) -> dict[str, bool]:
    targets = group_sparsities(graph, cfg.effective_sparsity, cfg.config, cfg.ignore)
    return {n: why is None for n, (_, why) in targets.items()}


def plan_amounts(graph: ChannelGraph, crit: Criterion, ctx: ScoreContext, cfg: PruneConfig,
                 example_inputs: Any = None, table: Any = None,
                 progress: Callable[[str, int, int], None] | None = None
                 ) -> tuple[dict[str, int], PruneConfig, Any]:
    """Channels kept per group, the settings with ``round_to`` resolved to an int, and the
    latency report (None without a latency table). Under ``target_latency`` the channels are
    allocated on the latency table with the method's scores (l1 for selectors) and checked in
    onnxruntime; see ``graphprune.latency.target``."""
    from .latency import target as lt

    table = lt.table_for_run(graph, example_inputs, cfg, table, progress)
    if cfg.round_to == "auto":
        cfg = replace(cfg, round_to=lt.run_round_to(cfg, table))
    if cfg.target_latency is not None:
        scores = _ranking_scores(graph, crit, ctx)
        amounts, rep = lt.target_amounts(graph, scores, cfg, table, _allowed(graph, cfg),
                                         cfg.round_to, example_inputs)
        return amounts, cfg, rep
    amounts = compute_amounts(graph, crit, ctx, cfg)
    return amounts, cfg, None if table is None else lt.run_report(graph, amounts, table)


def _data_runner(model: nn.Module) -> tuple[Any, bool]:
    """The data-driven runner and whether it also serves score criteria that read data:
    Hugging Face decoders block by block (``lm.blockwise``), other models group by group."""
    from .lm.decoder import supports

    if supports(model):
        from .lm import blockwise

        return blockwise, True
    from .datadriven import sequential

    return sequential, False


def _needs_data_error(cfg: PruneConfig, crit: Criterion, plan: Any) -> None:
    if ((crit.needs_data and plan is None) or cfg.reconstruct):
        what = f"method '{cfg.method}' chooses channels from data" if crit.needs_data and \
            plan is None else "reconstruct=True refits layers on data"
        raise ConfigError(f"{what}: pass calibration=... (a tensor of inputs, a list of batches "
                          "or (inputs, labels) pairs, or a DataLoader).")


def _meta(cfg: PruneConfig, model: nn.Module, latency: Any = None) -> dict[str, Any]:
    meta = {"method": cfg.method, "sparsity": cfg.effective_sparsity, "round_to": cfg.round_to,
            "seed": cfg.seed, "model": type(model).__name__, "reconstruct": cfg.reconstruct}
    if cfg.target is not None:
        meta[f"target_{cfg.target[0]}"] = cfg.target[1]
    if cfg.global_pruning:
        meta["global_pruning"] = True
    if latency is not None:
        from .latency.target import meta_of

        meta.update(meta_of(latency))
    return meta


def _on_device(model: nn.Module, example_inputs: Any, device: str | None, inplace: bool
               ) -> tuple[nn.Module, Any, torch.device]:
    """The model and example inputs where the run works (``device``; None: where the model is).
    The caller's model moves only with ``inplace``; otherwise a copy goes to the device."""
    from .datadriven.sequential import model_device
    from .distributed import resolve_device

    dev = resolve_device(device, model=model)
    if device is None:
        return model, example_inputs, dev
    if dev != model_device(model):
        model = model.to(dev) if inplace else copy.deepcopy(model).to(dev)
    return model, tree_map_only(torch.Tensor, lambda t: t.to(dev), example_inputs), dev


@frozen_heap()
def prune(model: nn.Module, example_inputs: Any, settings: PruneConfig | None = None, *,
          calibration: Any = None, plan: Plan | str | None = None, latency_table: Any = None,
          inplace: bool = False,
          progress: Callable[[str, int, int], None] | None = None, **options: Any) -> PruneResult:
    """Prune the channels of every prunable group and shrink the model physically.

    Args:
        model: any ``nn.Module`` (torch.fx or torch.export must capture it; see ``trace``).
        example_inputs: a tensor, tuple or dict of inputs shaped like real ones (batch first).
        settings: a ``PruneConfig``; keyword ``options`` are its fields and override it:
            ``sparsity`` (default 0.5), ``method`` ('l1', 'l2', 'fpgm', 'random', 'bn_scale';
            data-driven 'taylor', 'lasso', 'greedy'; ``graphprune.list_criteria()``),
            ``round_to``, ``ignore``, ``config`` (NNI-style list), ``reconstruct``,
            ``sequential``, ``global_pruning``, ``max_group_sparsity``, ``target_macs`` /
            ``target_params`` / ``target_latency`` (with ``latency_table``,
            ``latency_threads``, ``latency_rounds``), ``seed``, ``tracer``, ``device``,
            ``verify``, ``strict``. See ``PruneConfig``.
        calibration: inputs for data-driven methods and reconstruction: a tensor, an iterable of
            tensors or of ``(x, y)`` pairs, or a DataLoader (at most 256 samples are used); the
            batches move to the run's device one at a time.
        plan: a ``Plan`` (or a path to a saved one) to apply instead of choosing channels.
        latency_table: a ``graphprune.latency.LatencyTable`` (or a path, as the setting) to
            allocate ``target_latency`` on and to round with ``round_to='auto'``.
        inplace: modify ``model`` itself instead of returning a pruned copy (with ``device``,
            the model itself moves there).
        progress: ``fn(stage, i, n)`` called before each group of a data-driven run and as a
            latency table is measured.

    Returns:
        ``PruneResult`` with the smaller ``model`` (on ``device``), ``masks``, ``plan``,
        ``report``, ``graph`` and ``latency``.

    Raises:
        ConfigError: a bad setting (named, with the accepted values), data-driven work without
            ``calibration``, a CUDA device on a machine without one, or an unreachable target.
        LatencyTableError: a latency table file of another model or machine.
        TraceError / InputError: the model cannot be captured or the inputs do not fit.
        PlanError: a given plan does not fit the model.

    Example:
        >>> r = graphprune.prune(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224),
        ...                      sparsity=0.5, method="l1")
        >>> print(r.report)
        >>> r = graphprune.prune(model, x, target_latency=0.5)   # half the onnxruntime latency
        >>> print(r.latency)                                      # predicted vs measured
    """
    t0 = time.perf_counter()
    table = None
    if latency_table is not None and not isinstance(latency_table, str):
        table = latency_table  # an object: not a setting (settings are JSON values)
    elif latency_table is not None:
        options = {**options, "latency_table": latency_table}
    cfg = resolve(settings, options, "prune")
    crit = get_criterion(cfg.method)
    plan = cfg.plan if plan is None else plan
    if calibration is None:
        _needs_data_error(cfg, crit, plan)
    calib: Calibration | None = None
    if calibration is not None:
        calib = as_calibration(calibration, example_inputs)
    model, example_inputs, dev = _on_device(model, example_inputs, cfg.device, inplace)
    graph = trace(model, example_inputs, tracer=cfg.tracer, strict=cfg.strict, gqa=cfg.gqa)
    t1 = time.perf_counter()
    ctx = ScoreContext(params=graph.params, rng=np.random.default_rng(cfg.seed), calibration=calib,
                       graph=graph)
    weights, fidelity, extra_t, dd, latency = None, {}, {}, None, None
    seq, blockwise = _data_runner(model)
    if isinstance(plan, str):
        plan = Plan.load(plan)
    if plan is not None:
        plan.validate(graph)
        if cfg.reconstruct:
            fixed = {n: len(gp.keep) for n, gp in plan.groups.items()}
            dd = seq.run(graph, calib, crit, fixed, reconstruct=True, sequential=cfg.sequential,
                         seed=cfg.seed, meta=dict(plan.meta), progress=progress, fixed=plan,
                         device=dev)
            weights, fidelity["groups"], extra_t = dd.weights, dd.groups, dd.timings
    else:
        amounts, cfg, latency = plan_amounts(graph, crit, ctx, cfg, example_inputs, table, progress)
        meta = _meta(cfg, model, latency)
        if crit.kind == "select" or cfg.reconstruct or (blockwise and crit.needs_data):
            dd = seq.run(graph, calib, crit, amounts, reconstruct=cfg.reconstruct,
                         sequential=cfg.sequential, seed=cfg.seed, meta=meta, progress=progress,
                         device=dev)
            plan, weights, fidelity["groups"], extra_t = dd.plan, dd.weights, dd.groups, dd.timings
        else:
            scores = {n: score_group(crit, graph.group(n), ctx)
                      for n, k in amounts.items() if k < graph.group(n).size}
            plan = plan_from_scores(graph, scores, amounts, meta)
    t2 = time.perf_counter()
    applied = apply_plan(graph, plan, inplace=inplace, verify=cfg.verify, weights=weights)
    if hasattr(dd, "finish"):  # biases a layer did not have (FLAP's compensation)
        dd.finish(applied.model)
    t3 = time.perf_counter()
    timings = {"trace": t1 - t0, "plan": t2 - t1, "apply": t3 - t2, **extra_t}
    if calib is not None:
        fidelity["total"] = seq.output_fidelity(graph.model, applied.model, calib)
    return PruneResult(applied.model, applied, plan, graph, timings, fidelity, latency)


def make_plan(graph: ChannelGraph, settings: PruneConfig | None = None, *, calibration: Any = None,
              **options: Any) -> Plan:
    """Choose the channels to keep (no reconstruction): the planning half of ``prune``.

    Takes the same settings as ``prune`` (a ``PruneConfig`` and/or its fields as keywords).

    Raises:
        ConfigError: a bad setting, or a data-driven method without ``calibration``.

    Example:
        >>> g = graphprune.trace(model, x)
        >>> plan = graphprune.make_plan(g, sparsity=0.3, method="fpgm")
        >>> small = graphprune.apply_plan(g, plan).model
    """
    cfg = resolve(settings, options, "make_plan")
    crit = get_criterion(cfg.method)
    if crit.needs_data and calibration is None:
        raise ConfigError(f"method '{cfg.method}' chooses channels from data: pass calibration=... "
                          "(a tensor or an iterable of input batches).")
    calib = None
    if calibration is not None:
        t = graph.traced[0]
        calib = as_calibration(calibration, t.inputs[0])
    ctx = ScoreContext(params=graph.params, rng=np.random.default_rng(cfg.seed), calibration=calib,
                       graph=graph)
    amounts, cfg, latency = plan_amounts(graph, crit, ctx, cfg, tuple(graph.traced[0].inputs[0]))
    meta = {k: v for k, v in _meta(cfg, graph.model, latency).items() if k != "reconstruct"}
    if crit.kind == "select":
        from .datadriven import sequential as seq

        return seq.run(graph, calib, crit, amounts, reconstruct=False, seed=cfg.seed,
                       meta=meta).plan
    scores = {n: score_group(crit, graph.group(n), ctx)
              for n, k in amounts.items() if k < graph.group(n).size}
    return plan_from_scores(graph, scores, amounts, meta)
