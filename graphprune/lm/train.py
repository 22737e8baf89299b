"""A small LLaMA-style language model trained once on the standard library's text and cached
(model stage of the LM flow): the dense reference that one-shot pruning is measured against.

``pretrained_lm()`` returns the cached model when one exists for the same spec, corpus and code
version, else trains the tokenizer and the model (CPU, seeded) and stores them as a Hugging Face
directory (``config.json``, ``model.safetensors``, ``tokenizer.json``, ``graphprune_lm.json``
with the spec and the measured figures), renamed into place in one step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ._deps import need
from .corpus import SPLITS, Corpus, stdlib_corpus

LM_CODE_VERSION = 1  # bump when training or the saved format changes: old caches are not reused
INFO_FILE = "graphprune_lm.json"


@dataclass(frozen=True)
class LMSpec:
    """Shape, tokenizer and training budget of the reference model.

    The default is a 4-layer LLaMA (hidden 256, 8 query heads sharing 2 key/value heads, SwiGLU
    MLP 688 = 2.7x, RoPE, RMSNorm, untied embeddings: 4.0M parameters) with a 4096-id byte-level
    BPE, trained for 500 steps of 8 x 256 tokens (1.0M tokens, ~2 epochs of the train split;
    about 7 CPU-minutes on one thread: test perplexity 157 against a unigram 722).
    """

    vocab_size: int = 4096
    tokenizer: str = "bpe"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int = 688
    tie_embeddings: bool = False
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 500
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    seed: int = 0
    fractions: tuple[float, float, float] = (0.85, 0.05, 0.10)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "seq_len", "batch_size", "steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"The '{name}' parameter of LMSpec must be an int >= 1. Got {v!r} instead.")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(f"LMSpec: hidden_size={self.hidden_size} must split into num_heads="
                              f"{self.num_heads} heads of an even size (rotary embeddings rotate pairs).")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"LMSpec: num_heads={self.num_heads} must be a multiple of num_kv_heads="
                              f"{self.num_kv_heads} (each key/value head serves a whole group).")
        if self.tokenizer not in ("bpe", "byte"):
            raise ConfigError(f"The 'tokenizer' parameter of LMSpec must be one of 'bpe', 'byte'. "
                              f"Got {self.tokenizer!r} instead.")
        if not 0 < self.lr < 1 or self.warmup_steps < 0:
            raise ConfigError(f"LMSpec: lr must be in (0, 1) and warmup_steps >= 0. Got lr={self.lr!r}, "
                              f"warmup_steps={self.warmup_steps!r}.")

    def key(self, corpus: Corpus) -> str:
        """Cache key: this spec, the corpus' content and the training code's version."""
        blob = json.dumps([LM_CODE_VERSION, dataclasses.asdict(self), corpus.fingerprint], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def llama_config(spec: LMSpec, vocab_size: int, eos_token_id: int | None) -> Any:
    """The ``transformers.LlamaConfig`` of ``spec`` (``vocab_size`` from the trained tokenizer)."""
    tf = need("transformers", "llama_config")
    return tf.LlamaConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.seq_len,
        hidden_act="silu", rms_norm_eps=1e-5, initializer_range=0.02,
        tie_word_embeddings=spec.tie_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=None)


def _lr_at(step: int, spec: LMSpec) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    frac = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac))))


def _batches(ids: torch.Tensor, spec: LMSpec, g: torch.Generator):
    """Endless ``(batch, seq_len)`` batches: each epoch cuts the stream at a random offset into
    non-overlapping windows and visits them in a random order."""
    L = spec.seq_len
    while True:
        off = int(torch.randint(0, L, (1,), generator=g))
        n = (ids.numel() - off) // L
        if n < spec.batch_size:
            raise ConfigError(f"the train split holds {ids.numel():,} tokens, fewer than one batch of "
                              f"{spec.batch_size} x {L}. Give a larger corpus or a smaller batch.")
        w = ids[off:off + n * L].view(n, L)
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - spec.batch_size + 1, spec.batch_size):
            yield w[perm[i:i + spec.batch_size]]


def next_token_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    """One optimizer step of next-token cross-entropy on the id batch ``x`` (B, L), gradients
    clipped at norm 1; returns the loss."""
    logits = model(input_ids=x, use_cache=False).logits[:, :-1]  # (B, L-1, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def train_causal_lm(model: torch.nn.Module, ids: torch.Tensor, spec: LMSpec,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``model`` in place on the 1-D id stream ``ids`` (AdamW, warm-up + cosine, gradient
    clipping at 1, weight decay on matrices only); returns timings and the loss curve. The
    batches are drawn from a generator seeded with ``spec.seed``."""
    g = torch.Generator().manual_seed(spec.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.95))
    model.train()
    losses, times = [], []
    batches = _batches(ids, spec, g)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for step in range(spec.steps):
        t = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, spec)
        x = next(batches)  # (B, L)
        losses.append(next_token_step(model, opt, x))
        times.append(time.perf_counter() - t)
        if log and (step % 50 == 0 or step == spec.steps - 1):
            log(f"step {step + 1}/{spec.steps}: loss {losses[-1]:.3f}, "
                f"{statistics.median(times[-50:]):.2f} s/step")
    model.eval()
    return {"train_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
            "seconds_per_step": statistics.median(times),
            "tokens_seen": spec.steps * spec.batch_size * spec.seq_len,
            "loss_curve": [round(statistics.fmean(losses[i:i + 25]), 4) for i in range(0, len(losses), 25)],
            "threads": torch.get_num_threads()}


@dataclass
class TrainedLM:
    """A trained reference model with its tokenizer, corpus and measured figures (``info``)."""

    model: Any
    tokenizer: Any
    path: str
    spec: LMSpec
    corpus: Corpus
    info: dict[str, Any]
    _ids: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def ids(self, split: str) -> torch.Tensor:
        """The 1-D token stream of a corpus split (documents joined by end-of-text)."""
        if split not in self._ids:
            from .tokenizer import encode_documents

            self._ids[split] = encode_documents(self.tokenizer, [d.text for d in self.corpus.split(split)])
        return self._ids[split]


def _measure(lm: TrainedLM) -> dict[str, Any]:
    """Corpus and model figures: sizes, train/validation/test and unigram perplexities."""
    from .eval import perplexity, unigram_perplexity

    L, test = lm.spec.seq_len, lm.ids("test")
    n_test = test.numel() // L
    stats = lm.corpus.stats()
    out: dict[str, Any] = {
        "corpus": {s: {**stats[s], "tokens": int(lm.ids(s).numel())} for s in SPLITS},
        "vocab_size": int(lm.model.config.vocab_size),
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        "perplexity": {s: perplexity(lm.model, lm.ids(s), L, max_windows=n_test) for s in SPLITS},
        "unigram_perplexity": unigram_perplexity(lm.ids("train"), test, lm.model.config.vocab_size),
        "eval_windows": n_test,
    }
    return out


def _load(path: str, spec: LMSpec, corpus: Corpus) -> TrainedLM:
    tf = need("transformers", "pretrained_lm")
    from ..hf.loading import no_progress_bars
    from .tokenizer import load_tokenizer

    with open(os.path.join(path, INFO_FILE), encoding="utf-8") as f:
        info = json.load(f)
    with no_progress_bars():
        model = tf.LlamaForCausalLM.from_pretrained(path)  # float32, as saved
    model.eval()
    return TrainedLM(model, load_tokenizer(path), path, spec, corpus, info)


def pretrained_lm(spec: LMSpec | None = None, cache_dir: str | os.PathLike | None = None,
                  corpus: Corpus | None = None, log: Callable[[str], None] | None = None) -> TrainedLM:
    """The reference language model: loaded from ``cache_dir`` (default ``~/.cache/graphprune/lm``)
    or trained there on first use (tokenizer in seconds, model in ~7 CPU-minutes on one thread).

    >>> lm = pretrained_lm()                                  # doctest: +SKIP
    >>> perplexity(lm.model, lm.ids("test"), lm.spec.seq_len)  # doctest: +SKIP

    Raises:
        ConfigError: ``transformers`` is not installed (pip install 'graphprune[hf]').
    """
    from ..hf.loading import no_progress_bars
    from ..io import staged_dir
    from .cache import cache_root
    from .tokenizer import eos_id, load_tokenizer, train_tokenizer

    tf = need("transformers", "pretrained_lm")
    spec = spec or LMSpec()
    root = cache_root(cache_dir)
    corpus = corpus if corpus is not None else stdlib_corpus(spec.fractions, root)
    name = f"llama-{spec.key(corpus)}"
    path = os.path.join(root, name)
    if os.path.isfile(os.path.join(path, INFO_FILE)):
        try:
            lm = _load(path, spec, corpus)
            if log:
                log(f"loaded the trained language model from {path}")
            return lm
        except ImportError:  # a missing or shadowed package is not a broken cache entry
            raise
        except Exception as e:  # a broken cache entry: train again
            if log:
                log(f"ignoring the broken cached model in {path} ({type(e).__name__}: {e})")
            shutil.rmtree(path, ignore_errors=True)
    if log:
        log(f"training the reference language model ({spec.steps} steps, first run only) into {path}")
    with staged_dir(root) as stage:
        out = os.path.join(stage, name)
        os.makedirs(out)
        t = time.perf_counter()
        train_tokenizer([d.text for d in corpus.train], out, spec.tokenizer, spec.vocab_size,
                        model_max_length=spec.seq_len)
        tokenizer = load_tokenizer(out)
        tok_seconds = time.perf_counter() - t
        vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.get_vocab_size()
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            torch.manual_seed(spec.seed)
            model = tf.LlamaForCausalLM(llama_config(spec, vocab, eos_id(tokenizer)))
        lm = TrainedLM(model, tokenizer, path, spec, corpus, {})
        lm.info = {"spec": dataclasses.asdict(spec), "corpus_fingerprint": corpus.fingerprint,
                   "code_version": LM_CODE_VERSION, "tokenizer_seconds": tok_seconds,
                   "training": train_causal_lm(model, lm.ids("train"), spec, log)}
        lm.info.update(_measure(lm))
        lm.info["total_seconds"] = time.perf_counter() - t
        if log:
            ppl = lm.info["perplexity"]
            log(f"perplexity train {ppl['train']:.2f}, validation {ppl['validation']:.2f}, test "
                f"{ppl['test']:.2f} (unigram {lm.info['unigram_perplexity']:.1f}); "
                f"{lm.info['total_seconds']:.0f} s in all")
        with no_progress_bars():
            model.save_pretrained(out)
        with open(os.path.join(out, INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(lm.info, f, indent=1)
        raced = os.path.exists(path)
        if raced:  # another process finished first: keep its copy
            shutil.rmtree(out)
    return _load(path, spec, corpus) if raced else lm
