"""Capture policy for models that cannot be traced whole: the model as **regions** (stage 1).

A detector's forward mixes traceable networks (backbone + FPN, RPN head, box head, SSD heads)
with code neither torch.fx nor torch.export can capture (image lists, anchors, data-dependent
post-processing). ``region_graph`` runs the model once on the example inputs with hooks that
record what every submodule is really fed, traces each *maximal* traceable submodule on those
inputs (torch.fx, or torch.export when fx fails or hides parameterised modules; both in
``region_capture``), and builds one ``ChannelGraph`` from all of them:

- a region input that is the very tensor another region returned carries that region's channels
  (``grouping.CHANNELS_FROM``): the FPN output channels feeding the RPN head and the RoI pooling
  of the box head are one group with the FPN's convolutions;
- a region output that anything else reads (anchor generators only read sizes and are allowed)
  is frozen with the name of the untraceable code that reads it (``grouping.OUTPUT_REASON``);
- every prunable group is then *probed*: a quarter of its channels is removed, the whole pruned
  model runs, and every region's frozen outputs must equal those of the masked original
  (data-dependent glue values such as proposals are taken from the reference run, so that a
  re-ordered top-k does not hide or fake a difference); failing groups are bisected and frozen
  (``region_probe``).

Regions are traced in eval mode. Each region's ``Traced`` keeps the whole model's inputs in
``inputs`` (apply's verification runs the whole model) and its own in ``region_inputs``.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import ParityError, TraceError
from .graph import ChannelGraph
from .grouping import CHANNELS_FROM, OUTPUT_REASON, build_graph
from .region_capture import ModuleCall, capture_calls, find_regions, tensor_ids
from .rules.elements import TInfo
from .trace import Traced, normalize_inputs, preserved_state

# modules that read only the sizes of non-channel dims of their tensor inputs (anchor and
# default-box generators read the feature maps' spatial sizes), by dotted class name
SHAPE_READERS: set[str] = {
    "torchvision.models.detection.anchor_utils.AnchorGenerator",
    "torchvision.models.detection.anchor_utils.DefaultBoxGenerator",
}


def shape_reader(*names: str) -> None:
    """Declare module classes (dotted names) that read only non-channel sizes of their inputs,
    so region outputs they read stay prunable.

    Example:
        >>> graphprune.regions.shape_reader("mypkg.heads.GridMaker")
    """
    SHAPE_READERS.update(names)


@dataclass
class RegionTraced(Traced):
    """The trace of one region: ``region`` is its module path, ``region_inputs`` its tensors (in
    pytree order) and ``in_nodes`` their placeholders, ``out_nodes`` the graph values of its
    output's leaves, ``linked`` the input positions carrying another region's channels and
    ``closed`` the output positions that are frozen (-> why)."""

    region: str = ""
    region_inputs: tuple[Any, ...] = ()
    in_nodes: tuple[Any, ...] = ()
    out_nodes: tuple[Any, ...] = ()
    linked: tuple[int, ...] = ()
    closed: dict[int, str] = field(default_factory=dict)



def _io_nodes(t: Traced, n_in: int, out: Any) -> tuple[list[Any], list[Any]]:
    """The placeholders of the region's tensors and the graph values of its output leaves."""
    phs = [n for n in t.graph.nodes if n.op == "placeholder"]
    outs = next(n for n in reversed(t.graph.nodes) if n.op == "output").args[0]
    n_out = len(tree_flatten(out)[0])
    if t.tracer == "torch.export":  # parameters first, user inputs last; mutations, then outputs
        return phs[len(phs) - n_in:], list(outs)[len(outs) - n_out:]
    leaves = tree_flatten(outs)[0]
    return phs[:n_in], leaves if len(leaves) == n_out else [None] * n_out


def _describe(path: str, m: nn.Module) -> str:
    return f"{type(m).__name__} '{path}'" if path else type(m).__name__


def link_regions(model: nn.Module, regions: list[tuple[str, Traced]],
                 calls: dict[str, list[ModuleCall]], output: Any) -> list[RegionTraced]:
    """Tie each region input that another region returned to that value, and give every region
    output the reason it is frozen (None when it only feeds regions and size readers)."""
    mods = dict(model.named_modules())
    readers: dict[int, list[tuple[str, int]]] = defaultdict(list)  # tensor id -> (path, call)
    for path, cs in calls.items():
        for k, c in enumerate(cs):
            for i in set(tensor_ids(c.leaves)):
                readers[i].append((path, k))
    final = set(tensor_ids(output))
    region_paths = [p for p, _ in regions]
    inside = lambda p: any(p == r or p.startswith(r + ".") for r in region_paths)  # noqa: E731
    produced: dict[int, Any] = {}  # tensor id -> graph node of the region output
    result = []
    for path, t in regions:
        call = calls[path][0]
        tensors = [v for v in call.leaves if isinstance(v, torch.Tensor)]
        phs, outs = _io_nodes(t, len(tensors), call.output)
        linked = []
        for k, (ph, v) in enumerate(zip(phs, tensors)):
            src = produced.get(id(v))
            if src is not None and tuple(v.shape) == tuple(t.values[ph].shape):
                ph.meta[CHANNELS_FROM] = src
                linked.append(k)
        closed: dict[int, str] = {}
        for k, (node, v) in enumerate(zip(outs, tree_flatten(call.output)[0])):
            if not isinstance(v, torch.Tensor) or not hasattr(node, "meta"):
                continue
            why = _output_reason(path, v, readers, region_paths, inside, mods, final, calls)
            node.meta[OUTPUT_REASON] = why
            produced[id(v)] = node  # a later region reading it shares its (maybe frozen) channels
            if why is not None:
                closed[k] = why
        t.values.pop(next(n for n in t.graph.nodes if n.op == "output"), None)
        result.append(RegionTraced(**{f.name: getattr(t, f.name) for f in dataclasses.fields(t)},
                                   region=path, region_inputs=tuple(tensors),
                                   in_nodes=tuple(phs), out_nodes=tuple(outs),
                                   linked=tuple(linked), closed=closed))
    return result


def _output_reason(path: str, v: torch.Tensor, readers: dict[int, list[tuple[str, int]]],
                   regions: list[str], inside: Any, mods: dict[str, nn.Module], final: set[int],
                   calls: dict[str, list[ModuleCall]]) -> str | None:
    if id(v) in final:
        return "model output"
    got = readers.get(id(v), [])
    by_regions = [r for r, k in got if r in regions and k == 0 and
                  calls[r][0].order > calls[path][0].order]
    for r in dict.fromkeys(r for r, _ in got if not inside(r)):
        m = mods[r]
        name = f"{type(m).__module__}.{type(m).__qualname__}"
        if name in SHAPE_READERS:
            continue
        if any(q.startswith(r + ".") for q, _ in got):  # passes it on to its submodules
            continue
        return f"output of region '{path}' read by {_describe(r, m)}, which could not be traced"
    if not by_regions:
        parent = path.rpartition(".")[0]
        return (f"output of region '{path}' read by untraceable code in "
                f"{_describe(parent, mods.get(parent, mods['']))}")
    return None


# ---------------------------------------------------------------------- running regions
def run_regions(model: nn.Module, regions: list[RegionTraced], inputs: tuple[tuple, dict], *,
                reference: dict[str, list[Any]] | None = None
                ) -> tuple[dict[str, list[Any]], dict[str, Any], Any]:
    """Run the whole ``model`` (eval mode, state preserved) and return, per region, its input
    tensors as the model computed them and its output (pytree leaves), and the model's output.

    With ``reference`` (the inputs of another run, by region), the inputs a region gets from
    untraceable code (proposals, image sizes) are replaced by the reference's before the region
    runs, so that regions of two models that should compute alike see the same boxes.
    """
    mods = dict(model.named_modules())
    got_in: dict[str, list[Any]] = {}
    got_out: dict[str, Any] = {}
    handles = []
    for r in regions:
        def pre(m: nn.Module, a: Any, kw: Any, r: RegionTraced = r) -> Any:
            leaves, spec = tree_flatten((tuple(a), dict(kw)))
            pos = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
            got_in[r.region] = [leaves[i] for i in pos]
            if reference is not None and r.region in reference:
                ref = reference[r.region]
                for k, i in enumerate(pos):
                    if k not in r.linked and k < len(ref):
                        leaves[i] = ref[k]
            a2, kw2 = tree_unflatten(leaves, spec)
            return tuple(a2), kw2

        def post(m: nn.Module, a: Any, out: Any, r: RegionTraced = r) -> None:
            got_out[r.region] = tree_flatten(out)[0]

        m = mods[r.region]
        handles += [m.register_forward_pre_hook(pre, with_kwargs=True),
                    m.register_forward_hook(post)]
    args, kwargs = inputs
    try:
        with preserved_state(model, "eval"):
            y = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return got_in, got_out, y


def structure(y: Any) -> Any:
    """The structure of an output: containers, keys and tensor ranks (not sizes: a detector
    may return another number of boxes)."""
    if isinstance(y, torch.Tensor):
        return ("tensor", y.ndim, y.dtype)
    if isinstance(y, dict):
        return (type(y).__name__, tuple((k, structure(v)) for k, v in y.items()))
    if isinstance(y, (list, tuple)):
        return (type(y).__name__, tuple(structure(v) for v in y))
    return type(y).__name__


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; inf where the shapes differ, exact equality for integer tensors."""
    if a.shape != b.shape:
        return float("inf")
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare_regions(graph: ChannelGraph, model: nn.Module, reference: nn.Module) -> dict[str, float]:
    """Relative error of every frozen region output (head logits, box regressions, mask logits)
    of ``model`` against ``reference`` (e.g. the masked original), each region fed the
    reference's untraceable inputs. inf where a shape differs.

    Example:
        >>> errs = graphprune.regions.compare_regions(r.graph, r.model, masked_original)
    """
    regions = [t for t in graph.traced if isinstance(t, RegionTraced)]
    inputs = regions[0].inputs
    ref_in, ref_out, _ = run_regions(reference, regions, inputs)
    _, out, _ = run_regions(model, regions, inputs, reference=ref_in)
    errs = {}
    for r in regions:
        for k in r.closed:
            a, b = out.get(r.region, []), ref_out.get(r.region, [])
            if k < len(a) and k < len(b) and isinstance(b[k], torch.Tensor):
                errs[f"{r.region}[{k}]"] = rel_error(a[k], b[k])
    return errs


# ---------------------------------------------------------------------- verification
def _channel_sizes(graph: ChannelGraph, k: int, node: Any, shapes: dict) -> dict[int, int]:
    """dim -> size after pruning, for the dims of ``node``'s value that carry channels."""
    info, shape = graph.infos.get(node), shapes.get((k, getattr(node, "name", None)))
    if not isinstance(info, TInfo) or not isinstance(shape, tuple):
        return {}
    return {d: shape[d] for a in info.axes for d in a.dims if d < len(shape)
            and isinstance(shape[d], int)}


def _mismatch(got: Any, want: dict[int, int]) -> bool:
    return isinstance(got, torch.Tensor) and any(
        d >= got.ndim or got.shape[d] != n for d, n in want.items())


def verify_regions(graph: ChannelGraph, new: nn.Module, shapes: dict) -> None:
    """Run the pruned model once, natively: the channel dims of every traced layer's input and
    output, and of every region's inputs and outputs, must have the size the plan implies.
    (Other dims may differ: a detector's number of boxes depends on the pruned weights.)

    Raises:
        ParityError: a layer or region sees another channel count than the plan implies.
    """
    regions = [(k, t) for k, t in enumerate(graph.traced) if isinstance(t, RegionTraced)]
    want: dict[str, list[tuple[dict, dict, str]]] = defaultdict(list)
    for k, t in regions:
        for node in t.graph.nodes:
            if node.op == "call_module" and node.args and hasattr(node.args[0], "name"):
                want[node.target].append((_channel_sizes(graph, k, node.args[0], shapes),
                                          _channel_sizes(graph, k, node, shapes), node.name))
    got: dict[str, list[tuple[Any, Any]]] = defaultdict(list)
    mods = dict(new.named_modules())
    handles = [mods[p].register_forward_hook(
        lambda m, a, out, p=p: got[p].append((a[0] if a else None, out))) for p in want]
    try:
        got_in, got_out, _ = run_regions(new, [t for _, t in regions], regions[0][1].inputs)
    except Exception as e:
        raise ParityError(f"internal: the pruned model no longer runs ({type(e).__name__}: {e}). "
                          "This is a graphprune bug; please report it with the model. Work around "
                          "it by passing ignore=[...] for the module named in the message.") from e
    finally:
        for h in handles:
            h.remove()
    bad = [(f"layer '{p}' (node '{name}')", v, w) for p, calls in want.items()
           for (w_in, w_out, name), (g_in, g_out) in zip(calls, got.get(p, []))
           for v, w in ((g_in, w_in), (g_out, w_out))]
    for k, t in regions:
        bad += [(f"input {i} of region '{t.region}'", v, _channel_sizes(graph, k, n, shapes))
                for i, (n, v) in enumerate(zip(t.in_nodes, got_in.get(t.region, [])))]
        bad += [(f"output {i} of region '{t.region}'", v, _channel_sizes(graph, k, n, shapes))
                for i, (n, v) in enumerate(zip(t.out_nodes, got_out.get(t.region, [])))]
    for what, v, w in bad:
        if _mismatch(v, w):
            raise ParityError(f"internal: after pruning, {what} has shape {tuple(v.shape)} but the "
                              f"plan implies sizes {w} on its channel dims. This is a graphprune "
                              "bug; please report it with the model. Work around it with "
                              "ignore=[...].")


# ---------------------------------------------------------------------- the entry point
def region_graph(model: nn.Module, example_inputs: Any, *, why: str = "requested",
                 strict: bool = False, gqa: str = "group") -> ChannelGraph:
    """The channel graph of ``model`` captured as regions (see the module docstring).

    Raises:
        TraceError: the model does not run on the example inputs, or no submodule with
            parameters can be traced.

    Example:
        >>> m = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None)
        >>> g = graphprune.trace(m, ([torch.rand(3, 320, 320)],), tracer="regions")
        >>> print(graphprune.regions.describe(g))
    """
    args, kwargs = normalize_inputs(example_inputs)
    calls, y, keep = capture_calls(model, args, kwargs)
    found = find_regions(model, calls)
    if not found:
        raise TraceError(f"no submodule of {type(model).__name__} with parameters could be traced "
                         "on the inputs it gets in a real forward.")
    regions = link_regions(model, found, calls, y)
    listing = ", ".join(f"{r.region} ({r.tracer})" for r in regions)
    regions = [dataclasses.replace(r, inputs=(args, kwargs), model=model,
                                   why=f"captured as regions ({why}): {listing}" if k == 0 else r.why)
               for k, r in enumerate(regions)]
    del keep
    g = build_graph(model, regions, strict=strict, gqa=gqa)
    from .region_probe import probe_regions  # it runs regions: it imports this module

    return g.with_frozen(probe_regions(g))


def describe(graph: ChannelGraph) -> str:
    """One line per region: path, tracer, prunable channels / groups it holds, frozen outputs."""
    regions = [t for t in graph.traced if isinstance(t, RegionTraced)]
    if not regions:
        return "not captured as regions"
    lines = []
    for r in regions:
        own = [g for g in graph.groups if any(m.module == r.region or m.module.startswith(
            r.region + ".") for m in g.members)]
        pr = [g for g in own if g.prunable]
        lines.append(f"{r.region} ({type(graph.modules[r.region]).__name__}, {r.tracer}): "
                     f"{len(pr)}/{len(own)} groups prunable, {sum(g.size for g in pr)} channels"
                     + (f"; frozen outputs: {'; '.join(sorted(set(r.closed.values())))}"
                        if r.closed else ""))
    return "\n".join(lines)
