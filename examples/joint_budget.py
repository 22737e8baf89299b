"""Sparsity-quantization joint learning under global budgets (Yang et al., CVPR 2020): 5% of
the weights non-zero and 3.5 bits on average; the per-layer sparsity and bit-widths are
allocated by the projection during training, with knowledge distillation from the dense model.

    python examples/joint_budget.py
"""

import copy

import torch
from _common import evaluate, train, trained_digits

import graphprune as gp
from graphprune.training import ADMM, JointBudget, Sparsity, compression_report, distillation_loss

teacher, xtr, ytr, xte, yte = trained_digits()
model = gp.fold_batchnorm(teacher, xtr[:1])
budget = JointBudget(nnz_budget=0.05, bit_budget=3.5, min_bits=2, bits_until=20)
admm = ADMM(model, {n: Sparsity(0.0) for n in ("conv1", "conv2", "conv3", "fc")}, rho=0.2,
            rho_growth=1.05, update_interval=22, global_projection=budget)
x_index = {}


def loss_fn(out, y):
    with torch.no_grad():
        t = teacher(x_index["x"])
    return admm.loss(distillation_loss(out, t, y, temperature=4.0, alpha=0.5))


# the loss needs the inputs for the teacher: wrap the model call
forward = model.forward
model.forward = lambda x: (x_index.__setitem__("x", x), forward(x))[1]
train(model, xtr, ytr, epochs=12, lr=0.01, optimizer="sgd", schedule="constant",
      loss_fn=loss_fn, after_step=admm.step)
model.forward = forward
admm.finalize()
admm.grad_mask(admm.final_masks)
train(model, xtr, ytr, epochs=4, lr=5e-4, after_step=admm.step_masked)
admm.finalize()
W = {f"{n}.weight": getattr(model, n).weight.detach() for n in ("conv1", "conv2", "conv3", "fc")}
s = budget.summary(W)
rep = compression_report(model, budget.bits)
print(f"density {s['density']:.4f}, average bits {s['avg_bits']:.2f}, per layer "
      f"{ {k: (round(v['density'], 3), v['bits']) for k, v in s['layers'].items()} }")
print(f"accuracy {evaluate(model, xte, yte):.4f} (teacher {evaluate(teacher, xte, yte):.4f}); "
      f"{rep['ratio']:.1f}x smaller than fp32 counting bits, indices, scales and fp32 biases")
del copy
