"""Export a deployable bundle for a (pruned) Hugging Face decoder: ``model.onnx`` (fp32, with the
KV cache unless asked otherwise) and its weight-only quantized variants (``model.int4.onnx``,
``model.int8.onnx``), the tokenizer, ``decoder.json`` (inputs, outputs and each layer's KV
shape, for a runtime), the masks and plan of a ``PruneResult`` and ``report.json``. Everything
is staged and moved into place at the end, so a failure leaves nothing behind."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..io import atomic_write_text, staged_dir
from .decoder import export_decoder
from .weight_only import quantize_weights

QUANT_BITS = {"int8": 8, "int4": 4}


def _save_tokenizer(tokenizer: Any, stage: str) -> list[str]:
    before = set(os.listdir(stage))
    if hasattr(tokenizer, "save_pretrained"):  # transformers
        tokenizer.save_pretrained(stage)
    elif hasattr(tokenizer, "to_str"):  # tokenizers.Tokenizer
        atomic_write_text(os.path.join(stage, "tokenizer.json"), tokenizer.to_str(pretty=True))
    elif hasattr(tokenizer, "tokenizer_json"):  # graphprune.lm.ByteTokenizer
        atomic_write_text(os.path.join(stage, "tokenizer.json"),
                          json.dumps(tokenizer.tokenizer_json(), ensure_ascii=False, indent=1))
    else:
        raise ConfigError("The 'tokenizer' parameter of export_bundle_lm must be a transformers or "
                          "tokenizers tokenizer or a graphprune.lm.ByteTokenizer. Got "
                          f"{type(tokenizer).__name__} instead.", param="tokenizer")
    return sorted(set(os.listdir(stage)) - before)


def export_bundle_lm(out_dir: str | os.PathLike, model: nn.Module, *, tokenizer: Any = None,
                     result: Any = None, quantize: Sequence[str] = ("int4",), kv_cache: bool = True,
                     block_size: int = 32, exporter: str = "auto", report: dict[str, Any] | None = None,
                     finish: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Write the deployment bundle of the causal LM ``model`` (the pruned model of ``result``,
    a ``PruneResult``, whose masks, plan and report are saved too) into ``out_dir``. Returns the
    report written to ``report.json``.

    ``quantize`` lists the weight-only variants written beside the fp32 ``model.onnx``: 'int4'
    (``model.int4.onnx``, 4-bit MatMulNBits in blocks of ``block_size``) and/or 'int8'.
    ``finish(stage_dir, report)`` runs before ``report.json`` is written (the main job adds
    perplexities there). Run the files with ``graphprune.export.decoder_session.DecoderSession``.

    Raises:
        InputError: ``model`` is not a Hugging Face causal LM.
        ConfigError: an unknown ``quantize`` entry or tokenizer type.
        ExportError / ParityError: an export or a quantization failed (nothing is written).
        OutputError: ``out_dir`` cannot be written.

    Example:
        >>> r = graphprune.prune(model, graphprune.hf.example_inputs(model), sparsity=0.3)
        >>> export_bundle_lm("out/llm", r.model, tokenizer=tok, result=r, quantize=("int4", "int8"))
    """
    from ..errors import did_you_mean

    quantize = [quantize] if isinstance(quantize, str) else list(quantize)
    for q in quantize:
        if q not in QUANT_BITS:
            raise ConfigError(f"The 'quantize' parameter of export_bundle_lm must list entries of "
                              f"'int4', 'int8'. Got {q!r} instead.{did_you_mean(str(q), QUANT_BITS)}",
                              param="quantize")
    rep: dict[str, Any] = dict(report or {})
    if result is not None:
        rep.update(result.report.to_dict())
    with staged_dir(out_dir) as stage:
        ex = export_decoder(model, os.path.join(stage, "model.onnx"), kv_cache=kv_cache, exporter=exporter)
        files = {"fp32": {"file": "model.onnx", "bytes": ex.bytes, "exporter": ex.exporter,
                          "opset": ex.opset, "max_abs_err": ex.max_abs_err, "max_rel_err": ex.max_rel_err}}
        for q in quantize:
            name = f"model.{q}.onnx"
            r = quantize_weights(ex.path, os.path.join(stage, name), bits=QUANT_BITS[q],
                                 block_size=block_size)
            files[q] = {"file": name, "bytes": r.bytes, "bits": r.bits, "block_size": r.block_size,
                        "op": "MatMulNBits", "accuracy_level": r.accuracy_level,
                        "logits_cosine": r.cosine, "top1_agreement": r.agreement}
        cfg = model.config
        meta = {"format": "graphprune-decoder", "version": 1, "kv_cache": kv_cache,
                "inputs": ex.input_names, "outputs": ex.output_names,
                "vocab_size": int(cfg.vocab_size), "eos_token_id": getattr(cfg, "eos_token_id", None),
                "bos_token_id": getattr(cfg, "bos_token_id", None),
                "layers": [{"key_heads": kh, "key_dim": kd, "value_heads": vh, "value_dim": vd}
                           for kh, kd, vh, vd in ex.layout.layers],
                "files": {k: v["file"] for k, v in files.items()}}
        if tokenizer is not None:
            meta["tokenizer_files"] = _save_tokenizer(tokenizer, stage)
        atomic_write_text(os.path.join(stage, "decoder.json"), json.dumps(meta, indent=1) + "\n")
        rep["onnx"] = files
        if result is not None:
            from .masks import save_masks

            save_masks(result.masks, os.path.join(stage, "masks.safetensors"), plan=result.plan)
            result.plan.save(os.path.join(stage, "plan.json"))
        if finish is not None:
            finish(stage, rep)
        atomic_write_text(os.path.join(stage, "report.json"), json.dumps(rep, indent=1, default=str) + "\n")
    return rep
