"""The module table of the rule conformance suite: one one-op case per module class with a channel
rule (``graphprune.rules.registered()["modules"]``), and the registered classes exempted."""

from __future__ import annotations

import torch
from torch import nn

from .cases import Case, first_output, make, module_case, optional


def _mha(n: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = n.a(x)
    return n.mid(h, h, h, need_weights=False)[0]


def _cell(n: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h, state = n.a(x), None
    for t in range(5):  # the (2, 5, 6) input, unrolled
        state = n.mid(h[:, t], state)
    return state[0] if isinstance(n.mid, nn.LSTMCell) else state


def _roi_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """An image batch (2, 3, 6, 6) and four boxes (batch index, x1, y1, x2, y2) in its pixels."""
    g = torch.Generator().manual_seed(7)
    rois = torch.tensor([[0, 0.0, 0.0, 4.0, 4.0], [0, 1.0, 2.0, 5.5, 6.0],
                         [1, 0.5, 0.5, 3.0, 5.0], [1, 2.0, 1.0, 6.0, 4.5]])
    return torch.randn(2, 3, 6, 6, generator=g), rois


def _roi(n: nn.Module, x: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    return n.mid(n.a(x), rois)


def _multiscale_roi(n: nn.Module, x: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    """Two levels (6x6 and 3x3, on a 24x24 image) and a third one the module does not pool."""
    feats = {"0": n.a(x), "1": torch.nn.functional.max_pool2d(n.b(x), 2), "pool": n.c(x)}
    return n.mid(feats, [rois[:2, 1:] * 4, rois[2:, 1:] * 4], [(24, 24), (24, 24)])


def _encoder_layer() -> nn.Module:
    return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)


def _encoder() -> nn.Module:
    return nn.TransformerEncoder(_encoder_layer(), 2, enable_nested_tensor=False)


_ELEMENTWISE = [
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.RReLU, nn.Dropout,
    nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout,
]

MODULE_CASES: dict[type | str, Case] = {
    **{cls: module_case(cls) for cls in _ELEMENTWISE},
    nn.Threshold: module_case(make(nn.Threshold, 0.1, -1.0)),
    nn.Dropout1d: module_case(nn.Dropout1d, "ncl"),
    nn.Dropout3d: module_case(nn.Dropout3d, "ncdhw"),
    nn.PReLU: module_case(make(nn.PReLU, 8)),
    nn.Softmax: module_case(make(nn.Softmax, -1)),  # over a spatial dim: channels stay independent
    nn.LogSoftmax: module_case(make(nn.LogSoftmax, -1)),
    nn.Softmin: module_case(make(nn.Softmin, -1)),
    # layers: in and out channels of the module itself
    nn.Conv1d: module_case(make(nn.Conv1d, 8, 8, 3, padding=1), "ncl"),
    nn.Conv2d: module_case(make(nn.Conv2d, 8, 8, 3, padding=1, groups=2)),
    nn.Conv3d: module_case(make(nn.Conv3d, 8, 8, 3, padding=1), "ncdhw"),
    nn.ConvTranspose1d: module_case(make(nn.ConvTranspose1d, 8, 6, 2, stride=2), "ncl"),
    nn.ConvTranspose2d: module_case(make(nn.ConvTranspose2d, 8, 6, 3, stride=2, padding=1)),
    nn.ConvTranspose3d: module_case(make(nn.ConvTranspose3d, 8, 6, 2, stride=2), "ncdhw"),
    nn.Linear: module_case(make(nn.Linear, 8, 10), "nlc"),
    nn.Embedding: Case(lambda n, x: n.mid(x), make(nn.Embedding, 20, 8), "tokens"),
    # norms
    nn.BatchNorm1d: module_case(make(nn.BatchNorm1d, 8), "nc"),
    nn.BatchNorm2d: module_case(make(nn.BatchNorm2d, 8)),
    nn.BatchNorm3d: module_case(make(nn.BatchNorm3d, 8), "ncdhw"),
    nn.SyncBatchNorm: module_case(make(nn.SyncBatchNorm, 8)),
    nn.InstanceNorm1d: module_case(make(nn.InstanceNorm1d, 8, affine=True), "ncl"),
    nn.InstanceNorm2d: module_case(make(nn.InstanceNorm2d, 8, affine=True)),
    nn.InstanceNorm3d: module_case(make(nn.InstanceNorm3d, 8, affine=True), "ncdhw"),
    nn.GroupNorm: module_case(make(nn.GroupNorm, 4, 16), width=16),  # whole groups go
    nn.LayerNorm: module_case(make(nn.LayerNorm, 8), "nlc"),  # value-coupled
    nn.RMSNorm: module_case(make(nn.RMSNorm, 8), "nlc"),  # value-coupled
    # spatial: pooling, padding, resampling
    nn.MaxPool1d: module_case(make(nn.MaxPool1d, 2), "ncl"),
    nn.AvgPool1d: module_case(make(nn.AvgPool1d, 2), "ncl"),
    nn.AdaptiveAvgPool1d: module_case(make(nn.AdaptiveAvgPool1d, 3), "ncl"),
    nn.AdaptiveMaxPool1d: module_case(make(nn.AdaptiveMaxPool1d, 3), "ncl"),
    nn.LPPool1d: module_case(make(nn.LPPool1d, 2, 2), "ncl"),
    nn.MaxPool2d: module_case(make(nn.MaxPool2d, 2)),
    nn.AvgPool2d: module_case(make(nn.AvgPool2d, 3, stride=1, padding=1)),
    nn.AdaptiveAvgPool2d: module_case(make(nn.AdaptiveAvgPool2d, 1)),
    nn.AdaptiveMaxPool2d: module_case(make(nn.AdaptiveMaxPool2d, (2, 3))),
    nn.LPPool2d: module_case(make(nn.LPPool2d, 2, 2)),
    # output = input / kernel: the pseudo-random pooling regions are the same on every call
    nn.FractionalMaxPool2d: module_case(make(nn.FractionalMaxPool2d, 2, output_size=3)),
    nn.FractionalMaxPool3d: module_case(make(nn.FractionalMaxPool3d, 2, output_size=2), "ncdhw"),
    nn.MaxPool3d: module_case(make(nn.MaxPool3d, 2), "ncdhw"),
    nn.AvgPool3d: module_case(make(nn.AvgPool3d, 2), "ncdhw"),
    nn.AdaptiveAvgPool3d: module_case(make(nn.AdaptiveAvgPool3d, 1), "ncdhw"),
    nn.AdaptiveMaxPool3d: module_case(make(nn.AdaptiveMaxPool3d, 2), "ncdhw"),
    nn.UpsamplingNearest2d: module_case(make(nn.UpsamplingNearest2d, scale_factor=2)),
    nn.UpsamplingBilinear2d: module_case(make(nn.UpsamplingBilinear2d, scale_factor=2)),
    nn.Upsample: module_case(make(nn.Upsample, scale_factor=2, mode="bilinear")),
    **{cls: module_case(make(cls, 1), lay) for lay, classes in (
        ("ncl", (nn.ZeroPad1d, nn.ReflectionPad1d, nn.ReplicationPad1d, nn.CircularPad1d)),
        ("nchw", (nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d)),
        ("ncdhw", (nn.ZeroPad3d, nn.ReflectionPad3d, nn.ReplicationPad3d, nn.CircularPad3d)),
    ) for cls in classes},
    nn.ConstantPad1d: module_case(make(nn.ConstantPad1d, (1, 2), 0.5), "ncl"),
    nn.ConstantPad2d: module_case(make(nn.ConstantPad2d, 1, -0.5)),
    nn.ConstantPad3d: module_case(make(nn.ConstantPad3d, 1, 0.5), "ncdhw"),
    # reshaping
    nn.Flatten: module_case(nn.Flatten),  # (B, C*H*W) into a Linear: each channel a block of 36
    nn.Unflatten: Case(lambda n, x: n.mid(n.a(x)), make(nn.Unflatten, 2, (2, 4)), "ncl"),
    nn.PixelShuffle: module_case(make(nn.PixelShuffle, 2), width=16),
    nn.PixelUnshuffle: module_case(make(nn.PixelUnshuffle, 2)),
    nn.ChannelShuffle: module_case(make(nn.ChannelShuffle, 2)),
    # attention
    nn.MultiheadAttention: Case(_mha, make(nn.MultiheadAttention, 8, 2, batch_first=True),
                                "nlc"),
    nn.TransformerEncoderLayer: module_case(_encoder_layer, "nlc"),
    nn.TransformerEncoder: module_case(_encoder, "nlc"),
    # recurrent layers and cells
    nn.LSTM: first_output(make(nn.LSTM, 8, 6, batch_first=True), "nlc"),
    nn.GRU: first_output(make(nn.GRU, 8, 6, num_layers=2, bidirectional=True), "nlc"),
    nn.RNN: first_output(make(nn.RNN, 8, 6, batch_first=True, nonlinearity="relu"), "nlc"),
    nn.LSTMCell: Case(_cell, make(nn.LSTMCell, 8, 6), "nlc"),
    nn.GRUCell: Case(_cell, make(nn.GRUCell, 8, 6), "nlc"),
    nn.RNNCell: Case(_cell, make(nn.RNNCell, 8, 6), "nlc"),
    # classes of optional libraries, registered by dotted name
    # torchvision's RoI pooling (box / mask heads of detectors): (K, C, h, w) with the input's C
    "torchvision.ops.roi_align.RoIAlign": Case(
        _roi, optional("torchvision.ops.RoIAlign", 2, 1.0, 2, aligned=True), inputs=_roi_inputs),
    "torchvision.ops.roi_pool.RoIPool": Case(
        _roi, optional("torchvision.ops.RoIPool", 2, 1.0), inputs=_roi_inputs),
    # every pooled level is one channel axis; the level it does not pool ('pool') stays free
    "torchvision.ops.poolers.MultiScaleRoIAlign": Case(
        _multiscale_roi, optional("torchvision.ops.MultiScaleRoIAlign", ["0", "1"], 2, 2),
        inputs=_roi_inputs),
    # position-sensitive: output channel c pools input channels c*h*w .. (c+1)*h*w - 1 -> frozen
    **{f"torchvision.ops.{mod}.{cls}": Case(
        _roi, optional(f"torchvision.ops.{cls}", 2, 1.0, *extra), inputs=_roi_inputs,
        prunes=False, freezes="position-sensitive RoI pooling")
       for mod, cls, extra in (("ps_roi_align", "PSRoIAlign", (2,)), ("ps_roi_pool", "PSRoIPool", ()))},
    "transformers.pytorch_utils.Conv1D": module_case(optional("transformers.pytorch_utils.Conv1D", 10, 8),
                                              "nlc"),
}

# Registered module classes (from graphprune's own rules) that have no one-op case, and why.
MODULE_EXEMPT: dict[str, str] = {
    "torch.nn.modules.rnn.RNNBase": "abstract base: covered through nn.LSTM, nn.GRU and nn.RNN",
    "torch.nn.modules.rnn.RNNCellBase": "abstract base: covered through nn.LSTMCell, nn.GRUCell "
                                        "and nn.RNNCell",
}
