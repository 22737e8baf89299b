"""ThiNet (greedy) vs LASSO channel selection, with and without least-squares reconstruction,
on a CNN trained here on scikit-learn's real 8x8 digits. Runs in a few seconds.

    python examples/thinet_vs_lasso.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphprune as gp  # noqa: E402
from graphprune.datasets import digits  # noqa: E402
from graphprune.finetune import evaluate, train  # noqa: E402
from graphprune.models import digits_net  # noqa: E402

torch.manual_seed(0)
x_train, y_train, x_test, y_test = digits()
model = train(digits_net(width=16), x_train, y_train, epochs=8)
print(f"dense: {evaluate(model, x_test, y_test):.4f} test accuracy, "
      f"{sum(p.numel() for p in model.parameters()):,} parameters")

calibration = (x_train[:256], y_train[:256])  # (inputs, labels); labels are optional
for method in ("l1", "greedy", "lasso"):
    for reconstruct in (False, True):
        r = gp.prune(model, x_train[:1], sparsity=0.5, method=method,
                     calibration=calibration if method != "l1" or reconstruct else None,
                     reconstruct=reconstruct)
        print(f"{method:>6} reconstruct={reconstruct!s:<5}  accuracy {evaluate(r.model, x_test, y_test):.4f}"
              f"  params {r.report.params[1]:,}")

# the plan is a JSON file you can edit and replay on a fresh model
r = gp.prune(model, x_train[:1], sparsity=0.5, method="lasso", calibration=calibration,
             reconstruct=True)
print(r.plan.summary())
