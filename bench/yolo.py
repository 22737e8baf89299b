"""YOLO (ultralytics, from its yaml, random init): parameters, MACs and onnxruntime latency of
the dense model and of graphprune's L1 pruning at 30% and 50%, beside Torch-Pruning 1.6 in the
same run (its failure reported where it fails), and how close the pruned heads stay to the dense
ones on real photos.

Every model is exported with ultralytics' own head in export mode (one output tensor, as
``YOLO.export`` does) through the same exporter; latency: batch 1, onnxruntime, sessions taking
turns round-robin, median of the rounds. Output fidelity: relative error and cosine of the raw
box-distribution and class logits of the Detect head (each centred over the anchors), pruned vs
dense, on crops of scikit-learn's two sample photos (``--reconstruct``: also with least-squares
reconstruction of
the consumers on 16 other crops). Nothing is written outside a temporary directory.

    python bench/yolo.py [--models yolov8n] [--size 640] [--rounds 20] [--threads 2] [--reconstruct]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings

import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="gp-ultralytics-"))
warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import graphprune as gp  # noqa: E402
from graphprune.cost import count_params  # noqa: E402
from graphprune.datasets import IMAGENET_MEAN, IMAGENET_STD, sample_crops  # noqa: E402
from graphprune.deploy import Session  # noqa: E402

from deploy import interleaved  # noqa: E402  (bench/deploy.py: sessions taking turns)


def photos(n: int, size: int, seed: int) -> torch.Tensor:
    """RGB crops in [0, 1], as ultralytics models take them."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (sample_crops(n, size=size, seed=seed) * std + mean).clamp(0, 1)


def build(name: str, size: int) -> torch.nn.Module:
    """The model from its yaml, random weights, BatchNorm statistics from 8 photo crops: without
    them the activations of a random YOLO fade to nothing and its outputs are its head biases."""
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel

    torch.manual_seed(0)
    cls = SegmentationModel if "seg" in name else DetectionModel
    model = cls(f"{name}.yaml", verbose=False)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(photos(8, size, seed=11))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    return model.eval()


def export_mode(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose head returns one tensor, as ultralytics' exporter sets it."""
    from ultralytics.nn.modules import Detect

    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, Detect):
            mod.export = True
    return m


def head_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The Detect head's raw box-distribution and class logits (B, 4 x 16 + classes, anchors),
    each channel centred over the anchors: what the image changes, not the head's biases."""
    with torch.no_grad():
        _, preds = model(x)
    preds = preds.get("one2many", preds)
    y = torch.cat([preds["boxes"], preds["scores"]], 1).double()
    return y - y.mean(-1, keepdim=True)


def fidelity(dense: torch.nn.Module, pruned: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    a, b = head_logits(dense, x), head_logits(pruned, x)
    rel = float((a - b).norm() / a.norm())
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    return rel, cos


def tp_prune(model: torch.nn.Module, x: torch.Tensor, ratio: float):
    """Torch-Pruning 1.6's magnitude pruner, Detect head ignored (its recommended YOLO setup)."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=[m.model[-1]])
    pruner.step()
    with torch.no_grad():
        y0, y1 = model(x), m(x)
    if y0[0].shape != y1[0].shape:
        raise RuntimeError(f"the output shape changed from {tuple(y0[0].shape)} to "
                           f"{tuple(y1[0].shape)}")
    return m.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="yolov8n")
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--sparsities", default="0.3,0.5")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reconstruct", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime
    import torch_pruning
    import ultralytics

    x = photos(1, args.size, seed=1)
    held_out = photos(8, args.size, seed=7)
    print(f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, ultralytics "
          f"{ultralytics.__version__}, onnxruntime {onnxruntime.__version__}, torch-pruning "
          f"{torch_pruning.__version__}; {args.size}x{args.size}, batch 1, {args.threads} threads, "
          f"median of {args.rounds} interleaved rounds; fidelity on 8 photo crops")
    for name in args.models.split(","):
        dense = build(name, args.size)
        variants: dict[str, tuple[torch.nn.Module, int]] = {}
        m0 = gp.prune(dense, x, sparsity=0.0).report.macs[0]
        variants["dense"] = (dense, m0)
        notes, secs = [], {}
        for s in (float(v) for v in args.sparsities.split(",")):
            t = time.perf_counter()
            r = gp.prune(dense, x, sparsity=s, method="l1")
            secs[f"graphprune {s:.0%}"] = time.perf_counter() - t
            variants[f"graphprune {s:.0%}"] = (r.model, r.report.macs[1])
            if args.reconstruct:
                rr = gp.prune(dense, x, sparsity=s, method="l1", reconstruct=True,
                              calibration=photos(16, args.size, seed=3))
                variants[f"graphprune {s:.0%} + reconstruction"] = (rr.model, rr.report.macs[1])
            try:
                t = time.perf_counter()
                tpm = tp_prune(dense, x, s)
                secs[f"Torch-Pruning {s:.0%}"] = time.perf_counter() - t
                variants[f"Torch-Pruning {s:.0%}"] = (tpm, gp.prune(tpm, x, sparsity=0.0).report.macs[0])
            except Exception as e:  # noqa: BLE001  (report whatever the peer raises)
                notes.append(f"Torch-Pruning {s:.0%}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        with tempfile.TemporaryDirectory() as d:
            sessions = {}
            for tag, (model, _) in variants.items():
                path = gp.export_onnx(export_mode(model), x, os.path.join(d, f"{len(sessions)}.onnx"),
                                      exporter="legacy").path
                sessions[tag] = Session(path, threads=args.threads)
            lat = interleaved(sessions, x, args.rounds)
        p0 = count_params(dense)
        print(f"\n{name}\n")
        print("| model | params | params ratio | GMACs | MACs ratio | ORT ms | latency ratio | "
              "head logits rel. error | cosine | prune s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for tag, (model, macs) in variants.items():
            p = count_params(model)
            rel, cos = (0.0, 1.0) if tag == "dense" else fidelity(dense, model, held_out)
            took = f"{secs[tag]:.1f}" if tag in secs else ""
            print(f"| {tag} | {p:,} | {p / p0:.3f} | {macs / 1e9:.2f} | {macs / m0:.3f} | "
                  f"{lat[tag]:.2f} | {lat[tag] / lat['dense']:.3f} | {rel:.3f} | {cos:.3f} | {took} |",
                  flush=True)
        for n in notes:
            print(f"\n{n}")


if __name__ == "__main__":
    main()
