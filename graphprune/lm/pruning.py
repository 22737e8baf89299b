"""One-shot structured pruning of a Hugging Face decoder, measured in removed attention + MLP
parameters (the LLM entry point of the flow: trace -> amounts -> ``blockwise.run`` -> apply).

How many units each block keeps:

- ``block_amounts`` (uniform): every block loses the same fraction of its attention + MLP
  parameters; its attention groups lose ``round(remove x units)`` units (key/value groups are
  coarse: a 2-group layer prunes attention in steps of 50%), its MLP channels make up the rest;
- ``flap_amounts`` (FLAP's adaptive structure, "AL-AM", An et al. 2024): the fluctuation scores of
  every block are standardised per layer and module (attention: the squared metric of each
  ``o_proj`` column, as FLAP's code does, then averaged per unit), ranked across the whole model,
  and units are kept from the top until ``1 - remove`` of the parameters are kept, each unit
  weighing its parameter count (FLAP's 512/3 for a LLaMA-7B head); MLP channels, in score
  order, then make the parameter count exact to one channel.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .._validate import check_choice, check_fraction
from ..errors import ConfigError, InputError
from ..graph import ChannelGraph, Group

STAGES = ("self_attn.o_proj", "mlp.down_proj")


def _consumer(g: Group) -> str | None:
    ins = {m.module for m in g.members if m.role == "in"}
    return ins.pop() if len(ins) == 1 else None


def block_groups(graph: ChannelGraph) -> dict[str, list[Group]]:
    """Prunable groups by block prefix (``'model.layers.3.'``), attention first."""
    out: dict[str, list[Group]] = {}
    for g in graph.prunable_groups:
        c = _consumer(g)
        for stage in STAGES:
            if c is not None and c.endswith("." + stage):
                out.setdefault(c[: -len(stage)], []).append(g)
    for gs in out.values():
        gs.sort(key=lambda g: 0 if _consumer(g).endswith(STAGES[0]) else 1)
    return out


def unit_cost(graph: ChannelGraph, g: Group) -> float:
    """Parameters that go with one unit of ``g`` (the slices of every member, per unit)."""
    total = 0.0
    for m in g.members:
        t = graph.params[m.param]
        if isinstance(t, torch.nn.Parameter):
            total += t.numel() / t.shape[m.dim] * m.n_index
    return total / g.size


def block_params(graph: ChannelGraph, prefix: str) -> int:
    """Attention + MLP parameters of the block at ``prefix`` (frozen ones too: with
    ``gqa="query"`` the key/value projections stay, and still count in the share removed)."""
    return sum(t.numel() for name, t in graph.params.items()
               if isinstance(t, torch.nn.Parameter) and name.startswith(prefix)
               and name[len(prefix):].startswith(("self_attn.", "mlp.")))


def block_amounts(graph: ChannelGraph, remove: float) -> dict[str, int]:
    """Units kept per group so that every block loses ``remove`` of its attention + MLP
    parameters (attention groups rounded to whole units, the MLP making up the rest).

    >>> amounts = block_amounts(graph, 0.3)   # {'model.layers.0.self_attn.q_proj': 1, ...}
    """
    check_fraction(remove, "remove", "block_amounts")
    out: dict[str, int] = {}
    for prefix, gs in block_groups(graph).items():
        costs = [unit_cost(graph, g) for g in gs]
        budget = remove * block_params(graph, prefix)
        heads = [g for g in gs if _consumer(g).endswith(STAGES[0])]
        rest = [(g, c) for g, c in zip(gs, costs) if g not in heads]
        for g, c in zip(gs, costs):
            if g in heads:
                n = min(g.size - 1, int(round(remove * g.size)))
                while n > 0 and n * c > budget + 1e-9:
                    n -= 1
                out[g.name] = g.size - n
                budget -= n * c
        for g, c in rest:
            n = min(g.size - 1, max(0, int(round(budget / c))))
            out[g.name] = g.size - n
            budget -= n * c
    return out


def _standardise(x: np.ndarray) -> np.ndarray:
    sd = x.std(ddof=1) if x.size > 1 else 0.0
    return (x - x.mean()) / (sd if sd > 0 else 1.0)


def flap_amounts(graph: ChannelGraph, calibration: Any, remove: float) -> dict[str, int]:
    """FLAP's adaptive structure: units kept per group from one global ranking of standardised
    fluctuation scores, collected on the dense model (see the module docstring).

    Raises:
        ConfigError: ``remove`` not in [0, 1).
    """
    from ..calibration import as_calibration
    from ..criteria.activation import collect_stats, column_values
    from .blockwise import dense_stats
    from .decoder import supports

    check_fraction(remove, "remove", "flap_amounts")
    blocks = block_groups(graph)
    groups = [g for gs in blocks.values() for g in gs]
    calib = as_calibration(calibration)
    if supports(graph.model):  # block by block, in float32
        stats = dense_stats(graph.model, calib)
    else:
        stats = collect_stats(graph.model, calib, sorted({_consumer(g) for g in groups}))
    scores, costs, owner = [], [], []
    for i, g in enumerate(groups):
        ins = [m for m in g.members if m.role == "in"]
        mod = graph.modules[ins[0].module]
        s = stats[ins[0].module]
        pos = np.concatenate([m.pos for m in ins])
        unit = np.concatenate([m.unit for m in ins])
        metric = (s.var * column_values(mod, graph.params[ins[0].param], 2))[pos]
        if _consumer(g).endswith(STAGES[0]):
            metric = metric ** 2  # FLAP squares the attention metric before standardising
        z = _standardise(metric)
        per_unit = np.bincount(unit, weights=z, minlength=g.size) / np.maximum(
            np.bincount(unit, minlength=g.size), 1)
        scores.append(per_unit)
        costs.append(np.full(g.size, unit_cost(graph, g)))
        owner.append(np.full(g.size, i))
    v, c, o = np.concatenate(scores), np.concatenate(costs), np.concatenate(owner)
    order = np.argsort(-v, kind="stable")
    target = c.sum() - remove * sum(block_params(graph, p) for p in blocks)
    n_keep = int(np.argmin(np.abs(np.cumsum(c[order]) - target))) + 1
    kept = np.zeros(v.size, dtype=bool)
    kept[order[:n_keep]] = True
    # FLAP's threshold is exact to one unit; a head group weighs hundreds of MLP channels, so
    # the cheapest units (MLP channels) then go or come back in score order to meet the budget
    fine = c == c.min()
    excess = float(c[kept].sum() - target)
    step = float(c.min())
    for i in (order[::-1] if excess > 0 else order):
        if abs(excess) <= step / 2:
            break
        if fine[i] and kept[i] == (excess > 0):
            kept[i] = not kept[i]
            excess += -step if excess > 0 else step
    keep = np.bincount(o[kept], minlength=len(groups))
    return {g.name: int(max(1, keep[i])) for i, g in enumerate(groups)}


def prune_lm(model: torch.nn.Module, calibration: torch.Tensor, *, remove: float = 0.2,
             method: str = "greedy", reconstruct: bool | None = None, adaptive: bool = False,
             sequential: bool = True, bias: bool | None = None, target: str = "block",
             device: torch.device | str | None = None, graph: ChannelGraph | None = None,
             gqa: str = "group", progress: Callable[[str, int, int], None] | None = None) -> Any:
    """Remove ``remove`` of a Hugging Face decoder's attention + MLP parameters in one shot
    (key/value head groups and MLP channels), block by block on calibration token windows.

    ``method``: any criterion (``l1``, ``wanda``, ``flap``, ``taylor``, ``lasso``, ``greedy``...);
    ``reconstruct`` (default: True for ``lasso``/``greedy``) refits ``o_proj``/``down_proj`` by
    least squares; ``adaptive`` uses FLAP's global allocation (``flap_amounts``) instead of the
    same fraction in every block; ``bias`` (default: the method is ``flap``) FLAP's mean
    compensation; ``sequential`` statistics from the pruned-so-far model (FLAP's adaptive mode
    uses the dense model's); ``target``, ``device``: see ``blockwise.run``; ``graph``: the
    model's graph from ``graphprune.trace``, if already traced (tracing probes the model);
    ``gqa``: ``"group"`` removes key/value heads with their query heads, ``"query"`` keeps every
    key/value head and removes query heads evenly from every group (``graphprune.trace``).

    Returns:
        a ``graphprune.PruneResult`` (``.model`` is the pruned model, its config updated).

    Raises:
        InputError: ``calibration`` is not ``(n, seq_len)`` integer token ids.
        ConfigError: a bad ``remove``/``method``/``target``/``gqa``, or a model whose blocks are not
            LLaMA-style (``graphprune.lm.decoder.supports``).

    Example:
        >>> lm = graphprune.lm.pretrained_lm()
        >>> calib = graphprune.lm.corpus_calibration(lm.tokenizer, 32, 256)
        >>> r = graphprune.lm.prune_lm(lm.model, calib, remove=0.3, method="greedy")
    """
    from ..apply import apply_plan
    from ..calibration import as_calibration
    from ..capture import trace
    from ..criteria import get_criterion
    from ..prune import PruneResult
    from . import blockwise
    from .decoder import supports

    check_fraction(remove, "remove", "prune_lm")
    check_choice(target, "target", "prune_lm", ("block", "layer"))
    crit = get_criterion(method)
    if not supports(model):
        raise ConfigError(f"prune_lm needs a Hugging Face decoder with LLaMA-style blocks "
                          f"(model.model.layers with self_attn.o_proj and mlp.down_proj). Got "
                          f"{type(model).__name__} instead; use graphprune.prune for other models.")
    ids = torch.as_tensor(calibration)
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise InputError(f"The 'calibration' parameter of prune_lm must be (n, seq_len) integer token "
                         f"ids. Got {ids.dtype} of shape {tuple(ids.shape)} instead.")
    reconstruct = crit.kind == "select" if reconstruct is None else bool(reconstruct)
    t0 = time.perf_counter()
    graph = trace(model, ids[:1], gqa=gqa) if graph is None else graph
    t1 = time.perf_counter()
    calib = as_calibration(ids, ids[:1], batch_size=8)
    amounts = flap_amounts(graph, calib, remove) if adaptive else block_amounts(graph, remove)
    meta = {"method": method, "remove": remove, "reconstruct": reconstruct, "adaptive": adaptive,
            "model": type(model).__name__}
    dd = blockwise.run(graph, calib, crit, amounts, reconstruct=reconstruct,
                       sequential=sequential, meta=meta, progress=progress,
                       device=device, bias=bias, target=target)
    t2 = time.perf_counter()
    applied = apply_plan(graph, dd.plan, weights=dd.weights)
    if hasattr(dd, "finish"):
        dd.finish(applied.model)
    _update_config(applied.model)
    t3 = time.perf_counter()
    timings = {"trace": t1 - t0, "plan": t2 - t1, "apply": t3 - t2, **dd.timings}
    return PruneResult(applied.model, applied, dd.plan, graph, timings, {"groups": dd.groups})


def _update_config(model: torch.nn.Module) -> None:
    try:
        from ..hf import update_config
    except ImportError:  # an older graphprune.hf
        return
    update_config(model)
