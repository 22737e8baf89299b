"""Probe a torch.export graph for size arithmetic the exporter specialised away.

torch.fx keeps ``C = x.shape[-1]; q.reshape(B, N, H, C // H)`` as graph nodes, so the rules see
that the reshape depends on a channel count and freeze it. ``torch.export`` evaluates such
arithmetic on the example inputs and leaves literals (``reshape(1, 197, 3, 64)``): the graph no
longer shows the dependency, yet the model's own code still computes it after pruning. So an
export graph is checked empirically before anyone may prune it: every prunable group loses a
quarter of its channels at once, the shrunk model runs on the example inputs, and its output must
equal the original with those channels zeroed (groups whose removal changes other channels'
values, such as LayerNorm's, are only required to run and keep the output shape). Failing sets
are bisected down to single groups, which are frozen with the reason.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._modcopy import fake_run
from .trace import on_meta, preserved_state

if TYPE_CHECKING:
    from .graph import ChannelGraph, Group

TOLERANCE = 1e-3


def _outputs(y: Any) -> list[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (list, tuple)):
        return [t for v in y for t in _outputs(v)]
    return []


def _run(model: torch.nn.Module, inputs: tuple, mode: str) -> list[torch.Tensor]:
    args, kwargs = inputs
    with preserved_state(model, mode):
        if on_meta(model):
            with fake_run(args, kwargs) as (fa, fk):
                return _outputs(model(*fa, **fk))
        return _outputs(model(*args, **kwargs))


def _plan_for(groups: list[Group]):
    from .plan import GroupPlan, Plan

    return Plan({g.name: GroupPlan(g.size, tuple(range(g.size - max(1, g.size // 4))))
                 for g in groups})


def masked_copy(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with every masked entry of its parameters and buffers set to zero: what
    the shrunk model must compute (the probes' reference)."""
    m = copy.deepcopy(model)
    sd = m.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, mk in masks.items():
            sd[k].mul_(mk.to(sd[k].dtype))
    return m


def _fails(graph: ChannelGraph, groups: list[Group], ref: list[torch.Tensor]) -> str | None:
    """Why shrinking ``groups`` breaks the model, or None."""
    from .apply.shrink import apply_plan

    t = graph.traced[0]
    try:
        applied = apply_plan(graph, _plan_for(groups), verify=False)
        got = _run(applied.model, t.inputs, t.mode)
    except Exception as e:  # the model's own code no longer runs: that is the finding
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if [tuple(y.shape) for y in got] != [tuple(y.shape) for y in ref]:
        return "the output shape changes"
    if on_meta(graph.model) or any(g.value_coupled for g in groups):
        return None
    want = _run(masked_copy(graph.model, applied.masks), t.inputs, t.mode)
    for a, b in zip(got, want):
        if a.is_floating_point():
            err = float((a - b).norm() / b.norm().clamp_min(1e-30))
            if err > TOLERANCE:
                return f"the output differs from the masked original by {err:.1e}"
    return None


def probe_export_graph(graph: ChannelGraph) -> dict[str, str]:
    """The prunable groups of a torch.export graph whose removal breaks the model's own size
    arithmetic: group name -> why it must be frozen (``graph.with_frozen`` applies it)."""
    groups = list(graph.prunable_groups)
    if not groups:
        return {}
    t = graph.traced[0]
    ref = _run(graph.model, t.inputs, t.mode)
    frozen: dict[str, str] = {}

    def visit(gs: list[Group]) -> None:
        why = _fails(graph, gs, ref)
        if why is None:
            return
        if len(gs) == 1:
            frozen[gs[0].name] = why
            return
        half = len(gs) // 2
        visit(gs[:half])
        visit(gs[half:])

    visit(groups)
    return {name: ("torch.export specialised size arithmetic that depends on these channels "
                   f"(a probe pruning them failed: {why})")[:300] for name, why in frozen.items()}
