"""Hugging Face models as inputs to the flow: recognise them, load a local ``save_pretrained``
directory with the right class, make example inputs, and the capture settings they need.

Nothing here imports ``transformers`` until a Hugging Face model is actually used, and nothing is
ever downloaded: ``load`` reads a local directory only.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, InputError


def transformers_module() -> Any:
    """The ``transformers`` package (imported on demand).

    Raises:
        ConfigError: transformers is not installed.
    """
    try:
        import transformers
    except ImportError as e:
        raise ConfigError("Hugging Face models need transformers, which is not installed: pip "
                          "install 'graphprune[hf]'.") from e
    return transformers


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Silence transformers' progress bars (loading weights) inside the block, then restore."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def is_hf_model(model: Any) -> bool:
    """Is ``model`` a ``transformers.PreTrainedModel`` (without importing transformers)?"""
    t = sys.modules.get("transformers")
    return t is not None and isinstance(model, getattr(t, "PreTrainedModel", ()))


def capture_kwargs(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword inputs for capturing a Hugging Face model's graph: no KV cache (a cache object is
    not a tensor output and is not part of the computation being pruned), tensor outputs."""
    params = inspect.signature(model.forward).parameters
    out = dict(kwargs)
    if "use_cache" in params and "use_cache" not in out:
        out["use_cache"] = False
    if "return_dict" in params and "return_dict" not in out:
        out["return_dict"] = True
    return out


def load(path: str | os.PathLike) -> nn.Module:
    """A model from a local directory written by ``save_pretrained`` (config.json + weights),
    built with the class its config names (``architectures``), in eval mode. A directory written
    by ``graphprune.hf.save_pruned`` is rebuilt with its pruned shapes.

    Raises:
        ConfigError: not a directory with a config.json, an unknown architecture, or
            transformers missing.

    Example:
        >>> model = graphprune.hf.load("out/tiny-llama")
    """
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"'{path}' is not a Hugging Face model directory: it has no config.json "
                          "(write one with model.save_pretrained(dir)).", param="model")
    if os.path.isfile(os.path.join(path, "graphprune.json")):
        from .pruned import load_pruned

        return load_pruned(path)
    T = transformers_module()
    with open(cfg_path, encoding="utf-8") as f:
        archs = json.load(f).get("architectures") or []
    cls = next((getattr(T, a) for a in archs if hasattr(T, a)), None)
    if cls is None:
        cls = T.AutoModel
    try:
        with no_progress_bars():
            model = cls.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ConfigError(f"cannot load the Hugging Face model in '{path}' with {cls.__name__}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                          param="model") from e
    return model.eval()


def example_inputs(model: nn.Module, *, batch: int = 1, seq_len: int = 16,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs shaped like real ones for a Hugging Face model: ``input_ids`` and
    ``attention_mask`` for text, ``pixel_values`` for vision, plus ``decoder_input_ids`` for an
    encoder-decoder.

    Raises:
        InputError: the model's main input is neither token ids nor pixels.

    Example:
        >>> x = graphprune.hf.example_inputs(model)
        >>> r = graphprune.prune(model, x, sparsity=0.3)
    """
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    main = getattr(model, "main_input_name", "input_ids")
    if main == "pixel_values":
        size = getattr(cfg, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        return {"pixel_values": torch.randn(batch, getattr(cfg, "num_channels", 3), size, size,
                                            generator=g)}
    if main != "input_ids":
        raise InputError(f"{type(model).__name__}'s main input is '{main}': pass example inputs "
                         "yourself (a dict of keyword tensors).")
    vocab = int(getattr(cfg, "vocab_size", 2))
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    if any(p.device.type == "meta" for p in model.parameters()):
        # a model on the meta device (shapes only): the mask would be read for its values
        return {"input_ids": ids.to("meta")}
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(cfg, "is_encoder_decoder", False):
        start = getattr(cfg, "decoder_start_token_id", None)
        dec = torch.randint(0, vocab, (batch, max(2, seq_len // 2)), generator=g)
        if start is not None:
            dec[:, 0] = start
        out["decoder_input_ids"] = dec
    return out
