"""Compression ratio (bytes on disk after coding) and accuracy of each training-time method on
the digits CNN (trained here on scikit-learn's real 8x8 digits).

Every row ends the same way: the model is coded with graphprune.coding (relative indices of the
non-zeros + Huffman-coded codebook indices), decoded, and evaluated; the ratio is the dense
model's fp32 state dict (safetensors bytes) over the coded file's bytes.

    python bench/compression.py
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphprune as gp  # noqa: E402
from graphprune.coding import decode, encode  # noqa: E402
from graphprune.datasets import digits  # noqa: E402
from graphprune.finetune import evaluate, train  # noqa: E402
from graphprune.quantize import KMeans, quantize  # noqa: E402
from graphprune.training import (  # noqa: E402
    ADMM, AGPPruner, Intersection, JointBudget, Levels, LotteryTicketPruner, Sparsity,
)
from graphprune.models import digits_net  # noqa: E402

XTR, YTR, XTE, YTE = digits()


def coded(model, qmodel=None) -> tuple[int, float]:
    """(bytes of the coded file, accuracy of the decoded model)."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "m.gpc")
        rep = encode(qmodel if qmodel is not None else model, p)
        m = copy.deepcopy(model)
        m.load_state_dict(decode(p))
    return rep.bytes, evaluate(m, XTE, YTE)


def kmeans_finetuned(model, bits=4):
    q = quantize(model, KMeans(bits=bits))
    q.share_weights()
    train(q.model, XTR, YTR, epochs=3, lr=1e-3)
    return q.freeze()


def structured(model):
    """50% of the channels: LASSO + reconstruction, fine-tuned, BatchNorm folded."""
    r = gp.prune(model, XTR[:1], sparsity=0.5, method="lasso",
                 calibration=(XTR[:256], YTR[:256]), reconstruct=True)
    train(r.model, XTR, YTR, epochs=5, lr=1e-3)
    return gp.fold_batchnorm(r.model, XTR[:1])


def admm_train(model, admm, epochs=20, lr=0.005):
    train(model, XTR, YTR, epochs=epochs, lr=lr, optimizer="sgd", schedule="constant",
          loss_fn=lambda o, y: admm.loss(F.cross_entropy(o, y)), after_step=admm.step)


def admm_finish(model, admm):
    """Project for good; then try masked fine-tuning (the same loop: admm.step() keeps the zeros)
    followed by projecting again (fine-tuning moves weights off the quantization levels) and keep
    whichever does better on the TRAINING split (the test split only scores the result)."""
    admm.finalize()
    direct = copy.deepcopy(model.state_dict())
    acc_direct = evaluate(model, XTR, YTR)
    train(model, XTR, YTR, epochs=4, lr=5e-4, after_step=admm.step)
    admm.finalize()
    if evaluate(model, XTR, YTR) < acc_direct:
        model.load_state_dict(direct)


def admm_levels(base, sparsity):
    """A copy of ``base`` trained by ADMM onto ``sparsity`` zeros and 4-bit levels at once."""
    m = copy.deepcopy(base)
    admm = ADMM(m, Intersection(Sparsity(sparsity), Levels(bits=4)), rho_growth=1.05,
                update_interval=22)
    admm_train(m, admm)
    admm_finish(m, admm)
    return m


def agp(model, sparsity, epochs=10):
    steps = epochs * ((XTR.shape[0] + 63) // 64)
    p = AGPPruner(model, [{"sparsity": sparsity, "op_types": ["default"]}],
                  end_step=int(0.6 * steps), frequency=10)
    p.compress()
    train(model, XTR, YTR, epochs=epochs, lr=1e-3, after_step=p.step)
    p.finalize()
    return model


def rows(dense):
    m = agp(copy.deepcopy(dense), 0.9)
    yield "AGP 90% + 4-bit k-means", m, kmeans_finetuned(m)
    m = copy.deepcopy(dense)
    lt = LotteryTicketPruner(m, [{"sparsity": 0.5, "op_types": ["default"]}], rounds=3)
    lt.compress()
    for _ in range(3):
        train(m, XTR, YTR, epochs=6, after_step=lt.step)
        lt.next_round()
    train(m, XTR, YTR, epochs=6, after_step=lt.step)
    yield "lottery ticket 87.5% + 4-bit k-means", m, kmeans_finetuned(m)
    yield "ADMM 90% + 4-bit levels", admm_levels(dense, 0.9), None
    s = structured(dense)
    m = agp(copy.deepcopy(s), 0.8)
    yield "channels 50% + AGP 80% + 4-bit k-means (Deep Compression)", m, kmeans_finetuned(m)
    yield "channels 50% + ADMM 80% + 4-bit levels", admm_levels(s, 0.8), None
    m = copy.deepcopy(s)
    jb = JointBudget(nnz_budget=0.2, bit_budget=4, min_bits=2, bits_until=20)
    admm = ADMM(m, jb, rho_growth=1.05, update_interval=22)
    admm_train(m, admm)
    admm_finish(m, admm)
    yield f"channels 50% + joint budget (20% non-zero, 4 bits avg: {jb.bits})", m, None


def main() -> None:
    from safetensors.torch import save

    torch.set_num_threads(2)
    torch.manual_seed(0)
    dense = train(digits_net(), XTR, YTR, epochs=12, seed=0)
    acc0 = evaluate(dense, XTE, YTE)
    fp32 = len(save({k: v.contiguous() for k, v in dense.state_dict().items()}))
    print(f"# {time.strftime('%Y-%m-%d')}; dense digits CNN: {fp32:,} bytes fp32 "
          f"(safetensors), test accuracy {acc0:.4f}")
    print("| method | coded bytes | ratio | accuracy | loss (points) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, model, q in rows(dense):
        nbytes, acc = coded(model, q)
        print(f"| {name} | {nbytes:,} | {fp32 / nbytes:.1f}x | {acc:.4f} | "
              f"{100 * (acc0 - acc):+.2f} |", flush=True)


if __name__ == "__main__":
    main()
