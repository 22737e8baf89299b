"""An Inception-style net (Szegedy et al. 2015): four parallel branches concatenated."""

import torch
from torch import nn


def _cbr(cin, cout, k=1, s=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class InceptionBlock(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, cp):
        super().__init__()
        self.b1 = _cbr(cin, c1)
        self.b3 = nn.Sequential(_cbr(cin, c3r), _cbr(c3r, c3, 3))
        self.b5 = nn.Sequential(_cbr(cin, c5r), _cbr(c5r, c5, 3), _cbr(c5, c5, 3))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), _cbr(cin, cp))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


class InceptionSmall(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = _cbr(3, 32, 3)
        self.a = InceptionBlock(32, 16, 16, 24, 8, 12, 12)  # -> 64
        self.pool = nn.MaxPool2d(2)
        self.b = InceptionBlock(64, 32, 32, 48, 16, 24, 24)  # -> 128
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.head(self.b(self.pool(self.a(self.stem(x)))))


def inception_small(num_classes: int = 10) -> InceptionSmall:
    return InceptionSmall(num_classes)
