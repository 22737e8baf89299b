"""Stage 8: export to ONNX (``onnx``) with parity checked in onnxruntime."""

from .onnx import ExportResult, export_onnx, onnx_parity

__all__ = ["ExportResult", "export_onnx", "onnx_parity"]
