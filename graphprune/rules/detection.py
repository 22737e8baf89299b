"""Channel rules the detector families need (stage 2, rules): torchvision's RoI pooling modules,
which carry the feature maps' channels into the box and mask heads of a region graph
(``graphprune.regions``), and two ATen ops ultralytics' YOLO heads emit under torch.export
(``type_as`` of the anchor grids, the ``ConvTranspose2d`` of the segmentation prototypes).

Classes are registered by dotted name: importing graphprune imports no torchvision.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .common import arg, empty_like_spec, out_spec
from .elements import Builder, TInfo
from .functional_layers import _link_param
from .registry import module_rule, op_rule

_POOLERS = "torchvision.ops.poolers"
_ROI = "torchvision.ops"


def _pool_of_levels(b: Builder, node: fx.Node, levels: list[Any], reason: str) -> TInfo:
    """Output (K, C, h, w) whose channel ``c`` is channel ``c`` of every pooled feature map."""
    spec = out_spec(b, node)
    oa = b.new_axis(node.name, (1,), (spec.shape[1],))
    for x in levels:
        e = b.along(b.info(x), 1)
        if e is None or e.size != spec.shape[1]:
            b.freeze(oa.elems(), reason)
        else:
            b.couple(oa.elems(), e)
    return TInfo(spec.shape, [oa])


@module_rule(f"{_POOLERS}.MultiScaleRoIAlign", leaf=True)
def multiscale_roi_align(b: Builder, node: fx.Node, m: Any) -> Any:
    """``MultiScaleRoIAlign(features: dict, boxes, image_shapes)``: boxes of every level are pooled
    into one (K, C, h, w) tensor, so the channels of the pooled levels are one axis."""
    spec = out_spec(b, node)
    feats = arg(node, 0, "x")
    if not isinstance(feats, dict) or spec is None or len(getattr(spec, "shape", ())) != 4:
        return empty_like_spec(spec)
    # levels it does not pool (FPN's 'pool') carry nothing into the output
    levels = [v for k, v in feats.items() if k in m.featmap_names and isinstance(v, fx.Node)]
    return _pool_of_levels(b, node, levels,
                           f"pooled feature maps of '{node.target}' are not all channels")


@module_rule(f"{_ROI}.roi_align.RoIAlign", f"{_ROI}.roi_pool.RoIPool",
             f"{_ROI}.ps_roi_align.PSRoIAlign", f"{_ROI}.ps_roi_pool.PSRoIPool", leaf=True)
def roi_pool(b: Builder, node: fx.Node, m: Any) -> Any:
    """``RoIAlign(input, rois)`` -> (K, C, h, w) with the input's channels (position-sensitive
    pooling maps C = out * h * w input channels to ``out``: frozen)."""
    spec = out_spec(b, node)
    x = arg(node, 0, "input")
    if type(m).__name__.startswith("PS"):
        b.freeze_info(b.info(x), f"position-sensitive RoI pooling at '{node.target}'")
        return empty_like_spec(spec)
    return _pool_of_levels(b, node, [x], f"input of '{node.target}' is not a channel")


# ------------------------------------------------------------------ ATen ops of YOLO heads
_aten = torch.ops.aten


@op_rule(_aten.type_as.default)
def type_as(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """``x.type_as(other)``: ``x``'s channels pass through; ``other`` only lends its dtype."""
    x = b.info(node.args[0])
    spec = out_spec(b, node)
    return x if x is not None else empty_like_spec(spec)


@op_rule(_aten.conv_transpose1d.default, _aten.conv_transpose2d.input,
         _aten.conv_transpose3d.input)
def conv_transpose_fn(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """``conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups,
    dilation)`` with weight (C_in, C_out / groups, *k): rows consume, columns produce."""
    x, w, bias = b.info(node.args[0]), arg(node, 1, "weight"), arg(node, 2, "bias")
    groups = arg(node, 6, "groups", 1)
    spec = out_spec(b, node)
    wi = b.info(w)
    wo = b.along(wi, 1)
    reason = f"functional transposed convolution at '{node.name}'"
    if x is not None:
        for a in x.axes:
            if 1 not in a.dims:
                b.freeze(a.elems(), reason)
    if wo is None or groups != 1:
        b.freeze_info(TInfo(x.shape, [a for a in x.axes if 1 in a.dims]) if x else None,
                      reason + ("" if groups == 1 else " (groups)"))
        b.freeze_info(wi, reason)
        return TInfo(spec.shape)
    oa = b.new_axis(node.name, (1,), (spec.shape[1],))
    b.couple(oa.elems(), wo)
    b.source(oa.elems())
    b.link(b.along(wi, 0), x, 1, f"{reason}: its input is not a channel")
    _link_param(b, node, bias, 0, oa.elems(), "bias")
    b.set_roles(w, {1: "out", 0: "in"})
    b.set_roles(bias, {0: "out"})
    return TInfo(spec.shape, [oa])
