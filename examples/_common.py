"""Shared set-up of the examples: the repository on the path, digits data, a trained digits CNN."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from graphprune.datasets import digits  # noqa: E402
from graphprune.finetune import evaluate, train  # noqa: E402
from graphprune.models import digits_net  # noqa: E402


def trained_digits(seed: int = 0):
    """(model, x_train, y_train, x_test, y_test): the digits CNN trained for a few seconds."""
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = digits()
    model = train(digits_net(), xtr, ytr, epochs=10, seed=seed)
    print(f"dense: test accuracy {evaluate(model, xte, yte):.4f}")
    return model, xtr, ytr, xte, yte
