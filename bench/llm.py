"""Language-model benchmark: held-out perplexity of a small LLaMA-style decoder (GQA 8/2 heads)
trained on English text that ships with Python, dense and after one-shot structured pruning of
20%, 30% and 50% of its attention + MLP parameters, per method, no fine-tuning; then a short
fine-tune of graphprune's best 50% model (and of the dense model, as the control).

The model is trained once and cached (``graphprune.lm.pretrained_lm``; ~7 CPU-minutes on one
thread, then seconds). Perplexity is WikiText-2 style: non-overlapping 256-token windows of the
test split (documents never seen in training). Calibration windows come from the train split.
Throughput is PyTorch inference on a batch of test windows, measured interleaved across all
models in the same run (median of ``--repeats``).

    python bench/llm.py [--threads 2] [--cache-dir DIR] [--calibration 32] [--repeats 5]
                        [--ratios 0.2,0.3,0.5] [--finetune-steps 200] [--eval-windows N]
    python bench/llm.py --scale [--layers 22] [--dtype float32]   # TinyLlama-shaped timing
    python bench/llm.py --gqa-compare   # key/value groups vs query heads inside each group

Pruned rows come from ``methods(graph, ratios)``: ``(name, prune_fn)`` where
``prune_fn(model, calibration_ids) -> pruned model`` must leave ``model`` untouched
(``calibration_ids`` is ``(n, seq_len)`` int64). Every method removes the same parameters: the
uniform ones the same units per block (``block_amounts``), the adaptive ones (FLAP's global
allocation, ``flap_amounts``) the same total.

``--scale`` times ``prune_lm`` (FLAP and greedy + least squares, 20%) on a randomly initialised
TinyLlama-shaped model (22 layers, hidden 2048, 32/4 heads, MLP 5632: 1.1B parameters) on 32 x
128 calibration tokens, each method in its own process (wall time, peak RSS of that process).

``--gqa-compare`` prunes the same model with ``gqa="group"`` (a key/value head and its query
heads are one unit) and ``gqa="query"`` (key/value heads stay; query heads go evenly from every
group) at the same ratios of attention + MLP parameters, for the methods in ``GQA_SETTINGS``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import resource
import statistics
import subprocess
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
from graphprune.lm.job import block_params  # noqa: E402

PruneFn = Callable[[torch.nn.Module, torch.Tensor], torch.nn.Module]
RATIOS = (0.2, 0.3, 0.5)
# (label, prune_lm settings, graphprune's own method?) of every pruned row, at every ratio
SETTINGS: list[tuple[str, dict, bool]] = [
    ("l1", {"method": "l1"}, False),
    ("wanda-sp", {"method": "wanda"}, False),
    ("flap, uniform", {"method": "flap"}, False),
    ("FLAP (adaptive, as published)", {"method": "flap", "adaptive": True, "sequential": False}, False),
    ("taylor", {"method": "taylor"}, False),
    ("lasso + LS", {"method": "lasso"}, True),
    ("greedy + LS", {"method": "greedy"}, True),
    ("greedy + LS, adaptive", {"method": "greedy", "adaptive": True}, True),
]


GQA_SETTINGS = ["l1", "FLAP (adaptive, as published)", "greedy + LS, adaptive"]


def pruner(graph, kw: dict, ratio: float) -> PruneFn:
    """``prune_lm`` with these settings on a model whose graph is ``graph``."""
    from graphprune.lm.pruning import prune_lm

    return lambda model, calib: prune_lm(model, calib, remove=ratio, graph=graph, **kw).model


def methods(graph, ratios=RATIOS) -> list[tuple[str, PruneFn]]:
    """One ``(name, prune_fn)`` per setting and ratio; ``graph`` is the dense model's (traced
    once: every method prunes the same model)."""
    return [(f"{label} {ratio:.0%}", pruner(graph, kw, ratio)) for ratio in ratios
            for label, kw, _ in SETTINGS]


@dataclass
class Row:
    name: str
    model: torch.nn.Module
    params: int
    block_params: int  # attention + MLP parameters (what structured LLM pruning removes)
    ppl: float
    prune_seconds: float = 0.0
    tokens_per_s: float = float("nan")


def measure(name: str, model: torch.nn.Module, test: torch.Tensor, seq_len: int,
            prune_seconds: float = 0.0, max_windows: int | None = None) -> Row:
    return Row(name, model, sum(p.numel() for p in model.parameters()), block_params(model),
               perplexity(model, test, seq_len, batch_size=8, max_windows=max_windows), prune_seconds)


def prune_rows(dense: torch.nn.Module, methods: list[tuple[str, PruneFn]], calibration: torch.Tensor,
               test: torch.Tensor, seq_len: int, max_windows: int | None = None) -> list[Row]:
    """One row per ``(name, prune_fn)``: the pruned model's size and test perplexity. Each
    prune_fn gets its own copy of the dense model, so one method cannot affect the next."""
    rows = []
    for name, fn in methods:
        t = time.perf_counter()
        pruned = fn(copy.deepcopy(dense), calibration.clone())
        rows.append(measure(name, pruned, test, seq_len, time.perf_counter() - t, max_windows))
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
        print(f"| {r.name} | {r.params:,} | {r.block_params:,} | {removed:.1%} | {r.ppl:.2f} | "
              f"{r.ppl / dense.ppl:.2f} | {r.tokens_per_s:,.0f} | {r.prune_seconds:.1f} |")


def verdict(rows: list[Row], ratios: tuple[float, ...]) -> None:
    """graphprune's best method per ratio against FLAP and l1 (the issue's goals)."""
    by = {r.name: r for r in rows}
    dense = rows[0].ppl
    ours = [label for label, _, own in SETTINGS if own]
    for ratio in ratios:
        tag = f" {ratio:.0%}"
        best = min(ours, key=lambda label: by[label + tag].ppl)
        b, f, l1 = by[best + tag].ppl, by["FLAP (adaptive, as published)" + tag].ppl, by["l1" + tag].ppl
        print(f"{ratio:.0%}: graphprune's best is '{best}' ({b:.2f}); FLAP {f:.2f} "
              f"({'beaten' if b < f else 'NOT beaten'}); increase over dense {b - dense:+.2f} "
              f"vs l1's {l1 - dense:+.2f} "
              f"({(b - dense) / (l1 - dense):.1%} of it)")


def finetune(model: torch.nn.Module, lm, steps: int) -> tuple[torch.nn.Module, float]:
    """A copy of ``model`` trained ``steps`` more steps on the train split (AdamW, lr 3e-4 with
    10 warm-up steps and cosine decay, batches of 8 x 256 tokens); returns it and the seconds."""
    from graphprune.lm import train_causal_lm

    spec = dataclasses.replace(lm.spec, steps=steps, lr=3e-4, warmup_steps=10, seed=1)
    m = copy.deepcopy(model)
    t = time.perf_counter()
    train_causal_lm(m, lm.ids("train"), spec)
    return m.eval(), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None, help="default ~/.cache/graphprune/lm")
    ap.add_argument("--calibration", type=int, default=32, help="calibration windows")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ratios", default="0.2,0.3,0.5")
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--eval-windows", type=int, default=None, help="default: the whole test split")
    ap.add_argument("--scale", action="store_true", help="time a TinyLlama-shaped model instead")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--scale-one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gqa-compare", action="store_true",
                    help="prune with gqa='group' and gqa='query' and compare (no fine-tune)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.scale_one:
        return scale_one(args)
    if args.scale:
        return scale(args)
    import transformers

    from graphprune import trace

    ratios = tuple(float(r) for r in args.ratios.split(","))
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
    print(f"training: {spec.steps} steps x {spec.batch_size} x {spec.seq_len} tokens, "
          f"{tr['train_seconds'] / 60:.1f} min wall; perplexity test {info['perplexity']['test']:.2f}; "
          f"unigram {info['unigram_perplexity']:.1f}, uniform {cfg.vocab_size}")

    test = lm.ids("test")
    calib = corpus_calibration(lm.tokenizer, args.calibration, spec.seq_len, seed=0, corpus=lm.corpus)
    print(f"calibration: {args.calibration} x {spec.seq_len} tokens of the train split", flush=True)
    rows = [measure("dense", lm.model, test, spec.seq_len, max_windows=args.eval_windows)]
    if args.gqa_compare:
        return gqa_compare(lm.model, rows[0], calib, test, spec.seq_len, ratios, args.eval_windows)
    graph = trace(lm.model, calib[:1])
    rows += prune_rows(lm.model, methods(graph, ratios), calib, test, spec.seq_len, args.eval_windows)
    if args.finetune_steps:
        by = {r.name: r for r in rows}
        top = max(ratios)
        best = min((label for label, _, own in SETTINGS if own), key=lambda x: by[f"{x} {top:.0%}"].ppl)
        for name, model in [(f"{best} {top:.0%}", by[f"{best} {top:.0%}"].model), ("dense", lm.model)]:
            tuned, secs = finetune(model, lm, args.finetune_steps)
            rows.append(measure(f"{name} + fine-tune {args.finetune_steps} steps"
                                + (" (control)" if name == "dense" else ""), tuned, test, spec.seq_len,
                                secs, args.eval_windows))
            print(f"  {rows[-1].name}: perplexity {rows[-1].ppl:.2f} ({secs:.0f} s)", flush=True)
    n = test.numel() // spec.seq_len
    throughput(rows, test[: min(n, 8) * spec.seq_len].view(-1, spec.seq_len), args.repeats)
    print_table(rows)
    verdict(rows, ratios)


def _heads(model: torch.nn.Module) -> str:
    """Query / key-value heads summed over the layers."""
    attn = [layer.self_attn for layer in model.model.layers]
    hd = attn[0].head_dim
    q = sum(a.q_proj.weight.shape[0] // hd for a in attn)
    kv = sum(a.k_proj.weight.shape[0] // hd for a in attn)
    return f"{q}/{kv}"


def gqa_compare(dense: torch.nn.Module, dense_row: Row, calib: torch.Tensor, test: torch.Tensor,
                seq_len: int, ratios: tuple[float, ...], max_windows: int | None) -> None:
    """The same methods and ratios with both grouped-query modes, one table."""
    from graphprune import trace

    settings = {label: kw for label, kw, _ in SETTINGS if label in GQA_SETTINGS}
    found: dict[tuple[str, float, str], Row] = {}
    for mode in ("group", "query"):
        graph = trace(dense, calib[:1], gqa=mode)
        keys = [(label, ratio, mode) for ratio in ratios for label in settings]
        fns = [(f"{label} {ratio:.0%} gqa={mode}", pruner(graph, settings[label], ratio))
               for label, ratio, _ in keys]
        found.update(zip(keys, prune_rows(dense, fns, calib, test, seq_len, max_windows)))
    print(f"dense: perplexity {dense_row.ppl:.2f}, heads (query/key-value, all layers) "
          f"{_heads(dense)}")
    print("| method | target | gqa='group': removed, heads, perplexity | gqa='query': removed, heads, "
          "perplexity |")
    print("| --- | ---: | --- | --- |")
    for ratio in ratios:
        for label in settings:
            cells = []
            for mode in ("group", "query"):
                r = found[(label, ratio, mode)]
                cells.append(f"{1 - r.block_params / dense_row.block_params:.1%}, {_heads(r.model)}, "
                             f"{r.ppl:.2f}")
            print(f"| {label} | {ratio:.0%} | {cells[0]} | {cells[1]} |")


# ---------------------------------------------------------------------- scale
def tinyllama(layers: int, dtype: torch.dtype):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                   num_hidden_layers=layers, num_attention_heads=32,
                                   num_key_value_heads=4, max_position_embeddings=2048,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def rss_gb() -> float:
    """Peak resident set size of this process so far (GB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def scale_one(args) -> None:
    from graphprune.lm.pruning import prune_lm

    method, adaptive = args.scale_one.split(":")
    t0 = time.perf_counter()
    model = tinyllama(args.layers, getattr(torch, args.dtype))
    built, rss_model = time.perf_counter() - t0, rss_gb()
    ids = torch.randint(0, 32000, (32, 128), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    r = prune_lm(model, ids, remove=0.2, method=method, adaptive=adaptive == "1",
                 sequential=method != "flap")
    secs = time.perf_counter() - t
    out = {"method": args.scale_one, "layers": args.layers,
           "params": sum(p.numel() for p in model.parameters()),
           "params_after": sum(p.numel() for p in r.model.parameters()), "build_s": built,
           "prune_s": secs, "timings": {k: round(v, 1) for k, v in r._timings.items()},
           "rss_model_gb": rss_model, "peak_rss_gb": rss_gb()}
    print(json.dumps(out), flush=True)


def scale(args) -> None:
    print(f"# TinyLlama-shaped ({args.layers} layers, hidden 2048, 32/4 heads, MLP 5632), {args.dtype}, "
          f"random init; 32 x 128 calibration tokens; 20% of attention + MLP parameters removed; "
          f"{args.threads} thread(s)")
    print("| method | parameters | after | prune wall | trace | block-by-block | apply | peak RSS "
          "| model alone |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for spec, label in (("flap:1", "FLAP (adaptive)"), ("greedy:1", "greedy + LS, adaptive")):
        cmd = [sys.executable, __file__, "--scale-one", spec, "--layers", str(args.layers),
               "--dtype", args.dtype, "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("{")]
        if out.returncode or not line:
            print(f"| {label} | failed: {out.stderr.strip().splitlines()[-1:]} |")
            continue
        d = json.loads(line[-1])
        t = d["timings"]
        print(f"| {label} | {d['params'] / 1e9:.2f}B | {d['params_after'] / 1e9:.2f}B "
              f"| {d['prune_s'] / 60:.1f} min | {t['trace']:.0f} s | {t['plan']:.0f} s "
              f"| {t['apply']:.0f} s | {d['peak_rss_gb']:.1f} GB | {d['rss_model_gb']:.1f} GB |",
              flush=True)


if __name__ == "__main__":
    main()
