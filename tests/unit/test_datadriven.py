"""Data-driven selection (lasso, greedy, taylor, bn_scale) and least-squares reconstruction, on
a CNN trained in the test on scikit-learn's real 8x8 digits; budgets (global ranking,
MACs/params targets); and their bad inputs."""

import json

import numpy as np
import pytest
import torch

import graphprune as gp
from graphprune.datasets import digits
from graphprune.errors import ConfigError, InputError
from graphprune.finetune import evaluate, train
from graphprune.models import digits_net, resnet20

from ..conftest import assert_same_state


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()
    model = train(digits_net(width=16), xtr, ytr, epochs=8, seed=0)
    return model, (xtr, ytr, xte, yte)


def test_lasso_and_greedy_with_reconstruction_keep_most_of_the_accuracy(trained):
    model, (xtr, ytr, xte, yte) = trained
    dense = evaluate(model, xte, yte)
    assert dense > 0.97
    calib = (xtr[:256], ytr[:256])
    l1 = gp.prune(model, xtr[:1], sparsity=0.5, method="l1")
    loss_l1 = dense - evaluate(l1.model, xte, yte)
    assert loss_l1 > 0.1  # 50% of the channels without fine-tuning hurts a magnitude criterion
    for method in ("lasso", "greedy"):
        r = gp.prune(model, xtr[:1], sparsity=0.5, method=method, calibration=calib,
                     reconstruct=True)
        loss = dense - evaluate(r.model, xte, yte)
        assert loss <= loss_l1 / 3, (method, loss, loss_l1)
        assert r.report.fidelity["total"]["cosine"] > 0.95


def test_reconstruction_never_increases_a_consumers_error(trained):
    model, (xtr, ytr, _, _) = trained
    for method in ("l1", "lasso", "greedy", "random"):
        r = gp.prune(model, xtr[:1], sparsity=0.6, method=method, calibration=xtr[:200],
                     reconstruct=True)
        refits = [c for g in r.report.fidelity["groups"].values() for c in g["consumers_refit"]]
        assert refits
        for c in refits:
            assert c["rel_err_refit"] <= c["rel_err_removed"] + 1e-9, c


def test_lasso_hits_the_exact_channel_count():
    torch.manual_seed(1)
    model = resnet20().eval()
    x = torch.randn(48, 3, 32, 32)
    for sparsity in (0.3, 0.5, 0.7):
        r = gp.prune(model, x[:1], sparsity=sparsity, method="lasso", calibration=x)
        for g in r.graph.prunable_groups:
            want = g.size - int(np.floor(sparsity * g.size + 1e-9))
            assert r.plan.channels[g.name] == (g.size, want)


def test_lasso_selects_the_channels_that_matter():
    # a conv whose channels 0..3 carry the signal and 4..7 are tiny: lasso must keep 0..3
    from .nets import ConvBNConv

    torch.manual_seed(0)
    model = ConvBNConv().eval()
    with torch.no_grad():
        model.bn.weight[4:] = 1e-4
        model.bn.bias[4:] = 0
    x = torch.randn(64, 3, 8, 8)
    r = gp.prune(model, x[:1], sparsity=0.5, method="lasso", calibration=x)
    assert r.plan.groups["c1"].keep == (0, 1, 2, 3)
    r = gp.prune(model, x[:1], sparsity=0.5, method="greedy", calibration=x)
    assert r.plan.groups["c1"].keep == (0, 1, 2, 3)


def test_saved_plan_replays_exactly_with_reconstruction(trained, tmp_path):
    model, (xtr, _, _, _) = trained
    r = gp.prune(model, xtr[:1], sparsity=0.5, method="lasso", calibration=xtr[:128],
                 reconstruct=True)
    p = tmp_path / "plan.json"
    r.plan.save(p)
    r2 = gp.prune(model, xtr[:1], plan=str(p), calibration=xtr[:128], reconstruct=True)
    assert_same_state(r2.model, r.model)
    # without reconstruction, the plan alone rebuilds the structure from the original weights
    r3 = gp.prune(model, xtr[:1], plan=str(p))
    assert [t.shape for t in r3.model.state_dict().values()] == \
        [t.shape for t in r.model.state_dict().values()]


def test_taylor_and_bn_scale(trained):
    model, (xtr, ytr, xte, yte) = trained
    r = gp.prune(model, xtr[:1], sparsity=0.3, method="taylor", calibration=(xtr[:128], ytr[:128]))
    assert r.report.params[1] < r.report.params[0]
    r2 = gp.prune(model, xtr[:1], sparsity=0.3, method="taylor", calibration=xtr[:128])  # no labels
    assert r2.plan.groups
    b = gp.prune(model, xtr[:1], sparsity=0.5, method="bn_scale")
    g = np.abs(model.bn1.weight.detach().numpy())
    assert b.plan.groups["conv1"].keep == tuple(sorted(np.argsort(-g, kind="stable")[:8]))


def test_report_has_fidelity_and_stage_timings(trained):
    model, (xtr, _, _, _) = trained
    r = gp.prune(model, xtr[:1], sparsity=0.5, method="greedy", calibration=xtr[:64],
                 reconstruct=True)
    rep = r.report
    assert set(rep.fidelity["total"]) == {"rel_err", "cosine"}
    assert set(rep.fidelity["groups"]) == set(r.plan.groups)
    assert {"trace", "plan", "apply", "targets", "collect", "select", "refit"} <= set(rep.timings)
    json.dumps(rep.to_dict())


def test_global_ranking_floors_and_targets():
    model = resnet20().eval()
    x = torch.randn(1, 3, 32, 32)
    r = gp.prune(model, x, sparsity=0.6, global_pruning=True, max_group_sparsity=0.75)
    ch = r.plan.channels
    assert all(after >= np.ceil(before * 0.25) for before, after in ch.values())
    total_before = sum(b for b, _ in ch.values())
    sizes = {g.name: g.size for g in r.graph.prunable_groups}
    removed = sum(sizes[n] - a for n, (_, a) in ch.items())
    assert removed == int(0.6 * sum(sizes.values()))
    assert total_before <= sum(sizes.values())
    for target in (0.5, 0.3):
        r = gp.prune(model, x, target_macs=target)
        assert target - 0.05 <= r.report.ratio("macs") <= target
        r = gp.prune(model, x, target_params=target, global_pruning=True, round_to=2)
        assert target - 0.05 <= r.report.ratio("params") <= target


def test_bad_data_driven_inputs():
    model = resnet20().eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ConfigError, match="method 'lasso' chooses channels from data"):
        gp.prune(model, x, method="lasso")
    with pytest.raises(ConfigError, match="reconstruct=True refits layers on data"):
        gp.prune(model, x, reconstruct=True)
    with pytest.raises(InputError, match=r"calibration batch 0 has input shapes \[\(8, 3, 28, 28\)\]"):
        gp.prune(model, x, method="greedy", calibration=torch.randn(8, 3, 28, 28))
    with pytest.raises(ConfigError, match="target_macs=1e-05 cannot be reached"):
        gp.prune(model, x, target_macs=0.00001)
    with pytest.raises(ConfigError, match="not both"):
        gp.prune(model, x, sparsity=0.5, target_macs=0.5)


def test_calibration_accepts_loaders_lists_and_pairs(trained):
    from torch.utils.data import DataLoader, TensorDataset

    from graphprune.calibration import as_calibration

    model, (xtr, ytr, _, _) = trained
    loader = DataLoader(TensorDataset(xtr[:100], ytr[:100]), batch_size=32)
    c = as_calibration(loader, xtr[:1])
    assert c.n_samples == 100 and c.has_labels and len(c) == 4
    c = as_calibration([xtr[:10], xtr[10:30]], xtr[:1])
    assert c.n_samples == 30 and not c.has_labels
    c = as_calibration(xtr, xtr[:1], max_samples=50)
    assert c.n_samples == 50
    r = gp.prune(model, xtr[:1], sparsity=0.5, method="greedy", calibration=loader)
    assert r.plan.groups


@pytest.mark.slow
def test_attention_heads_chosen_by_lasso_with_reconstruction_beat_magnitude():
    """A small timm ViT trained on digits: half of every block's heads go. Choosing them by
    LASSO on the output projection and refitting it keeps clearly more accuracy than L1."""
    timm = pytest.importorskip("timm")
    xtr, ytr, xte, yte = digits()
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=2, num_heads=4,
        num_classes=10, mlp_ratio=2)
    vit = train(vit, xtr, ytr, epochs=15, seed=0, lr=2e-3).eval()
    heads = [{"op_names": ["*attn.qkv"], "sparsity": 0.5}]
    l1 = gp.prune(vit, xtr[:1], config=heads, method="l1")
    lasso = gp.prune(vit, xtr[:1], config=heads, method="lasso", calibration=(xtr[:256], ytr[:256]),
                     reconstruct=True)
    assert lasso.model.blocks[1].attn.num_heads == 2
    assert lasso.report.fidelity["groups"]["blocks.0.attn.qkv"]["method"] == "lasso"
    assert evaluate(lasso.model, xte, yte) > evaluate(l1.model, xte, yte) + 0.03


# ---------------------------------------------------------------------- cost and equivalence
class _Mixed(torch.nn.Module):
    """A residual block with in-place ReLUs and an in-place add, a depthwise conv, a concat and a
    Linear head: every kind of consumer the frontier runner samples."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.a1 = nn.Conv2d(16, 12, 1, bias=False)
        self.bna = nn.BatchNorm2d(12)
        self.a2 = nn.Conv2d(12, 16, 3, padding=1, bias=False)
        self.bnb = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.b = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.relu(self.bn0(self.stem(x)))
        y = self.bnb(self.a2(self.relu(self.bna(self.a1(x)))))
        y += x
        s = self.relu(y)
        z = torch.cat([self.b(s), torch.relu(self.dw(s))], 1)
        return self.fc(z.mean((2, 3)))


def _layer_calls(model):
    """Counts every Conv/Linear call (of the model and of its copies, which share the hooks)."""
    count = {"n": 0}

    def hook(*_):
        count["n"] += 1

    n_layers = 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(hook)
            n_layers += 1
    return count, n_layers


def _run_both(model, x, method, batch_size=16):
    from graphprune.budget import uniform_amounts
    from graphprune.calibration import as_calibration
    from graphprune.criteria import get_criterion
    from graphprune.datadriven import sequential as seq

    g = gp.trace(model, x[:1])
    calib = as_calibration(x, x[:1], batch_size=batch_size)
    amounts = uniform_amounts(g, 0.5, None, (), 1)
    return [seq.run(g, calib, get_criterion(method), amounts, reconstruct=True, block_cache=bc,
                    device="cpu") for bc in (True, False)]


@pytest.mark.parametrize("method", ["lasso", "greedy"])
def test_block_cached_run_matches_the_straightforward_one(method):
    from ..conftest import healthy_init

    torch.manual_seed(0)
    for model, x in ((healthy_init(_Mixed()).eval(), torch.randn(40, 3, 10, 10)),
                     (healthy_init(resnet20()).eval(), torch.randn(24, 3, 16, 16))):
        cached, plain = _run_both(model, x, method)
        assert cached.plan.groups == plain.plan.groups
        assert set(cached.weights) == set(plain.weights) and cached.weights
        for k, w in plain.weights.items():
            assert torch.allclose(cached.weights[k], w, rtol=1e-5, atol=1e-6 * float(w.abs().max())), k
        assert cached.groups == plain.groups  # same per-consumer errors


def test_data_driven_prune_costs_a_few_passes_over_the_calibration_data():
    """resnet20 (10 groups, each stage's residual stream spanning the stage), lasso with
    reconstruction: the targets, the frontier moving once through the model and each group's
    span add up to less than 4 dense passes; re-running the model for every group costs more
    than 6."""
    torch.manual_seed(0)
    model = resnet20().eval()
    x = torch.randn(24, 3, 16, 16)
    count, n_layers = _layer_calls(model)
    passes = []
    for block_cache in (True, False):
        from graphprune.budget import uniform_amounts
        from graphprune.calibration import as_calibration
        from graphprune.criteria import get_criterion
        from graphprune.datadriven import sequential as seq

        g = gp.trace(model, x[:1])
        calib = as_calibration(x, x[:1], batch_size=8)
        amounts = uniform_amounts(g, 0.5, None, (), 1)
        count["n"] = 0
        seq.run(g, calib, get_criterion("lasso"), amounts, block_cache=block_cache)
        passes.append(count["n"] / (n_layers * len(calib)))
    assert passes[0] <= 4.0, passes
    assert passes[1] > 6.0, passes


def test_frontier_never_changes_a_cached_value():
    """An in-place write through a view into a value held in the frontier: every collection from
    that frontier sees the original value, and the view's write reaches its base."""
    from graphprune.calibration import as_calibration
    from graphprune.datadriven.collect import sample_layers
    from graphprune.datadriven.frontier import FrontierRunner

    class ViewWrite(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 1)
            self.c2 = torch.nn.Conv2d(8, 8, 1)
            self.c3 = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x):
            a = self.c1(x)
            v = a[:, :4]
            b = self.c2(a)
            v.mul_(2)
            return self.c3(torch.relu(a) + b)

    torch.manual_seed(0)
    model = ViewWrite().eval()
    x = torch.randn(12, 3, 6, 6)
    g = gp.trace(model, x[:1])
    calib = as_calibration(x, x[:1], batch_size=4)
    want = sample_layers(model, calib, ["c3"], rows=100, want_inputs=True, want_outputs=True)
    runner = FrontierRunner.build(g, model, calib, None)
    at_c2 = runner.first_read({"c2.weight"})
    for _ in range(3):
        got = runner.collect(["c3"], at_c2, 100, inputs=True, outputs=True)
        assert runner.pos == at_c2
        assert torch.equal(got["c3"].P, want["c3"].P) and torch.equal(got["c3"].Y, want["c3"].Y)
    # a frontier over the memory budget is dropped: the next run starts from the inputs
    small = FrontierRunner(g, model, calib, None, max_bytes=0)
    for _ in range(2):
        got = small.collect(["c3"], at_c2, 100, inputs=True, outputs=True)
        assert small.pos == 0 and torch.equal(got["c3"].P, want["c3"].P)


def test_selection_gram_equals_the_explicit_contributions():
    """G[u, v] = <Z_u, Z_v> and xy[u] = <Z_u, t> with Z formed explicitly, for a dense conv, a
    grouped conv, a depthwise conv and a Linear."""
    from graphprune.datadriven.collect import Samples
    from graphprune.datadriven.select import consumer_stats

    torch.manual_seed(0)
    nn = torch.nn
    for m in (nn.Conv2d(12, 10, 3), nn.Conv2d(12, 24, 3, groups=4), nn.Conv2d(12, 12, 3, groups=12),
              nn.Linear(12, 7)):
        K = 1 if isinstance(m, nn.Linear) else 9
        P = torch.randn(50, 12, K, dtype=torch.float64)
        Y = torch.randn(50, m.weight.shape[0], dtype=torch.float64)
        chans, units = np.array([0, 2, 3, 5, 7]), np.array([0, 1, 1, 2, 3])
        alive = torch.ones(12, dtype=torch.bool)
        alive[1] = False
        G, xy, _ = consumer_stats(m, Samples(P.float()), Y.float(), units, chans, 4, alive)
        # explicit: the block-diagonal full weight, each channel's contribution to every output
        w = m.weight.detach().double().reshape(m.weight.shape[0], -1, K)
        groups = 1 if isinstance(m, nn.Linear) else m.groups
        full = torch.zeros(w.shape[0], 12, K, dtype=torch.float64)
        o, i = w.shape[0] // groups, 12 // groups
        for q in range(groups):
            full[q * o:(q + 1) * o, q * i:(q + 1) * i] = w[q * o:(q + 1) * o]
        Z = torch.einsum("sck,ock->cso", P, full)  # (C, S, O)
        Zu = torch.zeros(4, *Z.shape[1:], dtype=torch.float64).index_add_(
            0, torch.as_tensor(units), Z[chans])
        other = alive.clone()
        other[chans] = False
        bias = m.bias.detach().double()
        t = Y - Z[other].sum(0) - bias
        want_G = torch.einsum("uso,vso->uv", Zu, Zu) / (t * t).sum()
        want_xy = torch.einsum("uso,so->u", Zu, t) / (t * t).sum()
        assert np.allclose(G, want_G.numpy(), rtol=1e-4, atol=1e-6 * np.abs(G).max())
        assert np.allclose(xy, want_xy.numpy(), rtol=1e-4, atol=1e-6 * np.abs(xy).max())
