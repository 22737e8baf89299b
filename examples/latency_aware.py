"""Latency-aware pruning: halve torchvision MobileNetV2's onnxruntime latency on this machine,
keeping the channels that cost least latency per unit of l1 importance, and compare with
uniform pruning.

The first run measures the model (a latency table: a few minutes), later runs read it from
out/latency/ (``prune(..., latency_table=OUT)`` reads it there). Prints the table, the pruned
model's predicted and measured latency, MACs and parameters, and writes the step curves to
out/latency/mobilenet_v2.png when matplotlib is installed.

    python examples/latency_aware.py
"""

import os
import sys

import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphprune as gp  # noqa: E402
from graphprune.criteria import ScoreContext, get_criterion, score_group  # noqa: E402
from graphprune.latency import LatencyTable, kept_importance  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "out", "latency")
torch.manual_seed(0)
torch.set_num_threads(2)
model = torchvision.models.mobilenet_v2(weights=None).eval()
x = torch.randn(1, 3, 224, 224)
g = gp.trace(model, x)

# 1. measure: how each group's channels cost latency in onnxruntime here (cached per machine)
table = LatencyTable.build(model, x, g, threads=2, cache=OUT,
                           progress=lambda stage, i, n: print(f"\r{stage} {i + 1}/{n}", end=""))
print("\n" + table.summary(max_rows=12))
try:
    table.plot(os.path.join(OUT, "mobilenet_v2.png"))
except gp.ConfigError as e:
    print(e)

# 2. prune to half the latency: channels allocated on the table (most l1 importance per
#    millisecond, on the widths where latency steps), then timed against the dense model
r = gp.prune(model, x, target_latency=0.5, latency_table=OUT, method="l1")
print(r.latency)
ctx = ScoreContext(params=g.params, rng=np.random.default_rng(0), graph=g)
scores = {grp.name: score_group(get_criterion("l1"), grp, ctx) for grp in g.prunable_groups}
kept = {n: len(gp_.keep) for n, gp_ in r.plan.groups.items()}
print(f"l1 importance kept: {kept_importance(scores, kept):.3f}")

# 3. uniform pruning with round_to=1 crosses no latency step, and can be slower than dense: the
#    table says so; round_to="auto" keeps the channel counts it measured fast
small = gp.prune(model, x, sparsity=0.2, latency_table=OUT)
print("uniform 20%, round_to=1:", small.latency.warning)
safe = gp.prune(model, x, sparsity=0.2, round_to="auto", latency_table=OUT)
print(f"uniform 20%, round_to='auto' ({safe.plan.meta['round_to']}): predicted "
      f"{safe.latency.predicted_ratio:.3f} of dense")
