"""Latency-aware pruning: halve torchvision MobileNetV2's onnxruntime latency on this machine,
keeping the channels that cost least latency per unit of l1 importance, and compare with
uniform pruning.

The first run measures the model (a latency table: a few minutes), later runs read it from
out/latency/. Prints the table, the plan's predicted and measured latency, MACs and parameters,
and writes the step curves to out/latency/mobilenet_v2.png when matplotlib is installed.

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
from graphprune.latency import (  # noqa: E402
    LatencyTable, kept_importance, latency_amounts, latency_report, speed_warning,
)
from graphprune.plan import keep_count, plan_from_scores  # noqa: E402

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

# 2. allocate: channels per group for half the latency, most l1 importance kept
ctx = ScoreContext(params=g.params, rng=np.random.default_rng(0), graph=g)
scores = {grp.name: score_group(get_criterion("l1"), grp, ctx) for grp in g.prunable_groups}
amounts = latency_amounts(g, scores, 0.5, table)
plan = plan_from_scores(g, scores, amounts, {"method": "l1", "target_latency": 0.5})
pruned = gp.apply_plan(g, plan).model

# 3. check: the pruned model timed against the dense one, in the same interleaved run
report = latency_report(g, amounts, table, target=0.5, model=pruned, example_inputs=x)
print(report)
print(f"l1 importance kept: {kept_importance(scores, amounts):.3f}")

# uniform pruning with round_to=1 crosses no latency step, and can be slower than dense
uniform = {grp.name: keep_count(grp.size, 0.2, 1) for grp in g.prunable_groups}
print("uniform 20%, round_to=1:", speed_warning(table, uniform))
