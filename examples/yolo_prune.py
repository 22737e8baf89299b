"""Prune an ultralytics YOLO: half the channels of yolov8n (built from its yaml; load your own
weights with ``YOLO("best.pt")`` instead), rebuild it from the mask file, save it in ultralytics'
own checkpoint format and export it with ultralytics' exporter, then check it in onnxruntime
against PyTorch. About a minute on 2 cores, no download.

    python examples/yolo_prune.py [out_dir]
"""

import os
import sys

os.environ.setdefault("YOLO_OFFLINE", "1")  # no network, no settings file in the home directory
os.environ.setdefault("YOLO_VERBOSE", "False")
out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "out/yolo")
os.makedirs(out, exist_ok=True)
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(out, ".ultralytics"))

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphprune as gp  # noqa: E402
from graphprune.datasets import IMAGENET_MEAN, IMAGENET_STD, sample_crops  # noqa: E402
from graphprune.deploy import Session  # noqa: E402

from ultralytics import YOLO  # noqa: E402

os.chdir(out)  # ultralytics writes its exports next to the model's name
torch.manual_seed(0)
yolo = YOLO("yolov8n.yaml")  # or YOLO("best.pt"): your trained weights
model = yolo.model.eval()
# crops of scikit-learn's sample photos, RGB in [0, 1] as YOLO takes them
mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
x = (sample_crops(1, size=640, seed=1) * std + mean).clamp(0, 1)

r = gp.prune(model, x, sparsity=0.5, method="l1")  # model is untouched; r.model is smaller
print(r.report)
gp.save_masks(r.masks, "masks.safetensors", plan=r.plan)

# the mask file rebuilds the pruned model from a fresh instance of the architecture
small = gp.apply_masks(YOLO("yolov8n.yaml").model, "masks.safetensors", x)
print("rebuilt from masks.safetensors:", sum(p.numel() for p in small.parameters()), "parameters")

# the pruned model keeps ultralytics' module types: its checkpoint format and exporter work
yolo.model = r.model
yolo.save("yolov8n-pruned.pt")
onnx_path = yolo.export(format="onnx", imgsz=640, simplify=False, dynamic=False)
sess = Session(onnx_path, threads=2)
(boxes,) = sess.run(x)
with torch.no_grad():
    ref = r.model(x)[0]
err = float((torch.from_numpy(boxes) - ref).abs().max() / ref.abs().max())
print(f"onnxruntime vs PyTorch: max relative error {err:.1e}; "
      f"median latency {sess.benchmark(x)['p50']:.1f} ms")
print(f"wrote {out}/: {', '.join(sorted(f for f in os.listdir(out) if not f.startswith('.')))}")
