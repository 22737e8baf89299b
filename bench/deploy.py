"""onnxruntime latency of dense / pruned x fp32 / int8, next to the MACs ratio and to
Torch-Pruning's pruned model, in one run.

For each model (torchvision, random init): graphprune prunes 50% of the channels by L1; so does
Torch-Pruning 1.6 (classifier ignored); all are exported with the same exporter; int8 is static
QDQ (per-channel int8 weights, uint8 activations) calibrated on 32 crops of scikit-learn's sample
photos. Latency: batch 1, 2 threads, sessions run interleaved round-robin, median of the rounds.

    python bench/deploy.py [--models resnet50,mobilenet_v2] [--rounds 30]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphprune as gp  # noqa: E402
from graphprune.cost import count_params  # noqa: E402
from graphprune.datasets import sample_crops  # noqa: E402
from graphprune.deploy import Session  # noqa: E402


def tp_prune(model, x):
    import torch_pruning as tp

    model = copy.deepcopy(model)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=[last])
    pruner.step()
    return model.eval()


def macs(model, x) -> int:
    r = gp.prune(model, x, sparsity=0.0)
    return r.report.macs[0]


def interleaved(sessions: dict[str, Session], x, rounds: int, per_round: int = 5) -> dict[str, float]:
    """Median latency per session. Sessions take turns (so machine noise hits all alike); before
    each turn the other sessions' spinning thread pools are given time to park, or they would
    steal the cores of the session being timed."""
    for s in sessions.values():
        s.benchmark(x, warmup=5, runs=5)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            feeds = s._feeds((x,))
            time.sleep(0.05)
            s.sess.run(None, feeds)  # wake the pool
            for _ in range(per_round):
                t = time.perf_counter()
                s.sess.run(None, feeds)
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50,mobilenet_v2")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import torch_pruning
    import torchvision

    x = torch.randn(1, 3, 224, 224)
    calib = sample_crops(32, seed=3)
    print(f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, onnxruntime "
          f"{__import__('onnxruntime').__version__}, torch-pruning {torch_pruning.__version__}; "
          f"batch 1, {args.threads} threads, median of {args.rounds} interleaved rounds")
    print("| model | dense fp32 ms | pruned fp32 ms | dense int8 ms | pruned int8 ms | int8 speed-up"
          " (dense) | pruned/dense latency | MACs ratio | TP pruned/dense latency | TP MACs ratio |")
    print("| --- |" + " ---: |" * 9)
    for name in args.models.split(","):
        torch.manual_seed(0)
        dense = torchvision.models.get_model(name, weights=None).eval()
        r = gp.prune(dense, x, sparsity=0.5, method="l1")
        tpm = tp_prune(dense, x)
        assert count_params(tpm) == count_params(r.model), "both tools should prune the same"
        m0, m1, mt = macs(dense, x), r.report.macs[1], macs(tpm, x)
        with tempfile.TemporaryDirectory() as d:
            paths = {}
            for tag, model in (("dense", dense), ("pruned", r.model), ("tp", tpm)):
                paths[tag] = gp.export_onnx(model, x, os.path.join(d, f"{tag}.onnx"),
                                            exporter="legacy").path
            for tag, model in (("dense8", dense), ("pruned8", r.model)):
                paths[tag] = gp.export_onnx(model, x, os.path.join(d, f"{tag}.onnx"),
                                            exporter="legacy", quantize="int8",
                                            calibration=calib, min_cosine=0.9).path
            sess = {k: Session(p, threads=args.threads) for k, p in paths.items()}
            lat = interleaved(sess, x, args.rounds)
        print(f"| {name} | {lat['dense']:.2f} | {lat['pruned']:.2f} | {lat['dense8']:.2f} | "
              f"{lat['pruned8']:.2f} | {lat['dense'] / lat['dense8']:.2f}x | "
              f"{lat['pruned'] / lat['dense']:.3f} | {m1 / m0:.3f} | {lat['tp'] / lat['dense']:.3f} | "
              f"{mt / m0:.3f} |", flush=True)


if __name__ == "__main__":
    main()
