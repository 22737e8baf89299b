"""Resolve a model SPEC ('torchvision:resnet50', 'timm:vit_tiny_patch16_224',
'package.module:callable', 'hf:DIR' for a local Hugging Face ``save_pretrained`` directory, or a
name from the repository's ``models/`` zoo) and load weights."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, InputError, MaskFileError, did_you_mean


def _zoo() -> dict[str, Any]:
    """The reference models that ship with graphprune (``graphprune.models``, the repository's
    ``models/``)."""
    from . import models

    return models.ZOO


def load_model(spec: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """Build the model named by ``spec`` (random init; a Hugging Face directory with its own
    weights) and its default input shape, if known (None for Hugging Face models: their inputs
    are keyword tensors, see ``graphprune.hf.example_inputs``).

    Example:
        >>> model, shape = load_model("torchvision:resnet18")   # (ResNet, None)
        >>> llama, _ = load_model("hf:out/tiny-llama")          # LlamaForCausalLM from the folder

    Raises:
        ConfigError: an unknown model, a missing package, or a directory that is not a
            Hugging Face model.
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"The model spec must be a non-empty string. Got {spec!r} instead.",
                          param="model")
    kind, _, name = spec.partition(":")
    if not name:
        zoo = _zoo()
        if spec in zoo:
            fn, shape = zoo[spec]
            return fn().eval(), tuple(shape)
        raise ConfigError(
            f"Unknown model '{spec}'. Use 'torchvision:NAME', 'timm:NAME', 'hf:DIR', "
            f"'package.module:callable' or one of: {', '.join(sorted(zoo))}."
            f"{did_you_mean(spec, zoo)}")
    if kind == "hf":
        from .hf.loading import load

        if not os.path.isdir(name):
            raise ConfigError(f"The Hugging Face model directory '{name}' of model spec '{spec}' does "
                              "not exist (write one with model.save_pretrained(dir); nothing is "
                              "downloaded).", param="model")
        return load(name), None
    if kind == "torchvision":
        try:
            import torchvision
        except ImportError as e:
            raise ConfigError("'torchvision:' models need torchvision: pip install "
                              "'graphprune[zoo]'.") from e
        names = torchvision.models.list_models(module=torchvision.models)
        if name not in names:
            raise ConfigError(f"torchvision has no classification model '{name}'."
                              f"{did_you_mean(name, names)}")
        return torchvision.models.get_model(name, weights=None).eval(), None
    if kind == "timm":
        try:
            import timm
        except ImportError as e:
            raise ConfigError("'timm:' models need timm: pip install 'graphprune[zoo]'.") from e
        if not timm.is_model(name):
            raise ConfigError(f"timm has no model '{name}'."
                              f"{did_you_mean(name, timm.list_models())}")
        m = timm.create_model(name, pretrained=False).eval()
        shape = m.pretrained_cfg.get("input_size") if hasattr(m, "pretrained_cfg") else None
        return m, (1, *shape) if shape else None
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(kind)
    except Exception as e:
        raise ConfigError(f"cannot import module '{kind}' of model SPEC '{spec}': {e}") from e
    obj = getattr(mod, name, None)
    if obj is None:
        public = [n for n in dir(mod) if not n.startswith("_")]
        raise ConfigError(f"module '{kind}' has no attribute '{name}'.{did_you_mean(name, public)}")
    m = obj if isinstance(obj, nn.Module) else obj()
    if not isinstance(m, nn.Module):
        raise ConfigError(f"'{spec}' returned {type(m).__name__}, not a torch.nn.Module.")
    zoo = _zoo()
    shape = next((tuple(s) for fn, s in zoo.values() if fn is obj), None)
    return m.eval(), shape


def load_weights(model: nn.Module, path: str) -> None:
    """Load a safetensors file or a state dict saved with torch.save (read with
    ``weights_only=True``: never unpickles arbitrary objects)."""
    if not os.path.isfile(path):
        raise InputError(f"weights file '{path}' does not exist.")
    if path.endswith(".safetensors"):
        from .export.masks import read_safetensors

        sd, _ = read_safetensors(path, "weights file")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MaskFileError(f"cannot read weights file '{path}' with torch.load("
                                f"weights_only=True): {str(e).splitlines()[0]}") from e
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise MaskFileError(f"weights file '{path}' does not hold a state dict "
                                f"(got {type(sd).__name__}).")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        if bad:
            parts.append(f"shape mismatch for {bad[0]}: file {tuple(sd[bad[0]].shape)} vs "
                         f"model {tuple(own[bad[0]].shape)}")
        raise InputError(f"weights file '{path}' does not fit the model: {'; '.join(parts)}.")
    model.load_state_dict(sd)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise ConfigError(f"An input shape must be positive ints separated by commas, e.g. "
                          f"1,3,224,224. Got '{text}'.", param="input_shape")
    return shape
