"""Every reference architecture in models/ prunes correctly and exports to ONNX."""

import pytest
import torch

import graphprune as gp
from graphprune.models import ZOO

from ..conftest import healthy_init
from .common import check_prunes


@pytest.mark.parametrize("sparsity", [0.3, 0.7])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_reference_models_prune(name, sparsity):
    fn, shape = ZOO[name]
    torch.manual_seed(0)
    model = healthy_init(fn().eval())
    x = torch.randn(2, *shape[1:])
    for method in ("l1", "random"):
        check_prunes(model, x, sparsity, method=method)


def test_resnet_option_a_freezes_the_padded_stream_and_prunes_inside_blocks():
    from graphprune.models.resnet_cifar import resnet20

    model = healthy_init(resnet20(shortcut="A").eval())
    x = torch.randn(2, 3, 32, 32)
    g = gp.trace(model, x)
    assert not g.group("conv1").prunable and "padding a channel dim" in g.group("conv1").reason
    r = check_prunes(model, x, 0.5)
    assert r.model.layer2[0].conv1.out_channels == 16 and r.model.layer2[0].conv2.out_channels == 32


@pytest.mark.parametrize("name", sorted(ZOO))
def test_reference_models_export_to_onnx_dense_and_pruned(name, tmp_path):
    fn, shape = ZOO[name]
    torch.manual_seed(0)
    model = healthy_init(fn().eval())
    x = torch.randn(*shape)
    dense = gp.export_onnx(model, x, tmp_path / "dense.onnx", exporter="legacy")
    pruned = gp.prune(model, x, sparsity=0.5).model
    small = gp.export_onnx(pruned, x, tmp_path / "pruned.onnx", exporter="legacy")
    assert dense.max_rel_err < 1e-4 and small.max_rel_err < 1e-4
    assert small.bytes < dense.bytes
    # the batch axis is dynamic
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "pruned.onnx"), providers=["CPUExecutionProvider"])
    xb = torch.randn(3, *shape[1:])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), pruned(xb).detach(), rtol=1e-4, atol=1e-4)


def test_dynamo_exporter(tmp_path):
    fn, shape = ZOO["resnet20"]
    model = healthy_init(fn().eval())
    x = torch.randn(*shape)
    r = gp.export_onnx(gp.prune(model, x).model, x, tmp_path / "m.onnx", exporter="dynamo")
    assert r.exporter == "dynamo" and r.max_rel_err < 1e-4
