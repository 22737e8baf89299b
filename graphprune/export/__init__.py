"""Stage 8: export to ONNX (fp32 or int8), with parity checked in onnxruntime, and bundles;
Hugging Face decoders with their KV cache and weight-only int8 / 4-bit MatMuls."""

from .bundle import export_bundle
from .bundle_lm import export_bundle_lm
from .decoder import DecoderExportResult, export_decoder
from .decoder_session import DecoderSession, Generation
from .onnx import ExportResult, export_onnx, onnx_parity
from .weight_only import WeightOnlyResult, quantize_weights

__all__ = ["DecoderExportResult", "DecoderSession", "ExportResult", "Generation", "WeightOnlyResult",
           "export_bundle", "export_bundle_lm", "export_decoder", "export_onnx", "onnx_parity",
           "quantize_weights"]
