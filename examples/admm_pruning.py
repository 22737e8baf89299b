"""ADMM weight pruning (Zhang et al., ECCV 2018) to 90% sparsity, then masked fine-tuning, on
the digits CNN; then ADMM channel pruning (50%) that ends in a physically smaller model.

    python examples/admm_pruning.py
"""

import copy

import torch.nn.functional as F
from _common import evaluate, train, trained_digits

from graphprune.training import ADMM, ChannelSparsity, Sparsity

model, xtr, ytr, xte, yte = trained_digits()
steps_per_epoch = (xtr.shape[0] + 63) // 64

# --- unstructured: the augmented-Lagrangian term goes into the loss, admm.step() after each step
m = copy.deepcopy(model)
admm = ADMM(m, [{"op_types": ["default"], "projection": Sparsity(0.9)}], rho_growth=1.05,
            update_interval=steps_per_epoch)
train(m, xtr, ytr, epochs=12, lr=0.01, optimizer="sgd", schedule="constant",
      loss_fn=lambda out, y: admm.loss(F.cross_entropy(out, y)), after_step=admm.step)
with admm.projected():                # evaluate the projected model, then back to the trained one
    print(f"projected after ADMM: {evaluate(m, xte, yte):.4f}")
admm.finalize()                       # project for good; pruned weights now stay exactly zero
train(m, xtr, ytr, epochs=5, lr=5e-4, after_step=admm.step)   # masked fine-tuning: same loop
zeros = {n: f"{float((w == 0).float().mean()):.3f}" for n, w in m.named_parameters()
         if n.endswith("weight") and w.ndim > 1}
print(f"90% sparse, fine-tuned: {evaluate(m, xte, yte):.4f}; zero fraction {zeros}")

# --- structured: channel sparsity through the dependency graph, then a physical shrink
m = copy.deepcopy(model)
admm = ADMM(m, ChannelSparsity(0.5, criterion="l1"), rho_growth=1.05,
            update_interval=steps_per_epoch, example_inputs=xtr[:1])
train(m, xtr, ytr, epochs=12, lr=0.01, optimizer="sgd", schedule="constant",
      loss_fn=lambda out, y: admm.loss(F.cross_entropy(out, y)), after_step=admm.step)
small = admm.finalize()
train(small, xtr, ytr, epochs=5, lr=1e-3)
print(f"50% of channels removed: {sum(p.numel() for p in small.parameters()):,} parameters "
      f"(from {sum(p.numel() for p in model.parameters()):,}), accuracy {evaluate(small, xte, yte):.4f}")
