"""Channel selection and reconstruction: accuracy, output error and seconds per method.

1. digits CNN (trained here on scikit-learn's real 8x8 digits, width 16): test accuracy after
   pruning 30/50/70% of the channels WITHOUT fine-tuning, per method, with and without
   least-squares reconstruction (256 calibration images).
2. torchvision resnet18 (random init): output relative error and cosine on 16 held-out crops of
   scikit-learn's sample photos, after pruning 50% with 32 calibration crops.
3. torchvision resnet50, 50%, lasso + reconstruction, 64 calibration crops of 224x224: seconds
   and peak memory (in a child process, so the figure is its own).

    python bench/selection.py [--quick]
"""

from __future__ import annotations

import argparse
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


def resnet50_child() -> None:
    import torchvision

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = sample_crops(64)
    t = time.perf_counter()
    r = gp.prune(model, x[:1], sparsity=0.5, method="lasso", calibration=x, reconstruct=True)
    dt = time.perf_counter() - t
    f = r.report.fidelity["total"]
    print(f"{dt:.1f} {f['rel_err']:.5f} {f['cosine']:.5f}")


def resnet50_row() -> None:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--resnet50-child"], capture_output=True,
                         text=True, check=True, env=dict(os.environ, PYTHONPATH=ROOT))
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    secs, err, cos = out.stdout.split()[-3:]
    print("\n## resnet50, 50%, lasso + reconstruction, 64 calibration crops of 224x224")
    print(f"prune: {float(secs):.1f} s (process wall {wall:.1f} s), peak memory {peak:.0f} MB; "
          f"output on the calibration crops: rel. error {float(err):.4f}, cosine {float(cos):.5f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="digits only")
    ap.add_argument("--resnet50-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.resnet50_child:
        resnet50_child()
        return
    torch.set_num_threads(2)
    print(f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, torch {torch.__version__}")
    digits_table([0.3, 0.5, 0.7])
    if not args.quick:
        resnet18_table()
        resnet50_row()


if __name__ == "__main__":
    main()
