"""The main job for a Hugging Face causal language model (``pipeline.run`` hands a model loaded
from ``hf:DIR`` here): a local text file -> calibration windows and a held-out tail -> prune
(block by block for LLaMA-style decoders, through ``graphprune.prune``) -> optional fine-tune
-> ONNX decoder with its KV cache (+ int8 weight-only) -> perplexity in PyTorch and in
onnxruntime -> one bundle that is also a Hugging Face directory (``hf.save_pruned``: config
updated, safetensors, the tokenizer), so ``hf:OUT`` loads the pruned model again.

The text is tokenized once with the model directory's own tokenizer; its last tenth (at least
one window) is held out for perplexity, calibration windows are drawn from the rest.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..cost import count_params
from ..errors import ConfigError, InputError
from .calib import _TEXT_SUFFIXES, random_windows, read_text

Log = Callable[[str], None]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DEFAULT_SEQ_LEN = 256
HELD_OUT = 0.1  # share of the text's tokens kept for perplexity


def is_text_source(source: Any) -> bool:
    """Does the data source name a text file (``.txt``, ``.text``, ``.md``, ``.rst``)?"""
    return isinstance(source, (str, os.PathLike)) and os.fspath(source).lower().endswith(_TEXT_SUFFIXES)


def check_causal_lm(model: nn.Module, spec: str) -> None:
    """Raise a ConfigError unless ``model`` is a Hugging Face causal LM (what this job runs)."""
    from ..export.decoder import check_causal_lm as check

    try:
        check(model, "the main job")
    except InputError as e:
        raise ConfigError(
            f"The model '{spec}' is a {type(model).__name__}; the main job prunes Hugging Face "
            "causal language models (LlamaForCausalLM, Qwen2ForCausalLM, ...) on text. Prune other "
            "Hugging Face models with graphprune.prune(model, graphprune.hf.example_inputs(model), "
            "...).", param="model") from e


def check_text_source(source: Any, spec: str) -> str:
    """The text file a language model needs as its data source.

    Raises:
        ConfigError: no source, or one that is not a text file.
    """
    if source is None:
        raise ConfigError(f"The language model '{spec}' is calibrated and evaluated on text: give a "
                          f"text file ({', '.join(_TEXT_SUFFIXES)}) as the data source. Got none.",
                          param="data")
    if not is_text_source(source):
        raise ConfigError(f"The data source '{source}' is not a text file ({', '.join(_TEXT_SUFFIXES)})"
                          f"; the language model '{spec}' needs text to calibrate on and to measure "
                          "perplexity with.", param="data")
    if not os.path.isfile(source):
        raise ConfigError(f"The text file '{source}' does not exist.", param="data")
    return os.fspath(source)


def model_tokenizer(path: str) -> Any:
    """The tokenizer saved in the model directory ``path`` (``AutoTokenizer``, local files only).

    Raises:
        ConfigError: the directory holds no tokenizer, or it cannot be loaded.
    """
    from ..hf.loading import transformers_module

    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ConfigError(
            f"The Hugging Face model directory '{path}' holds no tokenizer (none of "
            f"{', '.join(TOKENIZER_FILES)}), which turns the text into token ids. Save the model's "
            f"tokenizer beside it: tokenizer.save_pretrained('{path}').", param="model")
    T = transformers_module()
    try:
        return T.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"cannot load the tokenizer in '{path}' with AutoTokenizer: "
                          f"{type(e).__name__}: {first}", param="model") from e


@dataclass(frozen=True)
class TextData:
    """A text file as token ids: ``calibration`` windows ``(n, seq_len)`` from its head,
    ``held_out`` (1-D) its tail, for perplexity."""

    calibration: torch.Tensor
    held_out: torch.Tensor
    train: torch.Tensor  # the head the windows come from (also what fine-tuning reads)
    seq_len: int
    source: str
    tokens: int


def text_data(path: str, tokenizer: Any, *, n_samples: int, seq_len: int, seed: int = 0,
              vocab_size: int | None = None, log: Log | None = None) -> TextData:
    """Tokenize the text file at ``path`` and split it: the last tenth of its tokens (at least
    ``seq_len``) is held out; ``n_samples`` windows of ``seq_len`` tokens (fewer if the head is
    short, said in ``log``) are drawn from the rest at seeded random offsets.

    Example:
        >>> d = text_data("notes.txt", tok, n_samples=64, seq_len=128)
        >>> d.calibration.shape, graphprune.lm.perplexity(model, d.held_out, d.seq_len)

    Raises:
        ConfigError: an unreadable file, a text shorter than two windows, or a tokenizer whose
            ids do not fit the model's vocabulary.
    """
    from .tokenizer import encode

    text, what = read_text(path)
    ids = torch.tensor(encode(tokenizer, text), dtype=torch.long)
    if ids.numel() < 2 * seq_len:
        raise ConfigError(f"{what} holds {ids.numel():,} tokens; the language model needs at least "
                          f"{2 * seq_len:,} (a {seq_len}-token calibration window and one held out). "
                          "Give a longer text or a shorter sequence length.", param="data")
    if vocab_size is not None and ids.numel() and int(ids.max()) >= vocab_size:
        raise ConfigError(f"the tokenizer gives id {int(ids.max())} for {what} but the model's "
                          f"vocabulary has {vocab_size} ids: the directory's tokenizer does not "
                          "belong to its model.", param="model")
    cut = ids.numel() - max(int(HELD_OUT * ids.numel()), seq_len)
    head, tail = ids[:cut], ids[cut:]
    n = min(n_samples, head.numel() // seq_len)
    if n < n_samples and log:
        log(f"{what} holds {head.numel():,} calibration tokens: {n} windows of {seq_len} instead of "
            f"{n_samples}")
    calib = random_windows(head, n, seq_len, seed, source=what)
    return TextData(calib, tail, head, seq_len, what, int(ids.numel()))


def seq_len_for(model: nn.Module, input_shape: Any) -> int:
    """The window length: the recipe's input shape ``(batch, seq_len)`` if given, else 256 (at
    most the model's ``max_position_embeddings``)."""
    if input_shape:
        return int(list(input_shape)[-1])
    limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_SEQ_LEN
    return int(min(DEFAULT_SEQ_LEN, limit))


def block_params(model: nn.Module) -> int:
    """Parameters of the decoder blocks' attention and MLP (what structured LLM pruning removes)."""
    names = (".self_attn.", ".mlp.", ".attn.", ".attention.")
    return sum(p.numel() for n, p in model.named_parameters() if any(k in n for k in names))


def finetune_lm(model: nn.Module, ids: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
                seq_len: int, seed: int = 0, log: Log | None = None) -> dict[str, Any] | None:
    """Train ``model`` in place for ``epochs`` passes over the ``seq_len`` windows of ``ids``
    (AdamW, warm-up + cosine, ``graphprune.lm.train_causal_lm``); None if ``ids`` is too short."""
    from .train import LMSpec, train_causal_lm

    windows = ids.numel() // seq_len - 1  # train_causal_lm cuts at a random offset
    if windows < 1:
        if log:
            log("the calibration text is too short to fine-tune on: fine-tuning skipped")
        return None
    batch = max(1, min(batch_size, windows))
    steps = max(1, epochs * (windows // batch))
    spec = LMSpec(seq_len=seq_len, batch_size=batch, steps=steps, lr=lr,
                  warmup_steps=max(1, steps // 10), seed=seed)
    return train_causal_lm(model, ids, spec, log=log)


def run_lm(recipe: Any, model: nn.Module, out_dir: str, *, log: Log | None = None,
           progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Run ``recipe`` on the Hugging Face causal LM ``model`` (loaded from the recipe's
    ``hf:DIR``) and write the bundle to ``out_dir``; returns the report.

    Raises:
        ConfigError: not a causal LM, no text file, no tokenizer, or a stage that language models
            do not have (the code stage, the sensitivity plot).
    """
    from ..export.bundle_lm import export_bundle_lm
    from ..export.decoder import export_decoder
    from ..export.decoder_session import DecoderSession
    from ..hf import save_pruned
    from ..prune import prune
    from ..specs import load_weights
    from .eval import perplexity

    log = log or (lambda s: None)
    spec = recipe.model.spec
    path = spec.partition(":")[2]
    check_causal_lm(model, spec)
    source = check_text_source(recipe.data.source, spec)
    for stage, on in (("the code stage", recipe.code.enabled), ("the sensitivity plot", recipe.sensitivity)):
        if on:
            raise ConfigError(f"{stage} is not available for language models; turn it off for "
                              f"'{spec}'.", param="code" if "code" in stage else "sensitivity")
    tok = model_tokenizer(path)
    if recipe.model.weights:
        load_weights(model, recipe.model.weights)
    model.eval()
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    L = seq_len_for(model, recipe.model.input_shape)
    data = text_data(source, tok, n_samples=recipe.data.calibration_samples or 256, seq_len=L,
                     seed=recipe.seed, vocab_size=int(model.config.vocab_size), log=log)
    max_w = max(1, recipe.data.eval_samples)

    def ppl(m: Any) -> float:
        return perplexity(m, data.held_out, L, batch_size=8, max_windows=max_w)

    log(f"{data.source}: {data.tokens:,} tokens; {data.calibration.shape[0]} calibration windows of "
        f"{L}, {data.held_out.numel():,} held out")
    ppl_dense = ppl(model)

    p = recipe.prune
    log(f"pruning with {p.method}" + (" + reconstruction" if p.reconstruct else ""))
    t = time.perf_counter()
    torch.manual_seed(recipe.seed)
    if p.global_pruning:  # FLAP's adaptive allocation: sparsity is the share of attention + MLP
        from .pruning import prune_lm

        if p.sparsity is None:
            raise ConfigError("global pruning of a language model removes a share of its attention "
                              "+ MLP parameters: give a sparsity (not a MACs/params/latency target).",
                              param="sparsity")
        r = prune_lm(model, data.calibration, remove=p.sparsity, method=p.method,
                     reconstruct=p.reconstruct, adaptive=True, device=p.device, gqa=p.gqa,
                     progress=progress)
    else:
        r = prune(model, data.calibration[:1], p.replace(seed=recipe.seed),
                  calibration=data.calibration, progress=progress)
    times["prune"] = time.perf_counter() - t
    pruned = r.model
    ppl_pruned = ppl(pruned)
    log(f"pruned: {r.report.params[0]:,} -> {r.report.params[1]:,} parameters; held-out perplexity "
        f"{ppl_dense:.2f} -> {ppl_pruned:.2f}")
    ppl_ft = ppl_pruned
    if recipe.finetune.epochs:
        log(f"fine-tuning for {recipe.finetune.epochs} epochs on the calibration text")
        t = time.perf_counter()
        done = finetune_lm(pruned, data.train, epochs=recipe.finetune.epochs, lr=recipe.finetune.lr,
                           batch_size=recipe.finetune.batch_size, seq_len=L, seed=recipe.seed, log=log)
        if done is not None:
            times["finetune"] = time.perf_counter() - t
            ppl_ft = ppl(pruned)
    quantize = ("int8",) if recipe.quantize.mode == "int8" else ()
    probe = data.held_out[: L * max(1, min(4, data.held_out.numel() // L))].view(-1, L)
    with tempfile.TemporaryDirectory(prefix="gp-lm-") as tmp:
        t = time.perf_counter()
        log("exporting the dense decoder for reference")
        dense_onnx = export_decoder(model, os.path.join(tmp, "dense.onnx"), exporter=recipe.export.exporter)
        dense_sess = DecoderSession(dense_onnx.path, threads=2)
        before = {"params": count_params(model),
                  "block_params": block_params(model), "perplexity_torch": ppl_dense,
                  "onnx_bytes": dense_onnx.bytes, "perplexity_ort": ppl(dense_sess),
                  "ort_tokens_per_s": dense_sess.tokens_per_second(probe, 3)}
        del dense_sess

        def finish(stage: str, report: dict[str, Any]) -> None:
            """Measure the staged files; add the Hugging Face directory and the main job's files."""
            from ..pipeline_report import write_report_files

            sess = DecoderSession(os.path.join(stage, "model.onnx"), threads=2)
            onnx = report["onnx"]
            after = {"params": count_params(pruned),
                     "block_params": block_params(pruned), "perplexity_torch_pruned": ppl_pruned,
                     "perplexity_torch": ppl_ft, "onnx_bytes": onnx["fp32"]["bytes"],
                     "perplexity_ort": ppl(sess), "ort_tokens_per_s": sess.tokens_per_second(probe, 3),
                     "precision": "fp32" + (" + int8 weight-only" if quantize else "")}
            del sess
            if quantize:
                q = DecoderSession(os.path.join(stage, onnx["int8"]["file"]), threads=2)
                after.update({"int8_bytes": onnx["int8"]["bytes"], "perplexity_ort_int8": ppl(q),
                              "int8_tokens_per_s": q.tokens_per_second(probe, 3)})
                del q
            times["export"] = time.perf_counter() - t
            save_pruned(pruned, stage, result=r)
            report.update({
                "graphprune": __import__("graphprune").__version__,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                "recipe": recipe.to_dict(), "model": spec, "data": source,
                "text": {"tokens": data.tokens, "seq_len": L,
                         "calibration_windows": int(data.calibration.shape[0]),
                         "held_out_tokens": int(data.held_out.numel()),
                         "held_out_windows": min(max_w, int(data.held_out.numel()) // L)},
                "before": before, "after": after,
                "timings_s": {**times, "total": time.perf_counter() - t_start}})
            write_report_files(stage, report, recipe)

        log("exporting the pruned decoder with its KV cache" + (" (+ int8 weight-only)" if quantize else ""))
        return export_bundle_lm(out_dir, pruned, tokenizer=tok, result=r, quantize=quantize, kv_cache=True,
                                exporter=recipe.export.exporter, finish=finish)


__all__ = ["TextData", "check_causal_lm", "check_text_source", "finetune_lm", "is_text_source",
           "model_tokenizer", "run_lm", "seq_len_for", "text_data"]
