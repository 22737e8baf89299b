"""Deploy: export a pruned torchvision MobileNetV2 to fp32 and int8 ONNX (calibrated on crops of
scikit-learn's sample photos), check it against PyTorch and time it in onnxruntime.

    python examples/deploy_onnx.py
"""

import os
import sys
import tempfile

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphprune as gp  # noqa: E402
from graphprune.datasets import sample_crops  # noqa: E402
from graphprune.deploy import Session, check  # noqa: E402

torch.manual_seed(0)
model = torchvision.models.mobilenet_v2(weights=None).eval()
x = torch.randn(1, 3, 224, 224)
r = gp.prune(model, x, sparsity=0.5, method="l1")
crops = sample_crops(32)
with tempfile.TemporaryDirectory() as d:
    for name, m, q in (("dense", model, None), ("pruned", r.model, None),
                       ("pruned-int8", r.model, "int8")):
        path = os.path.join(d, f"{name}.onnx")
        e = gp.export_onnx(m, x, path, quantize=q, calibration=crops if q else None)
        err = check(path, m, x)
        lat = Session(path, threads=2).benchmark(x)
        print(f"{name:>12}: {e.bytes / 1e6:6.2f} MB, median {lat['p50']:6.2f} ms, "
              f"max rel err vs PyTorch {err['max_rel_err']:.1e}")
