"""Exact channel structure of hand-built nets: which channels go together, which are frozen."""

import numpy as np
import pytest
import torch
from torch import nn

import graphprune as gp

from ..conftest import assert_mask_equivalent
from . import nets

X = torch.randn(2, 3, 8, 8)


def members(group, role=None):
    return sorted(m.label() for m in group.members if role is None or m.role == role)


def member(group, param, dim):
    return next(m for m in group.members if m.param == param and m.dim == dim)


def test_conv_bn_conv_group():
    g = gp.trace(nets.ConvBNConv(), X)
    assert [x.name for x in g.groups] == ["c1", "c2"]
    c1 = g.group("c1")
    assert c1.size == 8 and c1.prunable
    assert members(c1) == sorted(["c1.weight[out]", "c1.bias[out]", "bn.weight", "bn.bias",
                                  "bn.running_mean", "bn.running_var", "c2.weight[in]"])
    assert str(c1).startswith("Group 'c1' (8 channels, prunable): c1.")
    assert " => " in str(c1)
    c2 = g.group("c2")
    assert not c2.prunable and c2.reason == "model output"


def test_residual_add_couples_both_branches():
    g = gp.trace(nets.Residual(), X)
    grp = g.group("a")
    assert members(grp, "out") == ["a.bias[out]", "a.weight[out]", "b.bias[out]", "b.weight[out]"]
    assert members(grp, "in") == ["c.weight[in]"]
    assert len(g.prunable_groups) == 1


def test_concat_slices_are_separate_groups_with_offsets():
    g = gp.trace(nets.Concat(), X)
    a, b = g.group("a"), g.group("b")
    assert (a.size, b.size) == (8, 6)
    # the consumer and the BN see b's channels at offset 8
    np.testing.assert_array_equal(np.sort(member(b, "c.weight", 1).index), np.arange(8, 14))
    np.testing.assert_array_equal(np.sort(member(b, "bn.weight", 0).index), np.arange(8, 14))
    np.testing.assert_array_equal(np.sort(member(a, "c.weight", 1).index), np.arange(8))


def test_depthwise_couples_input_and_output():
    g = gp.trace(nets.Depthwise(), X)
    grp = g.group("c1")
    assert "dw.weight[out]" in members(grp) and "pw.weight[in]" in members(grp)
    assert [x.name for x in g.prunable_groups] == ["c1"]


def test_depthwise_multiplier_removes_whole_conv_groups():
    g = gp.trace(nets.Depthwise(mult=2), X)
    grp = g.group("c1")
    assert grp.size == 8
    dw = member(grp, "dw.weight", 0)
    # unit k owns output channels 2k and 2k+1 of the depthwise conv
    for k in range(8):
        np.testing.assert_array_equal(np.sort(dw.index[dw.unit == k]), [2 * k, 2 * k + 1])
    r = gp.prune(nets.Depthwise(mult=2).eval(), X, sparsity=0.5)
    assert r.model.dw.groups == 4 and r.model.dw.out_channels == 8 and r.model.dw.in_channels == 4


def test_grouped_conv_keeps_groups_equal():
    g = gp.trace(nets.Grouped(), X)
    c1, gc = g.group("c1"), g.group("gc")
    assert c1.size == 4 and gc.size == 6  # same local index in both conv groups is one unit
    r = gp.prune(nets.Grouped().eval(), X, sparsity=0.5)
    assert r.model.gc.groups == 2
    assert tuple(r.model.gc.weight.shape) == (6, 2, 3, 3)


def test_groupnorm_prunes_whole_groups():
    g = gp.trace(nets.GN(), X)
    grp = g.group("c1")
    assert grp.size == 4
    r = gp.prune(nets.GN().eval(), X, sparsity=0.5)
    assert (r.model.gn.num_groups, r.model.gn.num_channels) == (2, 8)


def test_flatten_expands_each_channel_to_its_spatial_block():
    g = gp.trace(nets.FlattenLinear(), torch.randn(2, 3, 5, 5))
    grp = g.group("c")
    fc = member(grp, "fc.weight", 1)
    for k in range(4):
        np.testing.assert_array_equal(np.sort(fc.index[fc.unit == k]), np.arange(9 * k, 9 * k + 9))


def test_chunk_couples_the_same_index_of_each_piece():
    g = gp.trace(nets.ChunkCat(), X)
    grp = g.group("c1")
    assert grp.size == 4  # 8 channels, chunk(2): channel i goes with channel 4 + i
    w = member(grp, "c1.weight", 0)
    for k in range(4):
        np.testing.assert_array_equal(np.sort(w.index[w.unit == k]), [k, k + 4])


def test_literal_slices_freeze_channels_before_the_boundary():
    g = gp.trace(nets.LiteralSlice(), X)
    sizes = {(x.size, x.prunable) for x in g.groups if x.name.startswith("c1")}
    assert sizes == {(3, False), (5, True)}
    frozen = next(x for x in g.groups if x.name.startswith("c1") and not x.prunable)
    assert "slice boundary 3" in frozen.reason


def test_literal_view_size_freezes():
    g = gp.trace(nets.LiteralView(), torch.randn(2, 3, 4, 4))
    grp = g.group("c")
    assert not grp.prunable and "literal channel size" in grp.reason


def test_op_without_rule_freezes_and_is_named():
    g = gp.trace(nets.Unknown(), X)
    assert not g.group("c1").prunable
    assert "torch.cumsum" in g.group("c1").reason and "cumsum" in g.group("c1").reason
    assert g.group("c2").prunable
    assert "torch.cumsum" in g.unsupported


def test_tied_weights_stay_tied():
    idx = torch.randint(0, 20, (2, 5))
    g = gp.trace(nets.Tied(), idx)
    grp = g.group("emb")
    # head.weight is emb.weight: its input dim and the embedding dim are one group
    assert {("emb.weight", "out"), ("emb.weight", "in")} <= {(m.param, m.role) for m in grp.members}
    r = gp.prune(nets.Tied().eval(), idx, sparsity=0.5)
    assert r.model.head.weight is r.model.emb.weight
    assert r.model.emb.embedding_dim == 8 and r.model.head.in_features == 8
    assert "head.weight" in r.masks and torch.equal(r.masks["head.weight"], r.masks["emb.weight"])


def test_module_called_twice_is_consistent():
    g = gp.trace(nets.Twice(), X)
    assert len(g.prunable_groups) == 1  # a.out, shared.in and shared.out are all one unit each
    r = gp.prune(nets.Twice().eval(), X, sparsity=0.5)
    assert r.model.shared.weight.shape[:2] == (4, 4)


def test_squeeze_excitation_gate_is_coupled():
    g = gp.trace(nets.SE(), X)
    grp = g.group("c")
    assert {"fc1.weight[in]", "fc2.weight[out]", "out.weight[in]"} <= set(members(grp))
    assert g.group("fc1").prunable


def test_channels_last_linear_and_layernorm():
    g = gp.trace(nets.ChannelsLast(), X)
    grp = g.group("c")
    assert {"ln.weight", "fc.weight[in]"} <= set(members(grp))
    assert grp.value_coupled and "LayerNorm" in grp.value_coupled
    assert g.group("fc").prunable


def test_conv_transpose():
    g = gp.trace(nets.Transposed(), X)
    assert "up.weight[in]" in members(g.group("c"))
    assert {"up.weight[out]", "bn.weight"} <= set(members(g.group("up")))


def test_split_with_literal_sizes_freezes():
    g = gp.trace(nets.SplitList(), X)
    assert not g.group("c1").prunable and "split" in g.group("c1").reason


def test_spatial_ops_pass_channels_through():
    g = gp.trace(nets.Spatial(), torch.randn(2, 3, 9, 9))
    assert g.group("c1").prunable and "prelu.weight" in members(g.group("c1"))


def test_softmax_across_channels_freezes():
    g = gp.trace(nets.SoftmaxChannels(), X)
    assert not g.group("c1").prunable and "softmax" in g.group("c1").reason


def test_channel_shuffle_view_transpose():
    g = gp.trace(nets.Shuffle(), X)
    grp = g.group("c1")
    assert grp.size == 4 and grp.prunable  # the 2 shuffle groups keep the same width
    w = member(grp, "c1.weight", 0)
    for k in range(4):
        np.testing.assert_array_equal(np.sort(w.index[w.unit == k]), [k, k + 4])


def test_multihead_attention_heads_and_embedding_are_groups():
    g = gp.trace(nets.MHA(), torch.randn(2, 5, 8))
    assert g.group("proj").prunable and g.group("attn").size == 2  # 2 heads
    assert g.group("attn.out_proj").prunable and "fc1.weight[in]" in members(g.group("attn.out_proj"))
    assert g.group("fc1").prunable and not g.unsupported


def test_inputs_and_outputs_are_never_pruned():
    r = gp.prune(nets.ConvBNConv().eval(), X, sparsity=0.9)
    assert r.model.c1.in_channels == 3 and r.model.c2.out_channels == 4


@pytest.mark.parametrize("net,x", [
    (nets.ConvBNConv, X), (nets.Residual, X), (nets.Concat, X), (nets.Depthwise, X),
    (nets.Grouped, X), (nets.GN, X), (nets.FlattenLinear, torch.randn(2, 3, 5, 5)),
    (nets.ChunkCat, X), (nets.LiteralSlice, X), (nets.Unknown, X), (nets.Twice, X), (nets.SE, X),
    (nets.Transposed, X), (nets.Spatial, torch.randn(2, 3, 9, 9)), (nets.Shuffle, X),
    (lambda: nets.Depthwise(2), X), (nets.MHA, torch.randn(2, 5, 8)),
])
@pytest.mark.parametrize("method", ["l1", "random"])
def test_mask_equivalence_on_hand_built_nets(net, x, method):
    from ..conftest import assert_mask_equivalent, healthy_init

    model = healthy_init(net().eval())
    r = gp.prune(model, x, sparsity=0.5, method=method)
    assert r.report.params[1] < r.report.params[0]
    assert_mask_equivalent(model, r, x)


class SelectiveKernel(nn.Module):
    """Two paths stacked on a new dim, weighted by a softmax over the paths of a (paths, C)
    view of one conv's output (SKNet): channel c of both paths and both attention rows go
    together; the softmax over paths mixes only entries of that unit."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 1)
        self.p0, self.p1 = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.fs = nn.Conv2d(8, 32, 1)
        self.out = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x = self.c0(x)
        y = torch.stack([self.p0(x), self.p1(x)], dim=1)
        a = self.fs(x)
        b, c, h, w = a.shape
        a = torch.softmax(a.view(b, 2, c // 2, h, w), dim=1)
        return self.out((y * a).sum(1))


def test_selective_kernel_paths_prune_per_channel():
    torch.manual_seed(0)
    m, x = SelectiveKernel().eval(), torch.randn(2, 3, 8, 8)
    g = gp.trace(m, x)
    grp = g.group("p0")
    assert grp.size == 16 and grp.prunable
    assert {mm.param for mm in grp.members} >= {"p0.weight", "p1.weight", "fs.weight", "out.weight"}
    r = gp.prune(m, x, sparsity=0.5)
    assert r.model.fs.out_channels == 16 and r.model.p1.out_channels == 8
    assert_mask_equivalent(m, r, x)
