"""The CLI, run for real in a subprocess: outputs, JSON, and one-line errors with exit code 2."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def gp(*args, cwd=ROOT, cache=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    if cache is not None:
        env["XDG_CACHE_HOME"] = str(cache)
    return subprocess.run([sys.executable, "-m", "graphprune", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_inspect_json_dot_png(tmp_path):
    dot, png = tmp_path / "g.dot", tmp_path / "g.png"
    r = gp("inspect", "--model", "resnet20", "--json", "--dot", str(dot), "--png", str(png))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["model"] == "ResNetCifar" and len(d["groups"]) == 13
    assert sum(g["prunable"] for g in d["groups"]) == 12
    assert dot.read_text().startswith("digraph") and png.read_bytes()[:4] == b"\x89PNG"


def test_inspect_table():
    r = gp("inspect", "--model", "models.lenet:lenet5", "--input-shape", "1,1,32,32")
    assert r.returncode == 0, r.stderr
    assert "conv2" in r.stdout and "prunable" in r.stdout


def test_inspect_with_the_export_tracer():
    r = gp("inspect", "--model", "resnet20", "--tracer", "export", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["tracer"] == "torch.export" and d["tracer_reason"] == "requested"
    assert sum(g["prunable"] for g in d["groups"]) == 12
    bad = gp("inspect", "--model", "resnet20", "--tracer", "dynamo")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


BUNDLE = ["channels.png", "masks.safetensors", "model.onnx", "model.safetensors", "plan.json",
          "recipe.json", "report.json", "report.md"]


def test_default_run_is_the_main_job(tmp_path):
    out = tmp_path / "out"
    r = gp("prune", "--out", str(out), cwd=tmp_path, cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == BUNDLE
    rep = json.loads((out / "report.json").read_text())
    b, a = rep["before"], rep["after"]
    assert a["params"] < b["params"] and a["macs"] < b["macs"] and a["onnx_bytes"] < b["onnx_bytes"]
    assert a["precision"] == "int8" and rep["recipe"]["prune"]["method"] == "l1"
    assert abs(a["accuracy_ort"] - a["accuracy_torch"]) <= 0.01
    assert a["accuracy_ort"] > 0.95 and b["accuracy_torch"] > 0.97
    assert "accuracy, onnxruntime" in r.stdout and "# graphprune report" in (out / "report.md").read_text()


def test_recipe_run_repeats_exactly(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--sparsity", "0.4", "--method", "greedy", "--finetune-epochs", "1",
            "--quantize", "none", "--exporter", "legacy"]
    assert gp("prune", *args, "--out", str(a), cache=tmp_path / "c").returncode == 0
    r = gp("prune", "--recipe", str(a / "recipe.json"), "--out", str(b), "--json",
           cache=tmp_path / "c")
    assert r.returncode == 0, r.stderr
    for f in ("plan.json", "masks.safetensors", "model.safetensors", "recipe.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    for k in ("params", "macs", "onnx_bytes", "accuracy_torch", "accuracy_ort"):
        assert ra["after"][k] == rb["after"][k], k
    assert json.loads(r.stdout)["after"]["params"] == ra["after"]["params"]


def test_prune_a_repository_model_with_l1(tmp_path):
    out = tmp_path / "out"
    r = gp("prune", "--model", "resnet20", "--method", "l1", "--no-reconstruct", "--quantize",
           "none", "--finetune-epochs", "0", "--exporter", "legacy", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"] == "photos" and rep["after"]["params"] < rep["before"]["params"]


@pytest.mark.parametrize("args,needle", [
    (["--model", "resnet2O"], "Unknown model 'resnet2O'"),
    (["--model", "torchvision:resnet1800"], "torchvision has no classification model"),
    (["--model", "digits", "--weights", "nope.safetensors"], "does not exist"),
    (["--model", "digits", "--input-shape", "1,1,12,12"], "example inputs do not fit"),
    (["--model", "digits", "--sparsity", "1.5"], "must be a float in [0, 1)"),
    (["--model", "digits", "--method", "lasso2"], "invalid choice: 'lasso2'"),
    (["--model", "digits", "--data", "/nonexistent/folder"], "does not exist"),
    (["--model", "resnet20", "--data", "EMPTY_DIR", "--input-shape", "1,3,32,32"], "holds no images"),
    (["--model", "digits", "--recipe", "nope.yaml"], "cannot read recipe"),
])
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, args, needle):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY_DIR" else a for a in args]
    r = gp("prune", *args, "--out", str(out), cache=tmp_path / "c")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()


def test_unwritable_output_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = gp("prune", "--model", "digits", "--out", str(f / "out"), cache=tmp_path / "c")
    assert r.returncode == 2 and "cannot write" in r.stderr
    assert f.read_text() == "x"


def test_quantize_writes_quantized_weights_that_load_back(tmp_path):
    out = tmp_path / "q.safetensors"
    r = gp("quantize", "--model", "lenet5", "--input-shape", "1,1,32,32", "--scheme", "kmeans",
           "--bits", "4", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["layers"] and all(v["distinct"] <= 16 and v["bits"] == 4 for v in d["layers"].values())
    assert 0 < d["output_rel_err"] < 0.5
    back = gp("export", "--model", "lenet5", "--input-shape", "1,1,32,32", "--weights", str(out),
              "--out", str(tmp_path / "m.onnx"), "--exporter", "legacy", "--json")
    assert back.returncode == 0, back.stderr
    bad = gp("quantize", "--model", "lenet5", "--input-shape", "1,1,32,32", "--bits", "1",
             "--out", str(tmp_path / "bad.safetensors"))
    assert bad.returncode == 2 and "bits" in bad.stderr and len(bad.stderr.splitlines()) == 1
    assert not (tmp_path / "bad.safetensors").exists()
