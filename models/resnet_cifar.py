"""CIFAR-style ResNet-20/56 (He et al. 2016, section 4.2): three stages of 16/32/64 channels.

``shortcut='B'`` uses 1x1 conv + BN projections when the shape changes (prunable residual
stream); ``shortcut='A'`` pads the identity with zero channels, as in the paper (the padded
stream cannot change width, so graphprune freezes it and prunes inside the blocks).
"""

import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = 0
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            if shortcut == "B":
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                              nn.BatchNorm2d(cout))
            else:
                self.pad = (cout - cin) // 2
                self.stride = stride

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad:
            sc = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))
        else:
            sc = self.shortcut(x)
        return F.relu(out + sc)


class ResNetCifar(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, shortcut: str = "B"):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, 110). Got {depth}.")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, c in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, c, 2 if (j == 0 and i > 0) else 1, shortcut))
                cin = c
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def resnet20(num_classes: int = 10, shortcut: str = "B") -> ResNetCifar:
    return ResNetCifar(20, num_classes, shortcut)


def resnet56(num_classes: int = 10, shortcut: str = "B") -> ResNetCifar:
    return ResNetCifar(56, num_classes, shortcut)
