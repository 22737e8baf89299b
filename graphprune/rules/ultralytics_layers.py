"""Resizers for ultralytics' YOLO blocks (stage 5, apply): the width attributes their other code
paths read after pruning.

C2f-style blocks run ``cv1(x).chunk(2, 1)`` in ``forward``, which follows a pruned ``cv1``; but
ultralytics' exporter switches them to ``forward_split``, which splits ``cv1``'s output at
``self.c`` (the hidden width). The channel rules keep both halves the same width (the same local
channel goes in each half), so ``c`` is half of ``cv1``'s new output width. With ``c`` refreshed,
the pruned model keeps ultralytics' module types and exports through ultralytics itself.

Classes are registered by dotted name (their subclasses, such as ``C3k2``, match through the
class hierarchy); importing graphprune imports no ultralytics.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .registry import resizer

_BLOCK = "ultralytics.nn.modules.block"
# blocks whose ``cv1`` (a ``Conv``) produces ``2 * self.c`` channels, split in two halves
_HALVES = ("C2", "C2f", "C2fAttn", "RepNCSPELAN4", "PSA", "C2PSA")


@resizer(*(f"{_BLOCK}.{name}" for name in _HALVES))
def resize_halves(m: nn.Module, in_shape: Any) -> None:
    conv = getattr(getattr(m, "cv1", None), "conv", None)
    if isinstance(conv, nn.Conv2d) and isinstance(getattr(m, "c", None), int):
        m.c = conv.weight.shape[0] // 2  # the conv's own resizer may not have run yet
