"""The small hand-built nets the criteria are checked on: a conv + BatchNorm + residual net, a
Linear MLP and a hand-written multi-head attention block (heads are units)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvResidual(nn.Module):
    """stem -> BN -> two residual branches (coupled by the add) -> a 1x1 conv head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = F.relu(h + self.bn2(self.c2(F.relu(self.bn1(self.c1(h))))))
        return self.fc(F.relu(self.head(h)).mean((2, 3)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.fc2 = nn.Linear(16, 12)
        self.fc3 = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.relu(self.fc1(x)))))


class SelfAttention(nn.Module):
    """Hand-written multi-head attention as timm writes it: q, k, v viewed as
    (B, N, num_heads, head_dim), sdpa, output projection. Heads are the units."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h):
        B, N, _ = h.shape
        q = self.q(h).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(a)


class Attention(nn.Module):
    """An attention block: input projection, attention with a residual, a residual MLP."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.inp = nn.Linear(6, dim)
        self.attn = SelfAttention(dim, heads)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.attn(h)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.out(h.mean(1))


def _calib(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# name -> (factory, example input, calibration inputs)
CRITERIA_NETS = {
    "conv_bn_residual": (ConvResidual, _calib((2, 3, 6, 6), 1), _calib((16, 3, 6, 6), 2)),
    "mlp": (MLP, _calib((2, 10), 3), _calib((32, 10), 4)),
    "attention": (Attention, _calib((2, 5, 6), 5), _calib((16, 5, 6), 6)),
}
