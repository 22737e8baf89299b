"""The main job (``graphprune prune``) under torchrun with 2 CPU processes (gloo): rank 0 prunes and
shares its plan, both fine-tune with DDP, rank 0 alone writes the same files as one process, with
the fine-tuned weights of one process on the same global batch; an error on rank 0 stops both."""

import json
import os
import time

import numpy as np
import torch
from safetensors.torch import load_file

from graphprune.cli import main
from graphprune.deploy import Session
from graphprune.finetune_cmd import load_pruned

from .test_distributed import DIST_VARS, torchrun, writes

# SGD: with Adam, a conv bias that feeds a BatchNorm (its gradient is 0 up to rounding) takes
# lr-sized steps driven by rounding noise, so it differs between any two summation orders
RECIPE = {"finetune": {"epochs": 2, "optimizer": "sgd", "lr": 0.05}, "quantize": {"mode": "none"}}


def _args(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(RECIPE))
    return ["--recipe", str(recipe)]


def test_main_job_on_two_processes_is_the_single_process_job(tmp_path, monkeypatch, capsys):
    for v in DIST_VARS:
        monkeypatch.delenv(v, raising=False)
    args = _args(tmp_path)
    out2 = tmp_path / "two"
    t = time.perf_counter()
    # the embedded default is trained by rank 0 alone (or read from the user's cache, as the CLI's
    # tests do); the single-process runs below read it from there
    run, watch = torchrun(tmp_path, ["prune", *args, "--out", str(out2)])
    t2 = time.perf_counter() - t
    assert run.returncode == 0, run.stderr[-3000:]

    out1, out0 = tmp_path / "one", tmp_path / "zero"
    t = time.perf_counter()
    assert main(["prune", *args, "--out", str(out1), "--quiet"]) == 0
    t1 = time.perf_counter() - t
    assert main(["prune", *args, "--finetune-epochs", "0", "--out", str(out0), "--quiet"]) == 0
    capsys.readouterr()
    print(f"main job: 2 processes {t2:.1f} s (torchrun included), 1 process {t1:.1f} s")

    # one set of result files, the same names, written by rank 0 alone
    files = sorted(os.listdir(out1))
    assert sorted(os.listdir(out2)) == files and {"model.onnx", "model.safetensors",
                                                  "masks.safetensors", "plan.json",
                                                  "report.json"} <= set(files)
    logs = writes(watch)
    assert str(out2 / "model.onnx") in logs["0"]
    assert str(out2) not in logs.get("1", ""), logs.get("1")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no staging left behind

    # the same pruning (rank 0's plan), the same fine-tune on 1 and on 2 processes
    rep1, rep2 = (json.loads((o / "report.json").read_text()) for o in (out1, out2))
    assert (out1 / "masks.safetensors").read_bytes() == (out2 / "masks.safetensors").read_bytes()
    assert json.loads((out1 / "plan.json").read_text()) == json.loads((out2 / "plan.json").read_text())
    assert (rep1["finetune"]["processes"], rep2["finetune"]["processes"]) == (1, 2)
    assert rep2["finetune"]["backend"] == "gloo" and rep2["finetune"]["batch_size_per_process"] == 32
    assert rep2["finetune"]["optimizer"] == "sgd" and rep2["finetune"]["steps_per_epoch"] == 1347 // 64
    assert rep1["after"]["params"] == rep2["after"]["params"] < rep1["before"]["params"]
    np.testing.assert_allclose(rep2["finetune"]["loss"], rep1["finetune"]["loss"], rtol=1e-5)
    w0, w1, w2 = (load_file(str(o / "model.safetensors")) for o in (out0, out1, out2))
    assert w1.keys() == w2.keys() == w0.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # fine-tuning moved the weights far more than the two runs disagree
    assert max(float((w1[k] - w0[k]).abs().max()) for k in w1 if k.endswith("weight")) > 1e-2

    # the exported model runs and computes the fine-tuned pruned model
    model, shape = load_pruned("digits", masks=str(out2 / "masks.safetensors"),
                               weights=str(out2 / "model.safetensors"))
    x = torch.randn(16, *shape[1:], generator=torch.Generator().manual_seed(0))
    got = Session(str(out2 / "model.onnx"), threads=1).run(x)[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_an_error_on_rank_0_stops_every_process(tmp_path, monkeypatch):
    for v in DIST_VARS:
        monkeypatch.delenv(v, raising=False)
    (tmp_path / "file").write_text("not a directory")
    t = time.perf_counter()
    out = tmp_path / "file" / "out"
    run, watch = torchrun(tmp_path, ["prune", *_args(tmp_path), "--out", str(out)], timeout=300)
    assert run.returncode != 0 and time.perf_counter() - t < 120
    err = run.stderr
    assert "graphprune prune: error: cannot write to output directory" in err
    assert "graphprune prune: error: Process RANK=0 failed while pruning: cannot write to " in err
    assert not {r: w for r, w in writes(watch).items() if r != "launcher"}  # no process wrote
