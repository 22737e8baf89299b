"""Language-model benchmark: held-out perplexity of a small LLaMA-style decoder (GQA 8/2 heads)
trained on English text that ships with Python, dense and after one-shot pruning.

The model is trained once and cached (``graphprune.lm.pretrained_lm``; ~7 CPU-minutes on one
thread, then seconds). Perplexity is WikiText-2 style: non-overlapping 256-token windows of the
test split (documents never seen in training). Calibration windows come from the train split.
Throughput is PyTorch inference on a batch of test windows, measured interleaved across all
models in the same run (median of ``--repeats``).

    python bench/llm.py [--threads 1] [--cache-dir DIR] [--calibration 32] [--repeats 5]

Pruned rows come from ``METHODS``: a list of ``(name, prune_fn)`` where
``prune_fn(model, calibration_ids) -> pruned model`` must leave ``model`` untouched
(``calibration_ids`` is ``(n, seq_len)`` int64).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from graphprune.lm import corpus_calibration, logits_of, perplexity, pretrained_lm  # noqa: E402

PruneFn = Callable[[torch.nn.Module, torch.Tensor], torch.nn.Module]

# (name, prune_fn) rows of the table; the pruning methods of graphprune go here.
METHODS: list[tuple[str, PruneFn]] = []


@dataclass
class Row:
    name: str
    model: torch.nn.Module
    params: int
    block_params: int  # attention + MLP parameters (what structured LLM pruning removes)
    ppl: float
    prune_seconds: float = 0.0
    tokens_per_s: float = float("nan")


def block_params(model: torch.nn.Module) -> int:
    """Parameters of the decoder blocks' attention and MLP (not embeddings, norms or the head)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n or ".mlp." in n)


def measure(name: str, model: torch.nn.Module, test: torch.Tensor, seq_len: int,
            prune_seconds: float = 0.0) -> Row:
    return Row(name, model, sum(p.numel() for p in model.parameters()), block_params(model),
               perplexity(model, test, seq_len, batch_size=8), prune_seconds)


def prune_rows(dense: torch.nn.Module, methods: list[tuple[str, PruneFn]], calibration: torch.Tensor,
               test: torch.Tensor, seq_len: int) -> list[Row]:
    """One row per ``(name, prune_fn)``: the pruned model's size and test perplexity. Each
    prune_fn gets its own copy of the dense model, so one method cannot affect the next."""
    rows = []
    for name, fn in methods:
        t = time.perf_counter()
        pruned = fn(copy.deepcopy(dense), calibration.clone())
        rows.append(measure(name, pruned, test, seq_len, time.perf_counter() - t))
        print(f"  {name}: perplexity {rows[-1].ppl:.2f} ({rows[-1].prune_seconds:.1f} s)", flush=True)
    return rows


def throughput(rows: list[Row], x: torch.Tensor, repeats: int) -> None:
    """Tokens/s of every row's model on ``x`` ``(B, L)``, interleaved (one call per model per
    round, so load on a shared machine hits all alike), median over rounds."""
    times: dict[str, list[float]] = {r.name: [] for r in rows}
    with torch.no_grad():
        for r in rows:
            r.model.eval()
            logits_of(r.model, x)  # warm-up
        for _ in range(repeats):
            for r in rows:
                t = time.perf_counter()
                logits_of(r.model, x)
                times[r.name].append(time.perf_counter() - t)
    for r in rows:
        r.tokens_per_s = x.numel() / statistics.median(times[r.name])


def print_table(rows: list[Row]) -> None:
    dense = rows[0]
    print("| model | parameters | attention+MLP params | removed | test perplexity | x dense "
          "| tokens/s (PyTorch) | prune s |")
    print("| --- |" + " ---: |" * 7)
    for r in rows:
        removed = 1 - r.block_params / dense.block_params
        print(f"| {r.name} | {r.params:,} | {r.block_params:,} | {removed:.0%} | {r.ppl:.2f} | "
              f"{r.ppl / dense.ppl:.2f} | {r.tokens_per_s:,.0f} | {r.prune_seconds:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=None, help="default ~/.cache/graphprune/lm")
    ap.add_argument("--calibration", type=int, default=32, help="calibration windows")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    lm = pretrained_lm(cache_dir=args.cache_dir, log=lambda s: print(s, flush=True))
    info, spec = lm.info, lm.spec
    print(f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores ({args.threads} thread(s)), torch "
          f"{torch.__version__}, transformers {transformers.__version__}")
    c = info["corpus"]
    print("corpus (Python's pydoc topics + stdlib docstrings): " + ", ".join(
        f"{s} {c[s]['documents']} documents / {c[s]['characters']:,} characters / {c[s]['tokens']:,} tokens"
        for s in ("train", "validation", "test")))
    cfg = lm.model.config
    print(f"tokenizer: byte-level BPE, {cfg.vocab_size} ids; model: LLaMA {cfg.num_hidden_layers} layers, "
          f"hidden {cfg.hidden_size}, {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads (GQA), "
          f"MLP {cfg.intermediate_size}, {info['parameters']:,} parameters")
    tr = info["training"]
    cpu = f", {tr['cpu_seconds'] / 60:.1f} min CPU" if "cpu_seconds" in tr else ""
    print(f"training: {spec.steps} steps x {spec.batch_size} x {spec.seq_len} tokens, "
          f"{tr['train_seconds'] / 60:.1f} min wall ({tr['seconds_per_step']:.2f} s/step, {tr['threads']} "
          f"thread(s){cpu}); perplexity train {info['perplexity']['train']:.2f} / validation "
          f"{info['perplexity']['validation']:.2f} / test {info['perplexity']['test']:.2f}; "
          f"unigram {info['unigram_perplexity']:.1f}, uniform {cfg.vocab_size}")

    test = lm.ids("test")
    rows = [measure("dense", lm.model, test, spec.seq_len)]
    if METHODS:
        calib = corpus_calibration(lm.tokenizer, args.calibration, spec.seq_len, seed=0, corpus=lm.corpus)
        rows += prune_rows(lm.model, METHODS, calib, test, spec.seq_len)
    n = test.numel() // spec.seq_len
    throughput(rows, test[: min(n, 8) * spec.seq_len].view(-1, spec.seq_len), args.repeats)
    print_table(rows)


if __name__ == "__main__":
    main()
