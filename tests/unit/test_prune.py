"""prune(): physical shrinking, masks, plans, configs, and the caller's model left alone."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.models import lenet5, resnet20

from ..conftest import assert_same_state, assert_unchanged, healthy_init, snapshot
from . import nets

X32 = torch.randn(2, 3, 32, 32)


def test_prune_result_is_smaller_and_runs():
    model = resnet20().eval()
    r = gp.prune(model, X32, sparsity=0.5)
    assert isinstance(r.model, nn.Module) and r.model is not model
    assert r.report.params[1] < r.report.params[0] and r.report.macs[1] < r.report.macs[0]
    assert r.model(X32).shape == (2, 10)
    assert r.model.layer1[0].conv1.out_channels == 8
    assert r.model.layer1[0].bn1.num_features == 8
    assert sum(p.numel() for p in r.model.parameters()) == r.report.params[1]


def test_callers_model_is_untouched_even_in_train_mode():
    model = resnet20().train()
    snap = snapshot(model)
    r = gp.prune(model, X32, sparsity=0.5)
    assert_unchanged(model, snap)
    # the new model owns its tensors: training it does not touch the original
    with torch.no_grad():
        for p in r.model.parameters():
            p.add_(1.0)
    assert_unchanged(model, snap)


def test_inplace_modifies_the_model():
    model = resnet20().eval()
    r = gp.prune(model, X32, sparsity=0.5, inplace=True)
    assert r.model is model and model.layer1[0].conv1.out_channels == 8


class _FunctionalLN(nn.LayerNorm):
    """A LayerNorm subclass that fx traces through (timm's LayerNorm): its normalized_shape is a
    literal in the graph that only the resizer refreshes."""

    def forward(self, x):
        return nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def test_inplace_refreshes_the_attributes_of_modules_traced_through():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), _FunctionalLN(16),
                          nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    fresh = copy.deepcopy(model)
    r = gp.prune(model, x, sparsity=0.5, inplace=True)
    assert r.model is model and model[3].normalized_shape == (8,) and model(x).shape == (2, 4)
    rebuilt = gp.apply_masks(fresh, r.masks, x, inplace=True)
    assert rebuilt is fresh and rebuilt[3].normalized_shape == (8,)
    assert_same_state(rebuilt, model)


def test_masks_have_original_shapes_and_cover_bn_stats():
    model = resnet20().eval()
    r = gp.prune(model, X32, sparsity=0.5)
    sd = model.state_dict()
    for k, m in r.masks.items():
        assert m.shape == sd[k].shape and m.dtype == torch.bool
    assert "layer1.0.bn1.running_mean" in r.masks and "layer1.0.bn1.running_var" in r.masks
    assert int(r.masks["layer1.0.bn1.weight"].sum()) == 8


def test_save_load_apply_masks_reproduces_exactly(tmp_path):
    model = healthy_init(resnet20().eval())
    r = gp.prune(model, X32, sparsity=0.5, method="fpgm")
    path = tmp_path / "m.safetensors"
    gp.save_masks(r.masks, path, plan=r.plan)
    masks = gp.load_masks(path)
    assert set(masks) == set(r.masks)
    fresh = resnet20().eval()
    fresh.load_state_dict(model.state_dict())
    rebuilt = gp.apply_masks(fresh, path, X32)
    assert_same_state(rebuilt, r.model)


def test_plan_round_trips_and_replays(tmp_path):
    model = resnet20().eval()
    r = gp.prune(model, X32, sparsity=0.4, method="l2")
    p = tmp_path / "plan.json"
    r.plan.save(p)
    plan = gp.Plan.load(p)
    assert plan == r.plan
    r2 = gp.prune(model, X32, plan=str(p))
    assert_same_state(r2.model, r.model)


def test_hand_edited_plan_changes_one_group(tmp_path):
    import json

    model = resnet20().eval()
    r = gp.prune(model, X32, sparsity=0.5)
    d = r.plan.to_dict()
    d["groups"]["layer1.0.conv1"]["keep"] = [0, 1, 2]
    del d["groups"]["layer3.1.conv1"]  # pin a layer: keep all its channels
    p = tmp_path / "edited.json"
    p.write_text(json.dumps(d))
    r2 = gp.prune(model, X32, plan=str(p))
    assert r2.model.layer1[0].conv1.out_channels == 3
    assert r2.model.layer3[1].conv1.out_channels == 64


def test_round_to_and_minimum_one_channel():
    model = resnet20().eval()
    r = gp.prune(model, X32, sparsity=0.5, round_to=8)
    for g in r.report.groups:
        if g.prunable:
            assert g.channels_after % 8 == 0
    r = gp.prune(model, X32, sparsity=0.99)
    assert all(g.channels_after >= 1 for g in r.report.groups)


def test_l1_keeps_the_largest_filters():
    model = nets.ConvBNConv().eval()
    with torch.no_grad():
        for i in range(8):
            model.c1.weight[i].fill_(0.01 * (i + 1) * (-1) ** i)
    r = gp.prune(model, torch.randn(1, 3, 8, 8), sparsity=0.5)
    assert r.plan.groups["c1"].keep == (4, 5, 6, 7)


def test_fpgm_prunes_the_most_replaceable_filter():
    model = nets.ConvBNConv().eval()
    with torch.no_grad():
        w = torch.randn(8, 3, 3, 3)
        w[3] = w[[0, 1, 2, 4, 5, 6, 7]].mean(0)  # closest to all others: the geometric median
        model.c1.weight.copy_(w)
    r = gp.prune(model, torch.randn(1, 3, 8, 8), sparsity=0.125, method="fpgm")
    assert 3 not in r.plan.groups["c1"].keep


def test_methods_are_registered_and_random_is_seeded():
    assert {"l1", "l2", "fpgm", "random"} <= set(gp.list_criteria())
    m = resnet20().eval()
    a = gp.prune(m, X32, method="random", seed=1).plan
    b = gp.prune(m, X32, method="random", seed=1).plan
    c = gp.prune(m, X32, method="random", seed=2).plan
    assert a == b and a != c


def test_config_list_later_entries_override_and_exclude():
    model = resnet20().eval()
    config = [
        {"op_types": ["Conv2d"], "sparsity": 0.5},
        {"op_names": ["layer3.*"], "sparsity": 0.25},
        {"op_names": ["layer1.0.conv1"], "exclude": True},
    ]
    r = gp.prune(model, X32, config=config)
    ch = r.plan.channels
    assert ch["layer2.1.conv1"] == (32, 16)
    assert ch["layer3.1.conv1"] == (64, 48)
    assert "layer1.0.conv1" not in r.plan.groups


def test_ignore_leaves_module_untouched():
    model = resnet20().eval()
    r = gp.prune(model, X32, sparsity=0.5, ignore=["layer2.0.conv2"])
    assert torch.equal(r.model.layer2[0].conv2.weight, model.layer2[0].conv2.weight)
    r = gp.prune(model, X32, sparsity=0.5, ignore=[model.layer1[0].conv1])
    assert r.model.layer1[0].conv1.out_channels == 16
    r = gp.prune(model, X32, sparsity=0.5, ignore=[nn.BatchNorm2d])
    assert all(m.num_features == m.weight.shape[0] for m in r.model.modules()
               if isinstance(m, nn.BatchNorm2d))
    assert r.report.params[0] == r.report.params[1]


def test_report_table_and_dict():
    r = gp.prune(lenet5().eval(), torch.randn(1, 1, 32, 32), sparsity=0.5)
    text = str(r.report)
    assert "params" in text and "conv1" in text
    d = r.report.to_dict()
    assert d["params"][0] > d["params"][1]
    g = {x["name"]: x for x in d["groups"]}
    assert g["conv2"]["channels_before"] == 16 and g["conv2"]["channels_after"] == 8
    assert g["conv2"]["macs_after"] < g["conv2"]["macs_before"]


def test_graph_views():
    g = gp.trace(resnet20().eval(), X32)
    s = g.summary()
    assert "prunable" in s and "layer1.0.conv1" in s
    G = g.to_networkx()
    assert G.number_of_nodes() > 20
    assert any(d["prunable"] for _, d in G.nodes(data=True))
    assert g.to_dot().startswith("digraph")


def test_kept_indices_follow_the_plan():
    model = nets.Concat().eval()
    x = torch.randn(1, 3, 8, 8)
    r = gp.prune(model, x, sparsity=0.5, method="random", seed=3)
    keep_b = np.array(r.plan.groups["b"].keep)
    keep_a = np.array(r.plan.groups["a"].keep)
    kept_in = np.concatenate([keep_a, 8 + keep_b])
    torch.testing.assert_close(r.model.c.weight, model.c.weight[:, kept_in])
    torch.testing.assert_close(r.model.bn.running_mean, model.bn.running_mean[kept_in])


@pytest.mark.parametrize("sparsity", [0.0, 0.3])
def test_zero_sparsity_is_identity(sparsity):
    model = lenet5().eval()
    r = gp.prune(model, torch.randn(1, 1, 32, 32), sparsity=sparsity)
    if sparsity == 0.0:
        assert not r.masks and r.report.params[0] == r.report.params[1]


def test_tracing_never_adds_attributes_to_the_callers_model():
    class WithConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)
            self.d = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.d(self.c(x) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1))

    model = WithConstant().eval()
    before = set(vars(model))
    r = gp.prune(model, torch.randn(1, 3, 8, 8), sparsity=0.5)
    assert set(vars(model)) == before
    assert not r.graph.group("c").prunable  # multiplied by a constant of fixed size
