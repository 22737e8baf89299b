"""Quantizer configs: small frozen dataclasses that validate themselves.

Each names one scheme; ``graphprune.quantize`` applies it to the weights of matching layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


def _bits(owner: str, name: str, v: object, lo: int = 1, hi: int = 16) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ConfigError(f"The '{name}' parameter of {owner} must be an int in [{lo}, {hi}]. "
                          f"Got {v!r} instead.")


@dataclass(frozen=True)
class QuantConfig:
    """Base class of every quantizer config."""

    name = "base"

    @property
    def bits(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError


@dataclass(frozen=True)
class Linear(QuantConfig):
    """Uniform quantization to ``bits`` levels: per-tensor or per-channel (output channel),
    symmetric (zero point 0) or affine (zero point chosen so that 0.0 stays exact)."""

    bits: int = 8
    per_channel: bool = True
    symmetric: bool = True
    name = "linear"

    def __post_init__(self) -> None:
        _bits("Linear", "bits", self.bits, 2, 16)


@dataclass(frozen=True)
class FixedPoint(QuantConfig):
    """Fixed point with ``int_bits`` integer bits (sign included) and ``frac_bits`` fraction
    bits: values are multiples of 2**-frac_bits, saturated to the representable range."""

    int_bits: int = 1
    frac_bits: int = 6
    name = "fixed_point"

    def __post_init__(self) -> None:
        _bits("FixedPoint", "int_bits", self.int_bits, 1, 16)
        _bits("FixedPoint", "frac_bits", self.frac_bits, 0, 24)
        if self.int_bits + self.frac_bits > 32:
            raise ConfigError("FixedPoint: int_bits + frac_bits must be at most 32. Got "
                              f"{self.int_bits + self.frac_bits}.")

    @property
    def bits(self) -> int:
        return self.int_bits + self.frac_bits


@dataclass(frozen=True)
class KMeans(QuantConfig):
    """Weight sharing (Deep Compression): 2**bits centroids found by scikit-learn's KMeans
    (``init='k-means++'`` or ``'linear'``, evenly spaced between min and max). With
    ``keep_zeros`` pruned weights stay exactly zero (code 0 is the value 0)."""

    bits: int = 4
    init: str = "linear"
    keep_zeros: bool = True
    seed: int = 0
    name = "kmeans"

    def __post_init__(self) -> None:
        _bits("KMeans", "bits", self.bits, 1, 8)
        if self.init not in ("k-means++", "linear", "random"):
            from ..errors import did_you_mean

            raise ConfigError(f"The 'init' parameter of KMeans must be one of 'k-means++', "
                              f"'linear', 'random'. Got {self.init!r} instead."
                              f"{did_you_mean(str(self.init), ['k-means++', 'linear', 'random'])}")


@dataclass(frozen=True)
class Naive(QuantConfig):
    """8-bit symmetric per-tensor weights (NNI's naive quantizer)."""

    name = "naive"

    @property
    def bits(self) -> int:
        return 8


@dataclass(frozen=True)
class DoReFa(QuantConfig):
    """DoReFa-Net weights (Zhou et al. 2016): w_q = 2*quantize_k(tanh(w)/(2 max|tanh w|)+1/2) - 1.
    Meant for training (``graphprune.quantize.qat``); applied after training it rescales the
    weights to [-1, 1]."""

    bits: int = 4
    name = "dorefa"

    def __post_init__(self) -> None:
        _bits("DoReFa", "bits", self.bits, 1, 16)


CONFIGS = {c.name: c for c in (Linear, FixedPoint, KMeans, Naive, DoReFa)}


def config_from(spec: object) -> QuantConfig:
    """A QuantConfig from a config, a scheme name, or a dict ``{'scheme': name, ...}``."""
    if isinstance(spec, QuantConfig):
        return spec
    if isinstance(spec, str):
        spec = {"scheme": spec}
    if isinstance(spec, dict):
        d = dict(spec)
        scheme = d.pop("scheme", d.pop("quant_type", None))
        if scheme not in CONFIGS:
            from ..errors import unknown_name

            raise unknown_name("quantizer", str(scheme), CONFIGS)
        try:
            return CONFIGS[scheme](**d)
        except TypeError as e:
            raise ConfigError(f"quantizer '{scheme}': {e}") from e
    raise ConfigError(f"A quantizer must be a QuantConfig, a name or a dict. Got {spec!r}.")
