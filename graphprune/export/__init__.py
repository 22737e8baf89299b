"""Stage 8: export to ONNX (fp32 or int8), with parity checked in onnxruntime, and bundles."""

from .bundle import export_bundle
from .onnx import ExportResult, export_onnx, onnx_parity

__all__ = ["ExportResult", "export_bundle", "export_onnx", "onnx_parity"]
