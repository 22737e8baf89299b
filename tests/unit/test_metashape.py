"""Stage 1's shape run on meta tensors must record exactly what the real run records."""

import importlib
import itertools

import pytest
import torch
import torchvision
from torch import nn

from tests.unit import nets

T = importlib.import_module("graphprune.trace")


def _both(model, x):
    model.eval()
    args, kwargs = T.normalize_inputs(x)
    with T.preserved_state(model, "eval"):
        root, graph, _, _ = T.symbolic_trace(model)
        real = T.record_values(root, graph, args, kwargs)
        meta = T.record_values(root, graph, args, kwargs, meta=True)
    return graph, real, meta


class Hooked(nn.Module):
    """A stock layer with a hook (the shortcut must step aside) and a constant fetched by fx."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.bn.register_forward_hook(lambda m, i, o: o[:, :4])
        self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))

    def forward(self, x):
        return self.bn(self.c(x)) * self.scale


@pytest.mark.parametrize("make,shape", [
    (lambda: torchvision.models.mobilenet_v2(), (1, 3, 64, 64)),
    (lambda: torchvision.models.resnet18(), (2, 3, 48, 64)),
    (lambda: torchvision.models.efficientnet_b0(), (1, 3, 64, 64)),
    (lambda: torchvision.models.convnext_tiny(), (1, 3, 64, 64)),
    (nets.Tied, (2, 5)), (nets.Twice, (1, 3, 8, 8)), (nets.Unknown, (1, 3, 8, 8)), (nets.SE, (1, 3, 8, 8)),
    (nets.ChannelsLast, (1, 3, 8, 8)), (Hooked, (1, 3, 8, 8)),
], ids=["mobilenet_v2", "resnet18", "efficientnet_b0", "convnext_tiny", "tied", "twice", "unknown", "se",
        "channels_last", "hooked"])
def test_meta_run_records_what_the_real_run_records(make, shape):
    torch.manual_seed(0)
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 20, shape) if make is nets.Tied else torch.randn(shape)
    graph, real, meta = _both(model, x)
    assert [n.name for n in real] == [n.name for n in meta] == [n.name for n in graph.nodes]
    for n in graph.nodes:
        assert real[n] == meta[n], (n.name, real[n], meta[n])
    # the meta run never touches (nor copies into) the real tensors
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_shape_formula_matches_the_kernel():
    """The Conv2d shortcut's output size against real ``nn.Conv2d`` over strides, paddings,
    dilations, groups and odd sizes."""
    from graphprune._metashape import shape_only_call

    checked = 0
    for k, s, p, d, g, size in itertools.product((1, 3, 4), (1, 2, 3), (0, 1, 2, "same", "valid"),
                                                 (1, 2), (1, 2), (5, 8, 11)):
        if p == "same" and s != 1:
            continue
        conv = nn.Conv2d(4, 6, k, stride=s, padding=p, dilation=d, groups=g)
        x = torch.randn(2, 4, size, size + 1)
        try:
            want = tuple(conv(x).shape)
        except RuntimeError:
            want = None
        got = shape_only_call(conv, (x.to("meta"),), {})
        if got is not None:
            assert want is not None and tuple(got.shape) == want, (k, s, p, d, g, size)
            assert got.device.type == "meta"
            checked += 1
    assert checked > 300
