"""`graphprune prune --model hf:DIR --data FILE.txt` end to end on a tiny LLaMA (GQA) saved with
save_pretrained and a byte-level tokenizer: calibration from the text file, the decoder pruned
block by block, saved as a Hugging Face directory (config updated), perplexity before/after on
the held-out tail, the ONNX decoder (KV cache + int8 weight-only) in the bundle; and one clear
error for each mismatch of model and data."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import graphprune as gp
from graphprune.cli import main
from graphprune.specs import load_model

T = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

SEQ = 64


def _text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:60_000]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny LLaMA (hidden 64, 2 layers, 4 query / 2 key-value heads), trained for a few steps
    on the text so that its perplexity is far below the uniform 257, saved with its tokenizer."""
    from graphprune.lm import ByteTokenizer, train_tokenizer
    from graphprune.lm.train import LMSpec, train_causal_lm

    root = tmp_path_factory.mktemp("hfcli")
    text = _text()
    (root / "notes.txt").write_text(text, encoding="utf-8")
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=256, bos_token_id=256))
    ids = torch.tensor(ByteTokenizer().encode(text[:48_000]))
    train_causal_lm(model, ids, LMSpec(seq_len=SEQ, batch_size=8, steps=60, lr=3e-3, warmup_steps=5))
    model.eval().save_pretrained(root / "tiny")
    train_tokenizer([], str(root / "tiny"), kind="byte")
    model.save_pretrained(root / "no-tokenizer")
    return root


def _run(capsys, *args):
    code = main(["prune", *args, "--quiet"])
    return code, capsys.readouterr().err


def test_hf_spec_loads_the_directory_with_its_class(hf_dir):
    model, shape = load_model(f"hf:{hf_dir / 'tiny'}")
    assert type(model).__name__ == "LlamaForCausalLM" and shape is None
    assert not model.training and model.config.num_key_value_heads == 2


def test_prune_hf_directory_on_a_text_file_end_to_end(hf_dir, capsys):
    out = hf_dir / "out"
    code, err = _run(capsys, "--model", f"hf:{hf_dir / 'tiny'}", "--data", str(hf_dir / "notes.txt"),
                     "--sparsity", "0.5", "--finetune-epochs", "0", "--input-shape", f"1,{SEQ}",
                     "--out", str(out))
    assert code == 0, err
    files = set(os.listdir(out))
    assert {"model.onnx", "model.int8.onnx", "decoder.json", "config.json", "model.safetensors",
            "graphprune.json", "tokenizer.json", "masks.safetensors", "plan.json", "report.json",
            "report.md", "recipe.json"} <= files, files
    rep = json.loads((out / "report.json").read_text())
    b, a = rep["before"], rep["after"]
    # half of every group: one of the two KV groups (2 query heads) and half the MLP go
    assert a["block_params"] / b["block_params"] == pytest.approx(0.5, abs=0.02)
    assert a["params"] < b["params"]
    assert b["perplexity_torch"] < 100  # a trained model: far below the uniform 257
    assert b["perplexity_torch"] < a["perplexity_torch"] < 257
    # onnxruntime scores the same held-out windows as PyTorch, before and after
    assert a["perplexity_ort"] == pytest.approx(a["perplexity_torch"], rel=1e-3)
    assert b["perplexity_ort"] == pytest.approx(b["perplexity_torch"], rel=1e-3)
    assert a["perplexity_ort_int8"] == pytest.approx(a["perplexity_torch"], rel=0.05)
    assert a["onnx_bytes"] < b["onnx_bytes"] and a["int8_bytes"] < a["onnx_bytes"]
    assert rep["text"]["seq_len"] == SEQ and rep["text"]["calibration_windows"] >= 16

    # the bundle is a Hugging Face directory: config updated, loadable, the same perplexity
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (2, 1, 64)
    small = gp.hf.load_pruned(out)
    from graphprune.lm import perplexity
    from graphprune.lm.job import model_tokenizer, text_data

    d = text_data(str(hf_dir / "notes.txt"), model_tokenizer(str(out)), n_samples=1, seq_len=SEQ)
    ppl = perplexity(small, d.held_out, SEQ, max_windows=rep["text"]["held_out_windows"])
    assert ppl == pytest.approx(a["perplexity_torch"], rel=1e-5)
    again, _ = load_model(f"hf:{out}")  # the pruned bundle is a model spec again
    with torch.no_grad():
        ids = d.held_out[:SEQ][None]
        torch.testing.assert_close(again(ids).logits, small(ids).logits)
    from graphprune.export.decoder_session import DecoderSession

    got = DecoderSession(out / "model.onnx").logits(ids.numpy())
    want = small(ids).logits.detach().numpy()
    assert abs(got - want).max() <= 1e-4 * abs(want).max()
    assert math.isfinite(rep["timings_s"]["prune"])


def test_inspect_an_hf_directory_with_token_ids(hf_dir, capsys):
    assert main(["inspect", "--model", f"hf:{hf_dir / 'tiny'}", "--input-shape", "1,8"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in out and "torch.export" in out


def test_global_pruning_of_a_language_model_is_flaps_adaptive_allocation(hf_dir, capsys):
    out = hf_dir / "out-global"
    code, err = _run(capsys, "--model", f"hf:{hf_dir / 'tiny'}", "--data", str(hf_dir / "notes.txt"),
                     "--method", "flap", "--global-pruning", "--sparsity", "0.3", "--finetune-epochs",
                     "0", "--quantize", "none", "--input-shape", f"1,{SEQ}", "--out", str(out))
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    b, a = rep["before"], rep["after"]
    # the share of attention + MLP parameters removed is the sparsity, to a few channels
    assert a["block_params"] / b["block_params"] == pytest.approx(0.7, abs=0.03)
    assert b["perplexity_torch"] < a["perplexity_torch"] < 257
    assert a["perplexity_ort"] == pytest.approx(a["perplexity_torch"], rel=1e-3)


@pytest.mark.parametrize("case", ["digits-data", "no-data", "text-for-cnn", "no-tokenizer", "bert"])
def test_mismatched_model_and_data_give_one_clear_error(hf_dir, capsys, case):
    txt = str(hf_dir / "notes.txt")
    tiny = f"hf:{hf_dir / 'tiny'}"
    if case == "bert":
        T.BertForSequenceClassification(T.BertConfig(
            vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64)).save_pretrained(hf_dir / "bert")
        capsys.readouterr()
    args, want = {
        "digits-data": (["--model", tiny, "--data", "digits"], "is not a text file"),
        "no-data": (["--model", tiny], "give a text file"),
        "text-for-cnn": (["--model", "digits", "--data", txt], "is a text file"),
        "no-tokenizer": (["--model", f"hf:{hf_dir / 'no-tokenizer'}", "--data", txt],
                         "holds no tokenizer"),
        "bert": (["--model", f"hf:{hf_dir / 'bert'}", "--data", txt], "causal language models"),
    }[case]
    out = hf_dir / f"err-{case}"
    code, err = _run(capsys, *args, "--out", str(out))
    assert code == 2 and want in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # nothing written


def test_query_heads_go_inside_each_kv_group_from_the_command_line(hf_dir, capsys):
    out = hf_dir / "out-gqa"
    code, err = _run(capsys, "--model", f"hf:{hf_dir / 'tiny'}", "--data", str(hf_dir / "notes.txt"),
                     "--method", "flap", "--global-pruning", "--gqa", "query", "--sparsity", "0.3",
                     "--finetune-epochs", "0", "--quantize", "none", "--input-shape", f"1,{SEQ}",
                     "--out", str(out))
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    small = gp.hf.load_pruned(out)
    for layer in small.model.layers:  # both key/value heads stay in every layer
        assert layer.self_attn.k_proj.out_features == 2 * cfg["head_dim"]
        assert layer.self_attn.q_proj.out_features == \
            2 * layer.self_attn.num_key_value_groups * cfg["head_dim"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["after"]["block_params"] / rep["before"]["block_params"] == pytest.approx(0.7, abs=0.03)
    assert rep["after"]["perplexity_ort"] == pytest.approx(rep["after"]["perplexity_torch"], rel=1e-3)
