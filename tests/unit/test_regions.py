"""A model neither torch.fx nor torch.export captures whole, pruned as regions: a hand-built
two-stage detector (backbone with two pyramid levels, a head shared over the levels, RoI pooling
into a box head) glued by data-dependent Python code."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

import graphprune as gp
from graphprune import regions
from graphprune.apply.shrink import expected_shapes
from graphprune.plan import comp_keep_for

from ..conftest import assert_same_state, healthy_init, masked_copy, snapshot, assert_unchanged

torchvision = pytest.importorskip("torchvision")


def cbr(i: int, o: int, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.c3, self.c4 = cbr(3, 16, 2), cbr(16, 32, 2), cbr(32, 48, 2)
        self.lat3, self.lat4 = nn.Conv2d(32, 24, 1), nn.Conv2d(48, 24, 1)

    def forward(self, x):
        c3 = self.c3(self.stem(x))
        c4 = self.c4(c3)
        return OrderedDict(p3=self.lat3(c3), p4=self.lat4(c4))


class Grids(nn.Module):
    """Reads only the spatial sizes of the feature maps (like torchvision's AnchorGenerator)."""

    def forward(self, feats):
        return [torch.stack(torch.meshgrid(torch.arange(f.shape[-2]), torch.arange(f.shape[-1]),
                                           indexing="ij")) for f in feats]


class ChannelStats(nn.Module):
    """Untraceable glue that reads channels (a parameter-free module with no channel rule)."""

    def forward(self, f):
        return f.mean((2, 3))[:, :4]


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1), nn.ReLU())
        self.cls, self.box = nn.Conv2d(24, 3, 1), nn.Conv2d(24, 4, 1)

    def forward(self, feats):
        hs = [self.conv(f) for f in feats]
        return [self.cls(h) for h in hs], [self.box(h) for h in hs]


class ToyDetector(nn.Module):
    def __init__(self, glue: str = ""):
        super().__init__()
        self.glue = glue
        self.backbone, self.grids, self.head = Backbone(), Grids(), Head()
        self.stats = ChannelStats()
        self.pool = torchvision.ops.RoIAlign((2, 2), spatial_scale=0.25, sampling_ratio=1)
        self.box_head = nn.Sequential(nn.Flatten(), nn.Linear(24 * 4, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, images: list[torch.Tensor]):
        x = torch.stack([im for im in images])  # torch.fx cannot iterate its input
        feats = self.backbone(x)
        grids = self.grids(list(feats.values()))
        cls, box = self.head(list(feats.values()))
        scores = torch.cat([c.flatten(2).amax(1) for c in cls], 1)[0]  # (anchors,)
        if self.glue == "stats":
            scores = scores + self.stats(feats["p4"]).sum()
        if self.glue == "plain":  # Python code reading two channels: nothing hooks can see
            scores = scores + feats["p3"][:, :2].mean() * 100
        k = max(int((scores > scores.median()).sum()), 1)  # data-dependent: torch.export fails
        top = scores.topk(k).indices
        g = grids[0].flatten(1).float()
        xy = g[:, top % g.shape[1]].T * 4
        rois = torch.cat([torch.zeros(k, 1), xy, xy + 8], 1)
        logits = self.box_head(self.pool(feats["p3"], rois))
        return {"boxes": rois[:, 1:], "scores": scores[top], "logits": logits}


regions.shape_reader(f"{Grids.__module__}.{Grids.__qualname__}")


def _model(glue: str = "") -> ToyDetector:
    torch.manual_seed(0)
    return healthy_init(ToyDetector(glue)).eval()


X = ([torch.rand(3, 32, 32)],)


def test_toy_detector_does_not_trace_whole():
    with pytest.raises(gp.TraceError):
        gp.trace(_model(), X, tracer="fx")
    with pytest.raises(gp.TraceError):
        gp.trace(_model(), X, tracer="export")


def test_regions_and_their_boundaries():
    model = _model()
    snap = snapshot(model)
    g = gp.trace(model, X)  # auto: fx and export fail, regions follow
    assert_unchanged(model, snap)
    traced = {t.region: t.tracer for t in g.traced}
    assert traced == {"backbone": "torch.fx", "head": "torch.fx", "pool": "torch.fx",
                      "box_head": "torch.fx"}
    assert "captured as regions" in g.tracer_reason
    # the two levels' channels: lateral convs, the shared head conv, and through RoIAlign the
    # box head's first Linear (4 columns per channel) are one group across three regions
    fpn = g.group("backbone.lat3")
    assert fpn.prunable and fpn.size == 24
    labels = {m.label() for m in fpn.members}
    assert {"backbone.lat3.weight[out]", "backbone.lat4.weight[out]", "head.conv.0.weight[in]",
            "box_head.1.weight[in]"} <= labels
    # what untraceable code reads stays
    for name in ("head.cls", "head.box"):
        assert g.group(name).reason == ("output of region 'head' read by untraceable code in "
                                        "ToyDetector")
    assert g.group("box_head.3").reason == "model output"  # the logits are returned as they are
    assert g.group("head.conv.0").prunable and g.group("box_head.1").prunable
    text = regions.describe(g)
    assert "backbone (Backbone, torch.fx)" in text and "pool (RoIAlign, torch.fx)" in text


def test_toy_detector_prunes_as_regions(tmp_path):
    model = _model()
    fresh, snap = copy.deepcopy(model), snapshot(model)
    r = gp.prune(model, X, sparsity=0.5, method="l1")
    regions.verify_regions(r.graph, r.model, r._applied.shapes)
    assert_unchanged(model, snap)
    assert r.report.params[1] < 0.6 * r.report.params[0]
    with torch.no_grad():
        y0, y1, ym = model(*X), r.model(*X), masked_copy(model, r.masks)(*X)
    assert regions.structure(y1) == regions.structure(y0)
    for a, b in zip(tree_flatten(y1)[0], tree_flatten(ym)[0]):  # the masked original's boxes
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    errs = regions.compare_regions(r.graph, r.model, masked_copy(model, r.masks))
    assert set(errs) == {"head[0]", "head[1]", "head[2]", "head[3]", "box_head[0]"}
    assert max(errs.values()) < 1e-5
    gp.save_masks(r.masks, tmp_path / "m.safetensors", plan=r.plan)
    small = gp.apply_masks(fresh, tmp_path / "m.safetensors", X)
    assert_same_state(small, r.model)
    assert max(regions.compare_regions(r.graph, small, r.model).values()) == 0.0


def test_region_output_read_by_untraceable_module_is_frozen():
    g = gp.trace(_model("stats"), X)
    fpn = g.group("backbone.lat3")
    assert not fpn.prunable
    assert fpn.reason == ("output of region 'backbone' read by ChannelStats 'stats', which could "
                          "not be traced")
    assert g.group("backbone.c3.0").prunable  # inside the backbone everything still goes


def test_probe_freezes_channels_plain_code_reads():
    g = gp.trace(_model("plain"), X)
    fpn = g.group("backbone.lat3")
    assert not fpn.prunable and fpn.reason.startswith("pruning it breaks the model outside")
    # every other group passed the probe, and pruning them leaves the model's output intact
    model = _model("plain")
    plan = gp.make_plan(g, sparsity=0.5, method="l1")
    applied = gp.apply_plan(g, plan)
    shapes = expected_shapes(g, comp_keep_for(g, plan))
    regions.verify_regions(g, applied.model, shapes)
    with torch.no_grad():
        a, b = applied.model(*X), masked_copy(model, applied.masks)(*X)
    for u, v in zip(tree_flatten(a)[0], tree_flatten(b)[0]):
        assert u.shape == v.shape and torch.allclose(u, v, rtol=1e-4, atol=1e-5)
