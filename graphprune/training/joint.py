"""Sparsity-quantization joint learning under global budgets (Yang et al., CVPR 2020).

``JointBudget`` is a global projection for ``ADMM`` (one constraint over all the layers it
covers): given a budget of non-zero weights (a fraction of all compressed weights) and an average
bit-width over those non-zeros, it keeps the largest weights across all layers (so each layer's
sparsity is allocated by the budget, not set by hand), then chooses per-layer bit-widths greedily
— from ``max_bits`` down, always lowering the layer whose quantization error grows least per bit
saved — until the average meets the budget (never below ``min_bits``), and quantizes each layer's
non-zeros uniformly. Bit-widths may change every ``bits_every`` projections until ``bits_until``
projections, then stay fixed. ``compression_report`` counts the result honestly: weights x bits +
index overhead + scales + every uncompressed tensor in fp32.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_fraction
from ..errors import ConfigError
from ..sparsity import keep_largest, n_kept
from .projections import Projection


def _quantize(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric uniform quantization of the values ``v`` to 2**(bits-1)-1 levels."""
    m = (1 << (bits - 1)) - 1
    amax = v.abs().max() if v.numel() else torch.tensor(0.0)
    if amax == 0 or m == 0:
        return torch.zeros_like(v) if m == 0 else v.clone()
    s = amax / m
    return torch.clamp(torch.round(v / s), -m, m) * s


class JointBudget(Projection):
    """Global non-zero and bit budgets (see the module docstring): a projection of all the weights
    it constrains at once.

    Example:
        >>> admm = ADMM(model, JointBudget(nnz_budget=0.05, bit_budget=3.5), update_interval=22)

    Raises:
        ConfigError: ``nnz_budget`` outside (0, 1], not 2 <= ``min_bits`` <= ``max_bits`` <= 16,
            or ``bit_budget`` outside [``min_bits``, ``max_bits``].
    """

    keeps_zeros = True

    def __init__(self, nnz_budget: float, bit_budget: float, *, min_bits: int = 2,
                 max_bits: int = 8, bits_every: int = 1, bits_until: int | None = None):
        self.nnz_budget = check_fraction(nnz_budget, "nnz_budget", "JointBudget", allow_one=True)
        if self.nnz_budget <= 0:
            raise ConfigError(f"The 'nnz_budget' parameter of JointBudget must be a float in (0, 1]. "
                              f"Got {nnz_budget!r} instead.")
        if not isinstance(min_bits, int) or not 1 < min_bits <= max_bits <= 16:
            raise ConfigError(f"JointBudget needs 2 <= min_bits <= max_bits <= 16. Got min_bits="
                              f"{min_bits!r}, max_bits={max_bits!r}.")
        if not isinstance(bit_budget, (int, float)) or not min_bits <= bit_budget <= max_bits:
            raise ConfigError(f"The 'bit_budget' parameter of JointBudget must be in [min_bits, "
                              f"max_bits] = [{min_bits}, {max_bits}]. Got {bit_budget!r} instead.")
        self.bit_budget, self.min_bits, self.max_bits = float(bit_budget), min_bits, max_bits
        self.bits_every, self.bits_until = max(1, bits_every), bits_until
        self.bits: dict[str, int] = {}
        self.calls = 0

    def _sparsify(self, W: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep exactly ``n_kept(total, 1 - nnz_budget)`` weights of largest |w| over all layers
        (ties: lower index), every layer at least its largest."""
        total = sum(w.numel() for w in W.values())
        k = n_kept(total, 1.0 - self.nnz_budget, min_keep=len(W))
        scores = []
        for w in W.values():
            s = w.detach().abs().flatten().clone()
            if s.numel():
                s[int(torch.argmax(s))] = math.inf  # every layer keeps its largest weight
            scores.append(s)
        keep = keep_largest(torch.cat(scores), k)
        out, at = {}, 0
        for n, w in W.items():
            kw = keep[at:at + w.numel()].view(w.shape)
            at += w.numel()
            out[n] = torch.where(kw, w, torch.zeros_like(w))
        return out

    def _allocate(self, S: dict[str, torch.Tensor]) -> dict[str, int]:
        nnz = {n: int((s != 0).sum()) for n, s in S.items()}
        vals = {n: s[s != 0] for n, s in S.items()}
        bits = dict.fromkeys(S, self.max_bits)
        err = {n: float(((vals[n] - _quantize(vals[n], bits[n])) ** 2).sum()) for n in S}
        total = max(1, sum(nnz.values()))
        while sum(nnz[n] * bits[n] for n in S) / total > self.bit_budget + 1e-9:
            best, best_cost, best_err = None, math.inf, 0.0
            for n in S:
                if bits[n] <= self.min_bits or nnz[n] == 0:
                    continue
                e = float(((vals[n] - _quantize(vals[n], bits[n] - 1)) ** 2).sum())
                cost = (e - err[n]) / nnz[n]  # error added per bit saved
                if cost < best_cost:
                    best, best_cost, best_err = n, cost, e
            if best is None:
                break
            bits[best] -= 1
            err[best] = best_err
        return bits

    def project(self, w: torch.Tensor, name: str) -> torch.Tensor:
        return self.project_all({name: w})[name]

    @torch.no_grad()
    def project_all(self, W: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        S = self._sparsify(W)
        frozen = self.bits_until is not None and self.calls >= self.bits_until
        if not self.bits or (not frozen and self.calls % self.bits_every == 0):
            self.bits = self._allocate(S)
        self.calls += 1
        out = {}
        for n, s in S.items():
            q = s.clone()
            nz = s != 0
            q[nz] = _quantize(s[nz], self.bits.get(n, self.max_bits))
            out[n] = q
        return out

    def __repr__(self) -> str:
        return (f"JointBudget(nnz_budget={self.nnz_budget!r}, bit_budget={self.bit_budget!r}, "
                f"min_bits={self.min_bits}, max_bits={self.max_bits})")

    def summary(self, W: dict[str, torch.Tensor] | nn.Module) -> dict[str, Any]:
        """Density, average bits and per-layer (density, bits) of the weights ``W`` (a dict, or
        a model whose weights the budget constrained)."""
        if isinstance(W, nn.Module):
            sd = W.state_dict()
            W = {n: sd[n] for n in self.bits}
        nnz = {n: int((w != 0).sum()) for n, w in W.items()}
        total = sum(w.numel() for w in W.values())
        return {"density": sum(nnz.values()) / max(1, total),
                "avg_bits": sum(nnz[n] * self.bits.get(n, 32) for n in W) / max(1, sum(nnz.values())),
                "layers": {n: {"density": nnz[n] / W[n].numel(), "bits": self.bits.get(n)} for n in W}}


def compression_report(model: nn.Module, bits: dict[str, int], *, index_bits: int = 8
                       ) -> dict[str, Any]:
    """Honest storage of a pruned + quantized model vs fp32: each compressed weight costs its
    bits per non-zero plus the cheaper of a 1-bit-per-weight bitmap or ``index_bits`` relative
    indices per non-zero (with fillers for long zero runs), plus a 32-bit scale; every other
    floating-point tensor of the state dict is counted at 32 bits (integer buffers not at all).
    ``bits`` maps state_dict names of the compressed weights to their bit-widths.

    Example:
        >>> budget = JointBudget(nnz_budget=0.05, bit_budget=3.5)
        >>> ...                                 # ADMM(model, budget) training, finalize()
        >>> r = compression_report(model, budget.bits)
        >>> r["layers"]["conv1.weight"]         # 88 non-zeros x 4 bits + indices + scale
        {'nnz': 88, 'bits': 4, 'index_bits': 704, 'cost_bits': 1088}
        >>> r["ratio"]                          # fp32 bytes over coded bytes
    """
    sd = model.state_dict()
    fp32_bits = sum(t.numel() * 32 for t in sd.values() if t.is_floating_point())
    total = 0
    layers = {}
    for name, t in sd.items():
        if not t.is_floating_point():
            continue
        if name in bits:
            flat = t.flatten()
            nz = (flat != 0).nonzero().flatten()
            n = nz.numel()
            gaps = torch.diff(torch.cat([torch.tensor([-1]), nz])) - 1
            fillers = int((gaps // (1 << index_bits)).sum()) if n else 0
            index = min(t.numel(), (n + fillers) * index_bits)
            cost = (n + fillers) * bits[name] + index + 32
            layers[name] = {"nnz": n, "bits": bits[name], "index_bits": index, "cost_bits": cost}
        else:
            cost = t.numel() * 32
        total += cost
    return {"fp32_bytes": fp32_bits // 8, "bytes": int(math.ceil(total / 8)),
            "ratio": fp32_bits / max(1, total), "layers": layers}


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor | None = None,
                      *, temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): alpha * T^2 * KL(teacher_T || student_T)
    + (1 - alpha) * cross-entropy with the labels (if given). Both are logits; the teacher's
    are detached.

    Example:
        >>> with torch.no_grad():
        ...     t = teacher(x)
        >>> loss = distillation_loss(student(x), t, y, temperature=4.0, alpha=0.9)
        >>> loss.backward()

    Raises:
        ConfigError: ``temperature`` is not > 0.
    """
    if temperature <= 0:
        raise ConfigError(f"The 'temperature' parameter must be > 0. Got {temperature!r}.")
    kd = F.kl_div(F.log_softmax(student / temperature, -1),
                  F.softmax(teacher.detach() / temperature, -1), reduction="batchmean")
    loss = alpha * temperature * temperature * kd
    if y is not None:
        loss = loss + (1 - alpha) * F.cross_entropy(student, y)
    return loss
