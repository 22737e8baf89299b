"""The main job's last stage, rendering: its report dict (``report.json``) as the Markdown of
``report.md``, the rows of the summary table the CLI prints, and the figures ``channels.png``
and ``sensitivity.png``. The job's stages themselves are in ``pipeline`` (a vision model) and
``lm.job`` (a Hugging Face causal language model); both render through here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

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


def _fmt(v: Any, kind: str = "") -> str:
    """One table cell: ``kind`` is "acc" (a fraction, shown in %), "ms", "rate", "ppl" or ""."""
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


def table_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(quantity, before, after, after/before) rows of the summary table: accuracy and latency
    for a vision model, perplexity and tokens/s for a language model (rows it lacks are left out).

    Example:
        >>> table_rows({"before": {"params": 1000}, "after": {"params": 250}})[0]
        ('parameters', '1,000', '250', '0.250')
    """
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


def write_report_files(stage: str, report: dict[str, Any], recipe: Any) -> None:
    """``report.md`` and ``recipe.json`` of a main job, into its staged bundle folder."""
    import json

    from .io import atomic_write_text

    atomic_write_text(os.path.join(stage, "report.md"), report_markdown(report))
    atomic_write_text(os.path.join(stage, "recipe.json"), json.dumps(recipe.to_dict(), indent=1) + "\n")


def report_markdown(report: dict[str, Any]) -> str:
    """The text of ``report.md``: the run's settings, the summary table, the channels per group,
    the fidelity and the timings of a finished report (as ``pipeline.run`` returns it).

    Example:
        >>> report = graphprune.pipeline.run(recipe, "out/run")
        >>> print(report_markdown(report))      # what out/run/report.md holds
    """
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


# ---------------------------------------------------------------------- figures (matplotlib)
def have_matplotlib() -> bool:
    """Whether matplotlib, which draws the figures, is installed (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write_figures(stage: str, r: Any, model: nn.Module, example: torch.Tensor, eval_x: torch.Tensor,
                  eval_y: torch.Tensor | None, *, sensitivity: bool, log: Callable[[str], None]
                  ) -> None:
    """The main job's figures in the directory ``stage``: ``channels.png`` of the pruning result
    ``r`` (skipped, with a note in ``log``, without matplotlib) and, if ``sensitivity``, the
    ``sensitivity.png`` of the dense ``model`` (which needs matplotlib: check it first).

    Example:
        >>> write_figures("out/run", r, dense, x[:1], x_eval, y_eval, sensitivity=False, log=print)
    """
    if have_matplotlib():
        channels_png(r, os.path.join(stage, "channels.png"))
    else:
        log("matplotlib is not installed: channels.png skipped (pip install 'graphprune[plot]')")
    if sensitivity:
        log("measuring per-group sensitivity")
        sensitivity_png(model, example, eval_x, eval_y, os.path.join(stage, "sensitivity.png"))


def _save_png(plt: Any, fig: Any, path: str) -> None:
    """Lay out ``fig``, write it to ``path`` atomically and release it."""
    from .io import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def channels_png(r: Any, path: str) -> None:
    """Bars of the channels of the (first 60) prunable groups of the pruning result ``r``,
    before and after, written to ``path``."""
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
    _save_png(plt, fig, path)


def sensitivity_png(model: nn.Module, example: torch.Tensor, eval_x: torch.Tensor,
                    eval_y: torch.Tensor | None, path: str) -> None:
    """Accuracy (or output cosine without labels) on the evaluation data when one of the 12
    largest groups alone is pruned (l1, no reconstruction), vs its sparsity, written to ``path``."""
    from .capture import trace
    from .prune import prune
    from .viz import pyplot

    plt = pyplot()
    g = trace(model, example)
    groups = sorted(g.prunable_groups, key=lambda x: -x.size)[:12]
    levels = [0.25, 0.5, 0.75]
    x_eval = eval_x[:512]
    y_eval = None if eval_y is None else eval_y[:512]
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
    _save_png(plt, fig, path)
