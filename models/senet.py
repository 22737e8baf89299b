"""A squeeze-and-excitation ResNet (Hu et al. 2018): each block's output is gated per channel by
sigmoid(fc2(relu(fc1(mean(x))))), a broadcasting multiply."""

import torch.nn.functional as F
from torch import nn


class SEGate(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)  # (N, C, 1, 1)
        return x * self.fc2(F.relu(self.fc1(s))).sigmoid()


class SEBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = SEGate(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.se(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(out + (x if self.down is None else self.down(x)))


class SEResNetSmall(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(SEBlock(32, 32, 1), SEBlock(32, 64, 2), SEBlock(64, 64, 1),
                                    SEBlock(64, 128, 2))
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def se_resnet_small(num_classes: int = 10) -> SEResNetSmall:
    return SEResNetSmall(num_classes)
