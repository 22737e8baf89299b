"""Hand-built 2-3 layer nets with known channel structure, shared by the unit tests."""

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(F.relu(self.bn(self.c1(x))))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(self.a(x) + self.b(x))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(14)
        self.c = nn.Conv2d(14, 4, 1)

    def forward(self, x):
        return self.c(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))


class Depthwise(nn.Module):
    def __init__(self, mult: int = 1):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8 * mult, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8 * mult, 4, 1)

    def forward(self, x):
        return self.pw(F.relu(self.dw(F.relu(self.c1(x)))))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.gc = nn.Conv2d(8, 12, 3, padding=1, groups=2)
        self.c3 = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.c3(F.relu(self.gc(F.relu(self.c1(x)))))


class GN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 1)
        self.gn = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c2(self.gn(self.c1(x)))


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)  # 5x5 -> 3x3
        self.fc = nn.Linear(4 * 9, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.c(x)), 1))


class ChunkCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x1, x2 = self.c1(x).chunk(2, dim=1)
        return self.c2(torch.cat([x1, self.b(x2)], 1))


class LiteralSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.p = nn.Conv2d(3, 4, 1)
        self.q = nn.Conv2d(5, 4, 1)

    def forward(self, x):
        y = self.c1(x)
        return self.p(y[:, :3]) + self.q(y[:, 3:])


class LiteralView(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)  # 4x4 -> 2x2
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(self.c(x).view(-1, 32))


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.cumsum(self.c1(x), dim=1)  # mixes channels: no rule
        return self.c3(F.relu(self.c2(y)))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(F.relu(self.mid(self.emb(idx))))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(self.shared(F.relu(self.shared(self.a(x)))))


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.c(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.out(y * s)


class ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 6)
        self.out = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.fc(self.ln(self.c(x).permute(0, 2, 3, 1)))
        return self.out(y.permute(0, 3, 1, 2))


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.bn(self.up(F.relu(self.c(x))))))


class SplitList(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.p = nn.Conv2d(3, 2, 1)
        self.q = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        a, b = torch.split(self.c1(x), [3, 5], dim=1)
        return self.p(a) + self.q(b)


class Spatial(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.prelu = nn.PReLU(8)
        self.c2 = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = F.interpolate(self.prelu(self.c1(x)), scale_factor=2.0, mode="nearest")
        y = F.pad(y, (1, 1, 1, 1))
        return self.c2(F.max_pool2d(y, 2))


class SoftmaxChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(torch.softmax(self.c1(x), dim=1))


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.c1(x)
        y = y.view(n, 2, y.size(1) // 2, h, w).transpose(1, 2).reshape(n, -1, h, w)
        return self.c2(y)


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        y = self.proj(x)
        y, _ = self.attn(y, y, y)
        return self.fc2(F.gelu(self.fc1(y)))
