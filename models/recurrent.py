"""Recurrent reference architectures (random init): an LSTM text classifier, a Conv1d + GRU
audio net, a bidirectional 2-layer LSTM tagger and a projected (LSTMP) speech-style encoder.

Each is the usual shape of its family, small enough for unit tests: the hidden sizes dominate the
parameter count, as they do in practice.
"""

from __future__ import annotations

import torch
from torch import nn


class TextLSTM(nn.Module):
    """Embedding -> LSTM -> Linear on the last layer's final hidden state ``h_n[-1]``.

    Input: token ids ``(N, T)`` (int64); output: logits ``(N, num_classes)``.
    """

    def __init__(self, vocab: int = 1000, dim: int = 64, hidden: int = 128, num_classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.embed(tokens))  # h: (layers, N, hidden)
        return self.fc(h[-1])


class AudioGRU(nn.Module):
    """Two Conv1d blocks over a raw waveform, then a GRU over the frames and a Linear on its last
    output step (CRNN-style keyword spotting).

    Input: ``(N, 1, T)`` waveform; output: logits ``(N, num_classes)``.
    """

    def __init__(self, num_classes: int = 12, width: int = 32, hidden: int = 96):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv1d(1, w, 80, stride=4), nn.BatchNorm1d(w), nn.ReLU(), nn.MaxPool1d(4),
            nn.Conv1d(w, 2 * w, 3), nn.BatchNorm1d(2 * w), nn.ReLU(), nn.MaxPool1d(4),
        )
        self.gru = nn.GRU(2 * w, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).permute(0, 2, 1)  # (N, C, T') -> (N, T', C)
        y, _ = self.gru(f)  # (N, T', hidden)
        return self.fc(y[:, -1])


class BiLSTMTagger(nn.Module):
    """Embedding -> bidirectional 2-layer LSTM -> a Linear per token (sequence tagging).

    Input: token ids ``(N, T)``; output: tag logits ``(N, T, num_tags)``.
    """

    def __init__(self, vocab: int = 500, dim: int = 48, hidden: int = 64, num_tags: int = 9):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(2 * hidden, num_tags)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(self.embed(tokens))  # (N, T, 2 * hidden): [forward, backward]
        return self.fc(y)


class ProjLSTM(nn.Module):
    """A Linear front-end over feature frames, a 2-layer LSTM with projections (LSTMP, Sak et al.
    2014: ``proj_size`` < ``hidden_size``) and a Linear on the last output step.

    Input: feature frames ``(N, T, features)``; output: logits ``(N, num_classes)``.
    """

    def __init__(self, features: int = 40, dim: int = 64, hidden: int = 128, proj: int = 48,
                 num_classes: int = 10):
        super().__init__()
        self.frontend = nn.Linear(features, dim)
        self.act = nn.ReLU()
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, proj_size=proj, batch_first=True)
        self.fc = nn.Linear(proj, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(self.act(self.frontend(x)))  # (N, T, proj)
        return self.fc(y[:, -1])


def text_lstm(num_classes: int = 5) -> TextLSTM:
    return TextLSTM(num_classes=num_classes)


def audio_gru(num_classes: int = 12) -> AudioGRU:
    return AudioGRU(num_classes)


def bilstm_tagger(num_tags: int = 9) -> BiLSTMTagger:
    return BiLSTMTagger(num_tags=num_tags)


def proj_lstm(num_classes: int = 10) -> ProjLSTM:
    return ProjLSTM(num_classes=num_classes)
