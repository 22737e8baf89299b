"""Deploying the reference LLaMA (graphprune.lm.pretrained_lm) dense and pruned to onnxruntime:
fp32, weight-only int8 and 4-bit (MatMulNBits), and, as a peer, onnxruntime's own dynamic int8
(``quantize_dynamic``: MatMulInteger, activations quantized at run time).

For each model: ``export_decoder`` writes a no-cache file (whole sequences) and a KV-cache file
(generation); ``quantize_weights`` derives the int8 / int4 files from each. Columns:
- file size of the KV-cache file (what a bundle ships);
- test perplexity from onnxruntime logits (no-cache file) on non-overlapping 256-token windows of
  the test split, next to PyTorch's on the same windows;
- tokens/s in onnxruntime (``--threads``, default 2): a 1 x 256 sequence through the no-cache
  file, and greedy generation with the KV cache (32-token prompt, ``--new-tokens`` tokens,
  decode steps only); next to PyTorch (same threads; ``generate`` with its cache).
Timings are interleaved (one run of every variant per round, a short pause between turns so idle
thread pools park), medians over ``--rounds``; on a shared machine read the ratios.

    python bench/llm_deploy.py [--removed 0.3 0.5] [--windows 191] [--rounds 5] [--out out/llm_deploy]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphprune  # noqa: E402
from graphprune.export.decoder import export_decoder  # noqa: E402
from graphprune.export.decoder_session import DecoderSession  # noqa: E402
from graphprune.export.weight_only import quantize_weights  # noqa: E402
from graphprune.lm import perplexity, pretrained_lm  # noqa: E402
from graphprune.lm.job import block_params  # noqa: E402

FORMATS = ("fp32", "int8", "int4", "int8-dyn")


def prune_blocks(dense: torch.nn.Module, removed: float) -> torch.nn.Module:
    """Remove ``removed`` of the attention + MLP parameters by l1 (heads as whole GQA groups and
    MLP channels, ranked across layers): the target is expressed on all parameters."""
    total = sum(p.numel() for p in dense.parameters())
    keep = 1 - removed * block_params(dense) / total
    r = graphprune.prune(dense, graphprune.hf.example_inputs(dense), method="l1", target_params=keep,
                         global_pruning=True)
    return r.model.eval()


def dynamic_int8(src: str, dst: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    finally:
        logging.disable(logging.NOTSET)


def make_files(name: str, model: torch.nn.Module, out: str) -> dict[str, dict[str, str]]:
    """``{format: {"seq": path, "kv": path}}`` for one model."""
    files: dict[str, dict[str, str]] = {f: {} for f in FORMATS}
    for kind, kv in (("seq", False), ("kv", True)):
        fp = os.path.join(out, f"{name}.{kind}.fp32.onnx")
        r = export_decoder(model, fp, kv_cache=kv)
        print(f"  {name} {kind}: exported in {r.seconds:.1f} s ({r.exporter}), max rel err "
              f"{r.max_rel_err:.1e}, KV heads per layer {list(r.layout.kv_heads) or '-'}", flush=True)
        files["fp32"][kind] = fp
        for bits in (8, 4):
            q = os.path.join(out, f"{name}.{kind}.int{bits}.onnx")
            res = quantize_weights(fp, q, bits=bits, block_size=32, accuracy_level=4)
            files[f"int{bits}"][kind] = q
            if kind == "seq":
                print(f"  {name} int{bits}: logits cosine {res.cosine:.5f}, top-1 agreement "
                      f"{res.agreement:.3f}", flush=True)
        q = os.path.join(out, f"{name}.{kind}.int8-dyn.onnx")
        dynamic_int8(fp, q)
        files["int8-dyn"][kind] = q
    return files


def time_round(models, seqs, kvs, x, prompt, new_tokens, t_seq, t_gen) -> None:
    """One timed run of every variant (ONNX formats, then PyTorch) for every model."""
    ones = torch.ones_like(prompt)
    for n, model in models.items():
        for f in FORMATS:
            time.sleep(0.05)
            t = time.perf_counter()
            seqs[n, f].logits(x)
            t_seq[n, f].append(time.perf_counter() - t)
            time.sleep(0.05)
            t_gen[n, f].append(1 / kvs[n, f].generate(prompt, new_tokens).tokens_per_second)
        with torch.no_grad():
            time.sleep(0.05)
            t = time.perf_counter()
            model(input_ids=x, use_cache=False)
            t_seq[n, "torch"].append(time.perf_counter() - t)
            time.sleep(0.05)
            t = time.perf_counter()
            model.generate(prompt, attention_mask=ones, max_new_tokens=1, do_sample=False)
            first = time.perf_counter() - t  # the prompt's pass, excluded as for onnxruntime
            t = time.perf_counter()
            model.generate(prompt, attention_mask=ones, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)
            t_gen[n, "torch"].append((time.perf_counter() - t - first) / (new_tokens - 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--removed", type=float, nargs="+", default=[0.3],
                    help="fractions of attention+MLP parameters removed (one pruned model each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=None, help="test windows (default: all)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default="out/llm_deploy")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    lm = pretrained_lm()
    seq = lm.spec.seq_len
    test = lm.ids("test")
    n_win = min(args.windows or test.numel() // seq, test.numel() // seq)
    models = {"dense": lm.model.eval()}
    for f in args.removed:
        t = time.perf_counter()
        models[f"pruned {f:.0%}"] = prune_blocks(lm.model, f)
        print(f"pruned {f:.0%}: {time.perf_counter() - t:.1f} s", flush=True)

    files, ppl, ppl_torch = {}, {}, {}
    for name, model in models.items():
        files[name] = make_files(name.replace(" ", "").replace("%", ""), model, args.out)
        ppl_torch[name] = perplexity(model, test, seq, batch_size=8, max_windows=n_win)
        for fmt in FORMATS:
            sess = DecoderSession(files[name][fmt]["seq"], threads=args.threads)
            ppl[name, fmt] = perplexity(sess, test, seq, batch_size=8, max_windows=n_win)
            print(f"  {name} {fmt}: perplexity {ppl[name, fmt]:.3f} (PyTorch {ppl_torch[name]:.3f})",
                  flush=True)

    # throughput, interleaved
    x = test[:seq].view(1, seq)
    prompt = test[seq: seq + 32].view(1, 32)
    seqs = {(n, f): DecoderSession(files[n][f]["seq"], threads=args.threads) for n in models for f in FORMATS}
    kvs = {(n, f): DecoderSession(files[n][f]["kv"], threads=args.threads) for n in models for f in FORMATS}
    t_seq: dict = {k: [] for k in list(seqs) + [(n, "torch") for n in models]}
    t_gen: dict = {k: [] for k in t_seq}
    for k in seqs:  # warm-up
        seqs[k].logits(x)
        kvs[k].generate(prompt, 4)
    for _ in range(args.rounds):
        time_round(models, seqs, kvs, x, prompt, args.new_tokens, t_seq, t_gen)

    import onnxruntime
    import transformers

    print(f"\n# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {args.threads} threads, torch "
          f"{torch.__version__}, transformers {transformers.__version__}, onnxruntime "
          f"{onnxruntime.__version__}; perplexity on {n_win} x {seq} test tokens; medians of "
          f"{args.rounds} interleaved rounds\n")
    base_seq = statistics.median(t_seq["dense", "fp32"])
    base_gen = statistics.median(t_gen["dense", "fp32"])
    dense_blocks = block_params(models["dense"])
    print("| model | attn+MLP removed | params | format | file MB | test ppl (ORT) | ppl (PyTorch) "
          "| 256-token seq, tok/s | x | generate, tok/s | x |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, model in models.items():
        removed = 1 - block_params(model) / dense_blocks
        params = sum(p.numel() for p in model.parameters())
        for f in (*FORMATS, "torch"):
            ms = statistics.median(t_seq[n, f])
            mg = statistics.median(t_gen[n, f])
            size = f"{os.path.getsize(files[n][f]['kv']) / 1e6:.2f}" if f != "torch" else "-"
            p = f"{ppl[n, f]:.2f}" if f != "torch" else "-"
            label = {"torch": "PyTorch eager", "int8-dyn": "int8 dynamic (ORT peer)"}.get(f, f)
            print(f"| {n} | {removed:.0%} | {params / 1e6:.2f}M | {label} | {size} | {p} | "
                  f"{ppl_torch[n]:.2f} | {seq / ms:,.0f} | {base_seq / ms:.2f} | {1 / mg:,.0f} | "
                  f"{base_gen / mg:.2f} |")


if __name__ == "__main__":
    main()
