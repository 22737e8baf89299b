"""graphprune vs Torch-Pruning: seconds to trace + group + prune (50% of channels by L1).

Runs both tools in the same process on torchvision models (random init, batch 1, 224x224,
classifier left alone), interleaved, and prints the median of each and the ratio. Torch-Pruning
works in place, so each of its runs gets a fresh copy made outside the timed region; graphprune
returns a new model (the copy is inside its timing) and, by default, verifies every
intermediate shape of the result (also timed; shown separately with verify=False).

    python bench/speed.py [--repeats 5] [--models resnet50,densenet121,...]
    python bench/speed.py --threads 1 --cpu-time   # CPU seconds: steadier on a shared machine
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def classifier_of(model):
    last = None
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            last = m
    return last


CLOCK = time.perf_counter


def run_tp(model, x):
    import torch_pruning as tp

    t = CLOCK()
    imp = tp.importance.MagnitudeImportance(p=1)
    pruner = tp.pruner.MagnitudePruner(model, x, importance=imp, pruning_ratio=0.5,
                                       ignored_layers=[classifier_of(model)])
    pruner.step()
    dt = CLOCK() - t
    return dt, sum(p.numel() for p in model.parameters())


def run_gp(model, x, verify=True):
    import graphprune as gp

    t = CLOCK()
    r = gp.prune(model, x, sparsity=0.5, method="l1", verify=verify)
    dt = CLOCK() - t
    return dt, r.report.params[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="resnet50,densenet121,mobilenet_v2,efficientnet_b0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time in CPU seconds of this process (with --threads 1: what other jobs on "
                         "the machine change least)")
    args = ap.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    torch.set_num_threads(args.threads)
    import torch_pruning
    import torchvision

    print(f"# {time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, torch-pruning "
          f"{torch_pruning.__version__}; {'CPU' if args.cpu_time else 'wall'} seconds, median of "
          f"{args.repeats} interleaved runs; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'model':<16} {'torch-pruning s':>15} {'graphprune s':>13} {'gp no-verify s':>15} "
          f"{'gp/TP':>6} {'no-verify/TP':>12} {'params TP':>11} {'params gp':>11}")
    rows = []
    for name in args.models.split(","):
        base = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(1, 3, 224, 224)
        run_gp(base, x)  # warm-up (imports, allocator)
        run_tp(copy.deepcopy(base), x)
        tps, gps, gpn = [], [], []
        for _ in range(args.repeats):
            m = copy.deepcopy(base)
            dt, p_tp = run_tp(m, x)
            tps.append(dt)
            dt, p_gp = run_gp(base, x)
            gps.append(dt)
            dt, _ = run_gp(base, x, verify=False)
            gpn.append(dt)
        a, b, c = statistics.median(tps), statistics.median(gps), statistics.median(gpn)
        rows.append((name, a, b, c))
        print(f"{name:<16} {a:>15.3f} {b:>13.3f} {c:>15.3f} {b / a:>6.2f} {c / a:>12.2f} "
              f"{p_tp:>11,} {p_gp:>11,}", flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
