"""Layer-by-layer calibration for Hugging Face decoders (the data-driven stage of the flow for
LLaMA / Qwen2 / Mistral causal LMs, run as SparseGPT, Wanda and FLAP run it).

The calibration tokens go through the model one decoder block at a time. The first block's
inputs (hidden states, rotary position embeddings, mask) are recorded by a hook that stops the
forward there; after that only the current block runs, so memory is one block (two copies: the
original and the working one, on ``device``) plus the hidden states of the calibration tokens,
never the model's activations. Two streams of hidden states go from block to block: the
ORIGINAL model's and the pruned-so-far model's (sequential mode).

In each block, the attention half then the MLP half:

1. the consumer's inputs (``o_proj``: the heads; ``down_proj``: the MLP channels) are summed
   over the tokens of the pruned-so-far stream (``layerfit.FitStats``); the target is what the
   ORIGINAL block produces on the ORIGINAL stream, minus the residual the pruned stream already
   carries, so that the refitted block output matches the original block output;
2. the units are chosen: any score criterion (``l1``, ``wanda``, ``flap``, ``taylor``... reading
   these statistics through ``criteria.activation``) or a selector (``lasso``, ``greedy``) on the
   Gram-matrix form of ``datadriven.select``;
3. the removed units' rows and columns are zeroed in the working block, and the consumer is
   refitted by ridge least squares over its kept columns (``reconstruct``), or, for ``flap``,
   given FLAP's bias: the removed columns' mean contribution (with ``reconstruct``, the refit
   gets an intercept instead, the best constant rather than the mean);
4. the working block's output feeds the next block.

The result is the plan, the refitted full-size weights (``apply_plan`` slices them) and the new
biases, which ``BlockwiseResult.finish`` adds to the pruned model (``decoder.add_biases``).
``layerwise=False`` computes the same from whole-model forward passes (one per block and
stream): the reference the layer-by-layer runner is tested against. Graphs whose pruned groups
are not heads or MLP channels of supported blocks go to ``datadriven.sequential.run``.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..calibration import Calibration
from ..criteria import Criterion, ScoreContext, score_group
from ..criteria.activation import STATS_KEY, ChannelStats, mean_contribution
from ..datadriven.sequential import DataDrivenResult, model_device
from ..graph import ChannelGraph, Group
from ..plan import GroupPlan, Plan
from . import decoder as dec
from .layerfit import FitStats, group_stats, refit

_CONSUMER = re.compile(r"^(.*\.layers)\.(\d+)\.(self_attn\.o_proj|mlp\.down_proj)$")
STAGES = ("self_attn.o_proj", "mlp.down_proj")
CACHE_BYTES = 1 << 30  # consumer inputs kept between the passes of a block (else recomputed)


@dataclass
class BlockwiseResult(DataDrivenResult):
    """``DataDrivenResult`` plus the biases FLAP's compensation gives layers that had none
    (module path -> bias), added to the pruned model by ``finish``."""

    biases: dict[str, torch.Tensor] = field(default_factory=dict)

    def finish(self, model: nn.Module) -> None:
        """Add the new biases to the pruned ``model`` (see ``decoder.add_biases``)."""
        if self.biases:
            dec.add_biases(model, self.biases)


@dataclass
class _Unit:
    group: Group
    block: int
    stage: str  # one of STAGES
    unit: np.ndarray  # unit of each consumer entry
    pos: np.ndarray  # consumer input column of each entry


def _units(graph: ChannelGraph, todo: list[Group]) -> dict[int, dict[str, list[_Unit]]] | None:
    """Block -> stage -> the pruned groups whose only consumer is that block's o_proj/down_proj
    (None if a group is anything else)."""
    out: dict[int, dict[str, list[_Unit]]] = {}
    for g in todo:
        ins = [m for m in g.members if m.role == "in"]
        match = _CONSUMER.match(ins[0].module) if ins else None
        if match is None or len({m.module for m in ins}) != 1 or g.value_coupled:
            return None
        prefix = f"{match.group(1)}.{match.group(2)}."
        if any(not m.module.startswith(prefix) for m in g.members) or ins[0].pos is None:
            return None
        u = _Unit(g, int(match.group(2)), match.group(3), np.concatenate([m.unit for m in ins]),
                  np.concatenate([m.pos for m in ins]))
        out.setdefault(u.block, {}).setdefault(u.stage, []).append(u)
    return out


def _taylor_terms(graph: ChannelGraph, calib: Calibration, device: torch.device,
                  groups: list[Group]) -> list[dict[tuple[str, int], np.ndarray]]:
    """``criteria.saliency.taylor``'s per-batch terms with the language-model loss (next-token
    cross-entropy on the calibration tokens), on a copy of the dense model."""
    work = copy.deepcopy(graph.model).to(device).float().eval()
    params = {graph.aliases.get(n, n): p for n, p in work.named_parameters()}
    keys = sorted({(m.param, m.dim) for g in groups for m in g.members
                   if m.role != "in" and m.param in params})
    out = []
    for xs, _ in calib:
        ids = xs[0].to(device)
        work.zero_grad(set_to_none=True)
        logits = work(ids, use_cache=False).logits[:, :-1]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        with torch.no_grad():
            terms = {}
            for p, d in keys:
                w = params[p]
                if w.grad is not None:
                    gw = (w.grad * w).double()
                    terms[(p, d)] = gw.sum(dim=[i for i in range(gw.ndim) if i != d]).cpu().numpy()
        out.append(terms)
    del work
    return out


class _Runner:
    """State of one run: settings, the growing plan and weights, timings."""

    def __init__(self, graph: ChannelGraph, calib: Calibration, crit: Criterion,
                 amounts: dict[str, int], reconstruct: bool, sequential: bool, fixed: Plan | None,
                 bias: bool, target: str, device: torch.device, seed: int):
        self.graph, self.calib, self.crit, self.amounts = graph, calib, crit, amounts
        self.reconstruct, self.sequential, self.fixed = reconstruct, sequential, fixed
        self.bias, self.target, self.device = bias, target, device
        self.ctx = ScoreContext(params=graph.params, rng=np.random.default_rng(seed),
                                calibration=calib, graph=graph)
        self.home = model_device(graph.model)
        self.home_dtype = next(graph.model.parameters()).dtype
        half = self.home_dtype in (torch.float16, torch.bfloat16)
        self.dtype = torch.float32 if device.type == "cpu" and half else self.home_dtype
        self.plan: dict[str, GroupPlan] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.biases: dict[str, torch.Tensor] = {}
        self.report: dict[str, dict[str, Any]] = {}
        self.t = {"collect": 0.0, "select": 0.0, "refit": 0.0}
        self.done = 0

    # ---------------------------------------------------------------- one stage of a block
    def settle(self, units: list[_Unit], stats: FitStats, work: nn.Module, progress: Any,
               total: int) -> None:
        """Choose the units of ``units`` (groups read by one consumer) from ``stats``, zero
        them in the working block ``work`` and refit / compensate the consumer."""
        t0 = time.perf_counter()
        u0 = units[0]
        path = f"{_block_prefix(u0)}{u0.stage}"
        lin = work.get_submodule(u0.stage)
        W = lin.weight.detach()
        self.ctx.cache[STATS_KEY] = {path: stats.channel_stats()}
        removed_cols: list[np.ndarray] = []
        for u in units:
            g = u.group
            if progress is not None:
                progress(g.name, self.done, total)
            self.done += 1
            info: dict[str, Any] = {"consumers": 1, "block": u.block}
            k = self.amounts.get(g.name, g.size)
            if self.fixed is not None:
                keep = np.asarray(self.fixed.groups[g.name].keep)
                info["method"] = "plan"
            elif self.crit.kind == "select":
                keep, _ = self.crit.fn(g, group_stats(stats, W, u.unit, u.pos, g.size), k)
                info["method"] = self.crit.name
            else:
                s = score_group(self.crit, g, self.ctx)
                keep = np.lexsort((np.arange(g.size), -s))[:k]
                info["method"] = self.crit.name
            keep = np.sort(np.asarray(keep, dtype=np.int64))
            self.plan[g.name] = GroupPlan(g.size, tuple(int(x) for x in keep))
            gone = np.ones(g.size, dtype=bool)
            gone[keep] = False
            _zero_producers(work, u, gone, self.graph)
            removed_cols.append(np.unique(u.pos[gone[u.unit]]))
            self.report[g.name] = info
        t1 = time.perf_counter()
        removed = np.unique(np.concatenate(removed_cols))
        kept_cols = np.setdiff1d(np.arange(W.shape[1]), removed)
        self._consumer(path, lin, stats, kept_cols, removed, self.report[units[-1].group.name])
        self.t["select"] += t1 - t0
        self.t["refit"] += time.perf_counter() - t1

    def _consumer(self, path: str, lin: nn.Linear, stats: FitStats, kept: np.ndarray,
                  removed: np.ndarray, info: dict[str, Any]) -> None:
        W, b0 = lin.weight.detach(), lin.bias.detach() if lin.bias is not None else None
        comp = None
        if self.bias and removed.size:
            comp = mean_contribution(lin, W, stats.channel_stats(), removed)
            comp = comp + b0 if b0 is not None else comp
        if self.reconstruct and kept.size:
            fit = refit(W, b0, stats, kept, intercept=self.bias or b0 is not None, fallback_bias=comp)
            new_w, new_b = fit.weight, fit.bias
            info["consumers_refit"] = [{"layer": path, **fit.info}]
        else:
            new_w = W.clone()
            new_w[:, torch.as_tensor(removed, dtype=torch.long, device=W.device)] = 0
            new_b = comp if comp is not None else b0
        with torch.no_grad():
            lin.weight.copy_(new_w)
            if new_b is not None and lin.bias is None:
                lin.bias = nn.Parameter(new_b.clone())
            elif new_b is not None:
                lin.bias.copy_(new_b)
        if self.reconstruct:
            self.weights[self.graph.aliases[f"{path}.weight"]] = _home(new_w, self)
        if new_b is not None and (self.reconstruct or comp is not None):
            canon = self.graph.aliases.get(f"{path}.bias")
            if canon is not None:
                self.weights[canon] = _home(new_b, self)
            else:
                self.biases[path] = _home(new_b, self)


def _home(t: torch.Tensor, r: _Runner) -> torch.Tensor:
    return t.detach().to(r.home, r.home_dtype).clone()


def _block_prefix(u: _Unit) -> str:
    return u.group.members[[m.role for m in u.group.members].index("in")].module[: -len(u.stage)]


def _zero_producers(work: nn.Module, u: _Unit, gone: np.ndarray, graph: ChannelGraph) -> None:
    """Zero the removed units' slices of every member inside the working block (the consumer's
    columns are set by the refit)."""
    prefix = _block_prefix(u)
    local = {graph.aliases.get(prefix + n, prefix + n): t for n, t in work.named_parameters()}
    with torch.no_grad():
        for m in u.group.members:
            t = local.get(m.param)
            sel = gone[m.unit]
            if t is not None and m.role != "in" and sel.any():
                idx = torch.as_tensor(np.unique(m.index[sel]), dtype=torch.long, device=t.device)
                t.index_fill_(m.dim, idx, 0)


def _bytes(ts: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _block(r: _Runner, i: int, orig: nn.Module, work: nn.Module, Ho: list, Hp: list | None,
           kws: list[dict], stages: dict[str, list[_Unit]], progress: Any, total: int) -> None:
    """Prune block ``i`` (``work`` is its working copy, changed in place) and move both streams
    past it: ``Ho`` (original) and ``Hp`` (pruned so far) are replaced batch by batch by the
    next block's inputs, so two streams are held, not one per stage."""
    seq = Hp is not None
    full = r.reconstruct or r.crit.kind == "select"
    att, mlp_units = stages.get(STAGES[0], []), stages.get(STAGES[1], [])
    sa, sm = FitStats(full), FitStats(full)
    to, tw = dec.Taps(orig), dec.Taps(work)
    try:
        t0 = time.perf_counter()
        a_cache: list[torch.Tensor] = []
        d_layer: list[torch.Tensor] = []  # the MLP's own original output ('layer' target)
        keep_a = seq and _bytes(Ho) * 4 < CACHE_BYTES
        with torch.no_grad():
            for b, h in enumerate(Ho):
                a_o = dec.attention(orig, h, kws[b])
                h1o = h + a_o
                d_o = dec.mlp(orig, h1o)
                Ho[b] = h1o + d_o
                if not seq:
                    sa.add(to.a, a_o)
                    sm.add(to.m, d_o)
                    continue
                if att:
                    dec.attention(work, Hp[b], kws[b])
                    sa.add(tw.a, (h1o - Hp[b]) if r.target == "block" else a_o)
                    if keep_a:
                        a_cache.append(tw.a)
                if r.target == "layer":
                    d_layer.append(d_o)
        r.t["collect"] += time.perf_counter() - t0
        if att:
            r.settle(att, sa, work, progress, total)
        if not seq:
            if mlp_units:
                r.settle(mlp_units, sm, work, progress, total)
            return
        t0 = time.perf_counter()
        m_cache: list[torch.Tensor] = []
        with torch.no_grad():
            for b, h in enumerate(Hp):
                upd = work.self_attn.o_proj(a_cache[b]) if a_cache else dec.attention(work, h, kws[b])
                Hp[b] = h1p = h + upd
                if mlp_units:
                    dec.mlp(work, h1p)
                    sm.add(tw.m, (Ho[b] - h1p) if r.target == "block" else d_layer[b])
                    if _bytes(m_cache) + tw.m.numel() * tw.m.element_size() < CACHE_BYTES:
                        m_cache.append(tw.m)
            del a_cache, d_layer
        r.t["collect"] += time.perf_counter() - t0
        if mlp_units:
            r.settle(mlp_units, sm, work, progress, total)
        with torch.no_grad():
            for b, h1 in enumerate(Hp):
                Hp[b] = h1 + (work.mlp.down_proj(m_cache[b]) if b < len(m_cache) else dec.mlp(work, h1))
    finally:
        to.close()
        tw.close()


def run(graph: ChannelGraph, calib: Calibration, crit: Criterion, amounts: dict[str, int], *,
        reconstruct: bool = True, sequential: bool = True, fallback: str = "l1", seed: int = 0,
        meta: dict[str, Any] | None = None, progress: dec.Progress | None = None,
        fixed: Plan | None = None, device: torch.device | str | None = None,
        layerwise: bool = True, bias: bool | None = None, target: str = "block") -> DataDrivenResult:
    """Choose the heads and MLP channels of a Hugging Face decoder block by block and refit the
    consumers (see the module docstring); the same signature and result as
    ``datadriven.sequential.run``, which it hands over to for other graphs.

    ``bias`` (default: the method is ``flap``) adds FLAP's mean compensation; ``target``
    'block' (match the original block output, correcting the error the pruned stream carries) or
    'layer' (match the consumer's own original output); ``device`` where each block is
    processed (default: the model's); ``layerwise=False`` runs whole-model passes instead.

    Example:
        >>> dd = run(graph, as_calibration(ids), get_criterion("greedy"), amounts)
        >>> small = apply_plan(graph, dd.plan, weights=dd.weights).model; dd.finish(small)
    """
    model = graph.model
    layers = dec.decoder_layers(model)
    todo = [g for g in graph.groups if g.prunable and amounts.get(g.name, g.size) < g.size]
    blocks = _units(graph, todo) if layers is not None and dec.supports(model) else None
    if blocks is None:
        from ..datadriven import sequential as seq

        return seq.run(graph, calib, crit, amounts, reconstruct=reconstruct, sequential=sequential,
                       fallback=fallback, seed=seed, meta=meta, progress=progress, fixed=fixed,
                       device=device)
    t0 = time.perf_counter()
    device = model_device(model) if device is None else torch.device(device)
    r = _Runner(graph, calib, crit, amounts, reconstruct, sequential, fixed,
                crit.name == "flap" if bias is None else bool(bias), target, device, seed)
    if crit.name == "taylor" and fixed is None:
        r.ctx.cache["taylor"] = _taylor_terms(graph, calib, device, todo)
    batches = [xs for xs, _ in calib]
    work_model = None if layerwise else copy.deepcopy(model).to(device, r.dtype).eval()
    Ho = Hp = kws = None
    if layerwise:
        first = dec.block_inputs(model, layers[0], batches, device, r.dtype)
        Ho = [h for h, _ in first]
        kws = [kw for _, kw in first]
        Hp = [h.clone() for h in Ho] if sequential else None
        probe = copy.deepcopy(layers[0]).to(device, r.dtype).eval()
        err = dec.check_block(probe, Ho[0], kws[0])
        if err > 1e-4:
            from ..datadriven import sequential as seq

            del probe
            return seq.run(graph, calib, crit, amounts, reconstruct=reconstruct, sequential=sequential,
                           fallback=fallback, seed=seed, meta=meta, progress=progress, fixed=fixed)
        del probe
    t1 = time.perf_counter()
    last = max(blocks)
    for i in range(last + 1):
        same = device == r.home and r.dtype == r.home_dtype
        orig = layers[i] if same else copy.deepcopy(layers[i]).to(device, r.dtype)
        orig.eval()
        if layerwise:
            work = copy.deepcopy(orig) if i in blocks else orig
        else:
            work = work_model.model.layers[i]
            got = dec.block_inputs(model, layers[i], batches, device, r.dtype)
            Ho, kws = [h for h, _ in got], [kw for _, kw in got]
            Hp = ([h for h, _ in dec.block_inputs(work_model, work, batches, device, r.dtype)]
                  if sequential else None)
        _block(r, i, orig, work, Ho, Hp, kws, blocks.get(i, {}), progress, len(todo))
        del work, orig
    plan = Plan(groups=r.plan, meta=dict(meta or {}))
    timings = {"targets": t1 - t0, **r.t}
    return BlockwiseResult(plan, r.weights, r.report, timings, None, r.biases)


def dense_stats(model: nn.Module, calib: Calibration, device: torch.device | str | None = None
                ) -> dict[str, ChannelStats]:
    """Input statistics of every block's ``o_proj`` and ``down_proj`` on the DENSE model,
    collected block by block (one block in memory, computed in float32 on CPU): what FLAP's
    adaptive allocation ranks (``pruning.flap_amounts``)."""
    layers = dec.decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    device = model_device(model) if device is None else torch.device(device)
    home_dtype = next(model.parameters()).dtype
    dtype = torch.float32 if device.type == "cpu" and home_dtype in (torch.float16, torch.bfloat16) \
        else home_dtype
    first = dec.block_inputs(model, layers[0], [xs for xs, _ in calib], device, dtype)
    H, kws = [h for h, _ in first], [kw for _, kw in first]
    out: dict[str, ChannelStats] = {}
    for i, layer in enumerate(layers):
        same = device == model_device(model) and dtype == home_dtype
        blk = layer if same else copy.deepcopy(layer).to(device, dtype)
        taps = dec.Taps(blk)
        a_path, m_path = f"{prefix}.{i}.{STAGES[0]}", f"{prefix}.{i}.{STAGES[1]}"
        try:
            with torch.no_grad():
                for b, h in enumerate(H):
                    h1 = h + dec.attention(blk, h, kws[b])
                    H[b] = h1 + dec.mlp(blk, h1)
                    for path, x in ((a_path, taps.a), (m_path, taps.m)):
                        s = ChannelStats.of(x, -1)
                        out[path] = out[path] + s if path in out else s
        finally:
            taps.close()
        del blk
    return out


def output_fidelity(a: nn.Module, b: nn.Module, calib: Calibration,
                    reference: list[Any] | None = None) -> dict[str, float]:
    """``datadriven.sequential.output_fidelity`` that also reads a ``ModelOutput``'s logits."""
    if dec.supports(a):
        return dec.logits_fidelity(a, b, calib)
    from ..datadriven.sequential import output_fidelity as generic

    return generic(a, b, calib, reference)


__all__ = ["BlockwiseResult", "dense_stats", "output_fidelity", "run"]
