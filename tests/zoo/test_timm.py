"""timm models (random init) prune correctly: CNNs, vision transformers, hybrids and MLPs.

``make zoo`` (marker ``zoo``) runs every model below at 50% of the channels: the output shape is
unchanged, parameters and MACs go down, ``apply_masks`` on a fresh copy rebuilds the same model,
and models whose pruned channels are independent in value equal their masked original. Models fx
cannot trace (or only with opaque blocks) go through torch.export; the default tier runs a few,
including both fallbacks.
"""

import pytest
import torch

from ..conftest import healthy_init
from .common import check_prunes

timm = pytest.importorskip("timm")

CNN = [
    "resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "ecaresnet26t", "skresnet18",
    "res2net50_14w_8s", "resnest14d", "regnetx_002", "regnety_002", "regnetz_b16",
    "efficientnet_b0", "efficientnet_lite0", "tf_efficientnet_b0", "mobilenetv2_050",
    "mobilenetv3_small_050", "mobilenetv4_conv_small", "ghostnet_100", "ghostnetv2_100",
    "hardcorenas_a", "mixnet_s", "fbnetc_100", "rexnet_100", "lcnet_050", "densenet121", "dla34",
    "dpn68", "hrnet_w18_small", "cspresnet50", "darknet17", "ese_vovnet19b_dw", "selecsls42b",
    "nf_resnet26", "nfnet_l0", "convnext_atto", "convnextv2_atto", "repvgg_a0", "mobileone_s0",
    "inception_v3", "xception41", "gernet_s", "hgnetv2_b0", "repghostnet_050",
]
TRANSFORMER = [
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
    "swin_tiny_patch4_window7_224", "swinv2_cr_tiny_224", "cait_xxs24_224", "xcit_nano_12_p16_224",
    "pit_ti_224", "tnt_s_patch16_224", "convit_tiny", "crossvit_tiny_240", "nest_tiny",
    "twins_pcpvt_small", "pvt_v2_b0", "eva02_tiny_patch14_224",
]
HYBRID = [
    "levit_128s", "mobilevit_xxs", "mobilevitv2_050", "efficientvit_b0", "edgenext_xx_small",
    "poolformer_s12", "maxvit_nano_rw_256", "coatnet_nano_rw_224", "coat_lite_tiny",
    "tiny_vit_5m_224", "efficientformer_l1", "efficientformerv2_s0", "fastvit_t8", "halonet26t",
    "botnet26t_256", "lambda_resnet26t",
]
MLP = [
    "mixer_s16_224", "resmlp_12_224", "gmlp_ti16_224",
]
# failures would be listed here as pytest.param(name, marks=pytest.mark.xfail(reason=...))
ALL = CNN + TRANSFORMER + HYBRID + MLP
FAST = ["efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224", "mixer_s16_224",
        "crossvit_tiny_240", "mobilevit_xxs"]
# which tracer each fallback model must end up with (the report says why)
EXPORT = {"crossvit_tiny_240", "nest_tiny", "mobilevit_xxs", "mobilevitv2_050", "efficientvit_b0",
          "tiny_vit_5m_224"}


def _model(name):
    torch.manual_seed(0)
    m = healthy_init(timm.create_model(name, pretrained=False).eval())
    return m, torch.randn(1, *m.pretrained_cfg["input_size"])


def _check(name):
    model, x = _model(name)
    r = check_prunes(model, x, 0.5)
    assert r.graph.tracer == ("torch.export" if name in EXPORT else "torch.fx"), r.graph.tracer_reason
    assert r.report.params[1] < 0.95 * r.report.params[0]


def test_the_timm_zoo_spans_at_least_40_models_in_four_families():
    assert len(set(ALL)) == len(ALL) >= 40
    assert min(len(CNN), len(TRANSFORMER), len(HYBRID), len(MLP)) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("name", FAST)
def test_timm_fast_tier(name):
    _check(name)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ALL)
def test_timm_zoo(name):
    _check(name)
