"""A small, deterministic training / evaluation loop for classification (fine-tuning after
pruning, the embedded default, tests and examples)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy (0..1) of ``model`` in eval mode."""
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
    model.train(was)
    return correct / max(1, x.shape[0])


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 10,
          lr: float = 3e-3, batch_size: int = 64, weight_decay: float = 1e-4, seed: int = 0,
          after_step: Callable[[], None] | None = None,
          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
          optimizer: str = "adamw", schedule: str = "onecycle") -> nn.Module:
    """Train ``model`` in place; returns it. ``optimizer`` 'adamw' or 'sgd' (momentum 0.9),
    ``schedule`` 'onecycle' or 'constant' (ADMM wants the weights to keep moving).

    ``after_step`` runs after every optimizer step (e.g. a pruner re-applying its masks);
    ``loss_fn(logits, y)`` replaces cross-entropy (e.g. a distillation or ADMM loss)."""
    g = torch.Generator().manual_seed(seed)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9,
                                                     weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * max(1, (x.shape[0] + batch_size - 1) // batch_size)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps),
                                                 pct_start=0.15) if schedule == "onecycle"
             else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    loss_fn = loss_fn or nn.functional.cross_entropy
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
    model.eval()
    return model
