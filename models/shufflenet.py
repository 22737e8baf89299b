"""A ShuffleNet-V2-style net (Ma et al. 2018): channel split (chunk), a branch, concat, and a
channel shuffle (view -> transpose -> view)."""

import torch
from torch import nn


def channel_shuffle(x, groups: int):
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(n, -1, h, w)


def _cb(cin, cout, k=1, s=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if act else nn.Sequential(*layers)


class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(_cb(cin, cin, 3, stride, cin, act=False), _cb(cin, half))
            src = cin
        else:
            src = half
        self.branch2 = nn.Sequential(_cb(src, half), _cb(half, half, 3, stride, half, act=False),
                                     _cb(half, half))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetSmall(nn.Module):
    def __init__(self, num_classes=10, widths=(48, 96, 192), repeats=(2, 3, 2)):
        super().__init__()
        self.stem = _cb(3, 24, 3)
        stages, cin = [], 24
        for w, r in zip(widths, repeats):
            units = [ShuffleUnit(cin, w, 2)] + [ShuffleUnit(w, w, 1) for _ in range(r - 1)]
            stages.append(nn.Sequential(*units))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.head = _cb(cin, 256)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x):
        x = self.head(self.stages(self.stem(x)))
        return self.fc(x.mean([2, 3]))


def shufflenet_small(num_classes: int = 10) -> ShuffleNetSmall:
    return ShuffleNetSmall(num_classes)
