"""Quantizers: values on their grid, zeros kept, per-channel scales, k-means centroid training,
QAT; and their bad inputs."""

import pytest
import torch
from torch import nn

from graphprune.errors import ConfigError, RegistryError
from graphprune.quantize import (
    QAT, DoReFa, FixedPoint, KMeans, Linear, Naive, prepare_qat, quantize, quantize_tensor,
)

W = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_linear_symmetric_per_channel(bits):
    q = quantize_tensor(W, Linear(bits=bits))
    qmax = 2 ** (bits - 1) - 1
    assert q.codes.abs().max() <= qmax and q.scale.shape == (8,)
    v = q.dequantize()
    for c in range(8):  # each channel's largest weight is exactly representable
        assert torch.isclose(v[c].abs().max(), W[c].abs().max())
    assert float((v - W).abs().max()) <= float(q.scale.max()) / 2 + 1e-6


def test_linear_affine_keeps_zero_exact():
    w = W.clone()
    w[0, 0] = 0
    q = quantize_tensor(w, Linear(bits=4, symmetric=False, per_channel=False))
    assert q.codes.min() >= 0 and q.codes.max() <= 15
    assert (q.dequantize()[0, 0] == 0).all()


def test_fixed_point_grid_and_saturation():
    w = torch.tensor([0.3, -0.7, 5.0, -5.0, 0.015625 * 3])
    q = quantize_tensor(w, FixedPoint(int_bits=2, frac_bits=4))  # step 1/16, range [-2, 2)
    v = q.dequantize()
    assert torch.equal(v * 16, torch.round(v * 16))
    assert v.max() == 2 - 1 / 16 and v.min() == -2


def test_kmeans_keeps_zeros_and_uses_few_levels():
    w = W.clone()
    w[w.abs() < 0.5] = 0  # pruned
    for init in ("linear", "k-means++"):
        q = quantize_tensor(w, KMeans(bits=3, init=init))
        v = q.dequantize()
        assert torch.equal(v == 0, w == 0)  # sparsity survives exactly
        assert len(torch.unique(v)) <= 8 and q.codebook[0] == 0


def test_naive_and_dorefa():
    q = quantize_tensor(W, Naive())
    assert q.bits == 8 and q.scale.ndim == 0
    d = quantize_tensor(W, DoReFa(bits=2)).dequantize()
    levels = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0])
    assert (d.flatten()[:, None] - levels).abs().min(dim=1).values.max() < 1e-6


@pytest.mark.parametrize("make", [
    lambda: Linear(bits=1), lambda: Linear(bits=17), lambda: KMeans(bits=9),
    lambda: FixedPoint(int_bits=0), lambda: FixedPoint(int_bits=20, frac_bits=20),
    lambda: KMeans(init="kmeans"), lambda: QAT(weight_bits=12), lambda: QAT(act_bits=1),
])
def test_unsupported_bit_widths_and_options(make):
    with pytest.raises(ConfigError):
        make()


def test_quantize_model_config_forms_and_errors():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    q = quantize(m, KMeans(bits=4))
    assert set(q.tensors) == {"0.weight", "3.weight"}
    assert not torch.equal(m[0].weight, q.model[0].weight)  # the original is untouched
    q = quantize(m, [{"quant": "linear", "op_types": ["default"]},
                     {"quant": {"scheme": "kmeans", "bits": 2}, "op_names": ["3"]},
                     {"exclude": True, "op_types": ["Conv2d"]}])
    assert set(q.tensors) == {"3.weight"} and q.tensors["3.weight"].scheme == "kmeans"
    q = quantize(m, {"0": FixedPoint(2, 5)})
    assert set(q.tensors) == {"0.weight"}
    with pytest.raises(RegistryError, match="Did you mean 'kmeans'"):
        quantize(m, "kmean")
    with pytest.raises(ConfigError, match="no module '4'"):
        quantize(m, {"4": Linear()})


def test_kmeans_centroid_gradient_is_the_sum_of_its_weights_gradients():
    m = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[0.0, 1.0, 1.0, 2.0]]))
    q = quantize(m, KMeans(bits=2))  # levels {0, 1, 2}
    (c,) = q.share_weights()
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    q.model(x).sum().backward()
    book = q.tensors["weight"].codebook
    one, two = int((book == 1).nonzero()), int((book == 2).nonzero())
    assert float(c.grad[one]) == 2 + 3 and float(c.grad[two]) == 4
    assert float(c.grad[0]) == 0  # the zero centroid (pruned weights) is not trained
    with torch.no_grad():
        c -= 0.1 * c.grad
    q.freeze()
    assert float(q.model.weight[0, 0]) == 0.0 and float(q.model.weight[0, 1]) == pytest.approx(0.5)


def test_qat_fake_quantizes_and_learns():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 6 * 6, 2)).eval()
    x = torch.randn(16, 1, 8, 8)
    q = prepare_qat(m, x[:1], QAT(), calibration=x)
    assert isinstance(q[1], nn.Identity)  # BatchNorm folded
    layer = q[0]
    w = layer.quant_weight().detach()
    scale = layer.weight_scale()
    steps = w / scale.view(-1, 1, 1, 1)
    assert torch.allclose(steps, steps.round(), atol=1e-4)  # on the int8 grid
    y = q(x)
    assert y.shape == (16, 2)
    q.train()
    loss = q(x).pow(2).mean()
    loss.backward()
    assert layer.layer.weight.grad is not None and layer.layer.weight.grad.abs().sum() > 0


def test_kmeans_relabel_moves_labels_and_keeps_zeros():
    torch.manual_seed(0)
    m = nn.Linear(16, 2, bias=False)
    with torch.no_grad():
        m.weight[:, :4] = 0
    q = quantize(m, KMeans(bits=2))
    q.share_weights(relabel=True)
    opt = torch.optim.SGD(q.model.parameters(), lr=0.5)
    x = torch.randn(32, 16)
    target = torch.randn(32, 2) * 3
    for _ in range(30):
        opt.zero_grad()
        (q.model(x) - target).pow(2).mean().backward()
        opt.step()
    q.freeze()
    w = q.model.weight.detach()
    assert (w[:, :4] == 0).all()  # pruned weights stayed pruned
    assert len(torch.unique(w)) <= 4
    assert torch.equal(q.tensors["weight"].dequantize(), w)  # codes follow the new labels
