"""The probe of a region graph (stage 1, after the regions are tied together): every prunable group
has about a quarter of its channels removed, the whole pruned model runs, and every value that
untraceable code produces or reads must equal the masked original's; groups that fail are
bisected and frozen with the reason.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .graph import ChannelGraph
from .probe import TOLERANCE, masked_copy
from .regions import RegionTraced, rel_error, run_regions, structure


def _differs(what: str, a: Any, b: Any, values: bool) -> str | None:
    if not isinstance(b, torch.Tensor):
        return None
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return f"{what} changes shape"
    err = rel_error(a, b)
    if values and err > TOLERANCE:
        return f"{what} differs from the masked original by {err:.1e}"
    return None


def _probe_keep(n: int) -> tuple[int, ...]:
    """A quarter of the channels, spread out and at both ends (code that reads ``x[:, :k]`` or
    ``x[:, -k:]`` sees other channels)."""
    gone = set(range(0, n, 4)) | {n - 1}
    keep = tuple(i for i in range(n) if i not in gone)
    return keep or (n - 1,)


def _perturbed(model: nn.Module, scale: float = 1e-5) -> nn.Module:
    """A copy whose parameters are scaled by 1 + ``scale`` * noise (zeros stay zeros)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.is_floating_point():
                p.mul_(1 + scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def _leaves(run: tuple[dict, dict, Any], regions: list[RegionTraced]) -> dict[str, Any]:
    """What a probe compares: every frozen region output, every region input made by untraceable
    code (as the model computed it) and every leaf of the model's output."""
    got_in, got_out, y = run
    out = {f"output {k} of the model": v for k, v in enumerate(tree_flatten(y)[0])}
    for r in regions:
        ins, outs = got_in.get(r.region, []), got_out.get(r.region, [])
        out.update({f"input {k} of region '{r.region}'": v for k, v in enumerate(ins)
                    if k not in r.linked})
        out.update({f"output {k} of region '{r.region}'": outs[k] for k in r.closed if k < len(outs)})
    return out


def _fails(graph: ChannelGraph, groups: list[Any]) -> str | None:
    """Why removing about a quarter of ``groups``' channels breaks the model, or None.

    The pruned model must run and keep the structure of its output, and every value
    ``_leaves`` names must be the masked original's, except values that are not stable: those
    that change when the masked original's weights are perturbed by 1e-5 (a top-k or an NMS
    that flips on rounding noise), which cannot tell a wrong pruning from noise. Regions are fed
    the masked original's boxes, so that their outputs stay comparable when a selection flips.
    """
    from .apply.shrink import apply_plan
    from .plan import GroupPlan, Plan

    plan = Plan({g.name: GroupPlan(g.size, _probe_keep(g.size)) for g in groups})
    regions = [t for t in graph.traced if isinstance(t, RegionTraced)]
    inputs = regions[0].inputs
    try:
        applied = apply_plan(graph, plan, verify=False)
        masked = masked_copy(graph.model, applied.masks)
        ref = run_regions(masked, regions, inputs)
        pert = run_regions(_perturbed(masked), regions, inputs, reference=ref[0])
        got = run_regions(applied.model, regions, inputs, reference=ref[0])
    except Exception as e:  # the model's own code no longer runs: that is the finding
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if structure(got[2]) != structure(ref[2]):
        return "the model's output changes structure"
    values = not any(g.value_coupled for g in groups)
    want, noisy, have = _leaves(ref, regions), _leaves(pert, regions), _leaves(got, regions)
    for what, b in want.items():
        if not isinstance(b, torch.Tensor) or _differs(what, noisy.get(what), b, True):
            continue  # not a tensor, or not stable under noise
        why = _differs(what, have.get(what), b, values)
        if why is not None:
            return why
    return None


def probe_regions(graph: ChannelGraph) -> dict[str, str]:
    """Prunable groups of a region graph whose removal breaks the whole model or changes a
    frozen region output: group name -> why (``graph.with_frozen`` applies it)."""
    frozen: dict[str, str] = {}

    def visit(gs: list[Any]) -> None:
        why = _fails(graph, gs)
        if why is None:
            return
        if len(gs) == 1:
            frozen[gs[0].name] = why
            return
        visit(gs[:len(gs) // 2])
        visit(gs[len(gs) // 2:])

    if graph.prunable_groups:
        visit(list(graph.prunable_groups))
    return {n: f"pruning it breaks the model outside the traced regions ({why})"[:300]
            for n, why in frozen.items()}
