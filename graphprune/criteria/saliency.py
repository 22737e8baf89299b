"""Scores that need more than the weights of the producers: network slimming's BatchNorm scale
(Liu et al., ICCV 2017) and first-order Taylor importance (Molchanov et al., CVPR 2019)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..graph import Group
from .registry import ScoreContext, criterion


# ---------------------------------------------------------------------- data-based scores
@criterion("bn_scale")
def bn_scale(group: Group, ctx: ScoreContext) -> np.ndarray:
    """|gamma| of the group's BatchNorm layers, summed (network slimming, Liu et al. ICCV 2017);
    groups without a BatchNorm fall back to l1."""
    total = np.zeros(group.size)
    found = False
    for m in group.members:
        mod = ctx.graph.modules.get(m.module) if ctx.graph is not None else None
        if m.param.endswith(".weight") and isinstance(mod, nn.modules.batchnorm._BatchNorm):
            w = ctx.params[m.param].detach().abs().double().cpu().numpy()
            total += np.bincount(m.unit, weights=w[m.index], minlength=group.size)
            found = True
    if not found:
        from .magnitude import l1

        return l1(group, ctx)
    return total


@criterion("taylor", needs_data=True)
def taylor(group: Group, ctx: ScoreContext) -> np.ndarray:
    """First-order Taylor importance (Molchanov et al., CVPR 2019): per calibration batch,
    (sum over the channel's parameters of gradient x weight)^2, averaged over batches. The loss is
    cross-entropy against the labels, or against the model's own predictions if there are none."""
    per_batch = ctx.cache.get("taylor")
    if per_batch is None:
        per_batch = ctx.cache["taylor"] = _taylor_terms(ctx)
    total = np.zeros(group.size)
    for terms in per_batch:
        unit_sum = np.zeros(group.size)
        for m in group.members:
            v = terms.get((m.param, m.dim)) if m.role != "in" else None  # the channel's own params
            if v is not None:
                unit_sum += np.bincount(m.unit, weights=v[m.index], minlength=group.size)
        total += unit_sum ** 2
    return total / max(1, len(per_batch))


def _taylor_terms(ctx: ScoreContext) -> list[dict[tuple[str, int], np.ndarray]]:
    """Per batch: for every (parameter, dim) member key, sum of grad*weight per index. Runs on a
    copy of the model, on ``ctx.device`` if the context has one, else where the model lives."""
    import copy

    from ..datadriven.collect import batch_inputs
    from ..datadriven.sequential import model_device

    graph = ctx.graph
    device = getattr(ctx, "device", None) or model_device(graph.model)
    model = copy.deepcopy(graph.model).to(device).eval()
    params = dict(model.named_parameters())
    keys = sorted({(m.param, m.dim) for m in graph.members if m.param in params})
    out = []
    for xs, y in ctx.calibration:
        model.zero_grad(set_to_none=True)
        logits = model(*batch_inputs(xs, device))
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        target = y.to(logits.device) if y is not None else logits.detach().argmax(-1)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 target.reshape(-1))
        loss.backward()
        terms = {}
        with torch.no_grad():
            for p, d in keys:
                w = params[p]
                if w.grad is None:
                    continue
                gw = (w.grad * w).double()
                other = [i for i in range(gw.ndim) if i != d]
                terms[(p, d)] = (gw.sum(dim=other) if other else gw).cpu().numpy()
        out.append(terms)
    return out
