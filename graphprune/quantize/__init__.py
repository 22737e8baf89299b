"""Quantization: weight quantizers (linear, fixed point, k-means, naive, DoReFa) and
quantization-aware training (``qat``)."""

from .api import QuantizedModel, quantize
from .configs import DoReFa, FixedPoint, KMeans, Linear, Naive, QuantConfig
from .schemes import handler, quantize_tensor
from .tensor import QuantizedTensor, dequantize

__all__ = ["DoReFa", "FixedPoint", "KMeans", "Linear", "Naive", "QuantConfig", "QuantizedModel",
           "QuantizedTensor", "dequantize", "handler", "quantize", "quantize_tensor"]
