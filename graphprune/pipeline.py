"""The main job, end to end: model -> (train the embedded default) -> prune (+ reconstruct) ->
fine-tune -> quantize -> (code) -> export -> run in onnxruntime -> report. A Hugging Face causal
language model (``hf:DIR``) takes a text file and is measured in perplexity: ``lm.job.run_lm``.

``run(recipe, out_dir)`` writes ``model.onnx``, ``masks.safetensors``, ``plan.json``,
``report.json``, ``report.md``, ``recipe.json``, ``model.safetensors`` (the pruned weights),
``channels.png`` (and ``sensitivity.png``, ``model.gpc`` when asked) into ``out_dir`` — all at
once at the end, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, InputError
from .recipe import Recipe

Log = Callable[[str], None]


@dataclass
class Data:
    calib_x: torch.Tensor
    calib_y: torch.Tensor | None
    eval_x: torch.Tensor
    eval_y: torch.Tensor | None
    source: str


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "graphprune")


def load_data(recipe: Recipe, input_shape: tuple[int, ...]) -> Data:
    """The run's data: the recipe's source, or a default that fits the input shape."""
    from .datasets import load_data as load, sample_crops

    src = recipe.data.source
    if src is None:
        src = ("digits" if tuple(input_shape[1:]) == (1, 8, 8) else
               "photos" if len(input_shape) == 4 and input_shape[1] == 3 and input_shape[2] >= 32
               else "random")
    g = torch.Generator().manual_seed(recipe.seed)
    n_cal, n_eval = recipe.data.calibration_samples, recipe.data.eval_samples
    if n_cal is None:  # ImageNet-size images: 64 keep data-driven pruning to minutes on a CPU
        n_cal = 64 if len(input_shape) == 4 and input_shape[2] * input_shape[3] >= 160 * 160 else 256
    if src == "photos":
        cx = sample_crops(n_cal, size=input_shape[2], seed=recipe.seed)
        ex = sample_crops(min(n_eval, 32), size=input_shape[2], seed=recipe.seed + 1)
        return Data(cx, None, ex, None, src)
    if src == "random":
        shp = tuple(input_shape[1:])
        return Data(torch.randn(n_cal, *shp, generator=g), None,
                    torch.randn(min(n_eval, 64), *shp, generator=g), None, src)
    cx, cy, ex, ey = load(src, tuple(input_shape))
    if tuple(cx.shape[1:]) != tuple(input_shape[1:]):
        raise InputError(f"The data source '{src}' holds inputs of shape {tuple(cx.shape[1:])} but "
                         f"the model takes {tuple(input_shape[1:])}.", param="data")
    return Data(cx, cy, ex[:n_eval], None if ey is None else ey[:n_eval], src)


def _train_default(model: nn.Module, data: Data, recipe: Recipe, log: Log) -> nn.Module:
    """Train (or load from the cache) the embedded default on its data."""
    from ._safetensors import dumps
    from .finetune import train
    from .export.masks import read_safetensors

    key = hashlib.sha256(json.dumps([recipe.model.spec, recipe.model.train_epochs, recipe.seed,
                                     data.source, list(data.calib_x.shape),
                                     float(data.calib_x.sum())]).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"{recipe.model.spec.replace(':', '_')}-{key}.safetensors")
    if os.path.isfile(path):
        try:
            state, _ = read_safetensors(path, "cached weights")
            model.load_state_dict(state)
            log(f"loaded the trained {recipe.model.spec} model from {path}")
            return model
        except Exception:
            pass  # a stale or broken cache entry: train again
    log(f"training the {recipe.model.spec} model on {data.source} ({recipe.model.train_epochs} "
        "epochs, first run only)")
    torch.manual_seed(recipe.seed)
    train(model, data.calib_x, data.calib_y, epochs=recipe.model.train_epochs, seed=recipe.seed)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        from .io import atomic_write_bytes

        atomic_write_bytes(path, dumps({k: v for k, v in model.state_dict().items()},
                                       {"format": "graphprune.cache"}))
    except OSError:
        pass  # no writable cache: train again next time
    return model


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> float | None:
    from .finetune import evaluate

    return None if y is None else evaluate(model, x, y)


def _onnx_eval(path: str, x: torch.Tensor, y: torch.Tensor | None, threads: int = 2
               ) -> tuple[float | None, dict[str, float], np.ndarray]:
    from .deploy import Session

    s = Session(path, threads=threads)
    outs = np.concatenate([s.run(x[i:i + 256])[0] for i in range(0, x.shape[0], 256)])
    acc = None if y is None else float((outs.argmax(-1) == y.numpy()).mean())
    lat = s.benchmark(x[:1], warmup=10, runs=50)
    return acc, lat, outs


def run(recipe: Recipe, out_dir: str, *, log: Log | None = None,
        progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Run ``recipe`` and write the bundle to ``out_dir``; returns the report."""
    from ._safetensors import dumps
    from .cost import count_params
    from .export import export_bundle, export_onnx
    from .finetune import train
    from .io import atomic_write_bytes, atomic_write_text, check_writable
    from .prune import prune as prune_model
    from .specs import load_model, load_weights

    if recipe.sensitivity and not _have_matplotlib():
        raise ConfigError("The sensitivity plot needs matplotlib: pip install 'graphprune[plot]'.",
                          param="sensitivity")

    check_writable(out_dir)  # before any work
    log = log or (lambda s: None)
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    torch.manual_seed(recipe.seed)
    model, shape = load_model(recipe.model.spec)
    from .hf import is_hf_model

    if is_hf_model(model):  # a language model: text in, perplexity out (graphprune.lm.job)
        from .lm.job import run_lm

        return run_lm(recipe, model, out_dir, log=log, progress=progress)
    if recipe.model.input_shape:
        shape = tuple(recipe.model.input_shape)
    if shape is None:
        raise ConfigError(f"The model '{recipe.model.spec}' has no default input shape: give one in "
                          "the recipe's model stage (input_shape: [1, 3, 224, 224]).",
                          param="input_shape")
    data = load_data(recipe, shape)
    example = data.calib_x[:1]
    if recipe.model.weights:
        load_weights(model, recipe.model.weights)
    elif recipe.model.spec == "digits" and data.calib_y is not None:
        t = time.perf_counter()
        model = _train_default(model, data, recipe, log)
        times["train"] = time.perf_counter() - t
    model.eval()
    acc_dense = _accuracy(model, data.eval_x, data.eval_y)

    # ------------------------------------------------------------------ prune
    p = recipe.prune
    log(f"pruning with {p.method}" + (" + reconstruction" if p.reconstruct else ""))
    t = time.perf_counter()
    calib = (data.calib_x, data.calib_y) if data.calib_y is not None else data.calib_x
    r = prune_model(model, example, p.replace(seed=recipe.seed), calibration=calib,
                    progress=progress)
    times["prune"] = time.perf_counter() - t
    pruned = r.model
    log(f"pruned: {r.report.params[0]:,} -> {r.report.params[1]:,} parameters")
    acc_pruned = _accuracy(pruned, data.eval_x, data.eval_y)

    # ------------------------------------------------------------------ fine-tune
    acc_ft = acc_pruned
    if recipe.finetune.epochs and data.calib_y is not None:
        log(f"fine-tuning for {recipe.finetune.epochs} epochs")
        t = time.perf_counter()
        tx, ty = data.calib_x, data.calib_y
        train(pruned, tx, ty, epochs=recipe.finetune.epochs, lr=recipe.finetune.lr,
              batch_size=recipe.finetune.batch_size, seed=recipe.seed)
        times["finetune"] = time.perf_counter() - t
        acc_ft = _accuracy(pruned, data.eval_x, data.eval_y)
    elif recipe.finetune.epochs:
        log("no labels in the data: fine-tuning skipped")

    pruned = pruned.cpu()  # exported, coded and evaluated in onnxruntime from the CPU
    q = recipe.quantize.mode
    with tempfile.TemporaryDirectory(prefix="gp-run-") as tmp:
        # ------------------------------------------------------------------ dense reference
        t = time.perf_counter()
        dense_onnx = export_onnx(model, example, os.path.join(tmp, "dense.onnx"),
                                 exporter=recipe.export.exporter)
        acc_dense_ort, lat_dense, _ = _onnx_eval(dense_onnx.path, data.eval_x, data.eval_y)

        def finish(stage: str, report: dict[str, Any]) -> None:
            """Evaluate the staged model and add the main job's files and figures."""
            acc_ort, lat_final, _ = _onnx_eval(os.path.join(stage, "model.onnx"), data.eval_x,
                                               data.eval_y)
            times["export"] = time.perf_counter() - t
            atomic_write_bytes(os.path.join(stage, "model.safetensors"),
                               dumps(pruned.state_dict(), {"format": "graphprune.pruned-weights"}))
            coded = None
            if recipe.code.enabled:
                coded = _code(pruned, example, data, recipe, os.path.join(stage, "model.gpc"), log)
            if _have_matplotlib():
                _channels_png(r, os.path.join(stage, "channels.png"))
            else:
                log("matplotlib is not installed: channels.png skipped (pip install "
                    "'graphprune[plot]')")
            if recipe.sensitivity:
                log("measuring per-group sensitivity")
                _sensitivity_png(model, example, data, recipe, os.path.join(stage,
                                                                            "sensitivity.png"))
            onnx = report["onnx"]
            report.update({
                "graphprune": __import__("graphprune").__version__,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                "recipe": recipe.to_dict(),
                "model": recipe.model.spec, "input_shape": list(shape), "data": data.source,
                "before": {"params": count_params(model), "macs": report["macs"][0],
                           "onnx_bytes": dense_onnx.bytes, "ort_latency_ms": lat_dense["p50"],
                           "accuracy_torch": acc_dense, "accuracy_ort": acc_dense_ort},
                "after": {"params": count_params(pruned), "macs": report["macs"][1],
                          "onnx_bytes": onnx["bytes"], "ort_latency_ms": lat_final["p50"],
                          "accuracy_torch_pruned": acc_pruned, "accuracy_torch": acc_ft,
                          "accuracy_ort": acc_ort, "precision": onnx["quantize"],
                          **({"coded_bytes": coded["bytes"], "coded_accuracy": coded["accuracy"]}
                             if coded else {})},
                "timings_s": {**times, "total": time.perf_counter() - t_start},
            })
            slower = lat_final["p50"] / lat_dense["p50"] if lat_dense["p50"] else 0.0
            if slower >= 1.0:  # pruning should never make the shipped model slower by accident
                from .latency.allocate import default_round_to

                report["warnings"] = [
                    f"the pruned model ran {slower:.2f}x the dense model's latency in onnxruntime on "
                    f"this machine: channel counts that are not multiples of "
                    f"{default_round_to(None)} (this CPU's channel block) can cost more than the "
                    "MACs they save; prune with round_to='auto' or a target_latency"]
                log(f"warning: {report['warnings'][0]}")
            atomic_write_text(os.path.join(stage, "report.md"), report_markdown(report))
            atomic_write_text(os.path.join(stage, "recipe.json"),
                              json.dumps(recipe.to_dict(), indent=1) + "\n")
            report["files"] = sorted(set(os.listdir(stage)) | {"report.json"})

        log("exporting" + (" (int8, calibrating activations)" if q == "int8" else ""))
        return export_bundle(out_dir, pruned, example, result=r,
                             quantize=None if q == "none" else q, calibration=data.calib_x,
                             exporter=recipe.export.exporter,
                             calibrate_method=recipe.quantize.calibrate_method, finish=finish)


def _have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _code(pruned: nn.Module, example: torch.Tensor, data: Data, recipe: Recipe, path: str,
          log: Log) -> dict[str, Any]:
    from .coding import encode
    from .finetune import train
    from .fold import fold_batchnorm
    from .quantize import quantize

    c = recipe.code
    log(f"coding: {c.scheme} {c.bits}-bit + {c.method}")
    folded = fold_batchnorm(pruned, example)
    spec: dict[str, Any] = {"scheme": c.scheme}
    if c.scheme in ("kmeans", "linear"):
        spec["bits"] = c.bits
    q = quantize(folded, spec)
    if c.scheme == "kmeans" and c.finetune_epochs and data.calib_y is not None:
        q.share_weights()
        train(q.model, data.calib_x, data.calib_y, epochs=c.finetune_epochs, lr=1e-3,
              seed=recipe.seed)
        q.freeze()
    rep = encode(q, path, method=c.method)
    return {"bytes": rep.bytes, "accuracy": _accuracy(q.model, data.eval_x, data.eval_y)}


def _channels_png(r: Any, path: str) -> None:
    from .io import atomic_path
    from .viz import pyplot

    plt = pyplot()
    rows = [g for g in r.report.groups if g.prunable][:60]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(rows) + 2), 4))
    xs = np.arange(len(rows))
    ax.bar(xs, [g.channels_before for g in rows], color="#cccccc", label="before")
    ax.bar(xs, [g.channels_after for g in rows], color="#3a7bd5", label="after")
    ax.set_xticks(xs, [g.name for g in rows], rotation=90, fontsize=6)
    ax.set_ylabel("channels")
    ax.set_title("channels per group, before and after pruning")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _sensitivity_png(model: nn.Module, example: torch.Tensor, data: Data, recipe: Recipe,
                     path: str) -> None:
    """Accuracy (or output cosine without labels) when one group alone is pruned, vs sparsity."""
    from .capture import trace
    from .viz import pyplot

    plt = pyplot()
    from .io import atomic_path
    from .prune import prune

    g = trace(model, example)
    groups = sorted(g.prunable_groups, key=lambda x: -x.size)[:12]
    levels = [0.25, 0.5, 0.75]
    x_eval = data.eval_x[:512]
    y_eval = None if data.eval_y is None else data.eval_y[:512]
    with torch.no_grad():
        ref = model(x_eval)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for grp in groups:
        vals = []
        for s in levels:
            rr = prune(model, example, config=[{"op_names": [grp.name], "sparsity": s}],
                       method="l1")
            with torch.no_grad():
                out = rr.model(x_eval)
            vals.append(float((out.argmax(-1) == y_eval).float().mean()) if y_eval is not None
                        else float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), 0)))
        ax.plot(levels, vals, marker="o", label=grp.name)
    ax.set_xlabel("sparsity of the group alone (l1, no reconstruction)")
    ax.set_ylabel("accuracy" if y_eval is not None else "output cosine")
    ax.set_title("sensitivity per group")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _fmt(v: Any, kind: str = "") -> str:
    if v is None:
        return "-"
    if kind == "acc":
        return f"{100 * v:.2f}%"
    if kind == "ms":
        return f"{v:.3f} ms"
    if kind == "rate":
        return f"{v:,.0f}"
    if kind == "ppl":
        return f"{v:,.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


_ROWS = (("params", "parameters", ""), ("macs", "MACs", ""), ("onnx_bytes", "ONNX bytes on disk", ""),
         ("ort_latency_ms", "onnxruntime latency (batch 1, median)", "ms"),
         ("accuracy_torch", "accuracy, PyTorch", "acc"), ("accuracy_ort", "accuracy, onnxruntime", "acc"))
_LM_ROWS = (("params", "parameters", ""), ("block_params", "attention + MLP parameters", ""),
            ("onnx_bytes", "ONNX bytes on disk (fp32)", ""),
            ("int8_bytes", "ONNX bytes, int8 weight-only", ""),
            ("ort_tokens_per_s", "onnxruntime tokens/s (fp32, median)", "rate"),
            ("perplexity_torch", "held-out perplexity, PyTorch", "ppl"),
            ("perplexity_ort", "held-out perplexity, onnxruntime", "ppl"),
            ("perplexity_ort_int8", "held-out perplexity, onnxruntime int8", "ppl"))


def table_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(quantity, before, after, after/before) rows of the summary table."""
    b, a = report["before"], report["after"]
    rows = []
    lm = "perplexity_torch" in b
    for key, label, kind in _LM_ROWS if lm else _ROWS:
        bv, av = b.get(key), a.get(key)
        if lm and bv is None and av is None:
            continue
        ratio = f"{av / bv:.3f}" if isinstance(av, (int, float)) and isinstance(bv, (int, float)) \
            and bv and kind != "acc" else ""
        rows.append((label, _fmt(bv, kind), _fmt(av, kind), ratio))
    if "coded_bytes" in a:
        rows.append(("coded weights (Deep Compression)", _fmt(b["params"] * 4) + " (fp32)",
                     _fmt(a["coded_bytes"]), f"{a['coded_bytes'] / (b['params'] * 4):.4f}"))
    return rows


def report_markdown(report: dict[str, Any]) -> str:
    r = report["recipe"]
    lines = [f"# graphprune report: {report['model']}", "",
             f"{report['date']} on {report['machine']}; data: {report['data']}; "
             f"method {r['prune']['method']}"
             + (" + reconstruction" if r["prune"]["reconstruct"] else "")
             + f"; fine-tune {r['finetune']['epochs']} epochs; export {report['after']['precision']}.",
             "", "| | before | after | after/before |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in table_rows(report)]
    acc_p = report["after"].get("accuracy_torch_pruned")
    if acc_p is not None:
        lines += ["", f"Accuracy right after pruning (before fine-tuning): {100 * acc_p:.2f}%."]
    ppl_p, text = report["after"].get("perplexity_torch_pruned"), report.get("text")
    if ppl_p is not None and text:
        lines += ["", f"Perplexity right after pruning (before fine-tuning): {ppl_p:.2f}. Text: "
                      f"{text['tokens']:,} tokens, {text['calibration_windows']} calibration windows of "
                      f"{text['seq_len']}, {text['held_out_windows']} held-out windows from its last "
                      f"{text['held_out_tokens']:,} tokens."]
    lines += ["", "## Channels per group", "", "| group | before | after | note |",
              "| --- | ---: | ---: | --- |"]
    for g in report["groups"]:
        lines.append(f"| {g['name']} | {g['channels_before']} | {g['channels_after']} | "
                     f"{'' if g['prunable'] else (g['reason'] or '')} |")
    fid = (report.get("fidelity") or {}).get("total")
    if fid:
        lines += ["", f"Output vs the original on the calibration data (before fine-tuning): "
                      f"relative error {fid['rel_err']:.4f}, cosine {fid['cosine']:.5f}."]
    lines += ["", "## Timings (s)", "", ", ".join(f"{k} {v:.1f}" for k, v in
                                                  report["timings_s"].items()), ""]
    return "\n".join(lines)
