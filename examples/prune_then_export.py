"""The main job in Python: train the digits CNN on scikit-learn's real 8x8 digits, prune half its
channels with LASSO + least-squares reconstruction, fine-tune briefly, export int8 ONNX with its
mask file, plan and report, and check it in onnxruntime. A minute on 2 cores.

    python examples/prune_then_export.py [out_dir]
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphprune as gp  # noqa: E402
from graphprune.datasets import digits  # noqa: E402
from graphprune.deploy import Session  # noqa: E402
from graphprune.finetune import evaluate, train  # noqa: E402
from graphprune.models import digits_net  # noqa: E402

out = sys.argv[1] if len(sys.argv) > 1 else "out/example"
torch.manual_seed(0)
x_train, y_train, x_test, y_test = digits()
model = train(digits_net(), x_train, y_train, epochs=12)
print(f"dense accuracy {evaluate(model, x_test, y_test):.4f}")

r = gp.prune(model, x_train[:1], sparsity=0.5, method="lasso",
             calibration=(x_train[:256], y_train[:256]), reconstruct=True)
print(r.report)
train(r.model, x_train, y_train, epochs=5)  # r.model is a normal nn.Module
print(f"pruned + fine-tuned accuracy {evaluate(r.model, x_test, y_test):.4f}")

rep = gp.export_bundle(out, r.model, x_train[:1], result=r, quantize="int8",
                       calibration=x_train[:256])
sess = Session(os.path.join(out, "model.onnx"), threads=2)
(logits,) = sess.run(x_test)
print(f"int8 onnxruntime accuracy {(logits.argmax(1) == y_test.numpy()).mean():.4f}, "
      f"{rep['onnx']['bytes']:,} bytes, median latency {sess.benchmark(x_test[:1])['p50']:.3f} ms")
print(f"wrote {out}/: {', '.join(sorted(os.listdir(out)))}")
