"""Latency stage, the alternative the profile is compared with: every convolution timed alone, in
a one-layer ONNX model built from the shapes the profile recorded (a lookup table of layers, as
NetAdapt and HALP build one). Kernels that are not convolutions (reorders, pooling, elementwise
ops, Gemm) have no entry in such a table and keep their dense time.

Used by ``bench/latency.py --compare`` to show which of the two predicts whole-model latency
better; the tables the library builds use the in-context profile.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from .measure import Kernel, _parse_profile, make_session

CONV_OPS = ("Conv", "FusedConv")


def _conv_model(k: Kernel):
    """A one-Conv ONNX model with the kernel's input, weight, bias (and summed input) shapes."""
    from onnx import TensorProto, helper, numpy_helper

    x, w = k.inputs[0], k.inputs[1]
    cin, h = x[1], x[2]
    cout, per_group, kh, kw = w
    ho = k.outputs[0][2] if k.outputs and len(k.outputs[0]) > 2 else h
    stride = max(1, round(h / max(1, ho)))
    pad = (kh - 1) // 2 if (h + 2 * ((kh - 1) // 2) - kh) // stride + 1 == ho else 0
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(w).astype(np.float32), "w")]
    ins = ["x", "w"]
    if len(k.inputs) > 2 and k.inputs[2]:
        inits.append(numpy_helper.from_array(rng.standard_normal(k.inputs[2]).astype(np.float32), "b"))
        ins.append("b")
    nodes = [helper.make_node("Conv", ins, ["c"], group=max(1, cin // per_group),
                              kernel_shape=[kh, kw], strides=[stride, stride], pads=[pad] * 4)]
    out_shape = [x[0], cout, ho, k.outputs[0][3] if k.outputs and len(k.outputs[0]) > 3 else ho]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x))]
    if len(k.inputs) > 3 and k.inputs[3]:
        nodes.append(helper.make_node("Add", ["c", "z"], ["y"]))
        inputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, list(k.inputs[3])))
    else:
        nodes[0].output[0] = "y"
    g = helper.make_graph(nodes, "layer", inputs,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def isolated_ms(k: Kernel, *, threads: int = 2, providers: Sequence[str] = ("CPUExecutionProvider",),
                runs: int = 15) -> float | None:
    """25th percentile of the convolution's time alone (None for other kernels)."""
    import onnx

    if k.op not in CONV_OPS or len(k.inputs) < 2 or len(k.inputs[1]) != 4 or len(k.inputs[0]) != 4:
        return None
    m = _conv_model(k)
    with tempfile.TemporaryDirectory(prefix="gp-latency-") as d:
        path = os.path.join(d, "layer.onnx")
        onnx.save(m, path)
        s = make_session(path, threads=threads, providers=providers, profile_prefix=os.path.join(d, "p"))
        rng = np.random.default_rng(0)
        feeds = {i.name: rng.standard_normal([int(v) for v in i.shape]).astype(np.float32)
                 for i in s.get_inputs()}
        for _ in range(runs + 3):
            s.run(None, feeds)
        kernels, _ = _parse_profile(s.end_profiling(), 3)
    times = [v.low_ms for v in kernels.values() if v.op in CONV_OPS]
    return max(times) if times else None


def isolated_runs(runs: Sequence[Mapping[str, Kernel]], **options) -> list[dict[str, Kernel]]:
    """``runs`` with every convolution's time replaced by its time alone (shapes timed once);
    other kernels keep the first (dense) run's time."""
    cache: dict[tuple, float | None] = {}
    out = []
    for r in runs:
        new = {}
        for name, k in r.items():
            sig = (k.op, k.inputs, k.outputs)
            if sig not in cache:
                cache[sig] = isolated_ms(k, **options)
            t = cache[sig]
            if t is None:
                d = runs[0].get(name, k)
                new[name] = replace(k, ms=d.ms, low_ms=d.low_ms)
            else:
                new[name] = replace(k, ms=t, low_ms=t)
        out.append(new)
    return out
