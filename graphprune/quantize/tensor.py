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
    """One quantized weight: int32 ``codes`` of its shape, and what maps them back to floats, a
    ``codebook`` (k-means, DoReFa) or a ``scale`` and ``zero_point`` (linear, naive, fixed point),
    per tensor or per channel along ``axis``. ``quantize_tensor`` makes them, the coder stores
    them.

    Example:
        >>> q = quantize_tensor(torch.tensor([0.5, -1.0]), Linear(bits=4, per_channel=False))
        >>> q.codes, q.scale, q.levels
        (tensor([ 3, -7], dtype=torch.int32), tensor(0.1429), 16)
        >>> q.dequantize()                  # (codes - zero_point) * scale
        tensor([ 0.4286, -1.0000])
    """

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
    """Float32 values of ``q`` (the single definition both quantizer and decoder use):
    ``codebook[codes]``, or ``(codes - zero_point) * scale`` broadcast along ``q.axis``.

    Example:
        >>> q = quantize_tensor(torch.tensor([0.5, -1.0, 0.25]), Linear(bits=4, symmetric=False))
        >>> q.codes, q.zero_point           # affine: 0.0 is code 10, exactly
        (tensor([15,  0, 12], dtype=torch.int32), tensor(10, dtype=torch.int32))
        >>> dequantize(q)
        tensor([ 0.5000, -1.0000,  0.2000])
    """
    if q.codebook is not None:
        return q.codebook.to(torch.float32)[q.codes.long()]
    scale, zp = q.scale.to(torch.float32), q.zero_point.to(torch.int32)
    if q.axis is not None and scale.ndim == 1:
        shape = [1] * q.codes.ndim
        shape[q.axis] = -1
        scale, zp = scale.view(shape), zp.view(shape)
    return (q.codes.to(torch.int32) - zp).to(torch.float32) * scale
