"""torchvision classification models (weights=None) prune correctly.

The default tier runs a representative subset at 64x64; ``make zoo`` (marker ``zoo``) runs every
classification model torchvision lists, at 0.3 and 0.7.
"""

import pytest
import torch

from ..conftest import healthy_init
from .common import check_prunes

tv = pytest.importorskip("torchvision")

FAST = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1",
        "regnet_x_400mf", "efficientnet_b0", "densenet121", "googlenet", "mnasnet0_5",
        "convnext_tiny"]
# models whose input size is fixed by their architecture
SIZE = {"vit_b_16": 224, "vit_b_32": 224, "vit_l_16": 224, "vit_l_32": 224, "vit_h_14": 224,
        "swin_t": 224, "swin_s": 224, "swin_b": 224, "swin_v2_t": 256, "swin_v2_s": 256,
        "swin_v2_b": 256, "maxvit_t": 224, "inception_v3": 299}


def _model(name):
    torch.manual_seed(0)
    return healthy_init(tv.models.get_model(name, weights=None).eval())


@pytest.mark.slow
@pytest.mark.parametrize("name", FAST)
def test_torchvision_fast_tier(name):
    model = _model(name)
    x = torch.randn(2, 3, 64, 64)
    for sparsity in (0.3, 0.7):
        check_prunes(model, x, sparsity)


# models over ~80M parameters run one at a time on one worker (``--dist loadgroup``): two of them
# side by side, each with its pruned, rebuilt and masked copies, do not fit in 24 GB
HUGE = {"vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32", "regnet_y_32gf", "regnet_x_32gf",
        "regnet_y_16gf", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
        "vgg19_bn", "wide_resnet101_2", "efficientnet_v2_l", "convnext_large", "convnext_base",
        "swin_b", "swin_v2_b", "vit_b_16", "vit_b_32", "resnext101_32x8d", "resnext101_64x4d"}
ALL = [pytest.param(n, marks=pytest.mark.xdist_group("huge")) if n in HUGE else n
       for n in tv.models.list_models(module=tv.models)]


@pytest.mark.zoo
@pytest.mark.parametrize("sparsity", [0.3, 0.7])
@pytest.mark.parametrize("name", ALL)
def test_torchvision_zoo(name, sparsity):
    model = _model(name)
    s = SIZE.get(name, 224)
    x = torch.randn(1, 3, s, s)
    check_prunes(model, x, sparsity)
