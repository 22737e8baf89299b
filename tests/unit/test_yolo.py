"""Tracing leaves no trace, and ultralytics YOLO end to end (yolov8n from its yaml, random init).

A model that caches tensors in forward (ultralytics' Detect assigns ``anchors``/``strides`` when
the input shape changes) must come out of ``trace``, ``prune`` and ``apply_masks`` exactly as it
went in: same attributes, no fake tensors, deep-copyable, computing the same.
"""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

import graphprune as gp

from ..conftest import assert_same_state, masked_copy, rel_err

# ultralytics reads these when imported: no network, no settings file in the user's home
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="gp-ultralytics-"))


# ---------------------------------------------------------------------- attribute equality
def _same(a, b, where: str) -> None:
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor), where
        assert type(a).__name__ not in ("FakeTensor", "FunctionalTensor"), f"{where} is fake"
        assert a.device == b.device and a.dtype == b.dtype and a.shape == b.shape, where
        assert type(a) is type(b) and torch.equal(a, b), where
    elif isinstance(b, nn.Module):
        assert type(a) is type(b), where  # module trees are compared module by module
    elif isinstance(b, dict):
        assert type(a) is type(b) and list(a) == list(b), where
        for k in b:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(b, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(b, (int, float, str, bool, type(None), torch.Size, torch.dtype)):
        assert a == b, f"{where}: {a!r} != {b!r}"
    else:
        assert type(a) is type(b), where


def assert_same_attributes(model: nn.Module, reference: nn.Module) -> None:
    """Every module of ``model`` has exactly the attributes of ``reference``'s (hooks, buffers,
    parameters, caches, training flags), and the model deep-copies."""
    copy.deepcopy(model)
    mods, refs = dict(model.named_modules()), dict(reference.named_modules())
    assert list(mods) == list(refs)
    for name, ref in refs.items():
        m = mods[name]
        assert type(m) is type(ref), name
        assert sorted(vars(m)) == sorted(vars(ref)), f"'{name}' gained or lost attributes"
        for k, v in vars(ref).items():
            if k.endswith("hooks") or k.startswith("_forward") or k.startswith("_backward"):
                assert len(vars(m)[k]) == len(v), f"{name}.{k}"
            elif k != "_modules":
                _same(vars(m)[k], v, f"{name}.{k}" if name else k)


# ---------------------------------------------------------------------- a hand-written cache
class CachingHead(nn.Module):
    """Caches a grid when the input shape changes, as ultralytics' Detect caches its anchors;
    the class attribute is the never-run default."""

    grid = torch.empty(0)
    shape = None

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, 6, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x):
        if self.shape != x.shape:
            h, w = x.shape[-2:]
            self.grid = torch.arange(h * w, dtype=x.dtype).view(1, 1, h, w) / (h * w)
            self.shape = x.shape
            self.seen.append(tuple(x.shape))
        self.calls += 1
        return self.conv(x) + self.grid


class CachingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.head = CachingHead(24)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("ran", [False, True], ids=["never-run", "after-a-run"])
@pytest.mark.parametrize("tracer", ["auto", "export"])
def test_trace_prune_apply_masks_leave_no_trace(tracer, ran, tmp_path):
    torch.manual_seed(0)
    model = CachingNet().eval()
    x = torch.randn(2, 3, 8, 8)
    if ran:
        with torch.no_grad():
            model(torch.randn(1, 3, 4, 4))
    reference, fresh = copy.deepcopy(model), copy.deepcopy(model)
    g = gp.trace(model, x, tracer=tracer)
    assert g.tracer == "torch.export"  # fx cannot trace the shape test: the fake-tensor path
    assert_same_attributes(model, reference)
    r = gp.prune(model, x, sparsity=0.5, method="l1", tracer=tracer)
    assert_same_attributes(model, reference)
    assert r.report.params[1] < r.report.params[0]
    gp.save_masks(r.masks, tmp_path / "masks.safetensors", plan=r.plan)
    small = gp.apply_masks(fresh, tmp_path / "masks.safetensors", x)
    assert_same_attributes(fresh, reference)
    assert_same_state(small, r.model)
    copy.deepcopy(small)
    with torch.no_grad():  # everything still runs, and the caches fill in as they did before
        y_ref, y = reference(x), model(x)
        assert torch.equal(y, y_ref) and model.head.seen == reference.head.seen
        assert rel_err(r.model(x), masked_copy(reference, r.masks)(x)) < 1e-5


# ---------------------------------------------------------------------- YOLO
def calibrate_bn(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """BatchNorm statistics from real images: a randomly initialised YOLO's activations fade to
    nothing through its ~60 convolutions (its outputs are its head biases) until the
    BatchNorms normalise them, as training does."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batch
    model.train()
    with torch.no_grad():
        model(images)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    return model.eval()


def photos(n: int, size: int, seed: int = 5) -> torch.Tensor:
    """Crops of scikit-learn's sample photos in [0, 1] (what detectors take)."""
    from graphprune.datasets import IMAGENET_MEAN, IMAGENET_STD, sample_crops

    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (sample_crops(n, size=size, seed=seed) * std + mean).clamp(0, 1)


def _shapes(y):
    if isinstance(y, torch.Tensor):
        return tuple(y.shape)
    if isinstance(y, dict):
        return {k: _shapes(v) for k, v in y.items()}
    if isinstance(y, (list, tuple)):
        return type(y)(_shapes(v) for v in y)
    return type(y).__name__


@pytest.fixture(scope="module")
def yolo():
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    torch.manual_seed(0)
    model = tasks.DetectionModel("yolov8n.yaml", verbose=False)  # random init, no download
    calibrate_bn(model, photos(4, 320, seed=1))
    x = photos(1, 320)
    reference, fresh = copy.deepcopy(model), copy.deepcopy(model)
    r = gp.prune(model, x, sparsity=0.5, method="l1")
    return model, x, reference, fresh, r


def test_yolov8n_prunes_whole(yolo):
    model, x, reference, _, r = yolo
    assert r.report.params[1] / r.report.params[0] < 0.6
    assert r.report.macs[1] < 0.6 * r.report.macs[0]
    names = {g.name for g in r.graph.prunable_groups}
    # C2f split + concat, SPPF, the box and class branches of the Detect head all lose channels
    for group in ("model.2.cv1.conv", "model.9.cv1.conv", "model.22.cv2.0.0.conv",
                  "model.22.cv3.0.1.conv"):
        assert group in names and group in r.plan.groups, group
    frozen = {g.name: g.reason for g in r.graph.groups if not g.prunable}
    assert "model.22.cv2.0.2" in frozen  # the 4 x reg_max DFL bins stay
    assert_same_attributes(model, reference)
    with torch.no_grad():
        y0, y1, ym = model(x), r.model(x), masked_copy(model, r.masks)(x)
    assert _shapes(y1) == _shapes(y0)  # (boxes+scores, {"boxes", "scores", "feats"})
    # the class logits depend on the image, not only on the head's biases (std 2e-7 without
    # BatchNorm statistics)
    assert float(y0[1]["scores"].std()) > 0.1
    for a, b in zip(tree_flatten(y1)[0], tree_flatten(ym)[0]):
        assert rel_err(a, b) < 1e-5
    assert rel_err(y1[1]["scores"], y0[1]["scores"]) > 1e-3  # pruning did change the model


def test_yolov8n_keeps_ultralytics_types_and_export_path(yolo):
    model, x, _, _, r = yolo
    from ultralytics.nn.modules import C2f, Detect

    assert [type(m) for m in r.model.modules()] == [type(m) for m in model.modules()]
    blocks = [m for m in r.model.modules() if isinstance(m, C2f)]
    assert blocks and all(m.c == m.cv1.conv.out_channels // 2 for m in blocks)
    assert any(m.c < m2.c for m, m2 in zip(blocks, (b for b in model.modules() if isinstance(b, C2f))))
    # ultralytics' exporter runs C2f.forward_split (split at self.c) and Detect without the dict
    exp = copy.deepcopy(r.model)
    for m in exp.modules():
        if isinstance(m, C2f):
            m.forward = m.forward_split
        if isinstance(m, Detect):
            m.export = True
    with torch.no_grad():
        assert torch.equal(exp(x), r.model(x)[0])


def test_yolov8n_mask_file_rebuilds_a_never_run_model(yolo, tmp_path):
    model, x, reference, fresh, r = yolo
    gp.save_masks(r.masks, tmp_path / "yolo.safetensors", plan=r.plan)
    small = gp.apply_masks(fresh, tmp_path / "yolo.safetensors", x)
    assert_same_state(small, r.model)
    assert_same_attributes(fresh, reference)
    with torch.no_grad():
        a, b = small(x), copy.deepcopy(r.model)(x)
    assert all(torch.equal(u, v) for u, v in zip(tree_flatten(a)[0], tree_flatten(b)[0]))
