"""Export a (pruned) Hugging Face causal language model to a single ONNX file (stage 8 for decoders).

The model is wrapped so that it takes tensors and returns tensors: ``input_ids`` and
``attention_mask`` in, ``logits`` out, with dynamic batch and sequence axes. With ``kv_cache=True``
it also takes ``position_ids`` and one ``past_key_values.{i}.key`` / ``.value`` per layer and
returns the matching ``present.{i}.key`` / ``.value``, so onnxruntime can generate one token at a
time (``graphprune.export.decoder_session.DecoderSession``). A pruned model's layers may keep
different numbers of key/value heads: each layer's cache inputs have that layer's own shape.

Before the file is moved into place it must pass ``onnx.checker`` and match PyTorch in
onnxruntime on two input shapes (one left-padded batch, one single sequence; with the cache, a
real prefix cache from PyTorch): a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validate import check_choice, check_int
from ..errors import ExportError, InputError, ParityError
from ..io import OutputError, atomic_path
from ..trace import preserved_state

EXPORTERS = ("auto", "legacy", "dynamo")
BATCH, SEQ, PAST, TOTAL = "batch", "sequence", "past_sequence", "total_sequence"


@dataclass(frozen=True)
class CacheLayout:
    """Per layer ``(key heads, key dim, value heads, value dim)`` of a decoder's KV cache."""

    layers: tuple[tuple[int, int, int, int], ...]

    @property
    def kv_heads(self) -> tuple[int, ...]:
        return tuple(k for k, _, _, _ in self.layers)


@dataclass
class DecoderExportResult:
    path: str
    exporter: str
    opset: int
    kv_cache: bool
    max_abs_err: float  # onnxruntime vs PyTorch logits (and present KV) on the check inputs
    max_rel_err: float  # relative to the largest magnitude of each output
    bytes: int
    seconds: float
    layout: CacheLayout
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)


def _cache_kwarg(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    """``[k0, v0, k1, v1, ...]`` of a transformers cache (5.x ``.layers``, 4.x lists or tuples)."""
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    if hasattr(cache, "key_cache"):
        return [t for k, v in zip(cache.key_cache, cache.value_cache) for t in (k, v)]
    return [t for kv in cache for t in kv[:2]]


def _out_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _make_cache(model: nn.Module, past: tuple[torch.Tensor, ...]) -> Any:
    from transformers import DynamicCache

    pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
    try:
        return DynamicCache(ddp_cache_data=pairs, config=model.config)
    except TypeError:  # transformers 4.x
        return DynamicCache.from_legacy_cache(tuple(pairs))


class DecoderWrapper(nn.Module):
    """Tensors in, tensors out: ``(input_ids, attention_mask[, position_ids, *past]) ->
    (logits[, *present])`` around a Hugging Face causal LM."""

    def __init__(self, model: nn.Module, kv_cache: bool):
        super().__init__()
        self.model = model
        self.kv_cache = kv_cache
        self._cache_kw = _cache_kwarg(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, *past: torch.Tensor) -> Any:
        if not self.kv_cache:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self._cache_kw: _make_cache(self.model, past)})
        return (out.logits, *_cache_tensors(_out_cache(out)))


def check_causal_lm(model: Any, owner: str) -> None:
    """Raise an InputError unless ``model`` is a Hugging Face causal LM taking token ids."""
    from ..hf import is_hf_model

    if not is_hf_model(model) or getattr(model, "main_input_name", None) != "input_ids" \
            or getattr(model.config, "is_encoder_decoder", False) \
            or model.get_output_embeddings() is None:  # a base model without its LM head
        raise InputError(f"The 'model' parameter of {owner} must be a Hugging Face causal language "
                         f"model (e.g. LlamaForCausalLM) taking input_ids. Got "
                         f"{type(model).__name__} instead.")


def cache_layout(model: nn.Module) -> CacheLayout:
    """Shapes of ``model``'s KV cache per layer, read from one forward pass with the cache (so
    pruned layers report the heads they kept, whatever the config says)."""
    ids = torch.zeros(1, 2, dtype=torch.long)
    with preserved_state(model, "eval"):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    cache = _out_cache(out)
    if cache is None:
        raise ExportError(f"{type(model).__name__} returned no KV cache with use_cache=True; export "
                          "it with kv_cache=False.")
    ts = _cache_tensors(cache)
    return CacheLayout(tuple((int(k.shape[1]), int(k.shape[3]), int(v.shape[1]), int(v.shape[3]))
                             for k, v in zip(ts[::2], ts[1::2])))


def io_names(layout: CacheLayout, kv_cache: bool) -> tuple[list[str], list[str]]:
    """ONNX input and output names (the ``optimum`` / onnxruntime-genai convention)."""
    ins, outs = ["input_ids", "attention_mask"], ["logits"]
    if kv_cache:
        ins.append("position_ids")
        for i in range(len(layout.layers)):
            ins += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
            outs += [f"present.{i}.key", f"present.{i}.value"]
    return ins, outs


def _dims(names: list[str], outputs: bool) -> dict[str, dict[int, str]]:
    out = {}
    for n in names:
        if n in ("input_ids", "position_ids", "logits"):
            out[n] = {0: BATCH, 1: SEQ}
        elif n == "attention_mask":
            out[n] = {0: BATCH, 1: TOTAL}
        else:
            out[n] = {0: BATCH, 2: TOTAL if outputs else PAST}
    return out


def _name_dims(path: str, ins: list[str], outs: list[str]) -> None:
    """Give the dynamic axes the same readable names whichever exporter wrote the file."""
    import onnx

    m = onnx.load(path)
    dims = {**_dims(ins, False), **_dims(outs, True)}
    for vi in list(m.graph.input) + list(m.graph.output):
        for axis, name in dims.get(vi.name, {}).items():
            d = vi.type.tensor_type.shape.dim[axis]
            d.Clear()
            d.dim_param = name
    onnx.save(m, path)


def example_case(model: nn.Module, layout: CacheLayout, kv_cache: bool, batch: int, seq: int,
                 past: int, pad: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Wrapper inputs: random ids, the first row left-padded by ``pad`` tokens, and (with the
    cache) the real cache PyTorch builds for a ``past``-token prefix."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (batch, past + seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    if not kv_cache:
        return ids, mask
    dtype = next(model.parameters()).dtype
    empty = tuple(torch.zeros(batch, h, 0, d, dtype=dtype) for kh, kd, vh, vd in layout.layers
                  for h, d in ((kh, kd), (vh, vd)))
    w = DecoderWrapper(model, True)
    prefix = w(ids[:, :past], mask[:, :past], pos[:, :past], *empty)[1:] if past else empty
    return (ids[:, past:], mask, pos[:, past:], *prefix)


def _silenced() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    sink = io.StringIO()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(sink))
    stack.enter_context(contextlib.redirect_stderr(sink))
    return stack


def _export(wrapper: DecoderWrapper, args: tuple[torch.Tensor, ...], path: str, exporter: str,
            opset: int | None, ins: list[str], outs: list[str]) -> None:
    kw: dict[str, Any] = {"input_names": ins, "output_names": outs}
    if opset is not None:
        kw["opset_version"] = opset
    with _silenced():
        if exporter == "legacy":
            axes = {**_dims(ins, False), **_dims(outs, True)}
            torch.onnx.export(wrapper, args, path, dynamo=False, dynamic_axes=axes, **kw)
        else:
            d = torch.export.Dim.DYNAMIC
            shapes: list[Any] = [{0: d, 1: d}, {0: d, 1: d}]
            if wrapper.kv_cache:
                shapes += [{0: d, 1: d}, tuple({0: d, 2: d} for _ in args[3:])]
            torch.onnx.export(wrapper, args, path, dynamo=True, external_data=False,
                              dynamic_shapes=tuple(shapes), verbose=False, **kw)
    _name_dims(path, ins, outs)


def _compare(name: str, got: np.ndarray, want: np.ndarray, mask: np.ndarray, seq: int
             ) -> tuple[float, float]:
    m = mask.astype(bool)
    if name == "logits":
        g, w = got[m[:, -seq:]], want[m[:, -seq:]]
    else:  # (B, H, T, D): keep the real positions of each row
        g = np.concatenate([got[b][:, m[b]].ravel() for b in range(got.shape[0])])
        w = np.concatenate([want[b][:, m[b]].ravel() for b in range(want.shape[0])])
    if not w.size:
        return 0.0, 0.0
    d = float(np.max(np.abs(g.astype(np.float64) - w)))
    scale = float(np.max(np.abs(w)))
    return d, d / scale if scale > 0 else d


def decoder_parity(path: str, model: nn.Module, cases: list[tuple[torch.Tensor, ...]], kv_cache: bool
                   ) -> tuple[float, float]:
    """Max absolute and relative error of the ONNX decoder vs PyTorch over ``cases`` (real
    positions only)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    w = DecoderWrapper(model, kv_cache)
    abs_err = rel_err = 0.0
    for args in cases:
        feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
        got = sess.run(None, feeds)
        want = w(*args)
        want = [t.numpy() for t in (want if isinstance(want, tuple) else (want,))]
        if len(got) != len(want):
            raise ParityError(f"ONNX decoder '{path}' has {len(got)} outputs, PyTorch {len(want)}.")
        for n, g, x in zip(names, got, want):
            if g.shape != x.shape:
                raise ParityError(f"ONNX decoder '{path}': output '{n}' has shape {g.shape}, "
                                  f"PyTorch {x.shape}.")
            a, r = _compare(n, g, x, args[1].numpy(), args[0].shape[1])
            abs_err, rel_err = max(abs_err, a), max(rel_err, r)
    return abs_err, rel_err


def export_decoder(model: nn.Module, path: str | os.PathLike, *, seq_len: int = 16,
                   kv_cache: bool = False, opset: int | None = None, exporter: str = "auto",
                   check: bool = True, rtol: float = 1e-4) -> DecoderExportResult:
    """Export a Hugging Face causal LM (dense or pruned by graphprune) to one ONNX file at
    ``path`` (written atomically, a single file: weights under 2 GB).

    Inputs ``input_ids`` / ``attention_mask`` ``(batch, sequence)`` (the mask covers past and new
    tokens), output ``logits`` ``(batch, sequence, vocab)``. With ``kv_cache`` also
    ``position_ids`` and per layer ``past_key_values.{i}.key|value`` ``(batch, kv_heads_i,
    past_sequence, head_dim)`` in, ``present.{i}.key|value`` out; an empty past (length 0)
    scores a whole sequence. ``exporter`` is 'legacy' (TorchScript; about a second), 'dynamo'
    (torch.export; slower) or 'auto' (legacy, then dynamo). With ``check`` the file must pass
    ``onnx.checker`` and match PyTorch in onnxruntime within ``rtol`` (relative to each output's
    largest magnitude) on a left-padded batch of ``seq_len`` tokens and on a single short
    sequence, else nothing is written.

    Raises:
        InputError: ``model`` is not a Hugging Face causal LM.
        ExportError: every exporter failed, or ``path`` cannot be written (nothing is written).
        ParityError: onnxruntime differs from PyTorch by more than ``rtol`` (nothing is written).

    Example:
        >>> r = graphprune.prune(model, graphprune.hf.example_inputs(model), sparsity=0.3)
        >>> export_decoder(r.model, "out/model.onnx", kv_cache=True).max_rel_err < 1e-4
        True
    """
    import onnx

    check_causal_lm(model, "export_decoder")
    check_choice(exporter, "exporter", "export_decoder", EXPORTERS)
    seq_len = check_int(seq_len, "seq_len", "export_decoder", low=4)
    path = os.fspath(path)
    t0 = time.perf_counter()
    with preserved_state(model, "eval"):
        layout = cache_layout(model) if kv_cache else CacheLayout(())
        ins, outs = io_names(layout, kv_cache)
        past = seq_len // 2 if kv_cache else 0
        example = example_case(model, layout, kv_cache, 2, seq_len - past, past, 0, 0)
        cases = [example_case(model, layout, kv_cache, 2, seq_len - past, past, 3, 1),
                 example_case(model, layout, kv_cache, 1, 1 if kv_cache else 3, 5 if kv_cache else 0, 0, 2)]
        wrapper = DecoderWrapper(model, kv_cache).eval()
        errors = []
        try:
            with atomic_path(path) as tmp:
                for ex in (["legacy", "dynamo"] if exporter == "auto" else [exporter]):
                    try:
                        _export(wrapper, example, tmp, ex, opset, ins, outs)
                        onnx.checker.check_model(tmp, full_check=True)
                        used = ex
                        break
                    except Exception as e:  # exporter failures come in many types
                        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                        errors.append(f"{ex}: {type(e).__name__}: {msg}")
                else:
                    raise ExportError(f"exporting {type(model).__name__} to ONNX failed; nothing was "
                                      "written. " + " | ".join(errors))
                abs_err = rel_err = 0.0
                if check:
                    abs_err, rel_err = decoder_parity(tmp, model, cases, kv_cache)
                    if not rel_err <= rtol:
                        raise ParityError(
                            f"the ONNX decoder differs from PyTorch by {rel_err:.2e} (relative, max abs "
                            f"{abs_err:.2e}) > rtol={rtol:g}; nothing was written.")
                proto = onnx.load(tmp, load_external_data=False)
                opset_used = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                                 default=0)
                size = os.path.getsize(tmp)
        except OutputError as e:
            raise ExportError(str(e)) from e
    return DecoderExportResult(path, used, opset_used, kv_cache, abs_err, rel_err, size,
                               time.perf_counter() - t0, layout, ins, outs)
