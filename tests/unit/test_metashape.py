"""Stage 1's shape run on meta tensors must record exactly what the real run records."""

import importlib
import itertools
import typing

import pytest
import torch
import torchvision
from torch import nn

import graphprune as gp
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


class Pair(typing.NamedTuple):
    image: torch.Tensor
    mask: torch.Tensor


class TakesPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, p):
        return self.c2(torch.relu(self.c1(p.image)) * p.mask)


def test_named_tuple_inputs_are_recorded_on_meta_tensors():
    x = Pair(torch.randn(1, 3, 8, 8), torch.ones(1, 1, 8, 8))
    graph, real, meta = _both(TakesPair(), (x,))
    assert all(real[n] == meta[n] for n in graph.nodes)
    assert gp.trace(TakesPair(), (x,)).traced[0].shapes_on_meta


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


# ---------------------------------------------------------------------- verification stand-ins
S = importlib.import_module("graphprune.apply.shrink")


class _Convs(torch.overrides.TorchFunctionMode):
    """Counts the convolutions and matrix products that really run."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.nn.functional.conv2d, torch.conv2d, torch.nn.functional.linear):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _pruned(model, x):
    g = gp.trace(model, x)
    plan = gp.make_plan(g, sparsity=0.5)
    return g, gp.apply_plan(g, plan, verify=False)


def test_verification_checks_every_layer_without_its_arithmetic():
    torch.manual_seed(0)
    g, app = _pruned(torchvision.models.mobilenet_v2(), torch.randn(1, 3, 64, 64))
    assert g.traced[0].shapes_on_meta
    with _Convs() as mode:
        S.verify_layers(g, app.model, app.shapes)
    assert mode.n == 0  # shapes from attributes: no convolution ran
    assert not any("forward" in m.__dict__ for m in app.model.modules())  # stand-ins removed


def test_verification_stand_ins_still_catch_a_wrong_layer():
    torch.manual_seed(0)
    g, app = _pruned(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    conv = app.model.layer1[0].conv1
    # a layer that produces one channel too few, attributes and all (what a rule bug would give)
    conv.weight = nn.Parameter(conv.weight[:-1].clone())
    conv.out_channels -= 1
    with pytest.raises(gp.errors.ParityError, match=r"no longer runs in layer 'layer1.0.bn1'.*31"):
        S.verify_layers(g, app.model, app.shapes)
    # a wrong width nothing downstream trips over: the layer's own check names it
    g, app = _pruned(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    fc = app.model.fc
    fc.weight, fc.bias = nn.Parameter(fc.weight[:-1].clone()), nn.Parameter(fc.bias[:-1].clone())
    fc.out_features -= 1
    with pytest.raises(gp.errors.ParityError, match=r"layer 'fc'.*999\) but the plan implies"):
        S.verify_layers(g, app.model, app.shapes)
    # a weight sliced without its attributes: the stand-in steps aside and the kernel fails
    g, app = _pruned(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    conv = app.model.layer1[0].conv2
    conv.weight = nn.Parameter(conv.weight[:, :-1].clone())
    with pytest.raises(gp.errors.ParityError, match="no longer runs in layer 'layer1.0.conv2'"):
        S.verify_layers(g, app.model, app.shapes)


def test_models_whose_values_are_read_are_verified_for_real():
    torch.manual_seed(0)
    model = nets.Tied()  # token ids are read: shapes recorded on the real run
    g, app = _pruned(model, torch.randint(0, 20, (2, 5)))
    assert not g.traced[0].shapes_on_meta
    with _Convs() as mode:
        S.verify_layers(g, app.model, app.shapes)
    assert mode.n == 2  # both linear layers really ran


class _ChecksValues(nn.Module):
    """A value check the meta run cannot see (``_assert_async`` is a no-op on meta tensors)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        h = self.act(self.conv1(x))
        torch._assert_async((h >= 0).all(), "relu output must be non-negative")
        return self.conv2(h)


def test_a_value_check_tripped_by_stand_ins_is_decided_by_a_real_run():
    torch.manual_seed(0)
    g, app = _pruned(_ChecksValues().eval(), torch.randn(1, 3, 8, 8))
    assert g.traced[0].shapes_on_meta
    torch.use_deterministic_algorithms(True)  # uninitialised memory is NaN: the check trips
    try:
        with _Convs() as mode:
            S.verify_layers(g, app.model, app.shapes)
    finally:
        torch.use_deterministic_algorithms(False)
    assert mode.n == 2  # the stand-in run failed, the real run decided (and passed)
