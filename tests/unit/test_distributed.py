"""Fine-tuning across processes: the data shards, BatchNorm over the global batch, and 2 CPU
processes under torchrun (gloo) computing what one process computes with the same global batch."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

import graphprune as gp
from graphprune._safetensors import dumps
from graphprune.datasets import digits
from graphprune.distributed import (DistEnv, GlobalBatchNorm, dist_env, global_batchnorm,
                                    resolve_device, shards)
from graphprune.errors import ConfigError
from graphprune.finetune import finetune
from graphprune.finetune_cmd import add_finetune_parser, cli_finetune, load_pruned
from graphprune.models import digits_net

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@pytest.mark.parametrize("world,batch", [(2, 12), (3, 12), (4, 8)])
def test_each_step_of_the_shards_is_the_single_process_batch(world, batch):
    n = 101  # not a multiple of anything: the tail is dropped the same way everywhere
    one_s, one_b = shards(n, batch, seed=5)
    ranks = [shards(n, batch, seed=5, env=DistEnv(r, world, r)) for r in range(world)]
    for epoch in range(3):
        one_s.set_epoch(epoch)
        for s, _ in ranks:
            s.set_epoch(epoch)
        single = list(one_b)
        per_rank = [list(b) for _, b in ranks]
        assert len(single) == n // batch and all(len(p) == len(single) for p in per_rank)
        for k, step in enumerate(single):
            parts = [p[k] for p in per_rank]
            assert all(len(q) == batch // world for q in parts)
            union = sorted(i for q in parts for i in q)
            assert union == sorted(step) and len(set(union)) == batch
    one_s.set_epoch(0)
    first = list(one_b)
    one_s.set_epoch(1)
    assert list(one_b) != first  # set_epoch reshuffles


def test_shards_and_env_errors():
    with pytest.raises(ConfigError) as e:
        shards(100, 10, seed=0, env=DistEnv(0, 4, 0))
    assert str(e.value) == ("The 'batch_size' parameter (the global batch) must be a multiple of "
                            "the number of processes (4). Got 10 instead.")
    with pytest.raises(ConfigError, match="at most the number of training samples"):
        shards(10, 16, seed=0)
    assert dist_env({}) == DistEnv()
    assert dist_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == DistEnv(1, 2, 1)
    with pytest.raises(ConfigError, match="RANK=2 of WORLD_SIZE=2"):
        dist_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="WORLD_SIZE must be an integer"):
        dist_env({"RANK": "0", "WORLD_SIZE": "two"})
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None, model=nn.Linear(2, 2)) == torch.device("cpu")
    auto = resolve_device("auto", DistEnv(1, 2, 1))
    assert auto == (torch.device("cuda", 1 % torch.cuda.device_count()) if torch.cuda.is_available()
                    else torch.device("cpu"))
    with pytest.raises(ConfigError) as e:
        resolve_device("tpu")
    assert str(e.value) == ("The 'device' parameter must be 'cpu', 'cuda', 'cuda:N' or 'auto'. "
                            "Got 'tpu' instead.")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.parametrize("momentum", [0.1, None])
def test_global_batchnorm_is_batchnorm_on_the_whole_batch(tmp_path, momentum):
    """One process holding the whole batch: the all-reduced statistics are the batch's, so the
    output, the gradients and the running statistics are BatchNorm's."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ref = nn.BatchNorm2d(6, momentum=momentum)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
        ours = GlobalBatchNorm(type(ref)(6, momentum=momentum))
        ours.bn.load_state_dict(ref.state_dict())
        for _ in range(3):
            x = (3 * torch.randn(10, 6, 5, 5) + 2).requires_grad_()
            x2 = x.detach().clone().requires_grad_()
            w = torch.randn(10, 6, 5, 5)
            want = ref(x)
            (want * w).sum().backward()
            out = ours(x2)
            (out * w).sum().backward()
            torch.testing.assert_close(out, want.detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.bn.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.bn.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(ours.bn.state_dict()[k], v, rtol=1e-5, atol=1e-6)
        ours.eval(), ref.eval()
        x = torch.randn(4, 6, 5, 5)
        torch.testing.assert_close(ours(x), ref(x))
    finally:
        dist.destroy_process_group()


def test_global_batchnorm_swaps_back():
    m = digits_net()
    keys = {k: v.shape for k, v in m.state_dict().items()}
    with global_batchnorm(m) as n:
        assert n == 3 and isinstance(m.bn2, GlobalBatchNorm)
    assert isinstance(m.bn2, nn.BatchNorm2d) and {k: v.shape for k, v in m.state_dict().items()} == keys


# ---------------------------------------------------------------------- 2 processes vs 1
# Imported by every process of the torchrun launch: logs each file-system write under the
# watched directory, per rank, so the test sees who wrote what.
WATCH = textwrap.dedent("""
    import builtins, os
    _dir, _log = os.environ.get("GP_WATCH_DIR"), os.environ.get("GP_WATCH_LOG")
    if _dir and _log:
        _open = builtins.open
        _name = os.path.join(_log, "writes-" + os.environ.get("RANK", "launcher") + ".txt")

        def _note(what, *paths):
            for p in paths:
                if isinstance(p, (str, os.PathLike)) and os.path.abspath(p).startswith(_dir):
                    with _open(_name, "a") as f:
                        f.write(what + " " + os.path.abspath(p) + "\\n")

        def _w_open(file, mode="r", *a, **k):
            if any(c in mode for c in "wax+"):
                _note("open", file)
            return _open(file, mode, *a, **k)

        builtins.open = _w_open

        def _wrap(name, nargs):
            orig = getattr(os, name)

            def f(*a, **k):
                if name != "open" or a[1] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                    _note(name, *a[:nargs])
                return orig(*a, **k)
            setattr(os, name, f)

        for _n, _k in (("open", 1), ("replace", 2), ("rename", 2), ("mkdir", 1)):
            _wrap(_n, _k)
""")


def torchrun(tmp_path, argv, nproc=2, env_extra=None, timeout=600):
    """``torchrun --standalone --nproc_per_node nproc -m graphprune *argv`` in ``tmp_path``, one
    thread per process, every file-system write under ``tmp_path`` logged per rank in
    ``tmp_path/watch/writes-RANK.txt``. Returns the finished process and the watch directory."""
    watch = tmp_path / "watch"
    watch.mkdir(exist_ok=True)
    (watch / "sitecustomize.py").write_text(WATCH)
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONPATH=os.pathsep.join([str(watch), ROOT]), OMP_NUM_THREADS="1",
               GP_WATCH_DIR=str(tmp_path), GP_WATCH_LOG=str(watch), **(env_extra or {}))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", str(nproc), "-m", "graphprune", *argv],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    return run, watch


def writes(watch):
    """Rank -> the paths it wrote under the watched directory (``torchrun``'s log)."""
    return {f.name[len("writes-"):-len(".txt")]: f.read_text() for f in watch.glob("writes-*.txt")}


def _parse(argv):
    import argparse

    p = argparse.ArgumentParser()
    add_finetune_parser(p.add_subparsers(dest="cmd"))
    return p.parse_args(argv)


def test_two_gloo_processes_compute_the_single_process_run(tmp_path, monkeypatch):
    for v in DIST_VARS:
        monkeypatch.delenv(v, raising=False)
    xtr, ytr, xte, yte = digits()
    data = tmp_path / "digits.npz"  # 320 samples: 5 steps of 64 per epoch
    np.savez(data, x_train=xtr[:320].numpy(), y_train=ytr[:320].numpy(), x_test=xte[:128].numpy(),
             y_test=yte[:128].numpy())
    torch.manual_seed(1)
    r = gp.prune(digits_net(), torch.randn(1, 1, 8, 8), sparsity=0.5, method="l1")
    masks, weights = tmp_path / "masks.safetensors", tmp_path / "pruned.safetensors"
    gp.save_masks(r.masks, masks, plan=r.plan)
    weights.write_bytes(dumps(r.model.state_dict()))
    argv = ["finetune", "--model", "digits", "--masks", str(masks), "--weights", str(weights),
            "--data", str(data), "--epochs", "2", "--batch-size", "64", "--optimizer", "sgd",
            "--lr", "0.05", "--seed", "3", "--device", "cpu"]

    out2 = tmp_path / "two"
    run, watch = torchrun(tmp_path, [*argv, "--out", str(out2)])
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1 and "2 process(es), cpu (gloo)" in run.stdout

    out1 = tmp_path / "one"
    assert cli_finetune(_parse([*argv, "--out", str(out1), "--quiet"])) == 0

    files = sorted(os.listdir(out1))
    assert files == sorted(os.listdir(out2)) == ["finetune.json", "masks.safetensors",
                                                 "model.safetensors"]
    assert (out1 / "masks.safetensors").read_bytes() == masks.read_bytes()
    rep1, rep2 = (json.loads((o / "finetune.json").read_text()) for o in (out1, out2))
    assert (rep1["processes"], rep2["processes"]) == (1, 2)
    assert (rep1["batch_size_per_process"], rep2["batch_size_per_process"]) == (64, 32)
    assert rep2["global_batchnorm_layers"] == 3 and rep1["steps_per_epoch"] == rep2["steps_per_epoch"] == 5
    np.testing.assert_allclose(rep2["loss"], rep1["loss"], rtol=1e-5)

    start = load_file(str(weights))
    w1, w2 = load_file(str(out1 / "model.safetensors")), load_file(str(out2 / "model.safetensors"))
    assert w1.keys() == w2.keys() == start.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # the runs moved the weights far more than they disagree, and another data order (seed)
    # lands far outside that tolerance: the agreement is not a tolerance that lets anything pass
    moved = max(float((w1[k] - start[k]).abs().max()) for k in w1 if k.endswith("weight"))
    assert moved > 1e-2
    model, _ = load_pruned("digits", masks=str(masks), weights=str(weights))
    x, y = torch.from_numpy(np.load(data)["x_train"]), torch.from_numpy(np.load(data)["y_train"])
    again, other = (finetune(model, (x, y), epochs=2, batch_size=64, optimizer="sgd", lr=0.05,
                             seed=seed, device="cpu").model.state_dict() for seed in (3, 4))
    assert all(torch.equal(again[k], w1[k]) for k in w1)  # deterministic, bit for bit
    assert max(float((other[k] - w1[k]).abs().max()) for k in w1 if k.endswith("weight")) > 1e-3

    # only rank 0 touched the output directory; rank 1 wrote nothing at all there
    logs = writes(watch)
    assert "1" not in logs, logs.get("1")
    assert str(out2 / "model.safetensors") in logs["0"]
