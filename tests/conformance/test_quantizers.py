"""Conformance of every weight quantizer registered in ``graphprune.quantize`` (the handler table
of ``schemes.py``, read at collection time: a scheme added later is checked with its default
config) and of quantization-aware training:

- every quantized weight lies on its scheme's grid: the model holds exactly
  ``QuantizedTensor.dequantize()``, with at most ``2**bits`` codes and values per tensor (per
  output channel for per-channel scales);
- zeros stay exactly zero where the scheme promises it (a pruned model stays pruned);
- quantizing the quantized model again changes no weight;
- the quantized model runs and keeps its output shape.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphprune import quantize as gq
from graphprune.quantize.configs import CONFIGS
from graphprune.quantize.schemes import _HANDLERS

# Does the scheme keep an exact 0.0 exactly zero? Every handler must say (a new scheme without an
# entry fails test_every_scheme_declares_its_zero_promise).
KEEPS_ZEROS = {
    gq.Linear: lambda cfg: True,  # symmetric: zero point 0; affine: the zero point makes 0.0 exact
    gq.Naive: lambda cfg: True,
    gq.FixedPoint: lambda cfg: True,
    gq.KMeans: lambda cfg: cfg.keep_zeros,
    gq.DoReFa: lambda cfg: False,  # tanh-normalised to [-1, 1]: 0.0 is not a level
}

# Default config of every registered scheme, plus low-bit variants where the grid is a real
# constraint on these small layers (8 bits = 256 levels would pass trivially on a 3x3 conv).
CONFIGS_UNDER_TEST = [cls() for cls in _HANDLERS] + [
    gq.Linear(bits=3), gq.Linear(bits=4, per_channel=False), gq.Linear(bits=5, symmetric=False),
    gq.Linear(bits=4, per_channel=False, symmetric=False), gq.FixedPoint(int_bits=2, frac_bits=2),
    gq.KMeans(bits=2), gq.KMeans(bits=3, init="k-means++", keep_zeros=False),
    gq.KMeans(bits=2, init="random"), gq.DoReFa(bits=2),
]

DOREFA_NOT_A_PROJECTION = (
    "DoReFa re-applies tanh and max|tanh| normalisation to weights already on its grid "
    "{2k/(2^b-1) - 1}, so quantize(quantize(w)) moves them: at bits=4 about a third of the entries "
    "move by one level, at bits=8 by up to 14 levels (bits <= 3 happen to be stable)")


def _case_id(cfg) -> str:
    fields = ",".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg))
    return f"{type(cfg).__name__}({fields})"


class Net(nn.Module):
    """Conv (out axis 0), ConvTranspose (out axis 1), Linear; a third of every weight is zero."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.fc = nn.Linear(6, 40)
        self.fc2 = nn.Linear(40, 32)  # 1,280 weights: more than 2**8 levels could hold

    def forward(self, x):
        h = F.relu(self.up(F.relu(self.conv(x)))).mean((2, 3))
        return self.fc2(F.relu(self.fc(h)))


X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = Net().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_((torch.rand(p.shape, generator=g) > 0.3).to(p.dtype))
    return m


def _channels(w: torch.Tensor, axis: int | None) -> list[torch.Tensor]:
    return [w] if axis is None else list(w.movedim(axis, 0))


@pytest.mark.parametrize("cfg", CONFIGS_UNDER_TEST, ids=_case_id)
def test_quantized_weights_lie_on_the_grid(cfg):
    model = _model()
    q = gq.quantize(model, cfg)
    assert set(q.tensors) == {"conv.weight", "up.weight", "fc.weight", "fc2.weight"}
    levels = 1 << cfg.bits
    for name, t in q.tensors.items():
        w = q.model.get_parameter(name)
        assert t.codes.shape == w.shape and not t.codes.dtype.is_floating_point, name
        assert torch.equal(w, t.dequantize().to(w.dtype)), f"{name} is not its codes' values"
        for ch_codes, ch_vals in zip(_channels(t.codes, t.axis), _channels(w, t.axis)):
            assert ch_codes.unique().numel() <= levels, name
            assert ch_vals.unique().numel() <= levels, f"{name}: more than {levels} values"
            assert int(ch_codes.max() - ch_codes.min()) < levels, f"{name}: codes span > {levels}"
        if t.axis is not None:
            assert t.axis == (1 if name == "up.weight" else 0), f"{name}: wrong channel axis"
        zeros = model.get_parameter(name) == 0
        if KEEPS_ZEROS[type(cfg)](cfg):
            assert bool((w[zeros] == 0).all()), f"{name}: {type(cfg).__name__} moved a zero"
    # the caller's model is untouched, the quantized one runs
    assert not torch.equal(model.fc2.weight, q.model.fc2.weight)
    with torch.no_grad():
        y0, y1 = model(X), q.model(X)
    assert y1.shape == y0.shape and torch.isfinite(y1).all()


@pytest.mark.parametrize("cfg", [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=DOREFA_NOT_A_PROJECTION))
    if isinstance(c, gq.DoReFa) and c.bits >= 4 else c for c in CONFIGS_UNDER_TEST
], ids=_case_id)
def test_quantizing_twice_changes_nothing(cfg):
    q = gq.quantize(_model(), cfg)
    again = gq.quantize(q.model, cfg)
    for name in q.tensors:
        a, b = q.model.get_parameter(name), again.model.get_parameter(name)
        # the values are the same to float32 rounding of a recomputed scale (affine per-channel
        # scales come back within an ulp); no entry may move to another level
        tol = 4 * torch.finfo(torch.float32).eps * float(a.detach().abs().max())
        moved = int(((a - b).abs() > tol).sum())
        assert moved == 0, f"{name}: {moved} of {a.numel()} weights changed when quantized again"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_scheme_is_reachable_by_name(name):
    q = gq.quantize(_model(), name)
    assert {t.scheme for t in q.tensors.values()} == {name}
    with torch.no_grad():
        assert q.model(X).shape == (2, 32)


def test_every_scheme_declares_its_zero_promise():
    assert set(CONFIGS.values()) == set(_HANDLERS), "a config without a handler, or the reverse"
    missing = [c.__name__ for c in _HANDLERS if c not in KEEPS_ZEROS]
    assert not missing, f"add these schemes to KEEPS_ZEROS: {missing}"
    assert {type(c) for c in CONFIGS_UNDER_TEST} == set(_HANDLERS)


# ---------------------------------------------------------------------- quantization-aware training
QAT_CONFIGS = [gq.QAT(), gq.QAT(weight_bits=4, act_bits=8), gq.QAT(weight_bits=3, per_channel=False),
               gq.QAT(scheme="dorefa", weight_bits=2, act_bits=4)]


@pytest.mark.parametrize("cfg", QAT_CONFIGS, ids=_case_id)
def test_qat_weights_lie_on_the_grid_and_are_stable(cfg):
    model = _model()
    qat = gq.prepare_qat(model, X, cfg, calibration=torch.randn(8, 3, 6, 6))
    with torch.no_grad():
        y0, y1 = model(X), qat(X)
    assert y1.shape == y0.shape and torch.isfinite(y1).all()
    plain = gq.strip_qat(qat)
    levels = 1 << cfg.weight_bits
    for name in ("conv.weight", "fc.weight", "fc2.weight"):
        w = plain.get_parameter(name)
        for ch in _channels(w, 0 if cfg.per_channel and cfg.scheme == "linear" else None):
            assert ch.unique().numel() <= levels, f"{name}: more than {levels} values"
        if cfg.scheme == "linear":  # symmetric: zeros stay zero
            assert bool((w[model.get_parameter(name) == 0] == 0).all()), name
    # fake-quantizing the quantized weights again changes nothing
    again = gq.strip_qat(gq.prepare_qat(plain, X, dataclasses.replace(cfg, fold_bn=False)))
    for name, w in plain.named_parameters():
        if name.endswith("weight") and not name.startswith("up."):
            tol = 4 * torch.finfo(torch.float32).eps * float(w.detach().abs().max())
            assert float((again.get_parameter(name) - w).abs().max()) <= tol, name
