"""Channel selection and reconstruction: accuracy, output error, seconds, forward passes, memory.

1. digits CNN (trained here on scikit-learn's real 8x8 digits, width 16): test accuracy after
   pruning 30/50/70% of the channels WITHOUT fine-tuning, per method, with and without
   least-squares reconstruction (256 calibration images).
2. torchvision resnet18 (random init): output relative error and cosine on 16 held-out crops of
   scikit-learn's sample photos, after pruning 50% with 32 calibration crops.
3. Cost at ImageNet size: torchvision resnet50, mobilenet_v2 and densenet121 (random init), 50%,
   64 calibration crops of 224x224, per method (l1 + reconstruction, taylor, lasso +
   reconstruction, greedy + reconstruction): seconds of ``graphprune.prune``, the same in
   "forward passes" (seconds / seconds of one dense forward pass over the 64 crops, timed in the
   same process before and after the prune, mean of the two), the same counted instead of timed
   ("layer passes": multiply-accumulates of every Conv/Linear call during the prune, on the model
   and on the copies it makes, / those of one dense pass; deterministic, the whole
   ``graphprune.prune`` call: trace, data passes, verification and the fidelity report), the
   process's peak resident memory
   (``getrusage(RUSAGE_SELF).ru_maxrss``: everything the process held, model and torch
   included; each row runs in its own child process), and the output error on 16 held-out crops.

    python bench/selection.py [--quick] [--models resnet50,...] [--methods lasso+rec,...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import graphprune as gp  # noqa: E402
from graphprune.datasets import digits, sample_crops  # noqa: E402
from graphprune.finetune import evaluate, train  # noqa: E402

METHODS = ["l1", "l2", "fpgm", "random", "bn_scale", "taylor", "lasso", "greedy"]
COST_MODELS = "resnet50,mobilenet_v2,densenet121"
COST_METHODS = "l1+rec,taylor,lasso+rec,greedy+rec"


def digits_table(sparsities) -> None:
    from graphprune.models import digits_net

    xtr, ytr, xte, yte = digits()
    torch.manual_seed(0)
    model = train(digits_net(width=16), xtr, ytr, epochs=8, seed=0)
    dense = evaluate(model, xte, yte)
    calib = (xtr[:256], ytr[:256])
    print(f"\n## digits CNN (dense test accuracy {dense:.4f}), no fine-tuning")
    print("| method | reconstruct | " + " | ".join(f"{int(s * 100)}%" for s in sparsities)
          + " | seconds (50%) |")
    print("| --- | --- |" + " ---: |" * (len(sparsities) + 1))
    for method in METHODS:
        for rec in (False, True):
            accs, secs = [], 0.0
            for s in sparsities:
                t = time.perf_counter()
                r = gp.prune(model, xtr[:1], sparsity=s, method=method, calibration=calib,
                             reconstruct=rec)
                if s == 0.5:
                    secs = time.perf_counter() - t
                accs.append(evaluate(r.model, xte, yte))
            print(f"| {method} | {'yes' if rec else 'no'} | "
                  + " | ".join(f"{a:.4f}" for a in accs) + f" | {secs:.2f} |", flush=True)


def resnet18_table() -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    calib, held = sample_crops(32, seed=1), sample_crops(16, seed=2)
    print("\n## resnet18 (random init), 50%: output error on 16 held-out crops")
    print("| method | reconstruct | rel. error | cosine | seconds |")
    print("| --- | --- | ---: | ---: | ---: |")
    from graphprune.calibration import as_calibration
    from graphprune.datadriven.sequential import output_fidelity

    for method in ["l1", "fpgm", "taylor", "lasso", "greedy"]:
        for rec in (False, True):
            t = time.perf_counter()
            r = gp.prune(model, calib[:1], sparsity=0.5, method=method, calibration=calib,
                         reconstruct=rec)
            dt = time.perf_counter() - t
            f = output_fidelity(model, r.model, as_calibration(held))
            print(f"| {method} | {'yes' if rec else 'no'} | {f['rel_err']:.4f} | "
                  f"{f['cosine']:.4f} | {dt:.1f} |", flush=True)


def _dense_pass(model, calib) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        for xs, _ in calib:
            model(*xs)
    return time.perf_counter() - t


def _count_macs(model) -> dict[str, int]:
    """Forward hooks counting the MACs of every Conv2d/Linear call (copies of the model share
    them: ``copy.deepcopy`` copies the hook dicts)."""
    import math

    total = {"macs": 0}

    def hook(m, inp, out):
        if isinstance(m, torch.nn.Linear):
            total["macs"] += out.numel() * m.in_features
        else:
            total["macs"] += out.numel() * (inp[0].shape[1] // m.groups) * math.prod(m.kernel_size)

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(hook)
    return total


def cost_child(name: str, spec: str) -> None:
    """One (model, method) row, in its own process; prints one JSON line."""
    import torchvision

    from graphprune.calibration import as_calibration
    from graphprune.datadriven.sequential import output_fidelity

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x, held = sample_crops(64), sample_crops(16, seed=2)
    calib = as_calibration(x)
    method, rec = spec.removesuffix("+rec"), spec.endswith("+rec")
    count = _count_macs(model)
    before = _dense_pass(model, calib)
    one, count["macs"] = count["macs"], 0
    t = time.perf_counter()
    r = gp.prune(model, x[:1], sparsity=0.5, method=method, calibration=x, reconstruct=rec)
    secs = time.perf_counter() - t
    layer_passes = count["macs"] / one
    after = _dense_pass(model, calib)
    fwd = (before + after) / 2
    f = output_fidelity(model, r.model, as_calibration(held))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"model": name, "method": spec, "seconds": secs, "forward": fwd,
                      "passes": secs / fwd, "layer_passes": layer_passes, "peak_mb": peak,
                      "rel_err": f["rel_err"],
                      "cosine": f["cosine"], "timings": r.report.timings}))


def cost_table(models: list[str], methods: list[str]) -> None:
    print("\n## ImageNet size, 50%, 64 calibration crops of 224x224 (2 threads); output error on "
          "16 held-out crops")
    print("| model | method | seconds | forward passes | layer passes | dense forward s | "
          "peak RSS MB | rel. error | cosine |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in models:
        for spec in methods:
            out = subprocess.run([sys.executable, __file__, "--cost-child", name, spec],
                                 capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
            if out.returncode != 0:
                print(f"| {name} | {spec} | failed: {out.stderr.strip().splitlines()[-1]} |")
                continue
            d = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {name} | {spec} | {d['seconds']:.1f} | {d['passes']:.1f} | "
                  f"{d['layer_passes']:.1f} | {d['forward']:.2f} | {d['peak_mb']:.0f} | "
                  f"{d['rel_err']:.4f} | {d['cosine']:.5f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="digits only")
    ap.add_argument("--models", default=COST_MODELS)
    ap.add_argument("--methods", default=COST_METHODS)
    ap.add_argument("--only-cost", action="store_true", help="skip the digits and resnet18 tables")
    ap.add_argument("--cost-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cost_child:
        cost_child(*args.cost_child)
        return
    torch.set_num_threads(2)
    print(f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, torch {torch.__version__}")
    if not args.only_cost:
        digits_table([0.3, 0.5, 0.7])
    if not args.quick:
        if not args.only_cost:
            resnet18_table()
        cost_table(args.models.split(","), args.methods.split(","))


if __name__ == "__main__":
    main()
