"""Grouped-query attention with ``gqa="query"``: every key/value head stays, query heads go in
equal numbers from every key/value group, in all three forms the attention takes (HF eager
``repeat_kv``, sdpa after ``repeat_kv``, sdpa with ``enable_gqa``)."""

from __future__ import annotations

import copy

import pytest
import torch

import graphprune as gp

from ..conftest import masked_copy, rel_err

T = pytest.importorskip("transformers")

# 8 query heads over 2 key/value heads: 4 query heads per group
D = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
         num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM")}


def _build(kind: str, impl: str = "sdpa"):
    torch.manual_seed(0)
    cfg_cls, cls = (getattr(T, n) for n in FAMILIES[kind])
    return cls(cfg_cls(attn_implementation=impl, **D)).eval()




def _exact(model, x) -> list[dict]:
    """Leave the value-coupled residual streams alone: an exact reference."""
    g = gp.trace(model, x, gqa="query")
    return [{"op_names": [gr.name], "exclude": True} for gr in g.groups if gr.value_coupled]


def _kept_heads_per_group(model, masks, layer: int) -> list[int]:
    rows = masks[f"model.layers.{layer}.self_attn.q_proj.weight"][:, 0]
    heads = rows.reshape(D["num_attention_heads"], D["head_dim"])
    assert (heads.all(1) | ~heads.any(1)).all(), "a head lost part of its channels"
    per_group = D["num_attention_heads"] // D["num_key_value_heads"]
    return heads.all(1).reshape(D["num_key_value_heads"], per_group).sum(1).tolist()


@pytest.mark.parametrize("kind,impl", [("llama", "eager"), ("llama", "sdpa"),
                                       ("llama", "sdpa+enable_gqa"), ("qwen2", "eager"),
                                       ("mistral", "sdpa+enable_gqa")])
def test_query_heads_go_evenly_from_every_kv_group_and_kv_heads_stay(kind, impl, monkeypatch):
    if impl == "sdpa+enable_gqa":  # transformers then calls sdpa with enable_gqa=True
        monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    model = _build(kind, impl.split("+")[0])
    x = gp.hf.example_inputs(model)
    before = copy.deepcopy(model.state_dict())
    r = gp.prune(model, x, method="l1", gqa="query",
                 config=[{"op_types": ["Linear"], "sparsity": 0.5}, *_exact(model, x)])
    for i in range(D["num_hidden_layers"]):
        attn = r.model.model.layers[i].self_attn
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (16, 64), "KV heads went"
        assert attn.q_proj.weight.shape == (32, 64) and attn.o_proj.weight.shape == (64, 32)
        assert attn.num_key_value_groups == 2
        assert _kept_heads_per_group(model, r.masks, i) == [2, 2]
    with torch.no_grad():
        got, want = r.model(**x).logits, masked_copy(model, r.masks)(**x).logits
    assert rel_err(got, want) < 1e-5
    ids = x["input_ids"][:, :5]
    ref = masked_copy(model, r.masks).eval()
    tokens = r.model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(tokens, ref.generate(ids, max_new_tokens=16, do_sample=False))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), \
        "the caller's model changed"
    assert model.model.layers[0].self_attn.num_key_value_groups == 4


def test_the_graph_says_why_kv_heads_stay_and_counts_query_slots():
    model = _build("llama")
    g = gp.trace(model, gp.hf.example_inputs(model), gqa="query")
    q = g.group("model.layers.0.self_attn.q_proj")
    assert q.prunable and q.size == 4  # slot j of both KV groups is one unit
    k = g.group("model.layers.0.self_attn.k_proj")
    assert not k.prunable and "gqa='query'" in k.reason
    default = gp.trace(model, gp.hf.example_inputs(model))
    assert default.group("model.layers.0.self_attn.q_proj").size == 2  # KV head + its queries


def test_layers_pruned_differently_round_trip_and_uniform_ones_load_plainly(tmp_path):
    model = _build("qwen2")
    x = gp.hf.example_inputs(model)
    r = gp.prune(model, x, method="l1", gqa="query", config=[
        {"op_names": ["model.layers.0.self_attn.*"], "sparsity": 0.75},
        {"op_names": ["model.layers.1.self_attn.*"], "sparsity": 0.25}])
    attn = [r.model.model.layers[i].self_attn for i in range(2)]
    assert [a.num_key_value_groups for a in attn] == [1, 3]
    gp.hf.save_pruned(r, tmp_path / "p")
    small = gp.hf.load_pruned(tmp_path / "p")
    assert [small.model.layers[i].self_attn.num_key_value_groups for i in range(2)] == [1, 3]
    ids = x["input_ids"][:, :5]
    with torch.no_grad():
        assert torch.equal(small(**x).logits, r.model(**x).logits)
    assert torch.equal(small.generate(ids, max_new_tokens=8, do_sample=False),
                       r.model.generate(ids, max_new_tokens=8, do_sample=False))

    u = gp.prune(model, x, sparsity=0.5, method="l1", gqa="query")
    gp.hf.save_pruned(u, tmp_path / "u")
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()
    assert plain.config.num_attention_heads == 4 and plain.config.num_key_value_heads == 2
    with torch.no_grad():
        assert torch.equal(plain(**x).logits, u.model(**x).logits)


def test_data_driven_selection_and_reconstruction_work_on_query_slots():
    model = _build("llama")
    x = gp.hf.example_inputs(model)
    calib = torch.randint(0, 96, (8, 16))
    r = gp.prune(model, calib[:1], sparsity=0.5, method="flap", gqa="query", calibration=calib,
                 reconstruct=True)
    attn = r.model.model.layers[0].self_attn
    assert attn.k_proj.weight.shape[0] == 16 and attn.num_key_value_groups in (1, 2, 3)
    assert attn.q_proj.weight.shape[0] == 16 * attn.num_key_value_groups
    with torch.no_grad():
        assert torch.isfinite(r.model(**x).logits).all()


def test_an_unknown_gqa_mode_is_refused_by_name():
    model = _build("llama")
    with pytest.raises(gp.ConfigError, match="'gqa' parameter"):
        gp.prune(model, gp.hf.example_inputs(model), sparsity=0.5, gqa="heads")
    with pytest.raises(gp.ConfigError, match="'gqa' parameter"):
        gp.trace(model, gp.hf.example_inputs(model), gqa="kv")
