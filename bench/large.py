"""Large models without their weights: a LLaMA-7B-shaped decoder on the ``meta`` device.

graphprune builds the channel graph from shapes only (values are recorded on meta tensors), plans
a 25% head + MLP reduction, and applies it on meta (slicing is shape-only there), so a 6.7B
parameter model is planned in a few GB of RAM. Torch-Pruning's dependency graph is built on the
same meta model in the same run for comparison (it needs a forward pass; on meta it runs shapes
only as well). Prints the medians of ``--repeats`` runs and peak RSS.

    python bench/large.py [--repeats 3] [--layers 32]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
warnings.filterwarnings("ignore")


def rss_gb() -> float:
    """Peak resident set size of this process so far (GB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def build(layers: int):
    from graphprune.models import Llama, LlamaConfig

    cfg = LlamaConfig.llama_7b()
    cfg.n_layers = layers
    with torch.device("meta"):
        return Llama(cfg)


def run_graphprune(model, x):
    import graphprune as gp

    t = time.perf_counter()
    g = gp.trace(model, x)
    t_graph = time.perf_counter() - t
    plan = gp.make_plan(g, sparsity=0.25, method="random",
                        config=[{"op_types": ["Linear"], "sparsity": 0.25},
                                {"op_names": ["embed", "head"], "exclude": True}])
    t_plan = time.perf_counter() - t - t_graph
    r = gp.prune(model, x, plan=plan)
    t_all = time.perf_counter() - t
    p1 = sum(p.numel() for p in r.model.parameters())
    return g, t_graph, t_plan, t_all, p1


def run_tp(model, x):
    import torch_pruning as tp

    t = time.perf_counter()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    n = len(list(dg.get_all_groups()))
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = build(args.layers)
    p0 = sum(p.numel() for p in model.parameters())
    x = torch.zeros(1, 16, dtype=torch.long)
    print(f"LLaMA-7B shape, {args.layers} layers, {p0 / 1e9:.2f}B parameters on meta; "
          f"torch {torch.__version__}")
    gp_graph, gp_all = [], []
    for _ in range(args.repeats):
        gc.collect()
        g, t_graph, t_plan, t_all, p1 = run_graphprune(model, x)
        gp_graph.append(t_graph)
        gp_all.append(t_all)
    print(f"graphprune: graph {statistics.median(gp_graph):.2f} s "
          f"({len(g.groups)} groups, {len(g.prunable_groups)} prunable), "
          f"graph+plan+apply {statistics.median(gp_all):.2f} s, "
          f"params {p0 / 1e9:.2f}B -> {p1 / 1e9:.2f}B, peak RSS {rss_gb():.2f} GB")
    try:
        tp_times = []
        for _ in range(args.repeats):
            gc.collect()
            t, n = run_tp(model, x)
            tp_times.append(t)
        med = statistics.median(tp_times)
        print(f"torch-pruning: dependency graph {med:.2f} s ({n} groups); "
              f"ratio tp/graphprune (graph) {med / statistics.median(gp_graph):.2f}x; "
              f"peak RSS {rss_gb():.2f} GB")
    except Exception as e:  # the peer may not run on meta; say so rather than hide it
        print(f"torch-pruning: could not build its graph on meta ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200]})")


if __name__ == "__main__":
    main()
