"""Property tests over randomly generated architectures mixing conv, BN, depthwise and grouped
conv, residual add, concat, split, GroupNorm, squeeze-excitation gating and flatten->Linear.

For every generated model and random sparsity/method: the pruned model runs, keeps its output
shape, masks applied as zeros to the original give the same outputs, and apply_masks on a
fresh copy rebuilds it exactly."""

import copy
import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import graphprune as gp

from ..conftest import assert_mask_equivalent, assert_same_state, healthy_init

BLOCKS = ["conv", "dw", "grouped", "res", "cat", "split", "se", "gn", "pool"]


class Block(nn.Module):
    def __init__(self, kind: str, c: int, out: int, g: int):
        super().__init__()
        self.kind = kind
        if kind == "conv":
            self.a = nn.Conv2d(c, out, 3, padding=1)
            self.bn = nn.BatchNorm2d(out)
        elif kind == "dw":
            self.a = nn.Conv2d(c, c * g, 3, padding=1, groups=c)
            self.bn = nn.BatchNorm2d(c * g)
        elif kind == "grouped":
            self.a = nn.Conv2d(c, out, 3, padding=1, groups=g)
        elif kind == "res":
            self.a = nn.Conv2d(c, out, 3, padding=1)
            self.b = nn.Conv2d(out, c, 1)
        elif kind == "cat":
            self.a = nn.Conv2d(c, out, 1)
            self.b = nn.Conv2d(c, g, 3, padding=1)
        elif kind == "split":
            self.a = nn.Conv2d(c // 2, c // 2, 3, padding=1)
        elif kind == "se":
            self.a = nn.Conv2d(c, max(1, c // 2), 1)
            self.b = nn.Conv2d(max(1, c // 2), c, 1)
        elif kind == "gn":
            self.gn = nn.GroupNorm(g, c)

    def forward(self, x):
        k = self.kind
        if k in ("conv", "dw"):
            return F.relu(self.bn(self.a(x)))
        if k == "grouped":
            return F.relu(self.a(x))
        if k == "res":
            return x + self.b(F.relu(self.a(x)))
        if k == "cat":
            return torch.cat([self.a(x), F.relu(self.b(x))], 1)
        if k == "split":
            x1, x2 = x.chunk(2, dim=1)
            return torch.cat([x1, F.relu(self.a(x2))], 1)
        if k == "se":
            s = x.mean((2, 3), keepdim=True)
            return x * torch.sigmoid(self.b(F.relu(self.a(s))))
        if k == "gn":
            return self.gn(x)
        return F.max_pool2d(x, 2)


class RandomNet(nn.Module):
    def __init__(self, spec, c0: int, hw: int, flatten: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, c0, 3, padding=1)
        blocks, c = [], c0
        for kind, out, g in spec:
            blocks.append(Block(kind, c, out, g))
            c = {"conv": out, "dw": c * g, "grouped": out, "cat": out + g}.get(kind, c)
            if kind == "pool":
                hw //= 2
        self.blocks = nn.Sequential(*blocks)
        self.flatten = flatten
        self.head = nn.Linear(c * hw * hw if flatten else c, 5)

    def forward(self, x):
        y = self.blocks(F.relu(self.stem(x)))
        return self.head(y.flatten(1) if self.flatten else y.mean((2, 3)))


@st.composite
def architectures(draw):
    c = draw(st.sampled_from([4, 6, 8]))
    c0, hw, spec = c, 8, []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(BLOCKS))
        out = draw(st.sampled_from([4, 6, 8]))
        g = 1
        if kind == "dw":
            g = draw(st.sampled_from([1, 2]))
        elif kind == "grouped":
            g = draw(st.sampled_from([d for d in (1, 2) if c % d == 0 and out % d == 0]))
        elif kind == "cat":
            g = draw(st.sampled_from([2, 4]))
        elif kind == "split" and c % 2:
            kind = "conv"
        elif kind == "gn":
            g = draw(st.sampled_from([d for d in (1, 2, c) if c % d == 0]))
        elif kind == "pool" and hw < 4:
            kind = "conv"
        if kind == "pool":
            hw //= 2
        spec.append((kind, out, g))
        c = {"conv": out, "dw": c * g, "grouped": out, "cat": out + g}.get(kind, c)
    return spec, c0, draw(st.booleans())


@settings(max_examples=int(os.environ.get("GP_EXAMPLES", "40")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures(), sparsity=st.floats(0.1, 0.9), method=st.sampled_from(
    ["l1", "l2", "fpgm", "random"]), seed=st.integers(0, 100))
def test_random_architectures_prune_correctly(arch, sparsity, method, seed):
    spec, c0, flatten = arch
    torch.manual_seed(seed)
    model = healthy_init(RandomNet(spec, c0, 8, flatten).eval(), seed)
    x = torch.randn(2, 3, 8, 8)
    fresh = copy.deepcopy(model)
    r = gp.prune(model, x, sparsity=sparsity, method=method, seed=seed)
    with torch.no_grad():
        assert r.model(x).shape == model(x).shape == (2, 5)
    assert r.report.params[1] <= r.report.params[0]
    if r.plan.groups:
        assert r.report.params[1] < r.report.params[0]
    assert_mask_equivalent(model, r, x)
    assert_same_state(gp.apply_masks(fresh, r.masks, x), r.model)
