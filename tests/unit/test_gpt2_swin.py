"""Attention heads of GPT-2 (transformers' Conv1D, fused c_attn split in q, k, v) and of
torchvision's Swin (C // num_heads, a relative position bias column per head) are removed whole,
and the pruned modules still compute what the masked original computes, on any input."""

import copy
import pickle

import pytest
import torch
from torch import nn

import graphprune as gp

from ..conftest import assert_mask_equivalent, assert_same_state, masked_copy, rel_err

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")


class LogitsOnly(nn.Module):
    """A causal LM as a callable of input_ids returning its logits (no KV cache)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False).logits


def _gpt2(n_layer=2):
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=64, n_layer=n_layer,
                                  n_head=4, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return LogitsOnly(transformers.GPT2LMHeadModel(cfg)).eval()


def test_gpt2_loses_whole_heads_of_its_fused_qkv_and_mlp_hidden(tmp_path):
    m = _gpt2()
    x = torch.randint(0, 50, (2, 8))
    g = gp.trace(m, x)
    assert g.tracer == "torch.export"  # GPT2Model's forward has Python control flow on tensors
    heads = g.group("lm.transformer.h.0.attn.c_attn")
    assert heads.prunable and heads.size == 4  # units are heads: q, k and v rows of each
    assert {"lm.transformer.h.0.attn.c_attn.weight[out]", "lm.transformer.h.0.attn.c_attn.bias[out]",
            "lm.transformer.h.0.attn.c_proj.weight[in]"} <= {mm.label() for mm in heads.members}
    assert g.group("lm.transformer.h.1.mlp.c_fc").prunable
    fresh = copy.deepcopy(m)
    r = gp.prune(m, x, sparsity=0.5, method="l1", ignore=["lm.transformer.wte"])  # not the stream
    for blk in r.model.lm.transformer.h:
        attn = blk.attn
        assert attn.c_attn.weight.shape == (64, 96) and attn.c_attn.nf == 96  # Conv1D: (in, out)
        assert attn.c_proj.weight.shape == (32, 64) and attn.c_proj.nx == 32
        assert attn.split_size == 32 and attn.num_heads == 2 and attn.head_dim == 16
        assert blk.mlp.c_fc.weight.shape == (64, 128) and blk.mlp.c_proj.weight.shape == (128, 64)
    assert r.report.params[1] / r.report.params[0] < 0.6
    assert_mask_equivalent(m, r, x)
    # the refreshed attributes hold for inputs other than the traced one
    x2 = torch.randint(0, 50, (1, 13))
    with torch.no_grad():
        assert rel_err(r.model(x2), masked_copy(m, r.masks).eval()(x2)) < 1e-5
    assert_same_state(gp.apply_masks(fresh, r.masks, x, inplace=True), r.model)
    res = gp.export_onnx(r.model, x, tmp_path / "gpt2.onnx", exporter="dynamo", dynamic_batch=False)
    assert res.max_rel_err < 1e-4


def test_conv1d_is_a_linear_with_a_transposed_weight_under_fx():
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.mlp = GPT2MLP(64, transformers.GPT2Config(n_embd=16))
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            return self.out(self.mlp(self.inp(x)).mean(1))

    torch.manual_seed(0)
    m, x = Net().eval(), torch.randn(2, 5, 8)
    g = gp.trace(m, x, tracer="fx")
    hidden = g.group("mlp.c_fc")
    assert hidden.prunable and hidden.size == 64
    assert {mm.label() for mm in hidden.members} == {
        "mlp.c_fc.weight[out]", "mlp.c_fc.bias[out]", "mlp.c_proj.weight[in]"}
    assert g.group("inp").prunable and g.group("mlp.c_proj").prunable
    r = gp.prune(m, x, sparsity=0.5, method="l1")
    c_fc, c_proj = r.model.mlp.c_fc, r.model.mlp.c_proj
    assert c_fc.weight.shape == (8, 32) and (c_fc.nx, c_fc.nf) == (8, 32)
    assert c_proj.weight.shape == (32, 8) and (c_proj.nx, c_proj.nf) == (32, 8)
    assert_mask_equivalent(m, r, x)


def test_swin_t_loses_whole_heads_and_their_relative_position_bias():
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    torch.manual_seed(0)
    m = torchvision.models.swin_t(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    g = gp.trace(m, x)
    heads = g.group("features.1.0.attn.qkv")
    assert heads.prunable and heads.size == 3
    assert {"features.1.0.attn.relative_position_bias_table",
            "features.1.0.attn.proj.weight[in]"} <= {mm.label() for mm in heads.members}
    assert sum(gr.name.endswith("attn.qkv") and gr.prunable for gr in g.groups) == 12
    stream = g.group("features.0.0")  # the residual stream: prunable, through every LayerNorm
    assert stream.prunable and stream.value_coupled
    fresh = copy.deepcopy(m)
    # the residual streams change every channel's LayerNorm: left alone, so the masked original
    # is an exact reference
    streams = [{"op_names": [gr.name], "exclude": True} for gr in g.groups if gr.value_coupled]
    r = gp.prune(m, x, method="l1", config=[{"op_types": ["Linear"], "sparsity": 0.5}, *streams])
    attn = r.model.features[1][0].attn
    assert isinstance(attn, ShiftedWindowAttention) and type(attn).__name__ == "PrunedShiftedWindowAttention"
    assert attn.qkv.weight.shape == (3 * 2 * 32, 96) and attn.proj.weight.shape == (96, 64)
    assert attn.relative_position_bias_table.shape == (169, 2)
    assert attn.num_heads == 2 and attn.head_dim == 32
    assert r.report.params[1] / r.report.params[0] < 0.6
    assert_mask_equivalent(m, r, x)
    x2 = torch.randn(1, 3, 96, 80)  # other padding and shifts
    with torch.no_grad():
        assert rel_err(r.model(x2), masked_copy(m, r.masks).eval()(x2)) < 1e-5
    assert_same_state(gp.apply_masks(fresh, r.masks, x, inplace=True), r.model)
    again = pickle.loads(pickle.dumps(r.model))  # the pruned class is importable by name
    with torch.no_grad():
        assert torch.equal(again(x), r.model(x))
