"""Transformers as people ship them: graphprune vs Torch-Pruning on Hugging Face models built
from tiny configs (random init), torchvision's swin_t and an einsum ViT, 50% l1.

For each model: prunable groups / all groups, params after/before, the rows of the first
attention's query projection before -> after (heads removed or not), whether the pruned model
equals its masked original on the channels that are independent in value, and seconds. Torch-
Pruning 1.6 runs the same model in a subprocess with a time limit (it hangs on some).

    python bench/hf_models.py [--timeout 300] [--only llama,t5]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# this file is named like the package it measures: keep bench/ off the import path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
sys.path.insert(0, os.path.dirname(HERE))

MODELS = ["bert", "gpt2", "llama", "qwen2", "mistral", "t5", "bart", "vit", "swin_t", "einsum_vit"]


def build(kind: str):
    """(model, keyword example inputs, path of the first attention's query projection)."""
    import graphprune as gp

    torch.manual_seed(0)
    if kind in ("swin_t", "einsum_vit"):
        if kind == "swin_t":
            import torchvision

            m = torchvision.models.swin_t(weights=None).eval()
            return m, {"x": torch.randn(1, 3, 224, 224)}, "features.1.0.attn.qkv"
        from tests.unit.test_einsum import EinsumViT  # the ViT written with torch.einsum

        m = EinsumViT(dim=256, heads=8, depth=4).eval()
        return m, {"x": torch.randn(2, 3, 16, 16)}, "blocks.0.attn.q"
    from tests.unit.test_hf import QUERY, _build

    d = dict(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=8, max_position_embeddings=128)
    import transformers as T

    if kind in ("llama", "qwen2", "mistral"):
        cfg_cls, cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM),
                        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
                        "mistral": (T.MistralConfig, T.MistralForCausalLM)}[kind]
        m = cls(cfg_cls(num_key_value_heads=4 if kind == "llama" else 2, **d))
    else:
        m = _build(kind)
    m = m.eval()
    q = QUERY.get(kind)
    names = [n for n, _ in m.named_modules()]
    if q not in names:
        q = next(n for n in names if n.endswith(("attention.self.query", "attention.q_proj",
                                                 "attention.attention.query")))
    return m, gp.hf.example_inputs(m), q


def _rows(model, path: str) -> int:
    mod = model.get_submodule(path)
    return mod.weight.shape[1] if type(mod).__name__ == "Conv1D" else mod.weight.shape[0]


def _call(model, x):
    y = model(**x)
    return y.logits if hasattr(y, "logits") else y


def run_graphprune(kind: str) -> dict:
    import graphprune as gp
    from tests.conftest import masked_copy, rel_err

    m, x, q = build(kind)
    t = time.perf_counter()
    g = gp.trace(m, x)
    r = gp.prune(m, x, sparsity=0.5, method="l1")
    secs = time.perf_counter() - t
    p0, p1 = r.report.params
    coupled = [gr.name for gr in g.groups if gr.value_coupled]
    exact = gp.prune(m, x, method="l1", config=[
        {"op_types": ["Linear", "Conv1D", "Conv2d"], "sparsity": 0.5},
        *[{"op_names": [n], "exclude": True} for n in coupled]])
    with torch.no_grad():
        err = rel_err(_call(exact.model, x), _call(masked_copy(m, exact.masks), x))
    return {"groups": f"{len(g.prunable_groups)}/{len(g.groups)}", "params": p1 / p0,
            "query": f"{_rows(m, q)} -> {_rows(r.model, q)}", "equal_masked": err,
            "seconds": secs}


def run_torch_pruning(kind: str) -> dict:
    import torch_pruning as tp

    m, x, q = build(kind)
    ignored = [mod for n, mod in m.named_modules()
               if n.split(".")[-1] in ("lm_head", "classifier", "head", "heads", "fc")]
    t = time.perf_counter()
    with torch.no_grad():
        ref = _call(m, x)
    if "use_cache" in __import__("inspect").signature(m.forward).parameters:
        x = {**x, "use_cache": False}  # the same capture setting graphprune uses
    pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=ignored,
                                  output_transform=lambda o: o.logits if hasattr(o, "logits")
                                  else o)
    p0 = sum(p.numel() for p in m.parameters())
    pruner.step()
    secs = time.perf_counter() - t
    with torch.no_grad():
        out = _call(m, x)
    return {"params": sum(p.numel() for p in m.parameters()) / p0, "query":
            f"{_rows(copy.deepcopy(build(kind)[0]), q)} -> {_rows(m, q)}",
            "same_output_shape": tuple(out.shape) == tuple(ref.shape), "seconds": secs}


def _subprocess(kind: str, tool: str, timeout: float) -> dict:
    try:
        out = subprocess.run([sys.executable, __file__, "--worker", tool, kind],
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result in {timeout:.0f} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:90]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--only", default="")
    ap.add_argument("--worker", nargs=2)
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.worker:
        tool, kind = a.worker
        import resource  # a tool that runs away with memory fails alone, not the machine

        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
        res = run_graphprune(kind) if tool == "graphprune" else run_torch_pruning(kind)
        print(json.dumps(res, default=float))
        return
    kinds = [k for k in MODELS if not a.only or k in a.only.split(",")]
    print("| model | graphprune groups | graphprune params | query rows | masked original "
          "(rel. err) | s | Torch-Pruning params | query rows | s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind in kinds:
        g = _subprocess(kind, "graphprune", a.timeout)
        t = _subprocess(kind, "torch_pruning", a.timeout)
        gcell = (f"{g['groups']} | {g['params']:.3f} | {g['query']} | {g['equal_masked']:.1e} | "
                 f"{g['seconds']:.1f}" if "error" not in g else f"error: {g['error']} | | | |")
        if "error" in t:
            tcell = f"{t['error']} | | "
        else:
            shape = "" if t["same_output_shape"] else " (output shape changed)"
            tcell = f"{t['params']:.3f}{shape} | {t['query']} | {t['seconds']:.1f}"
        print(f"| {kind} | {gcell} | {tcell} |", flush=True)


if __name__ == "__main__":
    main()
