"""The embedded default: a small CNN for scikit-learn's bundled 8x8 digits (1797 real images).

Three conv-BN-ReLU layers, then flatten (each channel of the 4x4 map is a block of 16 features)
into a Linear classifier. Reaches ~99% test accuracy after a minute of training on 2 cores.
"""

from torch import nn


class DigitsNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(1, w, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.pool = nn.MaxPool2d(2)  # 8x8 -> 4x4
        self.conv3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(2 * w)
        self.act = nn.ReLU()
        self.fc = nn.Linear(2 * w * 4 * 4, num_classes)

    def forward(self, x):  # (N, 1, 8, 8)
        x = self.act(self.bn1(self.conv1(x)))
        x = self.pool(self.act(self.bn2(self.conv2(x))))
        x = self.act(self.bn3(self.conv3(x)))
        return self.fc(x.flatten(1))


def digits_net(num_classes: int = 10, width: int = 32) -> DigitsNet:
    return DigitsNet(num_classes, width)
