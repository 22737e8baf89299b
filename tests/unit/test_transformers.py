"""Attention: whole heads of nn.MultiheadAttention, TransformerEncoder and hand-written
attention (a LLaMA-style decoder) prune correctly; the graph of a 7B decoder builds on meta."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.rules.nn_attention import PrunedMultiheadAttention
from graphprune.models import Llama, LlamaConfig

from ..conftest import masked_copy, rel_err


class AttnNet(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.proj = nn.Linear(8, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        y = self.proj(x)
        a, _ = self.attn(y, y, y, need_weights=False)
        return self.fc(F.relu(a + y))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_heads_prune_and_keep_the_call_signature(batch_first):
    torch.manual_seed(0)
    m = AttnNet(batch_first).eval()
    x = torch.randn(2, 6, 8) if batch_first else torch.randn(6, 2, 8)
    g = gp.trace(m, x)
    assert g.group("attn").size == 4 and g.group("attn").prunable
    r = gp.prune(m, x, config=[{"op_names": ["attn"], "sparsity": 0.5}], method="random", seed=1)
    attn = r.model.attn
    assert isinstance(attn, PrunedMultiheadAttention) and attn.num_heads == 2
    assert attn.embed_dim == 32 and attn.in_proj_weight.shape == (48, 32)
    ref = masked_copy(m, r.masks).eval()
    with torch.no_grad():
        assert rel_err(r.model(x), ref(x)) < 1e-5
        # the module itself, called as torch's is, with masks
        y = m.proj(x)
        L = y.shape[1] if batch_first else y.shape[0]
        causal = torch.ones(L, L, dtype=torch.bool).triu(1)
        pad = torch.zeros(2, L, dtype=torch.bool)
        pad[0, -2:] = True
        for kw in ({}, {"attn_mask": causal}, {"key_padding_mask": pad},
                   {"attn_mask": causal, "key_padding_mask": pad}):
            want, _ = ref.attn(y, y, y, **kw)
            got, w = attn(y, y, y, **kw)
            assert rel_err(got, want) < 1e-5, kw
            assert w.shape == (2, L, L)


def test_transformer_encoder_heads_and_ffn():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)

    class E(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 32)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.out = nn.Linear(32, 3)

        def forward(self, x):
            return self.out(self.enc(self.inp(x)))

    m = E().eval()
    x = torch.randn(2, 5, 8)
    g = gp.trace(m, x)
    assert g.group("inp").value_coupled  # the residual stream goes through LayerNorm
    r = gp.prune(m, x, sparsity=0.5, ignore=["inp"])  # heads and FFN hidden only
    lyr = r.model.enc.layers[0]
    assert lyr.self_attn.num_heads == 2 and lyr.linear1.out_features == 32
    with torch.no_grad():
        assert rel_err(r.model(x), masked_copy(m, r.masks).eval()(x)) < 1e-5


def test_llama_heads_and_mlp_prune_and_still_generate():
    torch.manual_seed(0)
    m = Llama().eval()
    x = torch.randint(0, 256, (2, 16))
    g = gp.trace(m, x)
    heads = g.group("blocks.0.attn.wq")
    assert heads.size == 4 and heads.prunable
    assert {"blocks.0.attn.wk.weight[out]", "blocks.0.attn.wv.weight[out]",
            "blocks.0.attn.wo.weight[in]"} <= {mm.label() for mm in heads.members}
    assert g.group("embed").value_coupled  # RMSNorm over the residual stream
    r = gp.prune(m, x, sparsity=0.5, config=[{"op_types": ["Linear"], "sparsity": 0.5},
                                             {"op_names": ["embed"], "exclude": True}])
    attn = r.model.blocks[0].attn
    assert attn.wq.out_features == 32 and attn.wo.in_features == 32  # 2 heads of 16
    assert r.model.blocks[0].mlp.w1.out_features == 86
    with torch.no_grad():
        assert rel_err(r.model(x), masked_copy(m, r.masks).eval()(x)) < 1e-5
    out = r.model.generate(x[:, :4], 6)
    assert out.shape == (2, 10) and out.dtype == torch.long


def test_plan_from_a_meta_graph_applies_to_real_weights():
    cfg = LlamaConfig(n_layers=2)
    with torch.device("meta"):
        meta = Llama(cfg)
    x = torch.zeros(1, 8, dtype=torch.long)
    g = gp.trace(meta, x)  # no weights in memory
    plan = gp.make_plan(g, sparsity=0.5, method="random",
                        config=[{"op_types": ["Linear"], "sparsity": 0.5},
                                {"op_names": ["embed"], "exclude": True}])
    torch.manual_seed(0)
    real = Llama(cfg).eval()
    r = gp.prune(real, x, plan=plan)
    assert r.model.blocks[1].attn.wk.out_features == 32
    assert r.model(torch.randint(0, 256, (1, 8))).shape == (1, 8, 256)


@pytest.mark.slow
def test_llama_7b_graph_builds_on_meta():
    with torch.device("meta"):
        m = Llama(LlamaConfig.llama_7b())
    assert sum(p.numel() for p in m.parameters()) > 6.5e9
    g = gp.trace(m, torch.zeros(1, 16, dtype=torch.long))
    heads = g.group("blocks.31.attn.wq")
    assert heads.size == 32 and heads.prunable
    assert g.group("blocks.31.mlp.w1").size == 11008
    plan = gp.make_plan(g, sparsity=0.25, method="random")
    assert plan.channels["blocks.0.attn.wq"] == (32, 24)


@pytest.mark.slow
def test_timm_vit_heads_prune_through_literal_head_counts():
    """timm's Attention reshapes with ``self.num_heads`` / ``self.attn_dim`` literals: whole heads
    go, the attributes follow, and the shrunk model equals the masked original."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=3).eval()
    x = torch.randn(2, 3, 64, 64)
    g = gp.trace(m, x)
    heads = g.group("blocks.0.attn.qkv")
    assert heads.size == 3 and heads.prunable  # units are heads (3 x 64 rows of q, k and v)
    r = gp.prune(m, x, config=[{"op_names": ["*attn.qkv", "*mlp.fc1"], "sparsity": 0.5}])
    attn = r.model.blocks[2].attn
    assert attn.num_heads == 2 and attn.attn_dim == 128 and attn.head_dim == 64
    assert attn.qkv.out_features == 384 and attn.proj.in_features == 128
    assert r.model.blocks[0].mlp.fc1.out_features == 384
    ref = masked_copy(m, r.masks).eval()
    with torch.no_grad():
        assert rel_err(r.model(x), ref(x)) < 1e-5
