"""Detectors prune as wholes (``make zoo``): ultralytics YOLO v5/v8/11 and v8-seg from their yaml,
torchvision's Faster R-CNN, RetinaNet, SSDlite and Mask R-CNN as regions, DeepLabV3 / FCN whole.

For each (random init, 50% of the channels by L1): parameters < 0.6, the output keeps its
structure, the caller's model is untouched, the mask file rebuilds the pruned model exactly on a
fresh instance, the pruned model computes what the masked original computes (YOLO: every output;
detectors: every head's raw outputs, each fed the same boxes), ONNX parity where it exports.
"""

from __future__ import annotations

import copy
import gc
import os
import tempfile

import pytest
import torch
from torch.utils._pytree import tree_flatten

import graphprune as gp
from graphprune import regions

from ..conftest import assert_same_state, healthy_init, masked_copy, rel_err, snapshot, assert_unchanged
from ..unit.test_yolo import assert_same_attributes, calibrate_bn, photos

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="gp-ultralytics-"))


def _shapes(y):
    if isinstance(y, torch.Tensor):
        return tuple(y.shape)
    if isinstance(y, dict):
        return {k: _shapes(v) for k, v in y.items()}
    if isinstance(y, (list, tuple)):
        return type(y)(_shapes(v) for v in y)
    return type(y).__name__


# ---------------------------------------------------------------------- ultralytics YOLO
YOLOS = ["yolov5nu", "yolov8n", "yolo11n", "yolov8n-seg"]


@pytest.mark.zoo
@pytest.mark.parametrize("name", YOLOS)
def test_yolo_prunes_end_to_end(name, tmp_path, monkeypatch):
    ultralytics = pytest.importorskip("ultralytics")
    from ultralytics.nn.modules import C2f, Detect

    monkeypatch.chdir(tmp_path)  # ultralytics writes next to the yaml name, in the working dir
    torch.manual_seed(0)
    yolo = ultralytics.YOLO(f"{name}.yaml")  # random init; the wrapper sets task and args
    model = calibrate_bn(yolo.model, photos(4, 320, seed=1))
    x = photos(1, 320)
    reference, fresh = copy.deepcopy(model), copy.deepcopy(model)
    r = gp.prune(model, x, sparsity=0.5, method="l1")
    assert r.report.params[1] / r.report.params[0] < 0.6
    assert_same_attributes(model, reference)
    with torch.no_grad():
        y0, y1 = model(x), r.model(x)
    assert _shapes(y1) == _shapes(y0)
    # no YOLO group is value-coupled: the masked original computes the same, on real photos
    assert not any(g.value_coupled for g in r.graph.groups if g.name in r.plan.groups)
    imgs = photos(4, 320)
    with torch.no_grad():
        got, want = r.model(imgs), masked_copy(model, r.masks)(imgs)
    for a, b in zip(tree_flatten(got)[0], tree_flatten(want)[0]):
        assert rel_err(a, b) < 1e-5
    # the mask file rebuilds a never-run instance exactly
    gp.save_masks(r.masks, tmp_path / "m.safetensors", plan=r.plan)
    small = gp.apply_masks(fresh, tmp_path / "m.safetensors", x)
    assert_same_state(small, r.model)
    assert_same_attributes(fresh, reference)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(tree_flatten(small(x))[0], tree_flatten(y1)[0]))
    # ultralytics' module types, so its own checkpoint format and exporter take the pruned model
    assert [type(m) for m in r.model.modules()] == [type(m) for m in model.modules()]
    assert all(m.c == m.cv1.conv.out_channels // 2 for m in r.model.modules() if isinstance(m, C2f))
    yolo.model = r.model
    yolo.save("pruned.pt")
    with torch.no_grad():
        again = ultralytics.YOLO("pruned.pt").model.float().eval()(x)
    for a, b in zip(tree_flatten(again)[0], tree_flatten(y1)[0]):  # ultralytics saves fp16
        assert rel_err(a, b) < 5e-3
    onnx_path = yolo.export(format="onnx", imgsz=320, simplify=False, dynamic=False)
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    exp = copy.deepcopy(r.model)
    for m in exp.modules():
        if isinstance(m, Detect):
            m.export = True
    with torch.no_grad():
        want = exp(x)
    for a, b in zip(got, want if isinstance(want, tuple) else (want,)):
        assert rel_err(torch.from_numpy(a), b) < 1e-4
    res = gp.export_onnx(r.model, x, tmp_path / "gp.onnx")  # graphprune's own: checker + parity
    assert res.max_rel_err < 1e-4


# ---------------------------------------------------------------------- torchvision detectors
DETECTORS = {
    # model -> (keyword arguments, regions expected among the traced ones)
    "fasterrcnn_resnet50_fpn": ({"box_score_thresh": 0.001},
                                {"backbone", "rpn.head", "roi_heads.box_head", "roi_heads.box_predictor"}),
    "fasterrcnn_mobilenet_v3_large_fpn": ({"box_score_thresh": 0.001},
                                          {"backbone", "rpn.head", "roi_heads.box_head"}),
    "retinanet_resnet50_fpn": ({"score_thresh": 0.001}, {"backbone", "head"}),
    "ssdlite320_mobilenet_v3_large": ({}, {"backbone", "head"}),
    "maskrcnn_resnet50_fpn": ({"box_score_thresh": 0.001},
                              {"backbone", "rpn.head", "roi_heads.box_head", "roi_heads.mask_head",
                               "roi_heads.mask_predictor"}),
}


@pytest.mark.zoo
@pytest.mark.parametrize("name", list(DETECTORS))
def test_torchvision_detector_prunes_as_regions(name, tmp_path):
    tv = pytest.importorskip("torchvision")
    kwargs, expected = DETECTORS[name]
    if not name.startswith("ssd"):
        kwargs = {**kwargs, "min_size": 320, "max_size": 320}
    torch.manual_seed(0)
    model = healthy_init(tv.models.get_model(name, weights=None, weights_backbone=None, **kwargs)).eval()
    x = (list(photos(1, 320)),)
    fresh, snap = copy.deepcopy(model), snapshot(model)
    r = gp.prune(model, x, sparsity=0.5, method="l1")
    regions.verify_regions(r.graph, r.model, r._applied.shapes)
    assert r.graph.tracer_reason.startswith("captured as regions")
    assert expected <= {t.region for t in r.graph.traced}
    assert r.report.params[1] / r.report.params[0] < 0.6
    assert_unchanged(model, snap)
    copy.deepcopy(model)
    with torch.no_grad():
        y0, y1 = model(*x), r.model(*x)
    assert regions.structure(y1) == regions.structure(y0)  # same keys; the number of boxes may differ
    if name.startswith("maskrcnn"):
        assert y0[0]["masks"].shape[0] > 0  # the mask head ran on boxes
    errs = regions.compare_regions(r.graph, r.model, masked_copy(model, r.masks))
    assert errs and max(errs.values()) < 1e-4, errs
    gp.save_masks(r.masks, tmp_path / "m.safetensors", plan=r.plan)
    small = gp.apply_masks(fresh, tmp_path / "m.safetensors", x)
    assert_same_state(small, r.model)
    assert max(regions.compare_regions(r.graph, small, r.model).values()) == 0.0
    del fresh, small
    gc.collect()
    # the pruned backbone exports on its own (the detector's post-processing does not)
    res = gp.export_onnx(r.model.backbone, torch.rand(1, 3, 320, 320), tmp_path / "backbone.onnx")
    assert res.max_rel_err < 1e-4


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50", "fcn_resnet50"])
def test_torchvision_segmentation_prunes_whole(name, tmp_path):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = healthy_init(tv.models.get_model(name, weights=None, weights_backbone=None)).eval()
    x = photos(1, 224)
    fresh, snap = copy.deepcopy(model), snapshot(model)
    r = gp.prune(model, x, sparsity=0.5, method="l1")
    assert r.graph.tracer == "torch.fx"
    assert r.report.params[1] / r.report.params[0] < 0.6
    assert_unchanged(model, snap)
    with torch.no_grad():
        y0, y1, ym = model(x), r.model(x), masked_copy(model, r.masks)(x)
    assert _shapes(y1) == _shapes(y0)
    if not any(g.value_coupled for g in r.graph.groups if g.name in r.plan.groups):
        assert rel_err(y1["out"], ym["out"]) < 1e-5
    small = gp.apply_masks(fresh, r.masks, x, inplace=True)
    assert_same_state(small, r.model)
    res = gp.export_onnx(r.model, x, tmp_path / "seg.onnx")
    assert res.max_rel_err < 1e-4
