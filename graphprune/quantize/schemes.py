"""The weight quantizers: one handler per config class, registered by a decorator."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .._np import unique
from ..errors import unknown_name
from .configs import DoReFa, FixedPoint, KMeans, Linear, Naive, QuantConfig
from .tensor import QuantizedTensor

Handler = Callable[[torch.Tensor, QuantConfig, int], QuantizedTensor]
_HANDLERS: dict[type, Handler] = {}

KMEANS_FIT_SAMPLES = 100_000  # k-means is fitted on at most this many weights, then all assigned


def handler(cls: type) -> Callable[[Handler], Handler]:
    """Register ``fn(w, cfg, axis) -> QuantizedTensor`` as the quantizer of the config class
    ``cls`` (a decorator). ``w`` is the float32 CPU weight, ``axis`` its output-channel dim; the
    codes must reproduce the weight through ``dequantize``, which is what the model keeps.

    Example:
        >>> @handler(Ternary)              # the QuantConfig subclass of QuantConfig's example
        ... def ternary(w, cfg, axis):
        ...     s = float(w.abs().mean())
        ...     codes = torch.where(w.abs() > 0.7 * s, torch.sign(w), 0).to(torch.int32) + 1
        ...     return QuantizedTensor(codes, "ternary", 2, codebook=torch.tensor([-s, 0.0, s, 0.0]))
        >>> q = quantize(model, Ternary())  # weights in {-s, 0, s}; encode() codes them too
    """
    def deco(fn: Handler) -> Handler:
        _HANDLERS[cls] = fn
        return fn
    return deco


def quantize_tensor(w: torch.Tensor, cfg: QuantConfig, axis: int = 0) -> QuantizedTensor:
    """Quantize one weight tensor with ``cfg`` (``axis``: its output-channel dim, 1 for a
    transposed convolution). The tensor itself is not changed.

    Example:
        >>> q = quantize_tensor(torch.randn(8, 3, 3, 3), Linear(bits=4))
        >>> q.codes.shape, q.scale.shape    # a scale per output channel
        (torch.Size([8, 3, 3, 3]), torch.Size([8]))

    Raises:
        RegistryError: no handler is registered for ``type(cfg)`` (the message lists those that
            are).
    """
    fn = _HANDLERS.get(type(cfg))
    if fn is None:
        raise unknown_name("quantizer", type(cfg).__name__, [c.__name__ for c in _HANDLERS])
    return fn(w.detach().to(torch.float32).cpu(), cfg, axis)


def _reduce_dims(w: torch.Tensor, axis: int) -> list[int]:
    return [d for d in range(w.ndim) if d != axis]


@handler(Linear)
def linear(w: torch.Tensor, cfg: Linear, axis: int) -> QuantizedTensor:
    per_ch = cfg.per_channel and w.ndim > 1
    dims = _reduce_dims(w, axis) if per_ch else list(range(w.ndim))
    if cfg.symmetric:
        qmax = (1 << (cfg.bits - 1)) - 1
        qmin = -qmax
        amax = w.abs().amax(dim=dims) if dims else w.abs()
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        qmin, qmax = 0, (1 << cfg.bits) - 1
        lo = torch.clamp(w.amin(dim=dims) if dims else w, max=0.0)
        hi = torch.clamp(w.amax(dim=dims) if dims else w, min=0.0)
        scale = torch.where(hi > lo, (hi - lo) / (qmax - qmin), torch.ones_like(hi))
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    scale = scale.to(torch.float32)
    view = [1] * w.ndim
    if per_ch:
        view[axis] = -1
    s, z = (scale.view(view), zp.view(view)) if per_ch else (scale, zp)
    codes = torch.clamp(torch.round(w / s) + z, qmin, qmax).to(torch.int32)
    return QuantizedTensor(codes, "linear", cfg.bits, scale=scale, zero_point=zp,
                           axis=axis if per_ch else None)


@handler(Naive)
def naive(w: torch.Tensor, cfg: Naive, axis: int) -> QuantizedTensor:
    q = linear(w, Linear(bits=8, per_channel=False, symmetric=True), axis)
    q.scheme = "naive"
    return q


@handler(FixedPoint)
def fixed_point(w: torch.Tensor, cfg: FixedPoint, axis: int) -> QuantizedTensor:
    b = cfg.int_bits + cfg.frac_bits
    qmin, qmax = -(1 << (b - 1)), (1 << (b - 1)) - 1
    scale = torch.tensor(2.0 ** -cfg.frac_bits, dtype=torch.float32)
    codes = torch.clamp(torch.round(w / scale), qmin, qmax).to(torch.int32)
    return QuantizedTensor(codes, "fixed_point", b, scale=scale,
                           zero_point=torch.tensor(0, dtype=torch.int32))


@handler(DoReFa)
def dorefa(w: torch.Tensor, cfg: DoReFa, axis: int) -> QuantizedTensor:
    levels = (1 << cfg.bits) - 1
    t = torch.tanh(w)
    m = t.abs().max().clamp_min(1e-12)
    codes = torch.round((t / (2 * m) + 0.5) * levels).to(torch.int32)
    codebook = (2 * torch.arange(levels + 1, dtype=torch.float32) / max(levels, 1) - 1)
    return QuantizedTensor(codes, "dorefa", cfg.bits, codebook=codebook)


@handler(KMeans)
def kmeans(w: torch.Tensor, cfg: KMeans, axis: int) -> QuantizedTensor:
    from sklearn.cluster import KMeans as SKMeans

    flat = w.flatten().numpy().astype(np.float64)
    nz = flat != 0 if cfg.keep_zeros else np.ones(flat.shape, dtype=bool)
    k = (1 << cfg.bits) - (1 if cfg.keep_zeros else 0)
    vals = flat[nz]
    uniq = unique(vals)  # sort-based: np.unique is slow on millions of distinct floats
    codes = np.zeros(flat.shape, dtype=np.int32)
    if uniq.size <= k:  # fewer distinct values than levels: each value is its own centroid
        centers = uniq
    else:
        rng = np.random.default_rng(cfg.seed)
        fit = vals if vals.size <= KMEANS_FIT_SAMPLES else rng.choice(vals, KMEANS_FIT_SAMPLES,
                                                                      replace=False)
        init = (np.linspace(vals.min(), vals.max(), k)[:, None] if cfg.init == "linear"
                else cfg.init)
        km = SKMeans(n_clusters=k, init=init, n_init=1, random_state=cfg.seed, max_iter=300)
        km.fit(fit[:, None])
        centers = np.sort(km.cluster_centers_.ravel())
    if vals.size:
        # nearest centre in 1-D: boundaries at the midpoints of the sorted centres
        mids = (centers[1:] + centers[:-1]) / 2
        lab = np.searchsorted(mids, vals)
        codes[nz] = lab + (1 if cfg.keep_zeros else 0)
    book = np.concatenate([[0.0], centers]) if cfg.keep_zeros else centers
    book = np.pad(book, (0, max(0, (1 << cfg.bits) - book.size)))
    return QuantizedTensor(torch.from_numpy(codes.reshape(w.shape)), "kmeans", cfg.bits,
                           codebook=torch.from_numpy(book.astype(np.float32)))
