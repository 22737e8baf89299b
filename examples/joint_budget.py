"""Sparsity-quantization joint learning under global budgets (Yang et al., CVPR 2020): 5% of
the weights non-zero and 3.5 bits on average; the per-layer sparsity and bit-widths are
allocated by the projection during training, with knowledge distillation from the dense model.

    python examples/joint_budget.py
"""

import torch
from _common import evaluate, train, trained_digits

import graphprune as gp
from graphprune.training import ADMM, JointBudget, compression_report, distillation_loss

teacher, xtr, ytr, xte, yte = trained_digits()
model = gp.fold_batchnorm(teacher, xtr[:1])
budget = JointBudget(nnz_budget=0.05, bit_budget=3.5, min_bits=2, bits_until=20)
admm = ADMM(model, budget, rho_growth=1.05, update_interval=(xtr.shape[0] + 63) // 64)


def distill(out, x, y):
    with torch.no_grad():
        t = teacher(x)
    return distillation_loss(out, t, y, temperature=4.0, alpha=0.5)


# the loss needs the inputs for the teacher: train() calls loss_fn(out, y), so a small loop here
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
g = torch.Generator().manual_seed(0)
model.train()
for _ in range(12):
    for idx in torch.randperm(xtr.shape[0], generator=g).split(64):
        loss = admm.loss(distill(model(xtr[idx]), xtr[idx], ytr[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        admm.step()
admm.finalize()                                                           # keep the zeros
train(model, xtr, ytr, epochs=4, lr=5e-4, after_step=admm.step)           # masked fine-tuning
admm.finalize()                                                           # back onto the levels
s = budget.summary(model)
rep = compression_report(model, budget.bits)
print(f"density {s['density']:.4f}, average bits {s['avg_bits']:.2f}, per layer "
      f"{ {k: (round(v['density'], 3), v['bits']) for k, v in s['layers'].items()} }")
print(f"accuracy {evaluate(model, xte, yte):.4f} (teacher {evaluate(teacher, xte, yte):.4f}); "
      f"{rep['ratio']:.1f}x smaller than fp32 counting bits, indices, scales and fp32 biases")
