"""One-shot pruning of decoders block by block: Wanda-sp and FLAP on any graph, the layer-by-layer
runner (selection, least-squares refit, FLAP's bias), its equivalence with whole-model passes,
parameter budgets, and a pruned Hugging Face model that still generates, saves and loads."""


import numpy as np
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.apply import apply_plan
from graphprune.calibration import as_calibration
from graphprune.criteria import ScoreContext, get_criterion, score_group
from graphprune.errors import ConfigError, InputError
from graphprune.lm import blockwise, mean_nll, toy_language, train_toy_decoder
from graphprune.lm.pruning import block_amounts, flap_amounts, prune_lm, unit_cost

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def toy():
    """A 2-block LLaMA (GQA 4/2 heads) that has learnt the toy language, its traced graph,
    calibration and held-out windows."""
    torch.manual_seed(0)
    lang = toy_language()
    model = train_toy_decoder(lang, steps=150)
    calib = lang.sample(32, 32, seed=2)
    test = lang.sample(48, 32, seed=3)
    graph = gp.trace(model, calib[:1])
    return model, graph, as_calibration(calib, calib[:1], batch_size=8), calib, test


def _pruned(graph, calib, method, amounts, **kw):
    dd = blockwise.run(graph, calib, get_criterion(method), amounts, **kw)
    model = apply_plan(graph, dd.plan, weights=dd.weights, verify=False).model
    dd.finish(model)
    return dd, model


def _attn(graph):
    return [g for g in graph.prunable_groups if g.name.endswith("self_attn.q_proj")]


# ---- Wanda-sp and FLAP on any graph ----------------------------------------------------------

def test_wanda_and_flap_scores_are_the_consumer_columns_weighted_by_input_statistics():
    torch.manual_seed(0)
    for groups in (1, 2):  # a grouped consumer reads a channel with its own group's filters only
        net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(6, 4, 3, padding=1, groups=groups), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
        x = torch.randn(5, 3, 8, 8)
        graph = gp.trace(net, x[:1])
        ctx = ScoreContext(params=graph.params, calibration=as_calibration(x, x[:1]), graph=graph)
        with torch.no_grad():
            a = torch.relu(net[0](x)).transpose(0, 1).reshape(6, -1).double()  # conv2's input
        w = net[2].weight.detach().double()  # (4, 6 / groups, 3, 3)
        ipg, opg = 6 // groups, 4 // groups
        cols = torch.stack([w[c // ipg * opg:(c // ipg + 1) * opg, c % ipg] for c in range(6)])
        want = {"wanda": cols.abs().sum((1, 2, 3)) * a.norm(dim=1),
                "flap": cols.square().sum((1, 2, 3)) * a.var(dim=1)}
        seen = 0
        for g in graph.prunable_groups:
            (m,) = [m for m in g.members if m.param == "2.weight" and m.role == "in"] or [None]
            if m is None:
                continue
            for name, w_c in want.items():
                got = score_group(get_criterion(name), g, ctx)  # a unit sums its channels
                unit_sum = np.bincount(m.unit, weights=w_c.numpy()[m.pos], minlength=g.size)
                np.testing.assert_allclose(got, unit_sum, rtol=1e-6)
            seen += m.pos.size
        assert seen == 6


def test_wanda_and_flap_prune_a_cnn_through_prune():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    x = torch.randn(6, 3, 12, 12)
    for method in ("wanda", "flap"):
        r = gp.prune(net, x[:1], sparsity=0.5, method=method, calibration=x)
        assert r.model[0].out_channels == 4 and r.model(x).shape == (6, 3)


# ---- the block-by-block runner ---------------------------------------------------------------

def test_every_method_prunes_heads_and_channels_and_the_model_runs(toy):
    model, graph, calib, _, test = toy
    amounts = block_amounts(graph, 0.5)
    for method in ("l1", "wanda", "flap", "taylor", "lasso", "greedy"):
        dd, small = _pruned(graph, calib, method, amounts, reconstruct=method in ("lasso", "greedy"))
        attn = small.model.layers[0].self_attn
        assert attn.q_proj.out_features == 32 and attn.k_proj.out_features == 16, method
        assert small.model.layers[0].mlp.gate_proj.out_features == amounts[
            "model.layers.0.mlp.gate_proj"], method
        assert np.isfinite(mean_nll(small, test, seq_len=32)), method
        assert dd.groups["model.layers.0.self_attn.q_proj"]["method"] == method


def test_reconstruction_beats_l1_at_the_same_shapes_and_flap_bias_helps(toy):
    model, graph, calib, _, test = toy
    amounts = block_amounts(graph, 0.5)
    loss, plans = {}, {}
    for name, method, kw in [("l1", "l1", {}), ("greedy+LS", "greedy", {"reconstruct": True}),
                             ("lasso+LS", "lasso", {"reconstruct": True}), ("flap", "flap", {})]:
        dd, small = _pruned(graph, calib, method, amounts, **{"reconstruct": False, **kw})
        loss[name], plans[name] = mean_nll(small, test, seq_len=32), dd.plan
    # the same units as flap, without its bias
    _, small = _pruned(graph, calib, "flap", amounts, reconstruct=False, bias=False, fixed=plans["flap"])
    loss["flap-nobias"] = mean_nll(small, test, seq_len=32)
    dense = mean_nll(model, test, seq_len=32)
    assert dense < loss["greedy+LS"] < loss["l1"] and loss["lasso+LS"] < loss["l1"], loss
    assert loss["flap"] < loss["flap-nobias"], loss


def test_layer_by_layer_calibration_equals_whole_model_passes(toy):
    model, graph, calib, _, _ = toy
    amounts = block_amounts(graph, 0.5)
    for method, kw in [("greedy", {"reconstruct": True}), ("flap", {"reconstruct": False})]:
        a = blockwise.run(graph, calib, get_criterion(method), amounts, **kw)
        b = blockwise.run(graph, calib, get_criterion(method), amounts, layerwise=False, **kw)
        assert a.plan.groups == b.plan.groups
        assert a.weights.keys() == b.weights.keys() and a.biases.keys() == b.biases.keys()
        for k in a.weights:
            torch.testing.assert_close(a.weights[k], b.weights[k], rtol=1e-4, atol=1e-5)
        for k in a.biases:
            torch.testing.assert_close(a.biases[k], b.biases[k], rtol=1e-4, atol=1e-5)
    # the comparison is not vacuous: without the pruned-so-far stream block 1 is refitted otherwise
    c = blockwise.run(graph, calib, get_criterion("greedy"), amounts, sequential=False)
    a = blockwise.run(graph, calib, get_criterion("greedy"), amounts)
    key = "model.layers.1.mlp.down_proj.weight"
    assert not torch.allclose(a.weights[key], c.weights[key], atol=1e-4)


def test_refit_matches_the_original_block_output_better_than_removal(toy):
    _, graph, calib, _, _ = toy
    dd = blockwise.run(graph, calib, get_criterion("l1"), block_amounts(graph, 0.5))
    for name, info in dd.groups.items():
        (fit,) = info["consumers_refit"]
        assert fit["rel_err_refit"] < fit["rel_err_removed"], name


def test_prune_dispatches_hugging_face_decoders_to_the_block_runner(toy):
    model, _, _, ids, test = toy
    r = gp.prune(model, ids[:1], sparsity=0.5, method="flap", calibration=ids)
    o_proj = r.model.model.layers[0].self_attn.o_proj
    assert o_proj.bias is not None and o_proj.in_features == 32  # FLAP's bias, one KV group gone
    assert r.model.config.attention_bias and r.model.config.mlp_bias
    assert 0 < r.report.fidelity["total"]["cosine"] <= 1
    assert mean_nll(r.model, test, seq_len=32) < 5


def test_pruned_decoder_generates_saves_and_loads(toy, tmp_path):
    model, ids = toy[0], toy[3]
    r = prune_lm(model, ids, remove=0.3, method="flap")
    small = r.model
    prompt = ids[:1, :6]
    out = small.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 14)
    # greedy decoding with the KV cache agrees with argmax over full forwards
    with torch.no_grad():
        seq = prompt
        for _ in range(8):
            seq = torch.cat([seq, small(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)
    gp.hf.save_pruned(r, tmp_path / "pruned")
    back = gp.hf.load_pruned(tmp_path / "pruned")
    with torch.no_grad():
        torch.testing.assert_close(back(ids[:2]).logits, small(ids[:2]).logits)


# ---- budgets ---------------------------------------------------------------------------------

def _removed(graph, amounts):
    return sum(unit_cost(graph, g) * (g.size - amounts[g.name]) for g in graph.prunable_groups
               if g.name in amounts)


def test_block_and_flap_amounts_remove_the_asked_share_of_attention_and_mlp_parameters(toy):
    _, graph, calib, _, _ = toy
    total = sum(unit_cost(graph, g) * g.size for g in graph.prunable_groups)
    mlp_unit = max(unit_cost(graph, g) for g in graph.prunable_groups if "mlp" in g.name)
    for remove in (0.2, 0.3, 0.5):
        for amounts in (block_amounts(graph, remove), flap_amounts(graph, calib, remove)):
            assert abs(_removed(graph, amounts) - remove * total) <= 2 * mlp_unit + 1e-6
            assert all(k >= 1 for k in amounts.values())
    uniform = block_amounts(graph, 0.3)
    assert [uniform[g.name] for g in _attn(graph)] == [1, 1]  # round(0.3 x 2) key/value groups go


def test_prune_lm_checks_its_inputs(toy):
    model = toy[0]
    with pytest.raises(InputError, match=r"The 'calibration' parameter of prune_lm must be \(n, seq_len\) "
                                         r"integer token ids. Got torch.float32 of shape \(4,\) instead."):
        prune_lm(model, torch.zeros(4))
    with pytest.raises(ConfigError, match="prune_lm needs a Hugging Face decoder with LLaMA-style"):
        prune_lm(nn.Linear(2, 2), torch.zeros(1, 4, dtype=torch.long))


def test_block_by_block_statistics_equal_a_whole_model_pass(toy):
    from graphprune.criteria.activation import collect_stats

    model, _, calib, _, _ = toy
    blocks = blockwise.dense_stats(model, calib)
    whole = collect_stats(model, calib, sorted(blocks))
    assert len(blocks) == 4
    for path, s in blocks.items():
        assert s.n == whole[path].n == 32 * 32
        np.testing.assert_allclose(s.mean, whole[path].mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(s.var, whole[path].var, rtol=1e-4, atol=1e-6)


def test_refit_is_ridge_least_squares_over_the_kept_columns_and_reports_its_error():
    from graphprune.lm.layerfit import FitStats, refit

    g = torch.Generator().manual_seed(0)
    for n in (300, 40):  # well posed; ill posed (the penalty is chosen on held-out tokens)
        X = torch.randn(n, 12, generator=g)
        R = X @ torch.randn(5, 12, generator=g).T + 0.5 + 0.1 * torch.randn(n, 5, generator=g)
        s = FitStats(full=True)
        for xb, rb in zip(X.split(n // 3 + 1), R.split(n // 3 + 1)):
            s.add(xb, rb)
        keep = np.arange(0, 12, 2)
        fit = refit(torch.zeros(5, 12), None, s, keep, intercept=True)
        assert torch.all(fit.weight[:, 1::2] == 0)
        pred = X @ fit.weight.T + fit.bias
        err = float((pred - R).norm() / R.norm())
        assert fit.info["rel_err_refit"] == pytest.approx(err, rel=1e-4)
        if n == 300:  # the least-squares solution itself (the penalty is negligible)
            A = torch.cat([X[:, keep], torch.ones(n, 1)], 1).double()
            sol = torch.linalg.lstsq(A, R.double()).solution
            torch.testing.assert_close(fit.weight[:, keep].double(), sol[:-1].T, rtol=1e-3, atol=1e-4)
        assert fit.info["rel_err_refit"] < fit.info["rel_err_removed"]
