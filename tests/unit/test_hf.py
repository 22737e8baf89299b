"""Hugging Face transformers (tiny configs, random init): heads removed in every attention form,
the model's own config updated, generation with the KV cache, save/load without pickle."""

from __future__ import annotations

import copy

import pytest
import torch

import graphprune as gp

from ..conftest import masked_copy, rel_err

T = pytest.importorskip("transformers")

D = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
         num_attention_heads=4, max_position_embeddings=64)


def _build(kind: str):
    torch.manual_seed(0)
    if kind in ("llama", "qwen2", "mistral"):
        cfg_cls, cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM),
                        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
                        "mistral": (T.MistralConfig, T.MistralForCausalLM)}[kind]
        return cls(cfg_cls(num_key_value_heads=2, **D))  # GQA: 2 query heads per KV head
    if kind == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4,
                                              n_positions=64, bos_token_id=0, eos_token_id=0))
    if kind == "t5":
        return T.T5ForConditionalGeneration(T.T5Config(vocab_size=96, d_model=64, d_kv=16,
                                                       d_ff=128, num_layers=2, num_heads=4))
    if kind == "bart":
        return T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=96, d_model=64, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
            decoder_ffn_dim=128, max_position_embeddings=64))
    if kind == "bert":
        return T.BertForSequenceClassification(T.BertConfig(
            vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64))
    if kind == "vit":
        return T.ViTForImageClassification(T.ViTConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            image_size=32, patch_size=8))
    raise AssertionError(kind)


# the query projection of the first attention, and the head count it holds
QUERY = {"llama": "model.layers.0.self_attn.q_proj", "qwen2": "model.layers.0.self_attn.q_proj",
         "mistral": "model.layers.0.self_attn.q_proj", "gpt2": "transformer.h.0.attn.c_attn",
         "t5": "encoder.block.0.layer.0.SelfAttention.q", "bart": "model.encoder.layers.0.self_attn.q_proj",
         "bert": "bert.encoder.layers.0.attention.self.query", "vit": "vit.layers.0.attention.q_proj"}


def _out(y):
    return y.logits if hasattr(y, "logits") else y


def _rows(model, path: str) -> int:
    w = model.get_submodule(path).weight
    return w.shape[1] if type(model.get_submodule(path)).__name__ == "Conv1D" else w.shape[0]


def _exact_config(kind: str, model) -> list[dict]:
    """Prune everything except the value-coupled residual streams: an exact reference."""
    g = gp.trace(model, gp.hf.example_inputs(model))
    return [{"op_names": [gr.name], "exclude": True} for gr in g.groups if gr.value_coupled]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2", "t5", "bart", "bert",
                                  "vit"])
def test_heads_go_in_every_attention_and_the_masked_original_agrees(kind):
    model = _build(kind).eval()
    x = gp.hf.example_inputs(model)
    query = QUERY[kind]
    if kind in ("bert",):
        query = next(n for n, _ in model.named_modules() if n.endswith("attention.self.query"))
    if kind == "vit":
        query = next(n for n, _ in model.named_modules()
                     if n.endswith(("attention.attention.query", "attention.q_proj")))
    fresh = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    r = gp.prune(model, x, method="l1",
                 config=[{"op_types": ["Linear", "Conv1D", "Conv2d"], "sparsity": 0.5},
                         *_exact_config(kind, model)])
    assert _rows(r.model, query) == _rows(model, query) // 2, "whole heads were not removed"
    with torch.no_grad():
        got, want = _out(r.model(**x)), _out(masked_copy(model, r.masks)(**x))
    assert got.shape == _out(model(**x)).shape
    assert rel_err(got, want) < 1e-5
    rebuilt = gp.apply_masks(fresh, r.masks, x, inplace=True)
    with torch.no_grad():
        assert torch.equal(_out(rebuilt(**x)), got)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), \
        "the caller's model changed"


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "t5"])
def test_decoders_lose_half_their_parameters(kind):
    model = _build(kind).eval()
    r = gp.prune(model, gp.hf.example_inputs(model), sparsity=0.5, method="l1")
    p0, p1 = r.report.params
    # embeddings and the output head are not pruned: count the rest
    emb = sum(p.numel() for n, p in model.named_parameters()
              if any(k in n for k in ("embed", "wte", "wpe", "shared", "lm_head")))
    assert (p1 - emb) / (p0 - emb) < 0.6


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_pruned_decoder_generates_like_its_masked_original_and_round_trips(kind, tmp_path):
    model = _build(kind).eval()
    x = gp.hf.example_inputs(model)
    # layers pruned differently: the config cannot say it, graphprune.json does
    r = gp.prune(model, x, method="l1", config=[
        {"op_names": ["model.layers.0.*"], "sparsity": 0.5},
        {"op_names": ["model.layers.1.mlp*"], "sparsity": 0.25}])
    ids = x["input_ids"][:, :5]
    ref = masked_copy(model, r.masks).eval()
    tokens = r.model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(tokens, ref.generate(ids, max_new_tokens=16, do_sample=False))
    gp.hf.save_pruned(r, tmp_path / "p")
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert {"config.json", "graphprune.json", "masks.safetensors", "model.safetensors",
            "plan.json"} <= set(names)
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    small = gp.hf.load_pruned(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(small(**x).logits, r.model(**x).logits)
    assert torch.equal(small.generate(ids, max_new_tokens=16, do_sample=False), tokens)


def test_uniform_pruning_writes_a_config_plain_from_pretrained_loads(tmp_path):
    model = _build("llama").eval()
    x = gp.hf.example_inputs(model)
    r = gp.prune(model, x, sparsity=0.5, method="l1")
    gp.hf.save_pruned(r, tmp_path / "p")
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert plain.config.num_attention_heads == 2 and plain.config.num_key_value_heads == 1
    assert plain.config.intermediate_size == 64 and plain.config.head_dim == 16
    assert model.config.num_attention_heads == 4, "the caller's config changed"
    with torch.no_grad():
        assert torch.equal(plain.eval()(**x).logits, r.model(**x).logits)
    assert isinstance(gp.hf.load(tmp_path / "p"), T.LlamaForCausalLM)


def test_loading_a_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(gp.ConfigError, match="has no config.json"):
        gp.hf.load(tmp_path)
    with pytest.raises(gp.ConfigError, match="not a pruned model saved by"):
        gp.hf.load_pruned(tmp_path)


def test_a_7b_llama_graph_on_meta_has_heads_and_mlp_groups():
    """The 7B shape (GQA 32/8) on the meta device: no weights, shapes only."""
    cfg = T.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                        num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8)
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg).eval()
    g = gp.trace(model, gp.hf.example_inputs(model))
    heads = g.group("model.layers.0.self_attn.q_proj")
    assert heads.prunable and heads.size == 8  # 8 KV groups of 4 query heads
    assert g.group("model.layers.1.mlp.gate_proj").size == 11008
    plan = gp.make_plan(g, sparsity=0.25, method="random")
    small = gp.apply_plan(g, plan).model
    assert small.model.layers[0].self_attn.q_proj.weight.shape == (3072, 4096)
