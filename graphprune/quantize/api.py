"""Stage 6: quantize the weights of a (pruned) model.

``quantize(model, config)`` returns a ``QuantizedModel``: a copy of the model whose weights hold
the quantized values (it runs and exports as usual), and the integer codes of every quantized
weight for the coder. ``config`` is one ``QuantConfig`` for every Conv/Linear weight, a dict of
module path -> config, or an NNI-style list of ``{'quant', 'op_types', 'op_names', 'exclude'}``
entries, later entries overriding earlier ones.

K-means weights can be fine-tuned as Deep Compression does (section 3.3): ``share_weights()``
makes every shared weight a view of a learnable centroid, so a centroid's gradient is the sum
of its weights' gradients; ``freeze()`` writes the trained centroids back to the codes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..opmatch import resolve_config
from .configs import CONFIGS, QuantConfig, config_from
from .schemes import quantize_tensor
from .tensor import QuantizedTensor

DEFAULT_TYPES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                 "ConvTranspose3d", "Linear")


def _out_axis(m: nn.Module) -> int:
    return 1 if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0


class _Shared(nn.Module):
    """weight = centroids[codes]: the gradient of a centroid sums its weights' gradients.

    With ``relabel`` the original weights stay as full-precision latents that also train (straight-
    through), and every forward re-assigns each weight to its nearest centroid, so labels move too.
    """

    def __init__(self, codes: torch.Tensor, centroids: torch.Tensor, fixed_zero: bool,
                 relabel: bool = False):
        super().__init__()
        self.register_buffer("codes", codes.long())
        self.centroids = nn.Parameter(centroids.clone())
        self.fixed_zero, self.relabel = fixed_zero, relabel

    def _book(self) -> torch.Tensor:
        c = self.centroids
        return torch.cat([c.new_zeros(1), c[1:]]) if self.fixed_zero else c  # zeros stay zero

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        c = self._book()
        if not self.relabel:
            return c[self.codes]
        with torch.no_grad():
            first = 1 if self.fixed_zero else 0
            dist = (latent.detach().unsqueeze(-1) - c[first:].detach()).abs()
            new = dist.argmin(dim=-1) + first
            if self.fixed_zero:  # pruned weights keep code 0
                new = torch.where(self.codes == 0, self.codes, new)
            self.codes.copy_(new)
        return c[self.codes] + (latent - latent.detach())


@dataclass
class QuantizedModel:
    """A model whose weights are quantized, with their codes (``tensors``: state_dict name ->
    ``QuantizedTensor``) and the config used per module; what ``quantize`` returns and
    ``graphprune.coding.encode`` codes.

    Example:
        >>> q = quantize(model, KMeans(bits=4))
        >>> print(q.summary())                  # weight, scheme, bits per quantized tensor
        >>> centroids = q.share_weights()       # fine-tune the shared centroids (Deep Compression)
        >>> ...                                 # train q.model with your own loop
        >>> graphprune.coding.encode(q.freeze(), "model.gpc")
    """

    model: nn.Module
    tensors: dict[str, QuantizedTensor]
    configs: dict[str, QuantConfig] = field(default_factory=dict)

    def share_weights(self, relabel: bool = False) -> list[nn.Parameter]:
        """Make k-means (and other codebook) weights trainable through their centroids; returns
        the centroid parameters (the optimiser sees them through ``model.parameters()``). With
        ``relabel`` the weights also train as full-precision latents and are re-assigned to the
        nearest centroid at every step (labels refined, not only centroids)."""
        out = []
        for name, q in self.tensors.items():
            if q.codebook is None:
                continue
            owner, _, attr = name.rpartition(".")
            m = self.model.get_submodule(owner)
            if parametrize.is_parametrized(m, attr):
                continue
            fixed_zero = bool(q.codebook[0] == 0) and q.scheme == "kmeans"
            p = _Shared(q.codes, q.codebook.to(getattr(m, attr).dtype), fixed_zero, relabel)
            parametrize.register_parametrization(m, attr, p, unsafe=True)
            out.append(p.centroids)
        return out

    def freeze(self) -> QuantizedModel:
        """Remove the centroid parametrizations, keeping the trained centroids as codebooks."""
        for name, q in self.tensors.items():
            owner, _, attr = name.rpartition(".")
            m = self.model.get_submodule(owner)
            if parametrize.is_parametrized(m, attr):
                p = m.parametrizations[attr][0]
                with torch.no_grad():
                    book = p.centroids.detach().clone().to(torch.float32)
                    if p.fixed_zero:
                        book[0] = 0
                q.codebook = book
                q.codes = p.codes.detach().to(torch.int32).clone()
                parametrize.remove_parametrizations(m, attr, leave_parametrized=True)
                with torch.no_grad():
                    getattr(m, attr).copy_(q.dequantize().to(getattr(m, attr).dtype))
        return self

    def summary(self) -> str:
        lines = [f"{'weight':<40} {'scheme':<12} {'bits':>4}"]
        for k, q in self.tensors.items():
            lines.append(f"{k:<40} {q.scheme:<12} {q.bits:>4}")
        return "\n".join(lines)


def _resolve(model: nn.Module, config: Any) -> dict[str, QuantConfig]:
    mods = dict(model.named_modules())
    out: dict[str, QuantConfig] = {}
    if isinstance(config, (QuantConfig, str)) or (isinstance(config, Mapping) and "scheme" in config):
        cfg = config_from(config)
        return {n: cfg for n, m in mods.items() if type(m).__name__ in DEFAULT_TYPES}
    if isinstance(config, Mapping):
        for path, c in config.items():
            if path not in mods:
                from ..errors import did_you_mean

                raise ConfigError(f"quantize: the model has no module '{path}'."
                                  f"{did_you_mean(path, mods)}")
            out[path] = config_from(c)
        return out
    if isinstance(config, Sequence) and not isinstance(config, str):
        return resolve_config(model, config, _entry_config, keys=_ENTRY_KEYS, owner="quantize",
                              example="[{'quant': 'kmeans', 'bits': 4, 'op_types': ['Conv2d']}]",
                              eligible=_has_weight)
    raise ConfigError(f"quantize: config must be a QuantConfig, a dict or a list. Got {config!r}.")


# what a config-list entry may say besides the selection: the scheme and its settings
_ENTRY_KEYS = ("quant", "quant_type", "scheme", *sorted({f.name for c in CONFIGS.values()
                                                          for f in fields(c)}))


def _entry_config(e: Mapping[str, Any], where: str) -> QuantConfig:
    """The quantizer of one config-list entry: ``quant`` (a name or a QuantConfig) plus the
    scheme's settings written beside it (``{'quant': 'kmeans', 'bits': 4}``)."""
    q = e.get("quant", e.get("quant_type", e.get("scheme")))
    extra = {k: v for k, v in e.items() if k not in ("quant", "quant_type", "scheme", "op_types",
                                                      "op_names", "exclude")}
    if isinstance(q, QuantConfig):
        if extra:
            raise ConfigError(f"{where[0].upper()}{where[1:]} gives a QuantConfig and settings "
                              f"{sorted(extra)} beside it: put them in the QuantConfig.")
        return q
    if q is None:
        raise ConfigError(f"{where[0].upper()}{where[1:]} must name its quantizer: add 'quant': "
                          f"one of {', '.join(sorted(CONFIGS))}.")
    if isinstance(q, Mapping):  # {'quant': {'scheme': 'kmeans', 'bits': 2}}
        return config_from({**dict(q), **extra})
    return config_from({"scheme": q, **extra})


def _has_weight(path: str, m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.ndim >= 1


def quantize(model: nn.Module, config: Any = "linear", *, inplace: bool = False) -> QuantizedModel:
    """Quantize the weights of ``model`` (see the module docstring for ``config``).

    Example:
        >>> q = graphprune.quantize.quantize(pruned, graphprune.quantize.KMeans(bits=4))
        >>> graphprune.coding.encode(q, "model.gpc")

    Raises:
        ConfigError: a path that names no module of the model, a config that is not a
            QuantConfig, a dict or a list, or a bad scheme setting.
        RegistryError: an unknown scheme name.
    """
    resolved = _resolve(model, config)
    target = model if inplace else copy.deepcopy(model)
    mods = dict(target.named_modules())
    tensors: dict[str, QuantizedTensor] = {}
    for path, cfg in resolved.items():
        m = mods[path]
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim < 1:
            continue
        q = quantize_tensor(w, cfg, _out_axis(m))
        with torch.no_grad():
            w.copy_(q.dequantize().to(w.dtype))
        tensors[f"{path}.weight" if path else "weight"] = q
    return QuantizedModel(target, tensors, resolved)
