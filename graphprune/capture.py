"""The capture policy, above graph and apply: how a model becomes a ``ChannelGraph``.

torch.fx first (module-level graph, cheap). If fx cannot trace the model's own forward, or can only
trace it by hiding parameterised blocks as opaque leaves, ``torch.export`` captures it instead
(ATen-level graph, parameters mapped back to their names) and the graph with more prunable
channels wins. An export graph is *probed* (``probe``): shape arithmetic the exporter
specialised to literals would break after pruning, so groups whose removal does not reproduce
the masked original are frozen, in a new graph. Modules that only run in training mode are
captured in a second, training-mode trace. Capturing never changes the caller's model.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

from torch import nn

from ._checks import checks
from ._heap import frozen_heap
from ._validate import check_choice
from .config import GQA_MODES, TRACERS
from .errors import GraphPruneError, TraceError
from .graph import ChannelGraph
from .grouping import build_graph
from .probe import probe_export_graph
from .region_capture import opaque_leaves
from .regions import region_graph
from .hf.loading import capture_kwargs, is_hf_model
from .trace import Inputs, Traced, export_trace, normalize_inputs, trace_model


def _unreached(model: nn.Module, traced: Traced) -> list[str]:
    """Modules with parameters that the trace never calls (nor any ancestor) nor reads."""
    used: set[str] = set()
    for node in traced.graph.nodes:
        if node.op == "call_module":
            used.add(node.target)
        elif node.op == "get_attr":
            used.add(node.target.rpartition(".")[0])
    out = []
    for name, m in model.named_modules():
        if m._parameters and any(p is not None for p in m._parameters.values()):
            parts = name.split(".")
            if not any(".".join(parts[:i]) in used for i in range(1, len(parts) + 1)):
                out.append(name)
    return out


def _export_graph(model: nn.Module, example_inputs: Any, why: str, strict: bool,
                  gqa: str) -> ChannelGraph:
    g = build_graph(model, [export_trace(model, example_inputs, why=why)], strict=strict, gqa=gqa)
    return g.with_frozen(probe_export_graph(g))


@frozen_heap()
def trace(model: nn.Module, example_inputs: Any, *, tracer: str = "auto",
          strict: bool | None = None, gqa: str = "group") -> ChannelGraph:
    """Trace ``model`` into its channel-dependency graph.

    ``example_inputs`` is a tensor, a tuple of positional inputs or a dict of keyword inputs
    (batch first). The model is traced in eval mode; if some of its parameterised modules run only
    in training mode (an auxiliary classifier), the training graph is traced too and both are
    honoured. The model itself is not modified.

    ``tracer``: ``"fx"`` (torch.fx symbolic tracing; module-level graph), ``"export"``
    (``torch.export``; ATen-level graph, follows shape-dependent Python control flow on the example
    inputs), ``"regions"`` (each maximal traceable submodule on the inputs a real forward feeds
    it, channels tied across their boundaries; ``graphprune.regions``) or ``"auto"`` (fx, falling
    back to torch.export when fx cannot trace the model's own forward, or when modules fx could
    not trace would freeze channels that torch.export can see through, and to regions when
    neither captures the model). ``graph.tracer`` and ``graph.tracer_reason`` say which was used
    and why.

    ``strict``: a channel rule that crashes raises instead of freezing the channels it touches
    (for rule authors and test suites; default: ``graphprune.checks().strict``).

    ``gqa``: how heads of grouped-query attention (fewer key/value heads than query heads) go:
    ``"group"`` (a key/value head and the query heads that read it are one unit) or ``"query"``
    (every key/value head stays; query heads go, the same number from every key/value group, so
    ``num_key_value_groups`` stays an integer; the same slot of every group goes together, as the
    channels of a grouped convolution do).

    Raises:
        TraceError: neither torch.fx nor torch.export can capture the model.
        InputError: the example inputs do not fit the model's forward.
        ConfigError: an unknown ``tracer`` or ``gqa``.

    Example:
        >>> g = graphprune.trace(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
        >>> len(g.prunable_groups)
    """
    check_choice(tracer, "tracer", "trace", TRACERS)
    check_choice(gqa, "gqa", "trace", GQA_MODES)
    strict = checks().strict if strict is None else bool(strict)
    if is_hf_model(model):  # no KV cache while capturing; HF forwards need torch.export
        args, kwargs = normalize_inputs(example_inputs)
        example_inputs = Inputs(args, capture_kwargs(model, kwargs))
        if tracer == "auto":
            tracer, why = "export", "a Hugging Face model (torch.fx cannot trace its forward)"
            return _export_graph(model, example_inputs, why, strict, gqa)
    if tracer == "export":
        return _export_graph(model, example_inputs, "requested", strict, gqa)
    if tracer == "regions":
        return region_graph(model, example_inputs, why="requested", strict=strict, gqa=gqa)
    try:
        traced = [trace_model(model, example_inputs, mode="eval")]
    except TraceError as e:
        if tracer == "fx" or not isinstance(model, nn.Module):
            raise
        try:  # a failed torch.export prints its partial graph on stderr; its error says why
            with contextlib.redirect_stderr(io.StringIO()):
                return _export_graph(model, example_inputs, f"torch.fx failed: {e}", strict, gqa)
        except TraceError as e2:
            try:  # the submodules that trace, each on what the model really feeds it
                return region_graph(model, example_inputs, strict=strict, gqa=gqa,
                                    why="neither torch.fx nor torch.export captures the model")
            except TraceError as e3:
                raise TraceError(f"{e}\n{e2}\n{e3}") from e
    if _unreached(model, traced[0]):
        try:
            t2 = trace_model(model, example_inputs, mode="train")
        except GraphPruneError:
            t2 = None
        if t2 is not None and len(_unreached(model, t2)) < len(_unreached(model, traced[0])):
            traced.append(t2)
    g = build_graph(model, traced, strict=strict, gqa=gqa)
    frozen = opaque_leaves(model, traced[0]) if tracer == "auto" else []
    if frozen:
        try:
            why = (f"torch.fx could not trace {len(frozen)} module(s) with parameters "
                   f"({', '.join(frozen[:3])}{', ...' if len(frozen) > 3 else ''})")
            g2 = _export_graph(model, example_inputs, why, strict, gqa)
        except GraphPruneError:
            return g
        if g2.prunable_channels > g.prunable_channels:
            return g2
    return g
