"""Latency stage, modelling: which channel groups set each onnxruntime kernel's shapes, and its
time as a function of their widths, fitted to profiled runs of width variants.

Each kernel of the optimised onnxruntime graph (a convolution with its fused BatchNorm and
activation, a depthwise convolution, an NCHWc reorder, a pooling, a Gemm...) is timed in every
measured variant, together with its input and output shapes. A shape dimension that follows a
group's width across the variants (exactly, or padded up to the NCHWc block) ties the kernel to
that group; variants draw every group's width at random, so no two groups follow the same
sequence. A kernel's time is then fitted, by non-negative least squares, as

    t = c0 + c1 p                                  (one group: depthwise conv, reorder, pooling)
    t = c0 + c1 pa + c2 pb + c3 pa pb              (two groups: a conv's input and output)

where ``p = pad(width) / pad(size)`` is the fraction of the group's channels kept, padded up to
the kernel block: within a block the cost does not change, which makes each group's latency a
step curve of its width. The model's latency relative to dense is ``(sum(t) / dense sum(t)) **
exponent``, the exponent fitted to the wall-clock latencies of the same variants
(``build.calibrate``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .measure import Kernel


def pad(width: int, block: int) -> int:
    """``width`` rounded up to a multiple of ``block``."""
    return -(-int(width) // block) * block


def features(p: Sequence[float]) -> list[float]:
    """Regressors of a kernel's time from the kept fractions ``p`` of the groups it touches."""
    if not p:
        return [1.0]
    if len(p) == 1:
        return [1.0, p[0]]
    if len(p) == 2:
        return [1.0, p[0], p[1], p[0] * p[1]]
    return [1.0, *p, float(math.prod(p))]


@dataclass(frozen=True)
class KernelModel:
    """One onnxruntime kernel: the groups whose widths set its shapes and its fitted time."""

    name: str
    op: str
    groups: tuple[str, ...]
    coef: tuple[float, ...]
    dense_ms: float  # measured in the dense model

    def ms(self, p: Sequence[float]) -> float:
        return float(np.dot(features(p), self.coef))

    def to_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "groups": list(self.groups),
                "coef": list(self.coef), "dense_ms": self.dense_ms}

    @classmethod
    def from_dict(cls, d: Mapping) -> KernelModel:
        return cls(str(d["name"]), str(d["op"]), tuple(d["groups"]),
                   tuple(float(c) for c in d["coef"]), float(d["dense_ms"]))


def _dims(k: Kernel) -> list[tuple[int, int, int, int]]:
    """(side, tensor, dim, size) of every dimension of a kernel's inputs and outputs."""
    out = []
    for side, shapes in enumerate((k.inputs, k.outputs)):
        for i, s in enumerate(shapes):
            out.extend((side, i, d, v) for d, v in enumerate(s))
    return out


def attribute(runs: Sequence[Mapping[str, Kernel]], widths: Sequence[Mapping[str, int]],
              sizes: Mapping[str, int], block: int) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """Groups of every kernel present in all ``runs`` (variant k has group widths ``widths[k]``),
    and the kernels with a varying dimension that follows no single group (concatenations...)."""
    names = [n for n in runs[0] if all(n in r for r in runs[1:])]
    exact: dict[tuple[int, ...], str] = {}
    padded: dict[tuple[int, ...], str] = {}
    for g, size in sizes.items():
        seq = tuple(int(w.get(g, size)) for w in widths)
        if len(set(seq)) > 1:
            exact.setdefault(seq, g)
            padded.setdefault(tuple(pad(v, block) for v in seq), g)
    groups: dict[str, tuple[str, ...]] = {}
    unmatched = []
    for name in names:
        found: list[str] = []
        lost = False
        per_run = [dict(((s, i, d), v) for s, i, d, v in _dims(r[name])) for r in runs]
        for pos in per_run[0]:
            seq = tuple(r.get(pos, -1) for r in per_run)
            if len(set(seq)) == 1:
                continue
            g = exact.get(seq) or padded.get(seq)
            if g is None:
                lost = True
            elif g not in found:
                found.append(g)
        groups[name] = tuple(found)
        if lost:
            unmatched.append(name)
    return groups, unmatched


def fractions(groups: Sequence[str], widths: Mapping[str, int], sizes: Mapping[str, int],
              block: int) -> list[float]:
    return [pad(widths.get(g, sizes[g]), block) / pad(sizes[g], block) for g in groups]


def fit_kernels(runs: Sequence[Mapping[str, Kernel]], widths: Sequence[Mapping[str, int]],
                sizes: Mapping[str, int], block: int, stat: str = "ms"
                ) -> tuple[list[KernelModel], list[str]]:
    """Fit every kernel's time (``stat``: 'ms' median or 'low_ms') over the variants; the first
    run must be the dense model. Returns the models and the kernels no group explains."""
    from scipy.optimize import nnls

    groups, unmatched = attribute(runs, widths, sizes, block)
    out = []
    for name, gs in groups.items():
        X = np.array([features(fractions(gs, w, sizes, block)) for w in widths])
        y = np.array([getattr(r[name], stat) for r in runs])
        if X.shape[1] > len(y) - 1:  # too many regressors for the variants: time ∝ work
            X = np.stack([np.ones(len(y)), np.prod(X[:, 1:1 + len(gs)], axis=1)], axis=1)
            coef, _ = nnls(X, y)
            coef = _expand(coef, len(gs))
        else:
            coef, _ = nnls(X, y)
        out.append(KernelModel(name, runs[0][name].op, gs, tuple(float(c) for c in coef),
                               float(getattr(runs[0][name], stat))))
    return out, unmatched


def _expand(c: np.ndarray, n: int) -> np.ndarray:
    """Coefficients of ``[1, prod(p)]`` written over ``features`` of ``n`` fractions."""
    full = np.zeros(len(features([1.0] * n)))
    full[0], full[-1] = c[0], c[1]
    return full


class Predictor:
    """Fast predictions from kernel models: ``total(widths)`` in kernel milliseconds, and the
    change when one group's width changes (what the allocator asks thousands of times)."""

    def __init__(self, kernels: Sequence[KernelModel], sizes: Mapping[str, int], block: int):
        self.kernels = list(kernels)
        self.sizes = dict(sizes)
        self.block = int(block)
        self.by_group: dict[str, list[int]] = {g: [] for g in sizes}
        self.fixed_ms = 0.0
        for i, k in enumerate(self.kernels):
            if not k.groups:
                self.fixed_ms += k.ms([])
            for g in k.groups:
                self.by_group.setdefault(g, []).append(i)

    def kernel_ms(self, i: int, widths: Mapping[str, int]) -> float:
        k = self.kernels[i]
        return k.ms(fractions(k.groups, widths, self.sizes, self.block))

    def total(self, widths: Mapping[str, int]) -> float:
        return self.fixed_ms + sum(self.kernel_ms(i, widths) for i, k in enumerate(self.kernels)
                                   if k.groups)

    def group_ms(self, group: str, widths: Mapping[str, int]) -> float:
        """Time of the kernels that ``group``'s width changes, at ``widths``."""
        return sum(self.kernel_ms(i, widths) for i in self.by_group.get(group, ()))

    def delta(self, group: str, width: int, widths: Mapping[str, int]) -> float:
        """Change of ``total`` when ``group`` goes from ``widths[group]`` to ``width``."""
        before = self.group_ms(group, widths)
        after = self.group_ms(group, {**widths, group: width})
        return after - before
