"""Training-time compression on scikit-learn's real digits (trained in the test): ADMM, AGP,
lottery ticket, staged pruning, custom projections, joint budgets; and their bad inputs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphprune.datasets import digits
from graphprune.errors import ConfigError
from graphprune.finetune import evaluate, train
from graphprune.training import (
    ADMM, AGPPruner, ChannelSparsity, Intersection, JointBudget, LevelPruner, Levels,
    LotteryTicketPruner, Projection, Sparsity, compression_report, distillation_loss,
    masked_weights_are_zero,
)
from graphprune.models import digits_net
from graphprune.training.admm import DEFAULT_RHO, resolve_constraints
from graphprune.training.targets import resolve
from graphprune.sparsity import n_kept


@pytest.fixture(scope="module")
def trained():
    xtr, ytr, xte, yte = digits()
    torch.manual_seed(0)
    model = train(digits_net(), xtr, ytr, epochs=10, seed=0)
    return model, (xtr, ytr, xte, yte)


def _admm_train(model, admm, xtr, ytr, epochs=12):
    train(model, xtr, ytr, epochs=epochs, lr=0.01, optimizer="sgd", schedule="constant",
          loss_fn=lambda o, y: admm.loss(F.cross_entropy(o, y)), after_step=admm.step)


@pytest.mark.slow
def test_admm_90_percent_unstructured_then_masked_finetuning(trained):
    model, (xtr, ytr, xte, yte) = trained
    dense = evaluate(model, xte, yte)
    m = copy.deepcopy(model)
    admm = ADMM(m, [{"op_types": ["default"], "projection": Sparsity(0.9)}], rho_growth=1.05,
                update_interval=22)
    _admm_train(m, admm, xtr, ytr)
    assert admm.finalize() is m
    train(m, xtr, ytr, epochs=5, lr=5e-4, after_step=admm.step)  # masked retraining: same loop
    assert evaluate(m, xte, yte) >= dense - 0.015
    assert set(admm.masks) == {"conv1.weight", "conv2.weight", "conv3.weight", "fc.weight"}
    for name, mask in admm.masks.items():
        w = dict(m.named_parameters())[name]
        assert (w[~mask] == 0).all(), name  # exactly zero after training
        assert int(mask.sum()) == n_kept(w.numel(), 0.9)  # exactly the asked sparsity


@pytest.mark.slow
def test_admm_channel_pruning_shrinks_physically(trained):
    model, (xtr, ytr, xte, yte) = trained
    dense = evaluate(model, xte, yte)
    m = copy.deepcopy(model)
    admm = ADMM(m, ChannelSparsity(0.5), rho_growth=1.05, update_interval=22,
                example_inputs=xtr[:1])
    _admm_train(m, admm, xtr, ytr)
    small = admm.finalize()
    assert small is not m and small.conv2.out_channels == 32 and small.fc.in_features == 32 * 16
    assert small(xtr[:3]).shape == (3, 10)
    train(small, xtr, ytr, epochs=5, lr=1e-3)
    assert evaluate(small, xte, yte) >= dense - 0.02


def test_agp_reaches_final_sparsity_exactly_at_end_step(trained):
    model, (xtr, ytr, _, _) = trained
    m = copy.deepcopy(model)
    p = AGPPruner(m, [{"sparsity": 0.8, "op_types": ["Conv2d"]}], start_step=2, end_step=12,
                  frequency=3)
    p.compress()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    seen = []
    for step in range(1, 16):
        opt.zero_grad()
        F.cross_entropy(m(xtr[:64]), ytr[:64]).backward()
        opt.step()
        p.step()
        seen.append(p.sparsity()["conv2.weight"])
        if step < 12:
            assert seen[-1] < 0.8
    assert seen[11] == pytest.approx(0.8, abs=1e-4)  # step 12 is the end step
    assert all(s == pytest.approx(0.8, abs=1e-4) for s in seen[11:])
    assert seen == sorted(seen)  # the schedule never decreases
    assert masked_weights_are_zero(p)


def test_lottery_ticket_rewinds_to_the_initial_weights():
    xtr, ytr, _, _ = digits()
    torch.manual_seed(1)
    m = digits_net()
    p = LotteryTicketPruner(m, [{"sparsity": 0.5, "op_types": ["default"]}], rounds=2)
    p.compress()
    init = {k: v.clone() for k, v in m.state_dict().items()}
    for r in (1, 2):
        train(m, xtr[:512], ytr[:512], epochs=1)
        p.next_round()
        w, w0, mask = m.conv2.weight, init["conv2.weight"], p.masks["conv2.weight"]
        assert torch.equal(w[mask], w0[mask]) and (w[~mask] == 0).all()
        assert float((~mask).float().mean()) == pytest.approx(1 - 0.5 ** r, abs=1e-3)
        assert torch.equal(m.bn2.running_mean, init["bn2.running_mean"])
    with pytest.raises(ConfigError, match="rounds are done"):
        p.next_round()


def test_staged_pruning_follows_its_stages(trained):
    model, _ = trained
    m = copy.deepcopy(model)
    p = LevelPruner(m, [{"sparsity": [0.3, 0.6, 0.8], "op_types": ["Conv2d"]},
                        {"sparsity": 0.5, "op_names": ["fc"], "granularity": "kernel"}],
                    stage_epochs=[0, 2, 4])
    p.compress()
    for epoch, want in [(0, 0.3), (1, 0.3), (2, 0.6), (3, 0.6), (4, 0.8), (7, 0.8)]:
        p.update_epoch(epoch)
        assert p.sparsity()["conv3.weight"] == pytest.approx(want, abs=1e-3)
        assert p.sparsity()["fc.weight"] == pytest.approx(0.5, abs=1e-3)


def test_filter_granularity_masks_whole_units_and_finalize_shrinks(trained):
    model, (xtr, ytr, xte, yte) = trained
    m = copy.deepcopy(model)
    p = LevelPruner(m, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], granularity="filter",
                    criterion="fpgm", example_inputs=xtr[:1])
    p.compress()
    assert "bn2.running_var" in p.masks and "fc.weight" in p.masks  # coupled tensors masked too
    train(m, xtr, ytr, epochs=2, lr=1e-3, after_step=p.step)
    masked_acc = evaluate(m, xte, yte)
    small = p.finalize()
    assert small.conv1.out_channels == 16 and evaluate(small, xte, yte) == masked_acc


class PowerOfTwo(Projection):
    """A custom constraint: every weight a signed power of two (or zero)."""

    def project(self, w, name):
        e = torch.clamp(torch.round(torch.log2(w.abs().clamp_min(1e-8))), -8, 0)
        return torch.where(w.abs() < 2 ** -9, torch.zeros_like(w), torch.sign(w) * 2 ** e)


def test_custom_projection_end_to_end(trained):
    model, (xtr, ytr, xte, yte) = trained
    m = copy.deepcopy(model)
    admm = ADMM(m, [{"op_types": ["Conv2d"], "projection": PowerOfTwo()},
                    {"op_names": ["fc"], "projection": Intersection(Sparsity(0.7), Levels(bits=3))}],
                update_interval=22)
    _admm_train(m, admm, xtr, ytr, epochs=6)
    with admm.projected():
        projected = m.conv2.weight.detach().clone()
    assert not torch.equal(projected, m.conv2.weight)
    admm.finalize()
    w = m.conv2.weight.detach()
    nz = w[w != 0]
    assert torch.equal(torch.log2(nz.abs()), torch.round(torch.log2(nz.abs())))
    fc = m.fc.weight.detach()
    assert len(torch.unique(fc[fc != 0].abs())) <= 3 and float((fc == 0).float().mean()) >= 0.7
    assert evaluate(m, xte, yte) > 0.5


def test_joint_budget_respects_budgets_and_counts_honestly(trained):
    model, (xtr, ytr, xte, yte) = trained
    m = copy.deepcopy(model)
    jb = JointBudget(nnz_budget=0.05, bit_budget=3.5, min_bits=2, bits_until=20)
    names = ["conv1", "conv2", "conv3", "fc"]
    admm = ADMM(m, jb, rho_growth=1.05, update_interval=22)
    teacher = copy.deepcopy(model)
    train(m, xtr, ytr, epochs=12, lr=0.01, optimizer="sgd", schedule="constant",
          loss_fn=lambda o, y: admm.loss(F.cross_entropy(o, y)), after_step=admm.step)
    admm.finalize()  # masked fine-tuning, then the final projection again
    train(m, xtr, ytr, epochs=4, lr=5e-4, after_step=admm.step)
    admm.finalize()
    W = {f"{n}.weight": getattr(m, n).weight.detach() for n in names}
    assert set(jb.bits) == set(W) == set(admm.masks)
    s = jb.summary(m)
    total = sum(w.numel() for w in W.values())
    kept = sum(int(mk.sum()) for mk in admm.masks.values())  # quantizing may zero a few more
    assert 0.9 * n_kept(total, 1 - 0.05) <= kept <= n_kept(total, 1 - 0.05)
    assert s["density"] <= 0.05 + 1e-3 and s["avg_bits"] <= 3.5 + 1e-9
    assert min(jb.bits.values()) >= 2
    for n, w in W.items():  # quantized: at most 2**(bits-1)-1 magnitudes per layer
        assert len(torch.unique(w[w != 0].abs())) <= 2 ** (jb.bits[n] - 1) - 1
    rep = compression_report(m, jb.bits)
    assert rep["ratio"] > 15 and rep["bytes"] < rep["fp32_bytes"]
    with torch.no_grad():
        logits = teacher(xtr[:32])
    assert float(distillation_loss(logits, logits, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)
    assert evaluate(m, xte, yte) > 0.95


def test_bad_training_inputs(trained):
    model, (xtr, _, _, _) = trained
    m = copy.deepcopy(model)
    with pytest.raises(ConfigError, match="Entry 0 of the config list of LevelPruner selects no layer"):
        LevelPruner(m, [{"sparsity": 0.5, "op_names": ["nope*"]}])
    with pytest.raises(ConfigError, match="The config list of LevelPruner matches no layer of DigitsNet"):
        LevelPruner(m, [{"sparsity": 0.5, "op_types": ["Conv1d"]}])
    with pytest.raises(ConfigError, match="must not decrease"):
        LevelPruner(m, [{"sparsity": [0.6, 0.3], "op_types": ["default"]}])
    with pytest.raises(ConfigError, match="must not decrease"):
        AGPPruner(m, [{"sparsity": 0.2, "op_types": ["default"]}], end_step=10,
                  initial_sparsity=0.5)
    with pytest.raises(ConfigError, match="'rho' parameter of ADMM must be a float > 0"):
        ADMM(m, Sparsity(0.5), rho=0)
    with pytest.raises(ConfigError, match="'rho' parameter of ADMM"):
        ADMM(m, Sparsity(0.5), rho=-1.0)
    with pytest.raises(ConfigError, match="selects no layer.*Did you mean 'conv3'"):
        ADMM(m, [{"op_names": ["conv9"], "projection": Sparsity(0.5)}])
    with pytest.raises(ConfigError, match="example_inputs"):
        LevelPruner(m, [{"sparsity": 0.5}], granularity="filter")
    with pytest.raises(ConfigError, match="sparsity' parameter of LevelPruner"):
        LevelPruner(m, [{"sparsity": 1.2}])
    with pytest.raises(ConfigError, match="bit_budget"):
        JointBudget(0.1, 12)
    with pytest.raises(ConfigError, match="granularity"):
        LevelPruner(m, [{"sparsity": 0.5}], granularity="row")


# ---------------------------------------------------------------------- ADMM usability (fast)
class SameConv(nn.Conv2d):
    """A Conv2d subclass (like timm's Conv2dSame): a default layer although its name differs."""


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = SameConv(6, 8, 3, padding=1)
        self.emb = nn.Embedding(5, 4)  # not a default layer
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x))))).flatten(1))


def _tiny_batches(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 4, 4, generator=g), torch.randint(0, 10, (16,), generator=g))
            for _ in range(n)]


def _steps(model, admm, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        admm.loss(F.cross_entropy(model(x), y)).backward()
        opt.step()
        admm.step()


def test_one_resolver_and_its_defaults():
    m = Tiny()
    layers = ["conv1", "conv2", "fc"]  # 'default': convs and linears, subclasses included
    assert [t.module for t in resolve(m, [{"sparsity": 0.5}])] == layers
    assert list(resolve_constraints(m, Sparsity(0.5))) == [f"{n}.weight" for n in layers]
    cfg = [{"op_types": ["default"]}, {"op_names": ["emb"]},   # op_names alone: any class
           {"op_names": ["conv*"], "exclude": True}, {"op_names": ["conv2"]}]
    want = ["conv2", "emb", "fc"]
    assert [t.module for t in resolve(m, [{**e, "sparsity": 0.5} if not e.get("exclude") else e
                                          for e in cfg])] == want
    got = resolve_constraints(m, [{**e, "projection": Sparsity(0.5)} if not e.get("exclude") else e
                                  for e in cfg])
    assert list(got) == [f"{n}.weight" for n in want]
    with pytest.warns(FutureWarning, match=r"\[\{'op_names': \['conv\*'\], 'projection': "
                                           r"Sparsity\(0.5\)\}\]"):
        old = resolve_constraints(m, {"conv*": Sparsity(0.5)})  # the deprecated dict form
    assert list(old) == ["conv1.weight", "conv2.weight"]  # bn1's weight is not a matrix
    with pytest.raises(ConfigError, match="names class 'conv2d', which is neither in Tiny nor in "
                                          "torch.nn. Did you mean 'Conv2d'"):
        LevelPruner(m, [{"sparsity": 0.5, "op_types": ["conv2d"]}])
    with pytest.raises(ConfigError, match="^Unknown key 'sparsty' in entry 0 of the config list of "
                                          "LevelPruner. .* Did you mean 'sparsity'"):
        LevelPruner(m, [{"sparsty": 0.5}])
    with pytest.raises(ConfigError, match=r"ADMM entries give a 'projection': write "
                                          r"\{'projection': Sparsity\(0.8\), ...\}"):
        ADMM(m, [{"sparsity": 0.8}])
    with pytest.raises(ConfigError, match=r"wrap the dict in a list"):
        ADMM(m, {"op_types": ["Conv2d"], "projection": Sparsity(0.8)})
    with pytest.raises(ConfigError, match="'global_projection' parameter of ADMM is gone: pass "
                                          "the global projection as the constraint"):
        ADMM(m, Sparsity(0.5), global_projection=JointBudget(0.1, 4))


def test_rho_default_is_the_documented_one():
    assert ADMM(Tiny(), Sparsity(0.5)).rho == DEFAULT_RHO == 0.2


def test_masked_retraining_is_the_same_loop():
    """After finalize() the same loop (admm.loss, opt.step, admm.step) keeps the zeros exactly,
    even through momentum and weight decay of an optimizer that ran before finalize()."""
    torch.manual_seed(0)
    m = Tiny()
    admm = ADMM(m, [{"op_types": ["Conv2d", "SameConv"], "projection": Sparsity(0.58)},
                    {"op_names": ["fc"], "projection": Intersection(Sparsity(0.9), Levels(bits=3))}],
                update_interval=2)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    batches = _tiny_batches()
    _steps(m, admm, opt, batches)
    assert admm.masks == {}
    assert admm.finalize() is m
    assert {n: int(mk.sum()) for n, mk in admm.masks.items()} == {
        "conv1.weight": n_kept(54, 0.58), "conv2.weight": n_kept(432, 0.58),
        "fc.weight": n_kept(1280, 0.9)}
    x, y = batches[0]
    assert torch.equal(admm.loss(F.cross_entropy(m(x), y)), F.cross_entropy(m(x), y))
    params = dict(m.named_parameters())
    for x, y in batches * 2:
        opt.zero_grad()
        admm.loss(F.cross_entropy(m(x), y)).backward()
        for n, mk in admm.masks.items():
            assert (params[n].grad[~mk] == 0).all()  # gradients masked
        opt.step()
        admm.step()
        for n, mk in admm.masks.items():
            assert (params[n][~mk] == 0).all() and (params[n][mk] != 0).any()
    fc_before = m.fc.weight.detach().clone()
    admm.finalize()  # again: back onto the levels, zeros kept
    nz = m.fc.weight[m.fc.weight != 0]
    assert len(nz.abs().unique()) <= 3 and not torch.equal(fc_before, m.fc.weight)
    assert (m.fc.weight[~admm.masks["fc.weight"]] == 0).all()


class ZeroSmall(Projection):
    """A custom projection that says nothing about keeps_zeros but produces zeros."""

    def project(self, w, name):
        return torch.where(w.abs() < w.abs().median(), torch.zeros_like(w), w)


class Clip(Projection):
    keeps_zeros = False

    def project(self, w, name):
        return w.clamp(-0.1, 0.1)


class BadShape(Projection):
    def project(self, w, name):
        return w.flatten()


def test_a_custom_projection_with_zeros_gets_masks():
    torch.manual_seed(0)
    m = Tiny()
    admm = ADMM(m, [{"op_names": ["conv1"], "projection": ZeroSmall()},
                    {"op_names": ["conv2"], "projection": Levels(bits=2)},   # zero is a level
                    {"op_names": ["fc"], "projection": Clip()}])
    admm.finalize()
    assert set(admm.masks) == {"conv1.weight"}
    assert torch.equal(admm.masks["conv1.weight"], m.conv1.weight != 0)
    assert Intersection(Clip(), Levels()).keeps_zeros is False
    assert Intersection(ZeroSmall(), Levels()).keeps_zeros is None
    assert Intersection(Sparsity(0.5), Levels()).keeps_zeros is True
    with pytest.raises(ConfigError, match=r"BadShape\(\) must map weight 'fc.weight' of shape "
                                          r"\(10, 128\) to a tensor of the same shape"):
        ADMM(m, [{"op_names": ["fc"], "projection": BadShape()}])


def test_deprecated_masking_calls_still_work(tmp_path):
    from graphprune.export.masks import load_masks

    torch.manual_seed(0)
    m = Tiny()
    admm = ADMM(m, Sparsity(0.5), update_interval=2)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    _steps(m, admm, opt, _tiny_batches(4))
    with pytest.raises(ConfigError, match="before finalize"):
        admm.export_masks(tmp_path / "m.safetensors")
    with pytest.warns(FutureWarning, match="finalize\\(\\) installs the masks"):
        masks = admm.grad_mask()
    assert masks is admm.masks and admm.final_masks is admm.masks
    with pytest.warns(FutureWarning, match="call step\\(\\)"):
        admm.step_masked()
    admm.export_masks(tmp_path / "m.safetensors")
    back = load_masks(tmp_path / "m.safetensors")
    assert all(torch.equal(back[n], masks[n]) for n in masks)
