"""A quantized tensor: integer codes plus how to turn them back into values.

``values`` is ``codebook[codes]`` (k-means) or ``(codes - zero_point) * scale`` with ``scale``
per tensor or per channel along ``axis``; the float values are recomputed bit-exactly from codes
by ``dequantize``, which is what the coder relies on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedTensor:
    codes: torch.Tensor  # int32, same shape as the weight
    scheme: str
    bits: int
    codebook: torch.Tensor | None = None  # float32 (levels,) for codebook schemes
    scale: torch.Tensor | None = None  # float32 () or (channels,)
    zero_point: torch.Tensor | None = None  # int32, like scale
    axis: int | None = None  # channel axis of a per-channel scale

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)

    @property
    def levels(self) -> int:
        return 1 << self.bits


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Float32 values of ``q`` (the single definition both quantizer and decoder use)."""
    if q.codebook is not None:
        return q.codebook.to(torch.float32)[q.codes.long()]
    scale, zp = q.scale.to(torch.float32), q.zero_point.to(torch.int32)
    if q.axis is not None and scale.ndim == 1:
        shape = [1] * q.codes.ndim
        shape[q.axis] = -1
        scale, zp = scale.view(shape), zp.view(shape)
    return (q.codes.to(torch.int32) - zp).to(torch.float32) * scale
