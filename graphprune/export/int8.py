"""Static int8 quantization of an exported ONNX model for onnxruntime.

QDQ format, weights int8 per output channel, activations uint8 per tensor (the U8S8 combination
onnxruntime runs with int8 kernels on x86: QLinearConv / QGemm), calibrated on real inputs with
onnxruntime's quantization tool. Weight initializers are stored as int8 in the file.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
import numpy as np

from ..calibration import Calibration

METHODS = ("minmax", "percentile", "entropy")


class _Reader:
    def __init__(self, names: list[str], calib: Calibration):
        self.items = [{n: t.detach().cpu().numpy() for n, t in zip(names, xs)} for xs, _ in calib]
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.items):
            return None
        self.i += 1
        return self.items[self.i - 1]

    def rewind(self) -> None:
        self.i = 0


def quantize_static_int8(src: str, dst: str, calib: Calibration, *, method: str = "minmax",
                         per_channel: bool = True) -> None:
    """Write the int8 QDQ version of the fp32 ONNX model ``src`` to ``dst``."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
          "entropy": CalibrationMethod.Entropy}[method]
    names = [i.name for i in onnx.load(src, load_external_data=False).graph.input]
    reader = type("R", (_Reader, CalibrationDataReader), {})(names, calib)
    with tempfile.TemporaryDirectory(prefix="gp-int8-") as d:
        pre = os.path.join(d, "pre.onnx")
        try:
            quant_pre_process(src, pre, skip_symbolic_shape=False)
        except Exception:  # pre-processing is an optimisation; quantize the model as exported
            pre = src
        quantize_static(pre, dst, reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=cm, extra_options={"ActivationSymmetric": False,
                                                            "WeightSymmetric": True})
    compact_names(dst)


def compact_names(path: str) -> None:
    """Shorten internal tensor and node names and drop doc strings (small models shrink by
    kilobytes); graph inputs and outputs keep their names."""
    import onnx

    m = onnx.load(path)
    keep = {v.name for v in m.graph.input} | {v.name for v in m.graph.output}
    ren: dict[str, str] = {}

    def new(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in ren:
            ren[name] = f"t{len(ren)}"
        return ren[name]

    for init in m.graph.initializer:
        init.name = new(init.name)
    for i, n in enumerate(m.graph.node):
        n.name = f"n{i}"
        n.doc_string = ""
        n.input[:] = [new(x) for x in n.input]
        n.output[:] = [new(x) for x in n.output]
    for v in m.graph.value_info:
        v.name = new(v.name)
    m.doc_string = ""
    m.graph.doc_string = ""
    onnx.save(m, path)


def optimized_op_counts(path: str, threads: int = 1) -> Counter:
    """Op types of the graph onnxruntime actually runs (after its optimisations)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="gp-opt-") as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
