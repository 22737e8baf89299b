"""The main job (``graphprune prune``), every stage of the flow in order: load the model and the
data -> (train the embedded default) -> prune (+ reconstruct) -> fine-tune -> quantize -> (code)
-> export -> run in onnxruntime -> report, on one process or under torchrun. A Hugging Face causal
language model (``hf:DIR``) takes a text file and is measured in perplexity: ``lm.job.run_lm``.
The report is rendered (Markdown, table rows, figures) by ``pipeline_report``.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, InputError
from .pipeline_dist import check_same_weights, everywhere, plan_message, rebuild
from .pipeline_report import (have_matplotlib, report_markdown, table_rows, write_figures,
                              write_report_files)
from .recipe import Recipe

# report_markdown and table_rows live in pipeline_report; importable from here as before
__all__ = ["Data", "load_data", "report_markdown", "run", "table_rows"]

Log = Callable[[str], None]


@dataclass
class Data:
    """The run's calibration (pruning, fine-tuning) and evaluation tensors; labels None without."""

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


@contextmanager
def _timed(times: dict[str, float], stage: str) -> Iterator[None]:
    """Record the seconds the block takes as ``times[stage]``."""
    t = time.perf_counter()
    yield
    times[stage] = time.perf_counter() - t


def _accuracy(model: nn.Module, data: Data) -> float | None:
    """``model``'s accuracy on the evaluation data, or None without labels."""
    from .finetune import evaluate

    return None if data.eval_y is None else evaluate(model, data.eval_x, data.eval_y)


def _onnx_eval(path: str, data: Data, threads: int = 2) -> tuple[float | None, dict[str, float]]:
    """Accuracy (None without labels) on the evaluation data and batch-1 latency of the ONNX file
    ``path`` in onnxruntime."""
    from .deploy import Session

    x, y = data.eval_x, data.eval_y
    s = Session(path, threads=threads)
    outs = np.concatenate([s.run(x[i:i + 256])[0] for i in range(0, x.shape[0], 256)])
    acc = None if y is None else float((outs.argmax(-1) == y.numpy()).mean())
    lat = s.benchmark(x[:1], warmup=10, runs=50)
    return acc, lat


def run(recipe: Recipe, out_dir: str, *, log: Log | None = None,
        progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Run ``recipe`` and write the bundle to ``out_dir``; returns the report.

    On one process, or on every process of a ``torchrun`` launch: then rank 0 alone prepares the
    dense model, prunes it and sends its plan (JSON) to the others, every process applies that
    plan to the same fresh model, all fine-tune it together (``finetune``: DDP starts every
    process from rank 0's weights), and rank 0 alone exports and writes the bundle; every
    process returns rank 0's report. An error on rank 0 is raised on every process.

    Raises:
        ConfigError: a bad setting (e.g. a fine-tune batch that does not split over the
            processes), or a language model under torchrun.
        GraphPruneError: another process failed.
    """
    from .distributed import dist_env, message_group, process_group, resolve_device
    from .io import check_writable

    if recipe.sensitivity and not have_matplotlib():
        raise ConfigError("The sensitivity plot needs matplotlib: pip install 'graphprune[plot]'.",
                          param="sensitivity")
    env = dist_env()
    if not env.distributed:
        check_writable(out_dir)  # before any work
        return _run(recipe, out_dir, env, None, log or (lambda s: None), progress)
    dev = resolve_device(recipe.prune.device, env)
    with process_group(env, dev), message_group(env) as group:
        return _run(recipe, out_dir, env, group, log if log and env.is_main else (lambda s: None),
                    progress if env.is_main else None)


def _load(recipe: Recipe, env: Any) -> tuple[nn.Module, tuple[int, ...] | None, Data | None]:
    """The same on every process: a fresh model, its input shape and its data (None for a
    language model), with the fine-tune batches checked to split over the processes."""
    from .distributed import shards
    from .hf import is_hf_model
    from .specs import load_model

    torch.manual_seed(recipe.seed)
    model, shape = load_model(recipe.model.spec)
    if is_hf_model(model):
        if env.distributed:
            raise ConfigError("The main job of a language model runs on one process: launch it "
                              "without torchrun.", param="model")
        return model, shape, None
    if recipe.model.input_shape:
        shape = tuple(recipe.model.input_shape)
    if shape is None:
        raise ConfigError(f"The model '{recipe.model.spec}' has no default input shape: give "
                          "one in the recipe's model stage (input_shape: [1, 3, 224, 224]).",
                          param="input_shape")
    data = load_data(recipe, shape)
    if recipe.finetune.epochs and data.calib_y is not None:  # fails early, not after pruning
        shards(len(data.calib_y), recipe.finetune.batch_size, seed=recipe.seed, env=env)
    return model, shape, data


def _run(recipe: Recipe, out_dir: str, env: Any, group: Any, log: Log,
         progress: Callable[[str, int, int], None] | None) -> dict[str, Any]:
    """The stages on this process (``run``); ``group``: the processes' message group, or None."""
    from .distributed import from_main
    from .finetune import finetune
    from .io import check_writable

    t_start = time.perf_counter()
    times: dict[str, float] = {}
    model, shape, data = everywhere(env, group, "loading the model and the data",
                                     lambda: _load(recipe, env))
    if data is None:  # a language model: text in, perplexity out (graphprune.lm.job)
        from .lm.job import run_lm

        return run_lm(recipe, model, out_dir, log=log, progress=progress)
    assert shape is not None
    example = data.calib_x[:1]

    # ------------------------------------------------------------------ dense model, prune (rank 0)
    kept: dict[str, Any] = {}

    def prune_here() -> bytes:
        if env.distributed:
            check_writable(out_dir)  # before any work
        kept.update(_prune(recipe, model, data, example, log, progress, times))
        return plan_message(kept["result"], data) if env.distributed else b""

    message = from_main(env, prune_here, "pruning", group)
    pruned = everywhere(env, group, "applying rank 0's plan",  # rank 0 has it, the others rebuild it
                        lambda: kept["result"].model if env.is_main
                        else rebuild(model, example, recipe, message, data))

    # ------------------------------------------------------------------ fine-tune (every process)
    ft = None
    if recipe.finetune.epochs and data.calib_y is not None:
        log(f"fine-tuning for {recipe.finetune.epochs} epochs")
        with _timed(times, "finetune"):
            res = finetune(pruned, (data.calib_x, data.calib_y), epochs=recipe.finetune.epochs,
                           lr=recipe.finetune.lr, batch_size=recipe.finetune.batch_size,
                           optimizer=recipe.finetune.optimizer, seed=recipe.seed,
                           device=recipe.prune.device, inplace=True, log=log)
        pruned = res.model
        check_same_weights(env, pruned, group)
        ft = {k: res.report[k] for k in ("processes", "backend", "device", "optimizer", "batch_size",
                                         "batch_size_per_process", "steps_per_epoch",
                                         "global_batchnorm_layers", "loss")}
    elif recipe.finetune.epochs:
        log("no labels in the data: fine-tuning skipped")

    # ------------------------------------------------------------------ export, report (rank 0)
    def export_here() -> bytes:
        kept["report"] = _export(recipe, out_dir, kept, pruned, data, shape, example, ft, times,
                                 t_start, log)
        return json.dumps(kept["report"], default=str).encode() if env.distributed else b""

    message = from_main(env, export_here, "exporting", group)
    return kept["report"] if env.is_main else json.loads(message)


def _prune(recipe: Recipe, model: nn.Module, data: Data, example: torch.Tensor, log: Log,
           progress: Callable[[str, int, int], None] | None, times: dict[str, float]
           ) -> dict[str, Any]:
    """The dense model (weights, or the embedded default trained) and its pruning."""
    from .prune import prune as prune_model
    from .specs import load_weights

    if recipe.model.weights:
        load_weights(model, recipe.model.weights)
    elif recipe.model.spec == "digits" and data.calib_y is not None:
        with _timed(times, "train"):
            model = _train_default(model, data, recipe, log)
    model.eval()
    acc_dense = _accuracy(model, data)
    p = recipe.prune
    log(f"pruning with {p.method}" + (" + reconstruction" if p.reconstruct else ""))
    calib = (data.calib_x, data.calib_y) if data.calib_y is not None else data.calib_x
    with _timed(times, "prune"):
        r = prune_model(model, example, p.replace(seed=recipe.seed), calibration=calib,
                        progress=progress)
    log(f"pruned: {r.report.params[0]:,} -> {r.report.params[1]:,} parameters")
    return {"dense": model, "result": r, "acc_dense": acc_dense, "acc_pruned": _accuracy(r.model, data)}


# ---------------------------------------------------------------------- export (rank 0)
def _export(recipe: Recipe, out_dir: str, kept: dict[str, Any], pruned: nn.Module, data: Data,
            shape: tuple[int, ...], example: torch.Tensor, ft: dict[str, Any] | None,
            times: dict[str, float], t_start: float, log: Log) -> dict[str, Any]:
    """Evaluate, export and write the bundle; returns the report."""
    from ._safetensors import dumps
    from .cost import count_params
    from .export import export_bundle, export_onnx
    from .io import atomic_write_bytes

    model, r, acc_dense, acc_pruned = kept["dense"], kept["result"], kept["acc_dense"], \
        kept["acc_pruned"]
    acc_ft = _accuracy(pruned, data) if ft else acc_pruned
    pruned = pruned.cpu()  # exported, coded and evaluated in onnxruntime from the CPU
    q = recipe.quantize.mode
    with tempfile.TemporaryDirectory(prefix="gp-run-") as tmp:
        # ------------------------------------------------------------------ dense reference
        t = time.perf_counter()
        dense_onnx = export_onnx(model, example, os.path.join(tmp, "dense.onnx"),
                                 exporter=recipe.export.exporter)
        acc_dense_ort, lat_dense = _onnx_eval(dense_onnx.path, data)

        def finish(stage: str, report: dict[str, Any]) -> None:
            """Evaluate the staged model and add the main job's files and figures."""
            acc_ort, lat_final = _onnx_eval(os.path.join(stage, "model.onnx"), data)
            times["export"] = time.perf_counter() - t
            atomic_write_bytes(os.path.join(stage, "model.safetensors"),
                               dumps(pruned.state_dict(), {"format": "graphprune.pruned-weights"}))
            coded = None
            if recipe.code.enabled:
                coded = _code(pruned, example, data, recipe, os.path.join(stage, "model.gpc"), log)
            write_figures(stage, r, model, example, data.eval_x, data.eval_y,
                          sensitivity=recipe.sensitivity, log=log)
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
                **({"finetune": ft} if ft else {}),
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
            write_report_files(stage, report, recipe)
            report["files"] = sorted(set(os.listdir(stage)) | {"report.json"})

        log("exporting" + (" (int8, calibrating activations)" if q == "int8" else ""))
        return export_bundle(out_dir, pruned, example, result=r,
                             quantize=None if q == "none" else q, calibration=data.calib_x,
                             exporter=recipe.export.exporter,
                             calibrate_method=recipe.quantize.calibrate_method, finish=finish)


def _code(pruned: nn.Module, example: torch.Tensor, data: Data, recipe: Recipe, path: str,
          log: Log) -> dict[str, Any]:
    """Quantize (and share, fine-tune) the pruned weights and code them into ``path`` (model.gpc)."""
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
    return {"bytes": rep.bytes, "accuracy": _accuracy(q.model, data)}

