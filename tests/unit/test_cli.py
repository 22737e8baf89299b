"""The CLI, run for real in a subprocess: outputs, JSON, and one-line errors with exit code 2."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def gp(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "graphprune", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


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


def test_prune_writes_every_file(tmp_path):
    out = tmp_path / "out"
    r = gp("prune", "--model", "resnet20", "--sparsity", "0.5", "--out", str(out),
           "--exporter", "legacy")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["masks.safetensors", "model.onnx", "plan.json", "report.json"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["params"][1] < rep["params"][0] and rep["files"]["onnx"]["max_rel_err"] < 1e-4
    assert "params" in r.stdout and "after" in r.stdout


def test_prune_replays_a_plan(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert gp("prune", "--model", "digits", "--out", str(a), "--no-export").returncode == 0
    r = gp("prune", "--model", "digits", "--plan", str(a / "plan.json"), "--out", str(b),
           "--no-export", "--json")
    assert r.returncode == 0, r.stderr
    assert (a / "masks.safetensors").read_bytes() == (b / "masks.safetensors").read_bytes()


@pytest.mark.parametrize("args,needle", [
    (["--model", "resnet2O"], "Unknown model 'resnet2O'"),
    (["--model", "torchvision:resnet1800"], "torchvision has no classification model"),
    (["--model", "digits", "--weights", "nope.safetensors"], "does not exist"),
    (["--model", "digits", "--input-shape", "1,1,12,12"], "example inputs do not fit"),
    (["--model", "digits", "--sparsity", "1.5"], "must be a float in [0, 1)"),
    (["--model", "digits", "--method", "lasso2"], "Unknown pruning method"),
])
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, args, needle):
    out = tmp_path / "out"
    r = gp("prune", *args, "--out", str(out))
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()


def test_unwritable_output_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = gp("prune", "--model", "digits", "--out", str(f / "out"))
    assert r.returncode == 2 and "cannot write" in r.stderr
    assert f.read_text() == "x"
