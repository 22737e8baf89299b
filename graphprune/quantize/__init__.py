"""Quantization: weight quantizers (linear, fixed point, k-means, naive, DoReFa) and
quantization-aware training (``qat``)."""

from .api import QuantizedModel, quantize
from .configs import DoReFa, FixedPoint, KMeans, Linear, Naive, QuantConfig
from .qat import QAT, QATLayer, prepare_qat, strip_qat
from .schemes import handler, quantize_tensor
from .tensor import QuantizedTensor, dequantize

__all__ = ["QAT", "DoReFa", "FixedPoint", "KMeans", "Linear", "Naive", "QATLayer", "QuantConfig",
           "QuantizedModel", "prepare_qat", "strip_qat",
           "QuantizedTensor", "dequantize", "handler", "quantize", "quantize_tensor"]
