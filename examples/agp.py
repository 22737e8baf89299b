"""Automated gradual pruning (Zhu & Gupta 2017): sparsity grows on a cubic schedule from 0 to
90% during fine-tuning; the final sparsity is reached exactly at end_step.

    python examples/agp.py
"""

import os

from _common import evaluate, train, trained_digits

from graphprune.training import AGPPruner, masked_weights_are_zero

model, xtr, ytr, xte, yte = trained_digits()
steps_per_epoch = (xtr.shape[0] + 63) // 64
pruner = AGPPruner(model, [{"sparsity": 0.9, "op_types": ["default"]}],
                   start_step=0, end_step=6 * steps_per_epoch, frequency=10)
pruner.compress()
train(model, xtr, ytr, epochs=10, lr=1e-3, after_step=pruner.step)  # pruner.step() after each step
print(f"AGP 90%: accuracy {evaluate(model, xte, yte):.4f}, sparsity "
      f"{ {k: round(v, 3) for k, v in pruner.sparsity().items()} }, "
      f"masked weights exactly zero: {masked_weights_are_zero(pruner)}")
out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "out")
os.makedirs(out, exist_ok=True)  # out/ of the repository, wherever the script is run from
pruner.export_masks(os.path.join(out, "agp-masks.safetensors"))
pruner.finalize()
print(f"wrote {os.path.join(out, 'agp-masks.safetensors')}")
