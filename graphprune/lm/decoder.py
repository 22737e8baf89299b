"""The parts of a Hugging Face decoder that layer-by-layer pruning touches: its blocks, their
inputs on calibration tokens, the attention and MLP halves of a block, and the biases FLAP's
compensation adds to a pruned model.

A supported block is LLaMA's (also Qwen2's, Mistral's): ``h1 = h + self_attn(input_layernorm(h))``
then ``out = h1 + mlp(post_attention_layernorm(h1))``, with ``self_attn.o_proj`` and
``mlp.down_proj`` Linear layers. ``check_block`` verifies that composition against the block's own
forward before anyone relies on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..hf.loading import is_hf_model

PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


class _Stop(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """``model.model.layers`` when every block has the supported structure, else None."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    for layer in layers:
        if not all(hasattr(layer, p) for p in PARTS):
            return None
        if not isinstance(getattr(layer.self_attn, "o_proj", None), nn.Linear) or \
                not isinstance(getattr(layer.mlp, "down_proj", None), nn.Linear):
            return None
    return layers


def supports(model: nn.Module) -> bool:
    """Is ``model`` a Hugging Face decoder that ``blockwise`` prunes block by block?"""
    return is_hf_model(model) and decoder_layers(model) is not None


def moved(v: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``v`` with every tensor on ``device`` and every floating tensor in ``dtype``."""
    if isinstance(v, torch.Tensor):
        return v.to(device, dtype) if v.is_floating_point() else v.to(device)
    if isinstance(v, tuple):
        return tuple(moved(x, device, dtype) for x in v)
    if isinstance(v, list):
        return [moved(x, device, dtype) for x in v]
    if isinstance(v, dict):
        return {k: moved(x, device, dtype) for k, x in v.items()}
    return v


def block_inputs(model: nn.Module, layer: nn.Module, batches: list[tuple[torch.Tensor, ...]],
                 device: torch.device, dtype: torch.dtype) -> list[tuple[torch.Tensor, dict]]:
    """Per calibration batch, the hidden states and keyword inputs (position embeddings, mask,
    position ids) that ``layer`` receives when ``model`` runs on the batch: a pre-hook records
    them and stops the forward there, so nothing after ``layer`` runs."""
    from ..datadriven.sequential import model_device

    got: list[tuple[torch.Tensor, dict]] = []

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        kw = dict(kwargs)
        h = args[0] if args else kw.pop("hidden_states")
        got.append((moved(h.detach(), device, dtype), moved(kw, device, dtype)))
        raise _Stop

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    home = model_device(model)
    try:
        with torch.no_grad():
            for xs in batches:
                try:
                    model(*(t.to(home) for t in xs), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(got) != len(batches):
        raise RuntimeError(f"the decoder block was reached on {len(got)} of {len(batches)} batches")
    return got


class Taps:
    """Records the inputs of a block's ``o_proj`` and ``down_proj`` while it is open."""

    def __init__(self, layer: nn.Module):
        self.a: torch.Tensor | None = None
        self.m: torch.Tensor | None = None
        self._h = [layer.self_attn.o_proj.register_forward_pre_hook(lambda _, i: self._set("a", i)),
                   layer.mlp.down_proj.register_forward_pre_hook(lambda _, i: self._set("m", i))]

    def _set(self, k: str, inp: tuple) -> None:
        setattr(self, k, inp[0].detach())

    def close(self) -> None:
        for h in self._h:
            h.remove()


def attention(layer: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
    """The attention half's update ``self_attn(input_layernorm(h))`` (added to ``h``)."""
    out = layer.self_attn(hidden_states=layer.input_layernorm(h), **kw)
    return out[0] if isinstance(out, tuple) else out


def mlp(layer: nn.Module, h1: torch.Tensor) -> torch.Tensor:
    """The MLP half's update ``mlp(post_attention_layernorm(h1))`` (added to ``h1``)."""
    return layer.mlp(layer.post_attention_layernorm(h1))


def check_block(layer: nn.Module, h: torch.Tensor, kw: dict) -> float:
    """Relative difference between the block's own forward and ``h + attention``, ``+ mlp``."""
    with torch.no_grad():
        ref = layer(h, **kw)
        ref = ref[0] if isinstance(ref, tuple) else ref
        h1 = h + attention(layer, h, kw)
        mine = h1 + mlp(layer, h1)
    return float((ref - mine).norm() / ref.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------- biases
_FLAGS = {"self_attn": ("attention_bias", ("q_proj", "k_proj", "v_proj", "o_proj")),
          "mlp": ("mlp_bias", ("gate_proj", "up_proj", "down_proj"))}


def add_biases(model: nn.Module, biases: dict[str, torch.Tensor]) -> list[str]:
    """Give the Linear layers at the paths of ``biases`` those biases (FLAP's compensation).

    Where the config has a switch for biases in that part (LLaMA's ``attention_bias`` /
    ``mlp_bias``), it is turned on and every other Linear it governs gets a zero bias, so the
    config still describes the model (``save_pretrained`` + ``from_pretrained`` round-trip it).
    Returns the config switches turned on."""
    for path, b in biases.items():
        m = model.get_submodule(path)
        with torch.no_grad():
            if m.bias is None:
                m.bias = nn.Parameter(b.detach().to(m.weight.device, m.weight.dtype).clone())
            else:
                m.bias.copy_(b)
    cfg = getattr(model, "config", None)
    layers = decoder_layers(model)
    turned: list[str] = []
    if cfg is None or layers is None:
        return turned
    for part, (flag, names) in _FLAGS.items():
        if not any(f".{part}." in p for p in biases) or not _flag_adds_biases(model, part, flag):
            continue
        for layer in layers:
            for n in names:
                lin = getattr(getattr(layer, part), n)
                if lin.bias is None:
                    lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                        device=lin.weight.device))
        setattr(cfg, flag, True)
        turned.append(flag)
    return turned


def _flag_adds_biases(model: nn.Module, part: str, flag: str) -> bool:
    """Does turning ``config.<flag>`` on make the architecture build biases in ``part``?"""
    import copy

    cfg = model.config
    if getattr(cfg, flag, None) is not False:
        return False
    on = copy.deepcopy(cfg)
    setattr(on, flag, True)
    try:
        with torch.device("meta"):
            ref = type(model)(on)
    except Exception:
        return False
    layers = decoder_layers(ref)
    return layers is not None and all(
        getattr(getattr(layer, part), n).bias is not None for layer in layers for n in _FLAGS[part][1])


def logits_fidelity(a: nn.Module, b: nn.Module, batches: Any) -> dict[str, float]:
    """Relative error and cosine of ``b``'s logits vs ``a``'s over calibration batches (the
    ``output_fidelity`` of the report, for models that return a ``ModelOutput``)."""
    from ..datadriven.sequential import model_device

    num = den = dot = nb = 0.0

    def logits(m: nn.Module, xs: tuple) -> torch.Tensor:
        out = m(*(t.to(model_device(m)) for t in xs), use_cache=False)
        return (out.logits if hasattr(out, "logits") else out[0]).double().flatten().cpu()

    with torch.no_grad():
        for xs, _ in batches:
            ya, yb = logits(a, xs), logits(b, xs)
            num += float((ya - yb).square().sum())
            den += float(ya.square().sum())
            dot += float(ya @ yb)
            nb += float(yb.square().sum())
    return {"rel_err": (num / den) ** 0.5 if den else 0.0,
            "cosine": dot / (den * nb) ** 0.5 if den and nb else 1.0}


Progress = Callable[[str, int, int], None]
