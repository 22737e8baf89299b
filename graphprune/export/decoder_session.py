"""Run a decoder exported by ``export_decoder`` in onnxruntime (stage 9 for language models):
logits for whole sequences, greedy generation with or without the KV cache, throughput.

    sess = DecoderSession("out/model.onnx", threads=2)
    logits = sess.logits(ids)                          # (B, L) ids -> (B, L, V) numpy
    g = sess.generate(prompt_ids, max_new_tokens=32)   # greedy; g.ids, g.tokens_per_second
    graphprune.lm.perplexity(sess, test_ids, seq_len=256)   # the session is an ids -> logits callable
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._validate import check_int
from ..deploy import ort_session
from ..errors import InputError


@dataclass(frozen=True)
class Generation:
    ids: np.ndarray  # (B, prompt + new) prompt followed by the generated tokens
    new_tokens: int  # generated per sequence
    prefill_seconds: float  # the prompt's forward pass
    decode_seconds: float  # every later step

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second after the prompt (batch x steps / decode time)."""
        steps = self.new_tokens - 1  # the first token comes from the prefill
        return self.ids.shape[0] * steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0


def _as_ids(x: Any, what: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer) or a.shape[1] == 0:
        raise InputError(f"The '{what}' parameter of DecoderSession must be (batch, sequence) integer "
                         f"token ids. Got {a.dtype} of shape {a.shape} instead.")
    return a.astype(np.int64)


class DecoderSession:
    """An onnxruntime session for a decoder written by ``export_decoder`` (with or without the
    KV cache). Calling it on ``(B, L)`` ids returns ``(B, L, V)`` logits as a torch tensor, so it
    plugs into ``graphprune.lm.perplexity``.

    Raises:
        InputError: the file is missing or is not a decoder from ``export_decoder``.
        ExportError: onnxruntime cannot load it.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None,
                 optimization: str = "all"):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise InputError(f"ONNX model '{path}' does not exist.")
        if threads:
            check_int(threads, "threads", "DecoderSession", low=1)
        self.sess = ort_session(path, threads=threads, optimization=optimization,
                                owner="DecoderSession")
        self.path = path
        ins = {i.name: i for i in self.sess.get_inputs()}
        if not {"input_ids", "attention_mask"} <= set(ins):
            raise InputError(f"'{path}' is not a decoder written by export_decoder: its inputs are "
                             f"{', '.join(ins)} (expected input_ids and attention_mask).")
        self.past_names = [n for n in ins if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.past_shapes = [(ins[n].shape[1], ins[n].shape[3]) for n in self.past_names]
        self._past_dtype = np.float16 if any(ins[n].type == "tensor(float16)" for n in self.past_names) \
            else np.float32
        self.kv_cache = bool(self.past_names)

    def _run(self, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray] | None
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self.kv_cache:
            b, n = ids.shape
            if past is None:
                past = [np.zeros((b, h, 0, d), self._past_dtype) for h, d in self.past_shapes]
            pos = np.maximum(mask.cumsum(-1) - 1, 0)[:, -n:]
            feeds["position_ids"] = pos.astype(np.int64)
            feeds.update(zip(self.past_names, past))
            out = self.sess.run(["logits", *self.present_names], feeds)
            return out[0], out[1:]
        return self.sess.run(["logits"], feeds)[0], []

    def logits(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """``(B, L, V)`` logits of whole sequences (an empty cache for a KV-cache model)."""
        ids = _as_ids(input_ids, "input_ids")
        mask = np.ones_like(ids) if attention_mask is None else _as_ids(attention_mask, "attention_mask")
        return self._run(ids, mask, None)[0]

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.logits(input_ids))

    def generate(self, input_ids: Any, max_new_tokens: int, *, attention_mask: Any = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> Generation:
        """Greedy decoding of ``max_new_tokens`` tokens after the (left-padded) prompts. A KV-cache
        model feeds back its ``present`` tensors and runs one token per step; a model without
        the cache recomputes the whole sequence every step. Rows that emit ``eos_token_id`` are
        padded with ``pad_token_id`` (default: the eos id) and decoding stops when all are done.

        Example:
            >>> g = DecoderSession("out/model.onnx").generate(tok.encode("def ")[None], 16)
            >>> g.ids.shape[1], round(g.tokens_per_second)
        """
        ids = _as_ids(input_ids, "input_ids")
        n_new = check_int(max_new_tokens, "max_new_tokens", "DecoderSession.generate", low=1)
        mask = np.ones_like(ids) if attention_mask is None else _as_ids(attention_mask, "attention_mask")
        pad = eos_token_id if pad_token_id is None else pad_token_id
        done = np.zeros(ids.shape[0], bool)
        past: list[np.ndarray] | None = None
        step_in = ids
        prefill = decode = 0.0
        made = 0
        for step in range(n_new):
            t = time.perf_counter()
            logits, present = self._run(step_in if self.kv_cache else ids, mask, past)
            nxt = logits[:, -1].argmax(-1).astype(np.int64)  # (B,)
            if step == 0:
                prefill = time.perf_counter() - t
            else:
                decode += time.perf_counter() - t
            if eos_token_id is not None:
                nxt = np.where(done, pad, nxt)
                done |= nxt == eos_token_id
            ids = np.concatenate([ids, nxt[:, None]], 1)
            mask = np.concatenate([mask, np.ones_like(nxt[:, None])], 1)
            step_in, past = nxt[:, None], present or None
            made += 1
            if done.all():
                break
        return Generation(ids, made, prefill, decode)

    def tokens_per_second(self, input_ids: Any, repeats: int = 5) -> float:
        """Median throughput of ``logits`` on the ``(B, L)`` batch (tokens/s) after a warm-up."""
        import statistics

        ids = _as_ids(input_ids, "input_ids")
        self.logits(ids)
        times = []
        for _ in range(check_int(repeats, "repeats", "DecoderSession.tokens_per_second", low=1)):
            t = time.perf_counter()
            self.logits(ids)
            times.append(time.perf_counter() - t)
        return ids.size / statistics.median(times)
