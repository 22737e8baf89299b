"""The command line: each subcommand is one library call; options mirror the API's arguments.

A user error prints one line and exits 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

DEFAULT_MODEL = "digits"


def _console(quiet: bool = False):
    from rich.console import Console

    width = None if sys.stdout.isatty() else 120
    return Console(stderr=False, quiet=quiet, highlight=False, width=width)


def _model_and_input(args: argparse.Namespace):
    import torch

    from .specs import load_model, load_weights, parse_shape

    model, shape = load_model(args.model)
    if args.weights:
        load_weights(model, args.weights)
    if args.input_shape:
        shape = parse_shape(args.input_shape)
    if shape is None:
        from .errors import ConfigError

        raise ConfigError(f"--input-shape is required for '{args.model}' (e.g. 1,3,224,224).")
    return model, torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="SPEC: a models/ name (digits, resnet56...), torchvision:NAME, timm:NAME "
                        "or package.module:callable (default: %(default)s)")
    p.add_argument("--input-shape", help="example input shape, batch first, e.g. 1,3,224,224")
    p.add_argument("--weights", help="weights to load: .safetensors, or a state dict (.pt/.pth, "
                                     "read with weights_only=True)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


# ---------------------------------------------------------------------- output staging
@contextlib.contextmanager
def staged_output(out: str) -> Iterator[str]:
    """Write into a hidden staging directory; move the files into ``out`` only on success."""
    from .io import OutputError

    out = os.path.abspath(out)
    created = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=".graphprune-", dir=out)
    except OSError as e:
        raise OutputError(f"cannot write to output directory '{out}': {e.strerror}.") from e
    try:
        yield stage
        for name in os.listdir(stage):
            os.replace(os.path.join(stage, name), os.path.join(out, name))
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ---------------------------------------------------------------------- inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    from .graph import trace

    model, x = _model_and_input(args)
    graph = trace(model, x)
    if args.dot:
        from .io import atomic_write_text

        atomic_write_text(args.dot, graph.to_dot())
    if args.png:
        from .viz import draw_png

        draw_png(graph, args.png)
    if args.json:
        print(json.dumps(_graph_json(graph), indent=1))
        return 0
    con = _console(args.quiet)
    from rich.table import Table

    from .report import _group_cost, layer_costs

    costs = layer_costs(graph, graph.model, None)
    total_p = max(1, sum(p.numel() for p in model.parameters()))
    total_m = max(1, sum(v[2] for v in costs.values()))
    t = Table(title=f"{type(model).__name__}: {len(graph.groups)} groups, "
                    f"{len(graph.prunable_groups)} prunable ({graph.tracer})")
    for c in ("group", "channels", "members", "prunable", "params %", "MACs %", "reason"):
        t.add_column(c, justify="right" if c in ("channels", "members", "params %", "MACs %") else "left")
    for g in graph.groups[: args.max_rows]:
        p, m = _group_cost(g, graph.params, costs, None, None)
        t.add_row(g.name, str(g.size), str(len(g.members)),
                  "[green]yes[/]" if g.prunable else "[red]no[/]", f"{100 * p / total_p:.1f}",
                  f"{100 * m / total_m:.1f}", g.reason or (g.value_coupled or ""))
    con.print(t)
    if len(graph.groups) > args.max_rows:
        con.print(f"... {len(graph.groups) - args.max_rows} more groups (--max-rows)")
    if graph.builder.unsupported:
        con.print("ops without a channel rule (channels frozen): " + ", ".join(
            f"{k} x{len(v)}" for k, v in graph.builder.unsupported.items()))
    return 0


def _graph_json(graph: Any) -> dict[str, Any]:
    return {
        "model": type(graph.model).__name__,
        "tracer": graph.tracer,
        "opaque_modules": graph.leaves,
        "unsupported_ops": {k: len(v) for k, v in graph.builder.unsupported.items()},
        "groups": [{"name": g.name, "channels": g.size, "prunable": g.prunable,
                    "reason": g.reason, "value_coupled": g.value_coupled,
                    "members": [{"param": m.param, "dim": m.dim, "role": m.role,
                                 "module": m.module} for m in g.members]}
                   for g in graph.groups],
    }


# ---------------------------------------------------------------------- prune
def _read_config(path: str) -> Any:
    from .errors import ConfigError

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror}.") from e
    try:
        import yaml

        return yaml.safe_load(text)
    except Exception as e:
        raise ConfigError(f"config file '{path}' is not valid YAML/JSON: {e}") from e


def cmd_prune(args: argparse.Namespace) -> int:
    from .export import export_onnx
    from .masks import save_masks
    from .prune import prune

    con = _console(args.quiet or args.json)
    model, x = _model_and_input(args)
    config = _read_config(args.config) if args.config else None
    with con.status("tracing and pruning...", spinner="dots"):
        r = prune(model, x, sparsity=args.sparsity, method=args.method, round_to=args.round_to,
                  ignore=args.ignore or (), config=config, plan=args.plan, seed=args.seed)
    files: dict[str, Any] = {}
    with staged_output(args.out) as stage:
        r.plan.save(os.path.join(stage, "plan.json"))
        save_masks(r.masks, os.path.join(stage, "masks.safetensors"), plan=r.plan)
        if not args.no_export:
            with con.status("exporting to ONNX and checking it in onnxruntime...", spinner="dots"):
                t0 = time.perf_counter()
                ex = export_onnx(r.model, x, os.path.join(stage, "model.onnx"),
                                 exporter=args.exporter)
            r.report.timings["export"] = time.perf_counter() - t0
            files["onnx"] = {"exporter": ex.exporter, "opset": ex.opset, "bytes": ex.bytes,
                             "max_rel_err": ex.max_rel_err}
        rep = r.report.to_dict()
        rep["model_spec"] = args.model
        rep["input_shape"] = list(x.shape)
        rep["files"] = files
        from .io import atomic_write_text

        atomic_write_text(os.path.join(stage, "report.json"), json.dumps(rep, indent=1) + "\n")
    if args.json:
        print(json.dumps({"out": os.path.abspath(args.out), "params": r.report.params,
                          "macs": r.report.macs, "bytes": r.report.bytes,
                          "timings": r.report.timings, "files": files}, indent=1))
        return 0
    _print_before_after(con, r.report, args)
    return 0


def _print_before_after(con: Any, rep: Any, args: argparse.Namespace) -> None:
    from rich.table import Table

    t = Table(title=f"graphprune prune --model {args.model} --sparsity {args.sparsity} "
                    f"--method {args.method}")
    for c in ("", "before", "after", "after/before"):
        t.add_column(c, justify="left" if not c else "right")
    for k in ("params", "macs", "bytes"):
        b, a = getattr(rep, k)
        t.add_row(k, f"{b:,}", f"{a:,}", f"{a / b:.3f}" if b else "-")
    con.print(t)
    g = Table(title="channels per group")
    for c in ("group", "before", "after", "note"):
        g.add_column(c, justify="right" if c in ("before", "after") else "left")
    for row in rep.groups[:30]:
        g.add_row(row.name, str(row.channels_before), str(row.channels_after),
                  "" if row.prunable else (row.reason or ""))
    con.print(g)
    if len(rep.groups) > 30:
        con.print(f"... {len(rep.groups) - 30} more groups in report.json")
    con.print("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in rep.timings.items()))
    con.print(f"wrote {os.path.abspath(args.out)}/: plan.json, masks.safetensors, report.json"
              + ("" if args.no_export else ", model.onnx"))


# ---------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx
    from .masks import apply_masks

    model, x = _model_and_input(args)
    if args.masks:
        model = apply_masks(model, args.masks, x)
    ex = export_onnx(model, x, args.out, exporter=args.exporter)
    if args.json:
        print(json.dumps(ex.__dict__, indent=1))
    else:
        _console(args.quiet).print(f"wrote {ex.path} ({ex.bytes:,} bytes, {ex.exporter} exporter, "
                                   f"opset {ex.opset}); onnxruntime vs PyTorch: max rel err "
                                   f"{ex.max_rel_err:.1e}")
    return 0


# ---------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphprune", description="Prune PyTorch models physically "
                                "through their channel-dependency graph and ship them to ONNX.")
    sub = p.add_subparsers(dest="cmd", required=True)

    pi = sub.add_parser("inspect", help="show the channel groups of a model")
    _common(pi)
    pi.add_argument("--dot", help="write the channel graph as Graphviz DOT")
    pi.add_argument("--png", help="draw the channel graph to a PNG")
    pi.add_argument("--max-rows", type=int, default=80)
    pi.set_defaults(fn=cmd_inspect)

    pp = sub.add_parser("prune", help="prune, shrink, export (the main job)")
    _common(pp)
    pp.add_argument("--sparsity", type=float, default=0.5, help="fraction of channels removed "
                    "per group (default %(default)s)")
    pp.add_argument("--method", default="l1", help="criterion: l1, l2, fpgm, random, ...")
    pp.add_argument("--round-to", type=int, default=1, help="keep channel counts a multiple of N")
    pp.add_argument("--ignore", action="append", help="module path left alone (repeatable)")
    pp.add_argument("--config", help="YAML/JSON config list (sparsity, op_types, op_names, exclude)")
    pp.add_argument("--plan", help="apply this plan.json instead of scoring")
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--out", default="out", help="output directory (default %(default)s)")
    pp.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    pp.add_argument("--exporter", default="auto", choices=("auto", "dynamo", "legacy"))
    pp.set_defaults(fn=cmd_prune)

    pe = sub.add_parser("export", help="export a model (optionally with masks) to ONNX")
    _common(pe)
    pe.add_argument("--masks", help="mask file to apply before exporting")
    pe.add_argument("--out", default="model.onnx")
    pe.add_argument("--exporter", default="auto", choices=("auto", "dynamo", "legacy"))
    pe.set_defaults(fn=cmd_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import GraphPruneError

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except GraphPruneError as e:
        if args.debug:
            raise
        msg = " ".join(str(e).split("\n")[0].split())
        print(f"graphprune {args.cmd}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
