"""Quantization-aware training without ``torch.ao``: fake quantization of weights and
activations with a straight-through estimator (Jacob et al., CVPR 2018), or DoReFa-Net's
quantizers (Zhou et al. 2016).

``prepare_qat(model, x)`` returns a copy in which BatchNorm is folded into the preceding layers
(running statistics) and every Conv/Linear becomes a ``QATLayer``: its input is fake-quantized
per tensor (uint8, range from an exponential moving average observer) and its weight per output
channel (int8 symmetric, range from the current weights). Train it with any loop; then
``export_onnx`` writes QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into
QLinearConv/QGemm, and ``int8_initializers`` stores the weights as int8 in the file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class QAT:
    """Fake-quantization settings of ``prepare_qat``: ``scheme`` 'linear' (int8-style: symmetric
    weights, per output channel with ``per_channel``, and affine activations from observers) or
    'dorefa'; bits for weights and activations; EMA ``momentum`` of the activation observers;
    ``fold_bn`` folds BatchNorm into the preceding layers first.

    Example:
        >>> qat = prepare_qat(model, x, QAT(weight_bits=8, act_bits=8, per_channel=False))

    Raises:
        ConfigError: bits that are not an int in [2, 16] (at most 8 with the 'linear' scheme,
            which exports to ONNX int8), an unknown ``scheme``, or ``momentum`` outside (0, 1].
    """

    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = True
    scheme: str = "linear"
    momentum: float = 0.01
    fold_bn: bool = True

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 16:
                raise ConfigError(f"The '{name}' parameter of QAT must be an int in [2, 16]. "
                                  f"Got {v!r} instead.")
        if self.scheme not in ("linear", "dorefa"):
            raise ConfigError(f"The 'scheme' parameter of QAT must be 'linear' or 'dorefa'. Got "
                              f"{self.scheme!r} instead.")
        if self.scheme == "linear" and (self.weight_bits > 8 or self.act_bits > 8):
            raise ConfigError("QAT(scheme='linear') exports to ONNX int8: weight_bits and act_bits "
                              "must be at most 8.")
        if not 0 < self.momentum <= 1:
            raise ConfigError(f"The 'momentum' parameter of QAT must be in (0, 1]. Got "
                              f"{self.momentum!r} instead.")


class _Ste(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int) -> torch.Tensor:
        n = (1 << k) - 1
        return torch.round(x * n) / n

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


def dorefa_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    t = torch.tanh(w)
    return 2 * _Ste.apply(t / (2 * t.abs().max().detach().clamp_min(1e-12)) + 0.5, bits) - 1


class ActObserver(nn.Module):
    """Running min/max of a tensor (EMA after the first batch); uint8 affine parameters."""

    def __init__(self, bits: int, momentum: float):
        super().__init__()
        self.bits, self.momentum = bits, momentum
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("seen", torch.tensor(False))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
        if not bool(self.seen):
            self.lo.copy_(lo)
            self.hi.copy_(hi)
            self.seen.fill_(True)
        else:
            self.lo.lerp_(lo, self.momentum)
            self.hi.lerp_(hi, self.momentum)

    def qparams(self) -> tuple[float, int]:
        qmax = (1 << self.bits) - 1
        lo, hi = float(self.lo), float(self.hi)
        scale = (hi - lo) / qmax if hi > lo else 1.0
        zp = int(min(qmax, max(0, round(-lo / scale))))
        return scale, zp


class QATLayer(nn.Module):
    """A Conv/Linear with fake-quantized input and weight (the wrapped layer is ``layer``).
    In training mode the activation observer (``act``) tracks the input range; in eval mode the
    weight scale is frozen, so an exported graph holds it as a constant. ``prepare_qat`` puts
    these in for you.

    Example:
        >>> layer = QATLayer(nn.Linear(16, 4), QAT())
        >>> layer(torch.rand(2, 16)).shape      # the input and weight seen on the int8 grid
        torch.Size([2, 4])
    """

    def __init__(self, layer: nn.Module, cfg: QAT):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        self.act = ActObserver(cfg.act_bits, cfg.momentum)
        self._frozen: torch.Tensor | None = None

    def weight_scale(self) -> torch.Tensor:
        w, qmax = self.layer.weight.detach(), (1 << (self.cfg.weight_bits - 1)) - 1
        amax = (w.abs().reshape(w.shape[0], -1).amax(dim=1) if self.cfg.per_channel
                else w.abs().max())
        return torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).float()

    def quant_weight(self) -> torch.Tensor:
        w, cfg = self.layer.weight, self.cfg
        if cfg.scheme == "dorefa":
            return dorefa_weight(w, cfg.weight_bits)
        qmax = (1 << (cfg.weight_bits - 1)) - 1
        # in eval mode the scale is a constant (so an exported graph holds it as an initializer)
        scale = self.weight_scale() if self.training or self._frozen is None else self._frozen
        # the range is [-2^(b-1), 2^(b-1)-1] (what ONNX int8 allows); the symmetric scale maps
        # the largest weight to 2^(b-1)-1, so -2^(b-1) is never produced
        if cfg.per_channel:
            return torch.fake_quantize_per_channel_affine(
                w, scale, torch.zeros_like(scale, dtype=torch.int32), 0, -qmax - 1, qmax)
        return torch.fake_quantize_per_tensor_affine(w, float(scale), 0, -qmax - 1, qmax)

    def train(self, mode: bool = True) -> QATLayer:
        super().train(mode)
        self._frozen = None if mode else self.weight_scale()
        return self

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.scheme == "dorefa":
            return _Ste.apply(torch.clamp(x, 0, 1), self.cfg.act_bits)
        if self.training:
            self.act.observe(x)
        elif not bool(self.act.seen):
            return x
        scale, zp = self.act.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, (1 << self.cfg.act_bits) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quant_weight()
        x = self.quant_input(x)
        m = self.layer
        if isinstance(m, nn.Linear):
            return nn.functional.linear(x, w, m.bias)
        return m._conv_forward(x, w, m.bias)


def prepare_qat(model: nn.Module, example_inputs: Any, cfg: QAT | None = None,
                calibration: Any = None) -> nn.Module:
    """A copy of ``model`` ready for quantization-aware training (see the module docstring):
    BatchNorm folded (with ``cfg.fold_bn``), every Conv/Linear a ``QATLayer``; returned in eval
    mode. With ``calibration`` batches, the activation observers are initialised on them.

    Example:
        >>> qat = prepare_qat(model, x, QAT(), calibration=x_train[:256])
        >>> ...                                 # train qat.train() with your own loop
        >>> graphprune.export_onnx(qat, x, "model_int8.onnx")   # QDQ nodes, int8 weights

    Raises:
        TraceError: the model cannot be traced to fold its BatchNorm (pass
            ``QAT(fold_bn=False)``).
        InputError: ``example_inputs`` or a calibration batch do not fit the model.
        ConfigError: ``calibration`` is neither a tensor, an iterable of batches nor a DataLoader.
    """
    cfg = cfg or QAT()
    if cfg.fold_bn:
        from ..fold import fold_batchnorm

        model = fold_batchnorm(model, example_inputs)
    else:
        model = copy.deepcopy(model)
    for m in list(model.modules()):
        for cname, child in list(m.named_children()):
            if isinstance(child, _LAYERS):
                setattr(m, cname, QATLayer(child, cfg))
    if calibration is not None:
        from ..calibration import as_calibration

        model.train()
        with torch.no_grad():
            for xs, _ in as_calibration(calibration, example_inputs):
                model(*xs)
    model.eval()
    return model


def has_qat(model: nn.Module) -> bool:
    return any(isinstance(m, QATLayer) for m in model.modules())


def strip_qat(model: nn.Module) -> nn.Module:
    """A copy where every ``QATLayer`` is replaced by its plain layer holding the quantized
    weights (on the int8 grid): what onnxruntime's static quantization then maps exactly.
    ``export_onnx(..., quantize="int8")`` calls it for you.

    Example:
        >>> plain = strip_qat(qat)              # plain layers again, in eval mode
        >>> any(isinstance(m, QATLayer) for m in plain.modules())
        False
    """
    model = copy.deepcopy(model).eval()
    for m in list(model.modules()):
        for name, child in list(m.named_children()):
            if isinstance(child, QATLayer):
                with torch.no_grad():
                    child.layer.weight.copy_(child.quant_weight())
                setattr(m, name, child.layer)
    return model


def int8_initializers(path: str) -> int:
    """Rewrite QuantizeLinear nodes whose input is a constant weight as int8 initializers feeding
    their DequantizeLinear directly (the file then stores int8 weights). Returns how many."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(path)
    inits = {i.name: i for i in m.graph.initializer}
    consts = {}
    for n in m.graph.node:  # Constant nodes carry the scales of the legacy exporter
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def value(name: str):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        return consts.get(name)

    done = 0
    keep_nodes = []
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in inits:
            w = numpy_helper.to_array(inits[n.input[0]]).astype(np.float32)
            scale = value(n.input[1])
            zp = value(n.input[2]) if len(n.input) > 2 else np.zeros((), dtype=np.int8)
            if scale is None or zp is None:
                keep_nodes.append(n)
                continue
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * w.ndim
            if scale.ndim == 1 and scale.size > 1:
                shape[axis] = -1
            info = np.iinfo(zp.dtype)
            q = np.clip(np.round(w / scale.reshape(shape)) + zp.astype(np.int64).reshape(shape),
                        info.min, info.max).astype(zp.dtype)
            t = numpy_helper.from_array(q, name=n.output[0])
            m.graph.initializer.append(t)
            done += 1
            continue
        keep_nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep_nodes)
    used = {x for n in m.graph.node for x in n.input} | {o.name for o in m.graph.output}
    kept = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    onnx.save(m, path)
    return done
