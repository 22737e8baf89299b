"""Apply a Plan to a model: slice every coupled parameter, refresh module attributes, and check
that every intermediate tensor of the new model has exactly the shape the plan implies."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .._checks import checks
from ..errors import ParityError, PlanError
from ..graph import ChannelGraph
from ..plan import Plan, comp_keep_for
from ..rules.elements import TInfo
from ..rules.registry import resizer_for
from .._metashape import STOCK_LAYERS, patched, stock_output
from .._modcopy import copy_tree, fake_run, share, to_meta
from ..trace import (
    TensorSpec,
    export_trace,
    on_meta,
    preserved_state,
    record_values,
    symbolic_trace,
)


@dataclass
class Applied:
    """Result of applying a plan: the new model, kept indices, expected shapes; ``masks`` (the
    original shapes, True = kept) are built on first access."""

    model: nn.Module
    kept: dict[str, dict[int, np.ndarray]]  # canonical param -> dim -> kept indices
    shapes: dict[tuple[int, str], Any]  # expected node shapes
    graph: ChannelGraph = field(repr=False)
    _masks: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        if self._masks is None:
            self._masks = masks_from_kept(self.graph, self.kept)
        return self._masks


def comp_keep_from_plan(graph: ChannelGraph, plan: Plan) -> np.ndarray:
    plan.validate(graph)
    return comp_keep_for(graph, plan)


def kept_indices(graph: ChannelGraph, comp_keep: np.ndarray) -> dict[str, dict[int, np.ndarray]]:
    """For every parameter dim that loses entries: the indices it keeps."""
    m_comp, offset, flat = graph.flat_layout
    k = comp_keep[m_comp]
    if k.all():
        return {}
    # one flat boolean space: (param, dim) key -> its slice of indices
    gone = np.zeros(int(offset[-1]), dtype=bool)
    gone[flat[~k]] = True
    if gone[flat[k]].any():  # the tie coupling makes this impossible; guard against rule bugs
        raise PlanError("internal: a parameter index is both kept and removed")
    left = np.flatnonzero(~gone)  # every kept index, in flat space (sorted)
    rel = left - offset[np.searchsorted(offset, left, side="right") - 1]  # index in its dim
    keys = np.flatnonzero(np.bincount(graph.m_key[~k], minlength=len(offset) - 1))
    lo = np.searchsorted(left, offset[keys]).tolist()
    hi = np.searchsorted(left, offset[keys + 1]).tolist()
    out: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for key, a, z in zip(keys.tolist(), lo, hi):
        p, d = graph.member_keys[key]
        out[p][d] = rel[a:z].copy()
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
    infos = graph.infos
    out = {}
    for k, t in enumerate(graph.traced):
        for node in t.graph.nodes:
            spec = t.values.get(node)
            if spec is not None:
                out[(k, node.name)] = _shape_of(infos.get(node), spec, elem_keep)
    return out


def _copy_model(model: nn.Module) -> nn.Module:
    """A new module tree sharing the model's tensors (the caller replaces every one of them)."""
    return copy_tree(model, share)


def _set_tensor(mods: dict[str, nn.Module], name: str, value: torch.Tensor,
                like: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    m = mods[owner]
    if isinstance(like, nn.Parameter):
        m._parameters[attr] = value
    else:
        m._buffers[attr] = value


def apply_plan(graph: ChannelGraph, plan: Plan, *, inplace: bool = False,
               verify: bool | str | None = None,
               weights: dict[str, torch.Tensor] | None = None) -> Applied:
    """Physically apply ``plan`` to the graph's model.

    Returns a new model (the original is untouched unless ``inplace``) whose coupled parameters
    are sliced and whose modules report their new sizes. With ``verify`` the new model is run on
    the example inputs and the input and output of every layer must have the shape the plan
    implies; ``verify="full"`` traces the new model again and checks every intermediate value
    (default: ``graphprune.checks().verify``).
    ``weights`` replaces tensors (canonical name -> full-size tensor, e.g. refitted consumers)
    before they are sliced.

    Raises:
        PlanError: the plan does not fit the graph.
        ParityError: the rewritten model does not have the shapes the plan implies (a bug).

    Example:
        >>> g = graphprune.trace(model, x)
        >>> small = graphprune.apply_plan(g, graphprune.make_plan(g, sparsity=0.5)).model
    """
    comp_keep = comp_keep_from_plan(graph, plan)
    kept = kept_indices(graph, comp_keep)
    model = graph.model
    names_of: dict[str, list[str]] = defaultdict(list)
    for alias, canon in graph.aliases.items():
        names_of[canon].append(alias)
    # owners of sliced tensors, by name (with inplace=True the tensors are replaced below)
    pruned_owners = {alias.rpartition(".")[0] for canon in kept for alias in names_of[canon]}
    new = model if inplace else _copy_model(model)
    mods = dict(new.named_modules(remove_duplicate=False))
    with torch.no_grad():
        for canon, t in graph.params.items():
            src = weights.get(canon, t) if weights else t
            if canon in kept:
                v = src.detach()
                for d, idx in sorted(kept[canon].items()):  # index_select copies
                    v = v.index_select(d, torch.as_tensor(idx, device=v.device))
            elif inplace and src is t:
                continue
            else:
                v = src.detach().clone()
            if isinstance(t, nn.Parameter):
                v = nn.Parameter(v, requires_grad=t.requires_grad)
            for alias in names_of[canon]:
                _set_tensor(mods, alias, v, t)
    shapes = expected_shapes(graph, comp_keep)
    _resize_modules(graph, mods, shapes, pruned_owners)
    if verify is None:
        verify = checks().verify
    if verify and graph.tracer == "regions":
        from ..regions import verify_regions  # the whole model runs natively once

        verify_regions(graph, new, shapes)
    elif verify == "full":
        verify_shapes(graph, new, shapes)
    elif verify:
        verify_layers(graph, new, shapes, mods)
    return Applied(new, kept, shapes, graph)


def _resize_modules(graph: ChannelGraph, mods: dict[str, nn.Module], shapes: dict,
                    pruned_owners: set[str]) -> None:
    touched: dict[str, Any] = {}
    for k, t in enumerate(graph.traced):
        for node in t.graph.nodes:
            if node.op == "call_module" and node.args and isinstance(node.args[0], fx.Node):
                touched[node.target] = shapes.get((k, node.args[0].name))
    # modules whose parameters were sliced but that are not leaves (e.g. LayerNorm2d), their
    # ancestors (a Swin attention whose qkv Linear changed computes with its width), and every
    # recurrent module: its kernel reads a list of the tensors that were just replaced
    rnns = {n for n, m in mods.items() if isinstance(m, nn.RNNBase)}
    ancestors = {name.rsplit(".", k)[0] for name in pruned_owners for k in range(1, name.count(".") + 1)}
    for name in pruned_owners | ancestors | rnns:
        if name not in touched and name in mods:
            touched[name] = None
    for name, in_shape in touched.items():
        m = mods[name]
        fn = resizer_for(m)
        if fn is not None and (in_shape is None or isinstance(in_shape, tuple)):
            fn(m, in_shape)
    # head counts / widths that user code passes to reshape as module attributes: the new size
    # of a node's dim, divided by ``per`` (query heads per key/value head: divided by the heads)
    ks = {id(t.graph): k for k, t in enumerate(graph.traced)}
    for path, attr, node, d, *per in graph.attr_sizes:
        shape = shapes.get((ks.get(id(node.graph), 0), node.name))
        if isinstance(shape, tuple) and d < len(shape) and isinstance(shape[d], int):
            setattr(mods[path], attr, shape[d] // (per[0] if per else 1))


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
            v = torch.zeros(t.shape[d], dtype=torch.bool)
            v[torch.as_tensor(idx, dtype=torch.long)] = True
            view = [1] * t.ndim
            view[d] = -1
            m &= v.view(view)
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
    diverged = False
    for k, t in enumerate(graph.traced):
        args, kwargs = t.inputs
        try:
            if t.tracer == "torch.export":
                t2 = export_trace(new, None, mode=t.mode, inputs=(args, kwargs))
                graph2, values = t2.graph, t2.values
            else:
                with preserved_state(new, t.mode):
                    root2, graph2, _, _ = symbolic_trace(new, leaf_types=t.leaf_types)
                    values = record_values(root2, graph2, args, kwargs, meta=on_meta(new))
        except Exception as e:
            raise ParityError(
                f"internal: the pruned model no longer runs ({e}). This is a graphprune bug; "
                "please report it with the model. Work around it by passing ignore=[...] for the "
                "module named in the message.") from e
        if [n.target for n in graph2.nodes] != [n.target for n in t.graph.nodes]:
            # the model's code took another path once pruned (HF's repeat_kv returns early when
            # one query head per key/value head is left): node names no longer correspond, so
            # values are checked where they still do, at every layer's input and output
            diverged = True
            continue
        for node in graph2.nodes:
            want = shapes.get((k, node.name))
            got = _flat_shapes(values.get(node))
            if want is not None and got is not None and want != got:
                raise ParityError(
                    f"internal: after pruning, node '{node.name}' ({node.format_node()}) has shape "
                    f"{got} but the plan implies {want}. This is a graphprune bug; please report it "
                    "with the model. Work around it with ignore=[...] for the modules involved.")
    if diverged:
        verify_layers(graph, new, shapes)


def _shapes_of_value(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
        return tuple(_shapes_of_value(x) for x in v)
    return None


def _stand_in(m: nn.Module) -> Callable[..., Any]:
    """``m.forward`` that returns what the stock layer would, shaped from its attributes (values
    left uninitialised), and runs the layer itself whenever that rule does not apply."""
    real = m.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = stock_output(m, args[0]) if len(args) == 1 and not kwargs else None
        return real(*args, **kwargs) if out is None else out

    return forward


class _LayerFailed(Exception):
    """The new model raised while layer ``path`` ran (the innermost checked layer)."""

    def __init__(self, path: str | None, error: Exception):
        super().__init__(path, error)
        self.path, self.error = path, error


def _run_hooked(model: nn.Module, paths: Any, args: Any, kwargs: Any, mode: str,
                mods: dict[str, nn.Module] | None = None, stand_ins: bool = False):
    got: dict[str, list[tuple[Any, Any]]] = defaultdict(list)
    running: list[str] = []  # checked layers entered and not left: the last one failed
    handles = []
    if mods is None:
        mods = dict(model.named_modules(remove_duplicate=False))
    for path in paths:
        def enter(m, inp, path=path):
            running.append(path)

        def leave(m, inp, out, path=path):
            running.pop()
            got[path].append((_shapes_of_value(inp[0]) if inp else None, _shapes_of_value(out)))
        handles.append(mods[path].register_forward_pre_hook(enter))
        handles.append(mods[path].register_forward_hook(leave))
    try:
        with preserved_state(model, mode):  # also drops the stand-ins (instance attributes)
            if stand_ins:
                for path in paths:
                    m = mods[path]
                    if type(m) in STOCK_LAYERS and not patched(m):
                        m.forward = _stand_in(m)
            y = model(*args, **kwargs)
    except Exception as e:
        raise _LayerFailed(running[-1] if running else None, e) from e
    finally:
        for h in handles:
            h.remove()
    return got, y


def verify_layers(graph: ChannelGraph, new: nn.Module, shapes: dict,
                  mods: dict[str, nn.Module] | None = None) -> None:
    """Run the new model natively; every leaf layer's input and output, and the model's output,
    must have the shape the plan implies (``mods``: the new model's modules by every path).

    Where the model's shapes were recorded on meta tensors (its shapes and control flow do not
    read values), stock layers (convolutions, linear layers, BatchNorm, activations, ...) stand in
    with the output their attributes imply instead of computing it (``_metashape.stock_output``;
    a layer whose parameters do not fit its input still runs, and fails as it would): the model's
    own code runs, every layer is checked, and the check costs a few milliseconds instead of a
    forward pass. Otherwise (values are read) the model runs for real, and so it does whenever
    the run with stand-ins fails: only a real run reports a problem.
    """
    for k, t in enumerate(graph.traced):
        want: dict[str, list[tuple[Any, Any, str]]] = defaultdict(list)
        out_node = None
        for node in t.graph.nodes:
            if node.op == "call_module" and node.args and isinstance(node.args[0], fx.Node):
                want[node.target].append((shapes.get((k, node.args[0].name)),
                                          shapes.get((k, node.name)), node.name))
            elif node.op == "output":
                out_node = node
        want_out = shapes.get((k, out_node.name)) if out_node is not None else None
        fast = t.shapes_on_meta and t.tracer == "torch.fx"
        problem = _check_run(new, t, want, want_out, mods, stand_ins=fast)
        if problem is not None and fast:
            # stand-in outputs hold no real values: a value check the meta run could not see
            # (``torch._assert_async``, an index computed from activations) may trip on them, so a
            # real run decides
            problem = _check_run(new, t, want, want_out, mods, stand_ins=False)
        if problem is not None:
            raise problem


def _check_run(new: nn.Module, t: Any, want: dict[str, list[tuple[Any, Any, str]]],
               want_out: Any, mods: dict[str, nn.Module] | None,
               stand_ins: bool) -> ParityError | None:
    """One checked run of the new model: the error to raise, or None."""
    args, kwargs = t.inputs
    try:
        if on_meta(new, None if mods is None else mods.values()):
            with fake_run(args, kwargs) as (fa, fk):
                got, y = _run_hooked(copy_tree(new, to_meta), want, fa, fk, t.mode)
        else:
            got, y = _run_hooked(new, want, args, kwargs, t.mode, mods, stand_ins=stand_ins)
    except Exception as failed:
        f = failed if isinstance(failed, _LayerFailed) else _LayerFailed(None, failed)
        e = f.error
        where = f" in layer '{f.path}'" if f.path else ""
        err = ParityError(
            f"internal: the pruned model no longer runs{where} ({type(e).__name__}: {e}). "
            "This is a graphprune bug; please report it with the model. Work around it by "
            "passing ignore=[...] for the modules involved.")
        err.__cause__ = e
        return err
    for path, calls in want.items():
        for (w_in, w_out, name), (g_in, g_out) in zip(calls, got.get(path, [])):
            if (w_in is not None and g_in is not None and w_in != g_in) or (
                    w_out is not None and g_out is not None and w_out != g_out):
                return ParityError(
                    f"internal: after pruning, layer '{path}' (node '{name}') maps {g_in} -> "
                    f"{g_out} but the plan implies {w_in} -> {w_out}. This is a graphprune "
                    "bug; please report it with the model. Work around it with ignore=[...].")
    got_out = _shapes_of_value(y)
    if want_out is not None and got_out is not None and _strip(want_out) != _strip(got_out):
        return ParityError(f"internal: the pruned model's output has shape {got_out}, "
                           f"expected {want_out}.")
    return None


def _strip(s: Any) -> Any:
    """Shapes of a (possibly nested, single-element) output, flattened for comparison."""
    if isinstance(s, tuple) and s and all(isinstance(x, int) for x in s):
        return (s,)
    if isinstance(s, tuple):
        return tuple(x for v in s for x in _strip(v))
    return ()
