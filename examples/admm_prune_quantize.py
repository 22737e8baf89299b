"""ADMM pruning and quantization together (Ren et al., ASPLOS 2019): every weight projected onto
the intersection of "90% zeros" and "3-bit symmetric levels" (Leng et al., AAAI 2018), then
coded as Deep Compression does.

    python examples/admm_prune_quantize.py
"""

import os
import tempfile

import torch.nn.functional as F
from _common import evaluate, train, trained_digits

import graphprune as gp
from graphprune.coding import decode, encode
from graphprune.training import ADMM, Intersection, Levels, Sparsity

model, xtr, ytr, xte, yte = trained_digits()
m = gp.fold_batchnorm(model, xtr[:1])  # quantize what will be deployed: BN folded in
admm = ADMM(m, Intersection(Sparsity(0.9), Levels(bits=3)), rho_growth=1.05,
            update_interval=(xtr.shape[0] + 63) // 64)
train(m, xtr, ytr, epochs=12, lr=0.01, optimizer="sgd", schedule="constant",
      loss_fn=lambda out, y: admm.loss(F.cross_entropy(out, y)), after_step=admm.step)
admm.finalize()                                               # project, keep the zeros
train(m, xtr, ytr, epochs=4, lr=5e-4, after_step=admm.step)   # masked fine-tuning
admm.finalize()                                               # back onto the levels
with tempfile.TemporaryDirectory() as d:
    rep = encode(m, os.path.join(d, "m.gpc"))
    m2 = gp.fold_batchnorm(model, xtr[:1])
    m2.load_state_dict(decode(os.path.join(d, "m.gpc")))
print(f"pruned 90% + 3-bit: accuracy {evaluate(m2, xte, yte):.4f}, coded {rep.bytes:,} bytes = "
      f"{rep.ratio:.1f}x smaller than fp32")
