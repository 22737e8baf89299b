"""Training-time compression on scikit-learn's real digits (trained in the test): ADMM, AGP,
lottery ticket, staged pruning, custom projections, joint budgets; and their bad inputs."""

import copy

import pytest
import torch
import torch.nn.functional as F

from graphprune.datasets import digits
from graphprune.errors import ConfigError
from graphprune.finetune import evaluate, train
from graphprune.training import (
    ADMM, AGPPruner, ChannelSparsity, Intersection, JointBudget, LevelPruner, Levels,
    LotteryTicketPruner, Projection, Sparsity, compression_report, distillation_loss,
    masked_weights_are_zero,
)
from graphprune.models import digits_net


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
    admm = ADMM(m, Sparsity(0.9), rho=0.2, rho_growth=1.05, update_interval=22)
    _admm_train(m, admm, xtr, ytr)
    admm.finalize()
    masks = admm.grad_mask(admm.final_masks)
    train(m, xtr, ytr, epochs=5, lr=5e-4, after_step=admm.step_masked)
    assert evaluate(m, xte, yte) >= dense - 0.015
    for name, mask in masks.items():
        w = dict(m.named_parameters())[name]
        assert (w[~mask] == 0).all(), name  # exactly zero after training
        assert float((~mask).float().mean()) == pytest.approx(0.9, abs=0.002)


@pytest.mark.slow
def test_admm_channel_pruning_shrinks_physically(trained):
    model, (xtr, ytr, xte, yte) = trained
    dense = evaluate(model, xte, yte)
    m = copy.deepcopy(model)
    admm = ADMM(m, ChannelSparsity(0.5), rho=0.2, rho_growth=1.05, update_interval=22,
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
    admm = ADMM(m, {"conv*": PowerOfTwo(), "fc": Intersection(Sparsity(0.7), Levels(bits=3))},
                rho=0.2, update_interval=22)
    _admm_train(m, admm, xtr, ytr, epochs=6)
    admm.apply_projection()
    projected = m.conv2.weight.detach().clone()
    admm.restore()
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
    admm = ADMM(m, {n: Sparsity(0.0) for n in names}, rho=0.2, rho_growth=1.05,
                update_interval=22, global_projection=jb)
    teacher = copy.deepcopy(model)
    train(m, xtr, ytr, epochs=12, lr=0.01, optimizer="sgd", schedule="constant",
          loss_fn=lambda o, y: admm.loss(F.cross_entropy(o, y)), after_step=admm.step)
    admm.finalize()
    admm.grad_mask(admm.final_masks)  # masked fine-tuning, then the final projection again
    train(m, xtr, ytr, epochs=4, lr=5e-4, after_step=admm.step_masked)
    admm.finalize()
    W = {f"{n}.weight": getattr(m, n).weight.detach() for n in names}
    s = jb.summary(W)
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
    with pytest.raises(ConfigError, match="matches no layer"):
        LevelPruner(m, [{"sparsity": 0.5, "op_names": ["nope*"]}])
    with pytest.raises(ConfigError, match="must not decrease"):
        LevelPruner(m, [{"sparsity": [0.6, 0.3], "op_types": ["default"]}])
    with pytest.raises(ConfigError, match="must not decrease"):
        AGPPruner(m, [{"sparsity": 0.2, "op_types": ["default"]}], end_step=10,
                  initial_sparsity=0.5)
    with pytest.raises(ConfigError, match="'rho' parameter of ADMM must be a float > 0"):
        ADMM(m, Sparsity(0.5), rho=0)
    with pytest.raises(ConfigError, match="'rho' parameter of ADMM"):
        ADMM(m, Sparsity(0.5), rho=-1.0)
    with pytest.raises(ConfigError, match="matches no module"):
        ADMM(m, {"conv9": Sparsity(0.5)})
    with pytest.raises(ConfigError, match="example_inputs"):
        LevelPruner(m, [{"sparsity": 0.5}], granularity="filter")
    with pytest.raises(ConfigError, match="sparsity' parameter of LevelPruner"):
        LevelPruner(m, [{"sparsity": 1.2}])
    with pytest.raises(ConfigError, match="bit_budget"):
        JointBudget(0.1, 12)
    with pytest.raises(ConfigError, match="granularity"):
        LevelPruner(m, [{"sparsity": 0.5}], granularity="row")
