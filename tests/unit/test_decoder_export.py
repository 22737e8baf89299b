"""Deploying a pruned Hugging Face decoder: ONNX export with and without the KV cache (parity
with PyTorch, per-layer cache shapes after pruning), greedy generation in onnxruntime against
``generate``, weight-only int8 / 4-bit MatMulNBits files, and nothing left behind on failure."""

import json
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

import graphprune  # noqa: E402
from ..conftest import assert_unchanged, snapshot  # noqa: E402
from graphprune.errors import ConfigError, ExportError, InputError, ParityError  # noqa: E402
from graphprune.export.bundle_lm import export_bundle_lm  # noqa: E402
from graphprune.export.decoder import export_decoder  # noqa: E402
from graphprune.export.decoder_session import DecoderSession  # noqa: E402
from graphprune.export.weight_only import quantize_weights  # noqa: E402

from graphprune.lm import ByteTokenizer, toy_language, train_toy_decoder  # noqa: E402

VOCAB = 24  # the toy language's


@pytest.fixture(scope="module")
def result():
    """A GQA LLaMA (4 query heads over 2 key/value heads, hidden 64, 2 layers) trained for a few
    seconds on the toy language, then pruned 50% by l1 (heads and MLP channels) with layer 1's
    attention kept whole, so the layers keep different numbers of key/value heads."""
    model = train_toy_decoder(toy_language(VOCAB), steps=80)
    r = graphprune.prune(model, graphprune.hf.example_inputs(model), sparsity=0.5, method="l1",
                         ignore=["model.layers.1.self_attn"])
    kv = [layer.self_attn.k_proj.out_features // 16 for layer in r.model.model.layers]
    assert kv == [1, 2], kv  # the point of the fixture: layers differ
    assert r.model.model.layers[0].mlp.up_proj.out_features < 176
    return r


@pytest.fixture(scope="module")
def pruned(result):
    return result.model


@pytest.fixture(scope="module")
def files(pruned, tmp_path_factory):
    d = tmp_path_factory.mktemp("decoder")
    out = {"fp32": export_decoder(pruned, d / "model.onnx"),
           "kv": export_decoder(pruned, d / "model.kv.onnx", kv_cache=True)}
    out["int4"] = quantize_weights(out["fp32"].path, d / "model.int4.onnx", bits=4, block_size=32)
    out["int8"] = quantize_weights(out["fp32"].path, d / "model.int8.onnx", bits=8, block_size=32)
    return out


def _torch_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()


def _rel(a, b):
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def _cos(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_pruned_decoder_logits_match_pytorch_on_new_shapes(pruned, files):
    assert files["fp32"].max_rel_err <= 1e-4 and files["kv"].max_rel_err <= 1e-4
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: compare the real positions
    want = _torch_logits(pruned, ids, mask)
    for key in ("fp32", "kv"):  # the KV model with an empty past scores whole sequences too
        got = DecoderSession(files[key].path).logits(ids, mask)
        assert got.shape == (3, 11, VOCAB)
        real = mask.numpy().astype(bool)
        assert _rel(got[real], want[real]) <= 1e-4


def test_kv_cache_inputs_follow_each_layers_kept_heads(pruned, files):
    sess = DecoderSession(files["kv"].path)
    heads = [layer.self_attn.k_proj.out_features // 16 for layer in pruned.model.layers]
    assert sess.past_shapes == [(h, 16) for h in heads for _ in ("key", "value")]
    assert files["kv"].layout.kv_heads == tuple(heads)
    shapes = {i.name: i.shape for i in sess.sess.get_inputs()}
    assert shapes["input_ids"] == ["batch", "sequence"]
    assert shapes["past_key_values.1.value"] == ["batch", heads[1], "past_sequence", 16]


def test_onnx_greedy_generation_matches_hf_generate(pruned, files):
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = pruned.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                               min_new_tokens=16, do_sample=False).numpy()
    g = DecoderSession(files["kv"].path).generate(prompt, 16)
    assert g.new_tokens == 16 and g.ids.shape == (2, 22)
    np.testing.assert_array_equal(g.ids, want)
    # without the cache (the whole sequence each step) the tokens are the same
    np.testing.assert_array_equal(DecoderSession(files["fp32"].path).generate(prompt, 16).ids, want)


def test_generation_stops_at_eos_and_pads_finished_rows(files):
    sess = DecoderSession(files["kv"].path)
    prompt = np.arange(12).reshape(2, 6)
    free = sess.generate(prompt, 8).ids
    eos = int(free[0, 7])  # row 0's second new token
    g = sess.generate(prompt, 8, eos_token_id=eos, pad_token_id=0)
    row0 = g.ids[0, 6:]
    assert list(row0[:2]) == list(free[0, 6:8]) and (row0[2:] == 0).all()


def test_int4_file_uses_matmulnbits_and_stays_close(pruned, files):
    r4 = files["int4"]
    m = onnx.load(r4.path)
    ops = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    inits = {i.name for i in m.graph.initializer}
    assert len(ops) == 15 == r4.quantized  # 7 per layer + lm_head
    assert all({a.name: a.i for a in n.attribute}["bits"] == 4 for n in ops)
    assert not [n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert r4.cosine > 0.99 and r4.bytes < 0.6 * files["fp32"].bytes
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(9))
    assert _cos(DecoderSession(r4.path).logits(ids), _torch_logits(pruned, ids)) > 0.99


def test_int8_file_is_smaller_than_fp32_and_nearly_exact(pruned, files):
    r8, r4 = files["int8"], files["int4"]
    assert r4.bytes < r8.bytes < files["fp32"].bytes
    assert r8.source_bytes == files["fp32"].bytes == os.path.getsize(files["fp32"].path)
    assert r8.cosine > 0.9999 and r8.agreement >= 0.95  # the toy language has near-ties
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(9))
    assert _cos(DecoderSession(r8.path).logits(ids), _torch_logits(pruned, ids)) > 0.9999


def test_excluded_modules_stay_float(files, tmp_path):
    r = quantize_weights(files["kv"].path, tmp_path / "q.onnx", bits=4, exclude=["lm_head"],
                         embeddings=True)
    m = onnx.load(r.path)
    assert r.kept_float == ["lm_head"] and r.quantized == 15  # 14 MatMuls + the embedding table
    assert sum(n.op_type == "GatherBlockQuantized" for n in m.graph.node) == 1
    assert sum(n.op_type == "MatMul" and n.name.startswith("/model/lm_head") for n in m.graph.node) == 1


def test_failed_export_or_quantization_leaves_nothing_behind(pruned, files, tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    pruned.train()
    snap = snapshot(pruned)
    try:
        with pytest.raises(ParityError, match="nothing was written"):
            export_decoder(pruned, target, rtol=0.0)  # float rounding alone exceeds rtol=0
        assert_unchanged(pruned, snap)  # weights and train mode as the caller left them
    finally:
        pruned.eval()
    with pytest.raises(ParityError, match="nothing was written"):
        quantize_weights(files["fp32"].path, target, bits=4, min_cosine=1.0)

    def broken(*a, **k):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ExportError, match="legacy: RuntimeError: exporter crashed"):
        export_decoder(pruned, target)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"] and target.read_bytes() == b"previous"


def test_errors_name_the_parameter(files, tmp_path):
    with pytest.raises(InputError) as e:
        export_decoder(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    assert str(e.value) == ("The 'model' parameter of export_decoder must be a Hugging Face causal "
                            "language model (e.g. LlamaForCausalLM) taking input_ids. Got Linear instead.")
    with pytest.raises(ConfigError) as e:
        quantize_weights(files["fp32"].path, tmp_path / "x.onnx", bits=3)
    assert str(e.value) == "The 'bits' parameter of quantize_weights must be one of 4, 8. Got 3 instead."
    with pytest.raises(ConfigError, match="power of two"):
        quantize_weights(files["fp32"].path, tmp_path / "x.onnx", block_size=48)
    with pytest.raises(InputError, match="cannot read the ONNX model"):
        quantize_weights(tmp_path / "missing.onnx", tmp_path / "x.onnx")
    assert os.listdir(tmp_path) == []


def test_bundle_holds_the_model_its_variants_and_how_to_run_them(result, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    rep = export_bundle_lm(out, result.model, tokenizer=ByteTokenizer(), result=result,
                           quantize=("int4", "int8"))
    assert sorted(os.listdir(out)) == ["decoder.json", "masks.safetensors", "model.int4.onnx",
                                       "model.int8.onnx", "model.onnx", "plan.json", "report.json",
                                       "tokenizer.json"]
    meta = json.loads((out / "decoder.json").read_text())
    assert [layer["key_heads"] for layer in meta["layers"]] == [1, 2]
    assert meta["files"] == {"fp32": "model.onnx", "int4": "model.int4.onnx", "int8": "model.int8.onnx"}
    assert json.loads((out / "report.json").read_text())["onnx"]["int4"]["logits_cosine"] > 0.99
    assert rep["onnx"]["fp32"]["max_rel_err"] <= 1e-4
    assert DecoderSession(out / "model.int4.onnx").generate(np.arange(5)[None], 4).ids.shape == (1, 9)
    with pytest.raises(ConfigError, match="Did you mean 'int4'"):
        export_bundle_lm(tmp_path / "other", result.model, quantize=("int-4",))

    def failing(*a, **k):
        raise ParityError("drifted")

    monkeypatch.setattr("graphprune.export.bundle_lm.quantize_weights", failing)
    with pytest.raises(ParityError):  # after model.onnx was staged
        export_bundle_lm(tmp_path / "other", result.model)
    assert sorted(os.listdir(tmp_path)) == ["bundle"]


@pytest.mark.zoo
def test_dynamo_exporter_kv_cache_parity(pruned, tmp_path):  # ~30 s: the dynamo exporter is slow
    r = export_decoder(pruned, tmp_path / "m.onnx", kv_cache=True, exporter="dynamo")
    assert r.exporter == "dynamo" and r.max_rel_err <= 1e-4
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pruned.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                               min_new_tokens=8, do_sample=False).numpy()
    np.testing.assert_array_equal(DecoderSession(r.path).generate(prompt, 8).ids, want)
