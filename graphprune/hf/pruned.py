"""After pruning a Hugging Face model: a config that describes the smaller model, and saving /
loading it without pickle.

``update_config`` writes the new head counts and widths into ``model.config`` where the config
can express them (the same count in every layer) and says whether the config alone now rebuilds
the model's shapes. ``save_pruned`` writes a ``save_pretrained`` directory (config.json +
safetensors; plain ``from_pretrained`` loads it when the config is exact) plus ``graphprune.json``
holding every shape and size attribute that differs from what the config builds, and the plan and
masks of the run; ``load_pruned`` rebuilds the model from those, never unpickling anything.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, MaskFileError
from ..io import atomic_write_text, staged_dir
from .loading import no_progress_bars, transformers_module

FORMAT = "graphprune.hf-pruned"
VERSION = 1


# ---------------------------------------------------------------------- config per family
def _count(m: nn.Module | None, per: int) -> int | None:
    w = getattr(m, "weight", None)
    if w is None:
        return None
    out = w.shape[1] if type(m).__name__ == "Conv1D" else w.shape[0]
    return out // per


def _uniform(values: list[int | None]) -> int | None:
    vals = {v for v in values if v is not None}
    return vals.pop() if len(vals) == 1 and None not in values else None


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return list(obj)
    return []


def _llama_like(model: nn.Module, cfg: Any) -> dict[str, int]:
    layers = _decoder_layers(model)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    out = {"head_dim": hd}
    for key, mod, per in (("num_attention_heads", "self_attn.q_proj", hd),
                          ("num_key_value_heads", "self_attn.k_proj", hd),
                          ("intermediate_size", "mlp.gate_proj", 1)):
        v = _uniform([_count(layer.get_submodule(mod), per) for layer in layers])
        if v is not None:
            out[key] = v
    return out


def _gpt2(model: nn.Module, cfg: Any) -> dict[str, int]:
    layers = _decoder_layers(model)
    hd = cfg.n_embd // cfg.n_head
    out = {}
    heads = _uniform([layer.attn.c_proj.weight.shape[0] // hd for layer in layers])
    inner = _uniform([_count(layer.mlp.c_fc, 1) for layer in layers])
    if heads is not None and heads * hd == cfg.n_embd:
        out["n_head"] = heads
    if inner is not None:
        out["n_inner"] = inner
    return out


def _t5(model: nn.Module, cfg: Any) -> dict[str, int]:
    blocks = [b for stack in ("encoder", "decoder") for b in getattr(model, stack).block]
    heads = _uniform([_count(b.layer[0].SelfAttention.q, cfg.d_kv) for b in blocks])
    ff = _uniform([_count(b.layer[-1].DenseReluDense.wi if hasattr(b.layer[-1].DenseReluDense,
                                                                   "wi")
                          else b.layer[-1].DenseReluDense.wi_0, 1) for b in blocks])
    return {k: v for k, v in (("num_heads", heads), ("d_ff", ff)) if v is not None}


def _bert_like(model: nn.Module, cfg: Any) -> dict[str, int]:
    hd = cfg.hidden_size // cfg.num_attention_heads
    queries, inter = [], []
    for name, m in model.named_modules():
        if name.endswith(("attention.self.query", "attention.q_proj", "attention.attention.query")):
            queries.append(_count(m, hd))
        if name.endswith(("intermediate.dense", "mlp.fc1")):
            inter.append(_count(m, 1))
    out = {}
    h, i = _uniform(queries), _uniform(inter)
    if h is not None and h * hd == cfg.hidden_size:
        out["num_attention_heads"] = h
    if i is not None:
        out["intermediate_size"] = i
    return out


def _bart_like(model: nn.Module, cfg: Any) -> dict[str, int]:
    hd = cfg.d_model // cfg.encoder_attention_heads
    out = {}
    for stack in ("encoder", "decoder"):
        layers = getattr(getattr(model, "model", model), stack).layers
        h = _uniform([_count(layer.self_attn.q_proj, hd) for layer in layers])
        f = _uniform([_count(layer.fc1, 1) for layer in layers])
        if h is not None and h * hd == cfg.d_model:
            out[f"{stack}_attention_heads"] = h
        if f is not None:
            out[f"{stack}_ffn_dim"] = f
    return out


# model_type -> how the pruned model's widths map to config fields
CONFIG_RULES: dict[str, Callable[[nn.Module, Any], dict[str, int]]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo",
                     "granite"), _llama_like),
    "gpt2": _gpt2, "t5": _t5, "mt5": _t5,
    **dict.fromkeys(("bert", "roberta", "vit", "deit", "electra", "distilbert"), _bert_like),
    **dict.fromkeys(("bart", "mbart", "marian", "pegasus"), _bart_like),
}


def _reference(model: nn.Module, config: Any) -> nn.Module | None:
    """The architecture built from ``config`` on the meta device (shapes only), or None."""
    try:
        with torch.device("meta"):
            return type(model)(config)
    except Exception:
        return None


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def update_config(model: nn.Module) -> bool:
    """Write the pruned model's head counts and widths into ``model.config`` where the config
    can express them; True if the config alone now rebuilds every parameter shape (then plain
    ``from_pretrained`` loads a saved copy).

    Example:
        >>> r = graphprune.prune(llama, graphprune.hf.example_inputs(llama), sparsity=0.25)
        >>> graphprune.hf.update_config(r.model)   # num_attention_heads, intermediate_size...
    """
    cfg = model.config
    rule = CONFIG_RULES.get(getattr(cfg, "model_type", ""))
    if rule is not None:
        for k, v in rule(model, cfg).items():
            setattr(cfg, k, v)
    ref = _reference(model, cfg)
    return ref is not None and _shapes(ref) == _shapes(model)


# ---------------------------------------------------------------------- save / load
def _attributes(model: nn.Module, ref: nn.Module) -> dict[str, dict[str, Any]]:
    """Size attributes (ints, tuples of ints) of the pruned modules that differ from what the
    config builds."""
    refs = dict(ref.named_modules())
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        r = refs.get(name)
        if r is None:
            continue
        diff = {}
        for k, v in vars(m).items():
            ok = isinstance(v, int) and not isinstance(v, bool) or (
                isinstance(v, tuple) and v and all(isinstance(x, int) for x in v))
            if ok and getattr(r, k, None) != v:
                diff[k] = list(v) if isinstance(v, tuple) else v
        if diff:
            out[name] = diff
    return out


def save_pruned(model: Any, path: str | os.PathLike, *, result: Any = None) -> str:
    """Save a pruned Hugging Face model (or a ``PruneResult`` of one) to a directory, without
    pickle: config.json + model.safetensors as ``save_pretrained`` writes them (the config
    updated by ``update_config``), ``graphprune.json`` with every shape and size attribute the
    config cannot express, and, for a result, ``masks.safetensors`` and ``plan.json``.
    Written into a staging directory and moved into place: a failure leaves nothing behind.

    Raises:
        ConfigError: ``model`` is not a Hugging Face model.

    Example:
        >>> r = graphprune.prune(model, graphprune.hf.example_inputs(model), sparsity=0.3)
        >>> graphprune.hf.save_pruned(r, "out/pruned")
        >>> small = graphprune.hf.load_pruned("out/pruned")
    """
    from .loading import is_hf_model

    if result is None and hasattr(model, "plan") and hasattr(model, "masks"):
        model, result = model.model, model
    if not is_hf_model(model):
        raise ConfigError(f"save_pruned needs a Hugging Face PreTrainedModel or the PruneResult of "
                          f"one. Got {type(model).__name__} instead.")
    exact = update_config(model)
    ref = _reference(model, model.config)
    with staged_dir(path) as stage:
        with no_progress_bars():
            model.save_pretrained(stage, safe_serialization=True)
        info = {"format": FORMAT, "version": VERSION, "architecture": type(model).__name__,
                "config_is_exact": exact}
        if not exact:
            info["shapes"] = {k: list(v) for k, v in _shapes(model).items()}
            info["attributes"] = _attributes(model, ref) if ref is not None else {}
        atomic_write_text(os.path.join(stage, "graphprune.json"), json.dumps(info, indent=1) + "\n")
        if result is not None:
            from ..export.masks import save_masks

            save_masks(result.masks, os.path.join(stage, "masks.safetensors"), plan=result.plan)
            result.plan.save(os.path.join(stage, "plan.json"))
    return os.fspath(path)


@contextlib.contextmanager
def _no_init() -> Any:
    T = transformers_module()
    ctx = None
    for mod in ("initialization", "modeling_utils"):  # transformers 5.x, 4.x
        ctx = ctx or getattr(getattr(T, mod, None), "no_init_weights", None)
    with (ctx() if ctx is not None else contextlib.nullcontext()):
        yield


def _set_param(model: nn.Module, name: str, shape: tuple[int, ...]) -> None:
    owner, _, attr = name.rpartition(".")
    m = model.get_submodule(owner) if owner else model
    old = getattr(m, attr)
    new = torch.empty(shape, dtype=old.dtype, device=old.device)
    if isinstance(old, nn.Parameter):
        m._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        m._buffers[attr] = new


def load_pruned(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by ``save_pruned`` (eval mode), with its pruned shapes.

    Raises:
        ConfigError / MaskFileError: not a pruned-model directory, or files that do not match.

    Example:
        >>> small = graphprune.hf.load_pruned("out/pruned")
        >>> small.generate(ids, max_new_tokens=16)
    """
    from safetensors.torch import load_file

    path = os.fspath(path)
    T = transformers_module()
    try:
        with open(os.path.join(path, "graphprune.json"), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"'{path}' is not a pruned model saved by graphprune.hf.save_pruned "
                          f"(graphprune.json: {e}).") from e
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise ConfigError(f"'{path}/graphprune.json' is not a {FORMAT} file of version {VERSION}.")
    cls = getattr(T, info.get("architecture", ""), None)
    if cls is None:
        raise ConfigError(f"transformers has no class '{info.get('architecture')}' (from "
                          f"'{path}/graphprune.json').")
    if info.get("config_is_exact"):
        with no_progress_bars():
            return cls.from_pretrained(path, local_files_only=True).eval()
    config = T.AutoConfig.from_pretrained(path, local_files_only=True)
    with _no_init():
        model = cls(config)
    for name, shape in info.get("shapes", {}).items():
        if name in model.state_dict() and tuple(model.state_dict()[name].shape) != tuple(shape):
            _set_param(model, name, tuple(shape))
    for mod, attrs in info.get("attributes", {}).items():
        m = model.get_submodule(mod) if mod else model
        for k, v in attrs.items():
            setattr(m, k, tuple(v) if isinstance(v, list) else v)
    for m in model.modules():  # recurrent kernels read a list of their weights
        if isinstance(m, nn.RNNBase):
            m._init_flat_weights()
    files = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")
             and f.startswith("model")]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise MaskFileError(f"the weights in '{path}' do not match the pruned model: missing "
                            f"{missing[:3]}, unexpected {list(unexpected)[:3]}.")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()
