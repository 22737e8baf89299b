"""Calibration data for data-driven criteria and reconstruction.

Accepts a tensor (batch first), an iterable of tensors, of ``(x, y)`` tuples, or a DataLoader;
normalises it into a list of ``(inputs, labels)`` batches capped at ``max_samples`` samples, and
checks every batch against the example inputs before any work starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError, InputError


@dataclass
class Calibration:
    """Batches of model inputs (each a tuple of positional inputs) and optional labels."""

    batches: list[tuple[torch.Tensor, ...]]
    labels: list[torch.Tensor | None]

    @property
    def n_samples(self) -> int:
        return sum(b[0].shape[0] for b in self.batches)

    @property
    def has_labels(self) -> bool:
        return all(y is not None for y in self.labels)

    def __iter__(self):
        return iter(zip(self.batches, self.labels))

    def __len__(self) -> int:
        return len(self.batches)


def _split(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(torch.split(x, batch_size)) if x.shape[0] > batch_size else [x]


def as_calibration(data: Any, example_inputs: Any = None, *, max_samples: int = 256,
                   batch_size: int = 32) -> Calibration:
    """Normalise ``data`` (tensor, iterable of tensors or (x, y) tuples, DataLoader).

    Batches are checked against ``example_inputs``: same number of inputs, same dims after the
    batch dim. Raises ``InputError`` naming the first batch that does not fit.
    """
    if isinstance(data, Calibration):
        return data
    if data is None:
        raise ConfigError("calibration data is required: pass a tensor of inputs, a list of "
                          "batches or (inputs, labels) pairs, or a DataLoader.")
    if isinstance(data, torch.Tensor):
        items: Iterable[Any] = _split(data, batch_size)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, torch.Tensor) for t in data) and data[0].shape[:1] == data[1].shape[:1] \
            and data[1].ndim == 1 and not data[1].is_floating_point():
        items = list(zip(_split(data[0], batch_size), _split(data[1], batch_size)))
    elif isinstance(data, Iterable):
        items = data
    else:
        raise ConfigError(f"calibration must be a tensor, an iterable of batches or a DataLoader. "
                          f"Got {type(data).__name__} instead.")
    ref = None
    if example_inputs is not None:
        from .trace import normalize_inputs

        args, _ = normalize_inputs(example_inputs)
        ref = [tuple(a.shape[1:]) if isinstance(a, torch.Tensor) else None for a in args]
    batches, labels, n = [], [], 0
    for i, item in enumerate(items):
        x, y = _unpack(item, i)
        if ref is not None:
            got = [tuple(t.shape[1:]) for t in x]
            if len(got) != len(ref) or any(r is not None and g != r for g, r in zip(got, ref)):
                raise InputError(
                    f"calibration batch {i} has input shapes {[tuple(t.shape) for t in x]} but the "
                    f"model's example inputs are (batch, {', '.join(map(str, ref))}): pass batches "
                    "shaped like the example inputs.")
        take = min(x[0].shape[0], max_samples - n)
        if take <= 0:
            break
        batches.append(tuple(t[:take].detach() for t in x))
        labels.append(None if y is None else y[:take].detach())
        n += take
    if not batches:
        raise InputError("calibration data is empty.")
    return Calibration(batches, labels)


def _unpack(item: Any, i: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    if isinstance(item, torch.Tensor):
        return (item,), None
    if isinstance(item, dict):
        raise InputError("calibration batches given as dicts are not supported; pass tensors "
                         "or (inputs, labels) tuples.")
    if isinstance(item, (tuple, list)) and item:
        if len(item) == 2 and isinstance(item[1], torch.Tensor) and not item[1].is_floating_point() \
                and item[1].ndim == 1 and isinstance(item[0], torch.Tensor) \
                and item[0].shape[0] == item[1].shape[0]:
            return (item[0],), item[1]
        if all(isinstance(t, torch.Tensor) for t in item):
            return tuple(item), None
    raise InputError(f"calibration batch {i} is a {type(item).__name__}; expected a tensor or an "
                     "(inputs, labels) tuple.")
