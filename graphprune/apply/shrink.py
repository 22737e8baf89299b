"""Apply a Plan to a model: slice every coupled parameter, refresh module attributes, and check
that every intermediate tensor of the new model has exactly the shape the plan implies."""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..errors import ParityError, PlanError
from ..graph import ChannelGraph
from ..plan import Plan
from ..rules.builder import TInfo
from ..rules.registry import resizer_for
from ..trace import TensorSpec, preserved_state, record_values, symbolic_trace


@dataclass
class Applied:
    """Result of applying a plan: the new model, the masks (original shapes), kept indices."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    kept: dict[str, dict[int, np.ndarray]]  # canonical param -> dim -> kept indices
    shapes: dict[tuple[int, str], Any] = field(default_factory=dict)  # expected node shapes


def comp_keep_from_plan(graph: ChannelGraph, plan: Plan) -> np.ndarray:
    plan.validate(graph)
    keep = np.ones(graph.ncomp, dtype=bool)
    for name, gp in plan.groups.items():
        g = graph.group(name)
        mask = np.ones(g.size, dtype=bool)
        mask[list(gp.keep)] = False
        keep[g.comps[mask]] = False
    return keep


def kept_indices(graph: ChannelGraph, comp_keep: np.ndarray) -> dict[str, dict[int, np.ndarray]]:
    """For every parameter dim that loses entries: the indices it keeps."""
    removed: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
    kept_seen: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
    for m in graph.builder.members:
        k = comp_keep[graph.comp[m.elems]]
        if not k.all():
            removed[(m.param, m.dim)].append(m.index[~k])
        kept_seen[(m.param, m.dim)].append(m.index[k])
    out: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for (p, d), rs in removed.items():
        r = np.unique(np.concatenate(rs))
        clash = np.intersect1d(r, np.concatenate(kept_seen[(p, d)]))
        if clash.size:  # the tie coupling makes this impossible; guard against rule bugs
            raise PlanError(f"internal: index {clash[0]} of '{p}' dim {d} is both kept and removed")
        n = graph.params[p].shape[d]
        out[p][d] = np.setdiff1d(np.arange(n), r)
    return dict(out)


def _shape_of(info: Any, spec: Any, elem_keep: np.ndarray) -> Any:
    if isinstance(spec, TensorSpec):
        shape = list(spec.shape)
        if isinstance(info, TInfo):
            for a in info.axes:
                k = elem_keep[a.elems()].reshape(a.sizes)
                for j, d in enumerate(a.dims):
                    other = tuple(x for x in range(len(a.dims)) if x != j)
                    shape[d] = int(k.any(axis=other).sum()) if other else int(k.sum())
        return tuple(shape)
    if isinstance(spec, (list, tuple)) and not isinstance(spec, torch.Size):
        infos = info if isinstance(info, (list, tuple)) else [None] * len(spec)
        return tuple(_shape_of(i, s, elem_keep) for i, s in zip(infos, spec))
    return None


def expected_shapes(graph: ChannelGraph, comp_keep: np.ndarray) -> dict[tuple[int, str], Any]:
    """(trace index, node name) -> the shape the node's value must have after pruning."""
    elem_keep = comp_keep[graph.comp]
    b = graph.builder
    out = {}
    for k, t in enumerate(graph.traced):
        for node in t.gm.graph.nodes:
            spec = t.values.get(node)
            if spec is not None:
                out[(k, node.name)] = _shape_of(b.infos.get(node), spec, elem_keep)
    return out


def _copy_model(model: nn.Module, keep_ids: set[int]) -> nn.Module:
    """Deep copy that shares (does not copy) the tensors in ``keep_ids``; they are replaced."""
    memo = {i: t for t in list(model.parameters()) + list(model.buffers()) if (i := id(t)) in keep_ids}
    return copy.deepcopy(model, memo)


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor, like: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    m = root.get_submodule(owner) if owner else root
    if isinstance(like, nn.Parameter):
        m._parameters[attr] = value
    else:
        m._buffers[attr] = value


def apply_plan(graph: ChannelGraph, plan: Plan, *, inplace: bool = False,
               verify: bool = True) -> Applied:
    """Physically apply ``plan`` to the graph's model.

    Returns a new model (the original is untouched unless ``inplace``) whose coupled parameters
    are sliced and whose modules report their new sizes. With ``verify`` the new model is run on
    the example inputs and every traced value must have the shape the plan implies.
    """
    comp_keep = comp_keep_from_plan(graph, plan)
    kept = kept_indices(graph, comp_keep)
    model = graph.model
    names_of: dict[str, list[str]] = defaultdict(list)
    for alias, canon in graph.aliases.items():
        names_of[canon].append(alias)
    pruned_ids = {id(graph.params[p]) for p in kept}
    all_ids = {id(t) for t in graph.params.values()}
    new = model if inplace else _copy_model(model, all_ids)
    with torch.no_grad():
        for canon, t in graph.params.items():
            if canon in kept:
                v = t.detach()
                for d, idx in sorted(kept[canon].items()):
                    v = v.index_select(d, torch.as_tensor(idx, device=v.device))
                v = v.clone()
            elif inplace:
                continue
            else:
                v = t.detach().clone()
            if isinstance(t, nn.Parameter):
                v = nn.Parameter(v, requires_grad=t.requires_grad)
            for alias in names_of[canon]:
                _set_tensor(new, alias, v, t)
    shapes = expected_shapes(graph, comp_keep)
    _resize_modules(graph, new, shapes, pruned_ids)
    masks = masks_from_kept(graph, kept, names_of)
    if verify:
        verify_shapes(graph, new, shapes)
    return Applied(new, masks, kept, shapes)


def _resize_modules(graph: ChannelGraph, new: nn.Module, shapes: dict, pruned_ids: set[int]) -> None:
    touched: dict[str, Any] = {}
    for k, t in enumerate(graph.traced):
        for node in t.gm.graph.nodes:
            if node.op == "call_module" and node.args and isinstance(node.args[0], fx.Node):
                touched[node.target] = shapes.get((k, node.args[0].name))
    # modules whose parameters were sliced but that are not leaves (e.g. LayerNorm2d)
    for name, m in graph.model.named_modules():
        if name not in touched and any(id(p) in pruned_ids for p in
                                       list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))):
            touched[name] = None
    for name, in_shape in touched.items():
        m = new.get_submodule(name)
        fn = resizer_for(m)
        if fn is not None and (in_shape is None or isinstance(in_shape, tuple)):
            fn(m, in_shape)


def masks_from_kept(graph: ChannelGraph, kept: dict[str, dict[int, np.ndarray]],
                    names_of: dict[str, list[str]] | None = None) -> dict[str, torch.Tensor]:
    """Boolean masks (True = kept) of the original shapes, for every state_dict name that lost
    entries."""
    if names_of is None:
        names_of = defaultdict(list)
        for alias, canon in graph.aliases.items():
            names_of[canon].append(alias)
    masks = {}
    for canon, dims in kept.items():
        t = graph.params[canon]
        m = torch.ones(t.shape, dtype=torch.bool)
        for d, idx in dims.items():
            rem = np.setdiff1d(np.arange(t.shape[d]), idx)
            m.index_fill_(d, torch.as_tensor(rem, dtype=torch.long), False)
        for alias in names_of[canon]:
            masks[alias] = m
    return masks


def _flat_shapes(v: Any) -> Any:
    if isinstance(v, TensorSpec):
        return v.shape
    if isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
        return tuple(_flat_shapes(x) for x in v)
    return None


def verify_shapes(graph: ChannelGraph, new: nn.Module, shapes: dict) -> None:
    """Trace the new model again and run it; every value must have the shape the plan implies.

    Re-tracing (rather than re-running the old graph) runs the new model's own code, with the
    module attributes the resizers refreshed.
    """
    for k, t in enumerate(graph.traced):
        args, kwargs = t.inputs
        try:
            with preserved_state(new, t.mode):
                gm2, _ = symbolic_trace(new, leaf_types=t.leaf_types)
                values = record_values(gm2, args, kwargs)
        except Exception as e:
            raise ParityError(
                f"internal: the pruned model no longer runs ({e}). This is a graphprune bug; "
                "please report it with the model. Work around it by passing ignore=[...] for the "
                "module named in the message.") from e
        for node in gm2.graph.nodes:
            want = shapes.get((k, node.name))
            got = _flat_shapes(values.get(node))
            if want is not None and got is not None and want != got:
                raise ParityError(
                    f"internal: after pruning, node '{node.name}' ({node.format_node()}) has shape "
                    f"{got} but the plan implies {want}. This is a graphprune bug; please report it "
                    "with the model. Work around it with ignore=[...] for the modules involved.")
