"""A small Conv1d audio classifier in the style of M5 (Dai et al. 2017) for raw 4 kHz waveforms."""

from torch import nn


class AudioNet(nn.Module):
    def __init__(self, num_classes: int = 12, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv1d(1, w, 80, stride=4), nn.BatchNorm1d(w), nn.ReLU(), nn.MaxPool1d(4),
            nn.Conv1d(w, w, 3), nn.BatchNorm1d(w), nn.ReLU(), nn.MaxPool1d(4),
            nn.Conv1d(w, 2 * w, 3), nn.BatchNorm1d(2 * w), nn.ReLU(), nn.MaxPool1d(4),
            nn.Conv1d(2 * w, 2 * w, 3), nn.BatchNorm1d(2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x):  # (N, 1, T)
        return self.fc(self.features(x))


def audio_net(num_classes: int = 12) -> AudioNet:
    return AudioNet(num_classes)
