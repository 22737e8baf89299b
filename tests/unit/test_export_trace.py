"""The torch.export path: models torch.fx cannot trace are captured at the ATen level, pruned with
the same rules, and the shrunk model equals the masked original; size arithmetic the exporter
specialised away is caught by the probe and frozen instead of producing a broken model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.models import resnet20

from ..conftest import assert_mask_equivalent, assert_unchanged, healthy_init, rel_err, snapshot


class ShapeBranchNet(nn.Module):
    """Shape-dependent Python control flow in the root forward: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.c3 = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32 * 4, 10)

    def forward(self, x):
        if x.shape[-1] > 16:
            x = F.avg_pool2d(x, 2)
        y = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(y)))
        y = y + self.c3(F.relu(self.dw(y)))
        y = F.adaptive_avg_pool2d(y, 2).flatten(1)
        return self.fc(y)


class HiddenArithmeticNet(ShapeBranchNet):
    """Attention heads split with ``C // heads`` where C is the *input* width of the projection
    (as in timm's CrossAttention): export bakes 32 // 4 into a literal, so nothing in the graph
    ties c2's channels to the reshape, yet pruning them breaks the model's own code."""

    heads = 4

    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(32, 32)

    def forward(self, x):
        if x.shape[-1] > 16:
            x = F.avg_pool2d(x, 2)
        y = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        t = y.flatten(2).transpose(1, 2)  # (B, HW, C)
        b, n, c = t.shape
        q = self.wq(t).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(b, n, 32)
        return self.fc(F.adaptive_avg_pool1d(a.transpose(1, 2), 4).flatten(1))


def _net(cls=ShapeBranchNet):
    torch.manual_seed(0)
    return healthy_init(cls()).eval()


def test_auto_falls_back_to_export_when_fx_cannot_trace_the_root():
    m, x = _net(), torch.randn(2, 3, 32, 32)
    with pytest.raises(gp.TraceError, match="torch.fx could not trace ShapeBranchNet"):
        gp.trace(m, x, tracer="fx")
    g = gp.trace(m, x)
    assert g.tracer == "torch.export" and "torch.fx failed" in g.tracer_reason
    # the same groups as fx finds on a traceable variant: c1 (with b1), c2's residual stream
    sizes = {gr.name: (gr.size, gr.prunable) for gr in g.groups}
    assert sizes["c1"] == (16, True) and sizes["c2"] == (32, True), sizes
    assert {m.param for m in g.group("c2").members} >= {
        "c2.weight", "b2.weight", "b2.running_mean", "dw.weight", "c3.weight", "fc.weight"}
    assert {m.role for m in g.group("c2").members if m.param == "c2.weight"} == {"out"}


def test_export_path_prunes_equivalently_to_the_masked_original():
    m, x = _net(), torch.randn(2, 3, 32, 32)
    snap = snapshot(m)
    r = gp.prune(m, x, sparsity=0.5, method="l1")
    assert_unchanged(m, snap)
    assert r.report.tracer == "torch.export" and "torch.fx failed" in r.report.tracer_reason
    assert r.model.c2.out_channels == 16 and r.model.dw.groups == 16 and r.model.fc.in_features == 64
    assert r.report.params[1] < 0.4 * r.report.params[0]
    assert 0 < r.report.macs[1] < 0.4 * r.report.macs[0]
    assert_mask_equivalent(m, r, x)
    assert_mask_equivalent(m, r, torch.randn(3, 3, 32, 32))  # batch size was not baked in
    assert "traced with torch.export" in str(r.report)


def test_export_and_fx_agree_on_a_model_both_can_trace():
    torch.manual_seed(0)
    m, x = healthy_init(resnet20()).eval(), torch.randn(2, 3, 32, 32)
    gf, ge = gp.trace(m, x, tracer="fx"), gp.trace(m, x, tracer="export")
    assert ge.tracer == "torch.export"
    assert {(g.name, g.size, g.prunable) for g in gf.groups} == \
        {(g.name, g.size, g.prunable) for g in ge.groups}
    rf = gp.prune(m, x, sparsity=0.4, method="l2", tracer="fx")
    re = gp.prune(m, x, sparsity=0.4, method="l2", tracer="export")
    assert rf.plan.to_json() == re.plan.to_json()
    assert rf.report.macs == re.report.macs and rf.report.params == re.report.params
    assert_mask_equivalent(m, re, x)


def test_probe_freezes_channels_behind_specialised_size_arithmetic():
    m, x = _net(HiddenArithmeticNet), torch.randn(2, 3, 32, 32)
    g = gp.trace(m, x)
    assert g.tracer == "torch.export"
    c2 = g.group("c2")
    assert not c2.prunable and "specialised size arithmetic" in c2.reason, c2
    assert g.group("c1").prunable
    r = gp.prune(m, x, sparsity=0.5)
    assert r.model.c2.out_channels == 32 and r.model.c1.out_channels == 8
    assert_mask_equivalent(m, r, x)


def test_data_driven_selection_and_reconstruction_on_an_export_graph():
    m = _net()
    torch.manual_seed(1)
    calib, x = torch.randn(64, 3, 32, 32), torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        y = m(x)
    plain = gp.prune(m, x[:1], sparsity=0.5, method="l1")
    rec = gp.prune(m, x[:1], sparsity=0.5, method="lasso", calibration=calib, reconstruct=True)
    assert rec.report.tracer == "torch.export"
    with torch.no_grad():
        e_plain, e_rec = rel_err(plain.model(x), y), rel_err(rec.model(x), y)
    assert e_rec < 0.5 * e_plain, (e_rec, e_plain)


def test_fold_batchnorm_on_an_export_graph():
    m, x = _net(), torch.randn(2, 3, 32, 32)
    f = gp.fold_batchnorm(m, x)
    assert isinstance(f.b1, nn.Identity) and isinstance(f.b2, nn.Identity)
    with torch.no_grad():
        assert rel_err(f(x), m(x)) < 1e-5


def test_unknown_tracer_is_a_config_error():
    with pytest.raises(gp.ConfigError, match="The 'tracer' parameter of trace must be one of"):
        gp.trace(_net(), torch.randn(1, 3, 16, 16), tracer="dynamo")
