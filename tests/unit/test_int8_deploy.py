"""int8 deployment in onnxruntime, bundles, and the deploy helpers."""

import os

import numpy as np
import pytest
import torch

import graphprune as gp
from graphprune.deploy import Session, check
from graphprune.export.int8 import optimized_op_counts


@pytest.fixture(scope="module")
def pruned_digits():
    from graphprune.datasets import digits
    from graphprune.finetune import train
    from graphprune.models import digits_net

    xtr, ytr, xte, yte = digits()
    torch.manual_seed(0)
    model = train(digits_net(width=64), xtr, ytr, epochs=10, seed=0)
    r = gp.prune(model, xtr[:1], sparsity=0.5, method="greedy",
                 calibration=(xtr[:256], ytr[:256]), reconstruct=True)
    return r, (xtr, ytr, xte, yte)


def _acc(path, x, y):
    (out,) = Session(path).run(x)
    return float((out.argmax(1) == y.numpy()).mean())


@pytest.mark.slow
def test_int8_keeps_accuracy_runs_qlinearconv_and_is_small(pruned_digits, tmp_path):
    r, (xtr, _, xte, yte) = pruned_digits
    f32 = gp.export_onnx(r.model, xtr[:1], tmp_path / "fp32.onnx", exporter="legacy")
    i8 = gp.export_onnx(r.model, xtr[:1], tmp_path / "int8.onnx", exporter="legacy",
                        quantize="int8", calibration=xtr[:256])
    a32, a8 = _acc(f32.path, xte, yte), _acc(i8.path, xte, yte)
    assert a8 >= a32 - 0.01, (a32, a8)
    ops = optimized_op_counts(i8.path)
    n_conv = sum(1 for m in r.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert ops["QLinearConv"] == n_conv and ops.get("Conv", 0) == 0 and ops.get("FusedConv", 0) == 0
    assert i8.bytes <= 0.30 * f32.bytes, (i8.bytes, f32.bytes)
    assert i8.cosine > 0.99


def test_qat_model_exports_to_full_int8(pruned_digits, tmp_path):
    from graphprune.finetune import train
    from graphprune.quantize import QAT, prepare_qat

    r, (xtr, ytr, xte, yte) = pruned_digits
    q = prepare_qat(r.model, xtr[:1], QAT(), calibration=xtr[:256])
    train(q, xtr[:512], ytr[:512], epochs=1, lr=5e-4)
    e = gp.export_onnx(q, xtr[:1], tmp_path / "qat.onnx", exporter="legacy", quantize="int8",
                       calibration=xtr[:256])
    assert optimized_op_counts(e.path)["QLinearConv"] == 3
    # exported as a fake-quant (QDQ) graph, the weights are stored as int8 initializers
    fq = gp.export_onnx(q, xtr[:1], tmp_path / "fq.onnx", exporter="legacy", rtol=1e-2)
    f32 = gp.export_onnx(r.model, xtr[:1], tmp_path / "f32.onnx", exporter="legacy")
    assert fq.bytes < 0.35 * f32.bytes
    assert optimized_op_counts(fq.path)["QLinearConv"] >= 2


def test_bundle_writes_every_file_atomically(pruned_digits, tmp_path):
    r, (xtr, _, _, _) = pruned_digits
    out = tmp_path / "out"
    rep = gp.export_bundle(out, r.model, xtr[:1], result=r, quantize="int8",
                           calibration=xtr[:128], exporter="legacy")
    assert sorted(os.listdir(out)) == ["masks.safetensors", "model.onnx", "plan.json", "report.json"]
    assert rep["onnx"]["quantize"] == "int8" and rep["params"][1] < rep["params"][0]
    # a failing export leaves nothing behind
    out2 = tmp_path / "out2"
    with pytest.raises(gp.ConfigError, match="needs calibration"):
        gp.export_bundle(out2, r.model, xtr[:1], result=r, quantize="int8")
    assert not out2.exists()


def test_session_checks_inputs_and_times(pruned_digits, tmp_path):
    r, (xtr, _, _, _) = pruned_digits
    p = gp.export_onnx(r.model, xtr[:1], tmp_path / "m.onnx", exporter="legacy").path
    s = Session(p, threads=1)
    assert s.inputs[0][0] == "input" and s.outputs == ["output"]
    (y,) = s.run(xtr[:5])
    assert y.shape == (5, 10)
    with pytest.raises(gp.InputError, match="has shape"):
        s.run(np.zeros((2, 1, 9, 9), dtype=np.float32))
    with pytest.raises(gp.InputError, match="takes 1 input"):
        s.run(xtr[:1], xtr[:1])
    b = s.benchmark(xtr[:1], warmup=2, runs=20)
    assert 0 < b["min"] <= b["p50"] <= b["p99"]
    err = check(p, r.model, xtr[:4])
    assert err["max_rel_err"] < 1e-4
    with pytest.raises(gp.InputError, match="does not exist"):
        Session(tmp_path / "nope.onnx")
    with pytest.raises(gp.ConfigError, match="'int8'"):
        gp.export_onnx(r.model, xtr[:1], tmp_path / "x.onnx", quantize="int4")
