"""The fixed model behind the golden files: LeNet-5 with weights computed from their indices
(no RNG), so the plan and mask bytes do not depend on torch's random streams.

Regenerate (only when the format changes on purpose):
    python -m tests.golden.golden_model
"""

import os

import torch

import graphprune as gp
from graphprune.models import lenet5

HERE = os.path.dirname(os.path.abspath(__file__))


def golden_lenet():
    m = lenet5().eval()
    with torch.no_grad():
        for k, (_, p) in enumerate(sorted(m.named_parameters())):
            i = torch.arange(p.numel(), dtype=torch.int64)
            p.copy_((((i * 7919 + k * 104729) % 1000).to(torch.float32) / 1000 - 0.5).view_as(p))
    return m


def golden_result():
    return gp.prune(golden_lenet(), torch.zeros(1, 1, 32, 32), sparsity=0.5, method="l1")


if __name__ == "__main__":
    r = golden_result()
    r.plan.save(os.path.join(HERE, "lenet5_plan.json"))
    gp.save_masks(r.masks, os.path.join(HERE, "lenet5_masks.safetensors"), plan=r.plan)
    print("written")
