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
    """Base class of every quantizer config: a frozen dataclass naming one scheme, whose
    ``bits`` say how many bits a code takes. A new scheme is a subclass plus a ``handler``.

    Example:
        >>> @dataclass(frozen=True)
        ... class Ternary(QuantConfig):
        ...     name = "ternary"   # weights in {-s, 0, s} (ternary weight networks)
        ...     bits = 2
        >>> quantize(model, Ternary())   # once a handler is registered, see ``handler``
    """

    name = "base"

    @property
    def bits(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError


@dataclass(frozen=True)
class Linear(QuantConfig):
    """Uniform quantization to ``bits`` levels: per-tensor or per-channel (output channel),
    symmetric (zero point 0) or affine (zero point chosen so that 0.0 stays exact).

    Example:
        >>> q = quantize_tensor(torch.tensor([[0.5, -1.0], [0.02, 0.01]]), Linear(bits=8))
        >>> q.codes, q.scale                # one scale per output channel: max |w| / 127
        (tensor([[  64, -127],
                [ 127,   63]], dtype=torch.int32), tensor([0.0079, 0.0002]))

    Raises:
        ConfigError: ``bits`` is not an int in [2, 16].
    """

    bits: int = 8
    per_channel: bool = True
    symmetric: bool = True
    name = "linear"

    def __post_init__(self) -> None:
        _bits("Linear", "bits", self.bits, 2, 16)


@dataclass(frozen=True)
class FixedPoint(QuantConfig):
    """Fixed point with ``int_bits`` integer bits (sign included) and ``frac_bits`` fraction
    bits: values are multiples of 2**-frac_bits, saturated to the representable range.

    Example:
        >>> w = torch.tensor([0.3, -2.0, 0.9])
        >>> quantize_tensor(w, FixedPoint(int_bits=1, frac_bits=3)).dequantize()  # [-1, 7/8]
        tensor([ 0.2500, -1.0000,  0.8750])

    Raises:
        ConfigError: ``int_bits`` is not an int in [1, 16], ``frac_bits`` not an int in [0, 24],
            or the two add up to more than 32.
    """

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
    (``init='k-means++'``, ``'random'`` or ``'linear'``, evenly spaced between min and max). With
    ``keep_zeros`` pruned weights stay exactly zero (code 0 is the value 0, the non-zero weights
    share the other 2**bits - 1 centroids).

    Example:
        >>> q = quantize_tensor(torch.tensor([0.0, 0.11, 0.09, -0.5, -0.52, 0.0, 1.0]), KMeans(bits=2))
        >>> q.codebook, q.codes
        (tensor([ 0.0000, -0.5100,  0.1000,  1.0000]), tensor([0, 2, 2, 1, 1, 0, 3], dtype=torch.int32))

    Raises:
        ConfigError: ``bits`` is not an int in [1, 8], or an unknown ``init`` (with the nearest
            valid name).
    """

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
    """8-bit symmetric per-tensor weights (NNI's naive quantizer): ``Linear(bits=8,
    per_channel=False)`` under its own scheme name.

    Example:
        >>> q = quantize_tensor(torch.randn(8, 3, 3, 3), Naive())
        >>> q.bits, q.scale.shape, q.axis     # one scale for the whole tensor
        (8, torch.Size([]), None)
    """

    name = "naive"

    @property
    def bits(self) -> int:
        return 8


@dataclass(frozen=True)
class DoReFa(QuantConfig):
    """DoReFa-Net weights (Zhou et al. 2016): w_q = 2*quantize_k(tanh(w)/(2 max|tanh w|)+1/2) - 1.
    Meant for training (``QAT(scheme='dorefa')``); applied after training it rescales the
    weights to [-1, 1].

    Example:
        >>> quantize_tensor(torch.tensor([-1.0, 0.0, 1.0]), DoReFa(bits=2)).dequantize()
        tensor([-1.0000,  0.3333,  1.0000])

    Raises:
        ConfigError: ``bits`` is not an int in [1, 16].
    """

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
