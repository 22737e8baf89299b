"""The command line: each subcommand is one library call; options mirror the API's arguments.

A user error prints one line and exits 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .io import staged_dir

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
    with staged_dir(args.out) as stage:
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


# ---------------------------------------------------------------------- export / deploy
def _model_with_masks(args: argparse.Namespace):
    model, x = _model_and_input(args)
    if getattr(args, "masks", None):
        from .masks import apply_masks

        model = apply_masks(model, args.masks, x)
    return model, x


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    model, x = _model_with_masks(args)
    calib = None
    if args.quantize == "int8":
        from .datasets import load_data

        calib = load_data(args.data or "digits", tuple(x.shape))[0][:256]
    ex = export_onnx(model, x, args.out, exporter=args.exporter, quantize=args.quantize,
                     calibration=calib)
    if args.json:
        print(json.dumps(ex.__dict__, indent=1))
    else:
        _console(args.quiet).print(
            f"wrote {ex.path} ({ex.bytes:,} bytes, {ex.quantize or 'fp32'}, {ex.exporter} "
            f"exporter, opset {ex.opset}); onnxruntime vs PyTorch: max rel err {ex.max_rel_err:.1e}"
            + (f", int8 cosine {ex.cosine:.5f}" if ex.cosine is not None else ""))
    return 0


def _load_input(path: str):
    import numpy as np

    from .errors import InputError

    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise InputError(f"cannot read input '{path}' as .npy: {e}") from e


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from .deploy import Session

    sess = Session(args.onnx, threads=args.threads)
    outs = sess.run(*[_load_input(p) for p in args.input])
    if args.output:
        from .io import atomic_path

        with atomic_path(args.output) as tmp, open(tmp, "wb") as f:
            np.save(f, outs[0])
    if args.json:
        print(json.dumps({"outputs": [{"name": n, "shape": list(o.shape)} for n, o in
                                      zip(sess.outputs, outs)],
                          "argmax": outs[0].argmax(-1).tolist() if outs[0].ndim == 2 else None}))
    else:
        con = _console(args.quiet)
        for n, o in zip(sess.outputs, outs):
            con.print(f"{n}: shape {list(o.shape)}" + (f", argmax {o.argmax(-1).tolist()[:20]}"
                                                       if o.ndim == 2 else ""))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .deploy import check

    model, x = _model_with_masks(args)
    xs = [_load_input(p) for p in args.input] if args.input else [x.numpy()]
    res = check(args.onnx, model, *xs)
    if args.json:
        print(json.dumps(res))
    else:
        _console(args.quiet).print(f"{args.onnx} vs {args.model}: max abs err "
                                   f"{res['max_abs_err']:.3e}, max rel err {res['max_rel_err']:.3e}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import numpy as np

    from .deploy import Session
    from .errors import ConfigError
    from .specs import parse_shape

    sess = Session(args.onnx, threads=args.threads)
    if args.input:
        xs = [_load_input(p) for p in args.input]
    else:
        xs = []
        for i, (name, shape, _) in enumerate(sess.inputs):
            if args.input_shape and i == 0:
                shp = parse_shape(args.input_shape)
            elif all(isinstance(s, int) for s in shape):
                shp = tuple(shape)
            elif all(isinstance(s, int) for s in shape[1:]):
                shp = (1, *shape[1:])
            else:
                raise ConfigError(f"input '{name}' has a dynamic shape {shape}: pass --input-shape.")
            xs.append(np.random.default_rng(0).standard_normal(shp).astype(np.float32))
    res = sess.benchmark(*xs, warmup=args.warmup, runs=args.runs)
    if args.json:
        print(json.dumps(res))
    else:
        _console(args.quiet).print(
            f"{args.onnx}: median {res['p50']:.3f} ms, p90 {res['p90']:.3f} ms, p99 "
            f"{res['p99']:.3f} ms, min {res['min']:.3f} ms over {res['runs']} runs "
            f"({args.threads or 'default'} threads)")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from .coding import encode
    from .quantize import quantize

    model, x = _model_with_masks(args)
    if args.fold_bn:
        from .fold import fold_batchnorm

        model = fold_batchnorm(model, x)
    obj = model if args.scheme == "none" else quantize(model, {"scheme": args.scheme,
                                                               **({"bits": args.bits} if args.scheme
                                                                  in ("linear", "kmeans", "dorefa")
                                                                  else {})})
    rep = encode(obj, args.out, method=args.method)
    if args.json:
        print(json.dumps({"path": rep.path, "bytes": rep.bytes, "fp32_bytes": rep.fp32_bytes,
                          "ratio": rep.ratio}))
    else:
        _console(args.quiet).print(f"wrote {rep.path}: {rep.bytes:,} bytes, {rep.ratio:.1f}x "
                                   f"smaller than the {rep.fp32_bytes:,} bytes of fp32 tensors")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from ._safetensors import dumps
    from .coding import decode
    from .io import atomic_write_bytes

    state = decode(args.coded)
    atomic_write_bytes(args.out, dumps(state, {"format": "graphprune.decoded"}))
    _console(args.quiet or args.json).print(f"wrote {args.out}: {len(state)} tensors")
    if args.json:
        print(json.dumps({"path": args.out, "tensors": len(state)}))
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
    pe.add_argument("--quantize", choices=("none", "int8"), default="none")
    pe.add_argument("--data", help="calibration data for int8: digits, a .npz/.npy, an image folder")
    pe.set_defaults(fn=cmd_export)

    pr = sub.add_parser("run", help="run an ONNX model in onnxruntime on .npy inputs")
    pr.add_argument("onnx")
    pr.add_argument("--input", action="append", required=True, help=".npy input (repeatable)")
    pr.add_argument("--output", help="write the first output to this .npy")
    pr.add_argument("--threads", type=int, default=None)
    for flag in ("--json", "--quiet", "--debug"):
        pr.add_argument(flag, action="store_true")
    pr.set_defaults(fn=cmd_run)

    pc = sub.add_parser("check", help="compare an ONNX model with its PyTorch source")
    pc.add_argument("onnx")
    _common(pc)
    pc.add_argument("--masks", help="mask file the ONNX model was pruned with")
    pc.add_argument("--input", action="append", help=".npy input (default: random of --input-shape)")
    pc.set_defaults(fn=cmd_check)

    pb = sub.add_parser("bench", help="latency percentiles of an ONNX model in onnxruntime")
    pb.add_argument("onnx")
    pb.add_argument("--input", action="append", help=".npy input (default: random)")
    pb.add_argument("--input-shape", help="shape of a random input, e.g. 1,3,224,224")
    pb.add_argument("--threads", type=int, default=None)
    pb.add_argument("--runs", type=int, default=100)
    pb.add_argument("--warmup", type=int, default=10)
    for flag in ("--json", "--quiet", "--debug"):
        pb.add_argument(flag, action="store_true")
    pb.set_defaults(fn=cmd_bench)

    pn = sub.add_parser("encode", help="quantize and code the weights (Deep Compression)")
    _common(pn)
    pn.add_argument("--masks", help="mask file to apply first")
    pn.add_argument("--scheme", default="kmeans",
                    choices=("kmeans", "linear", "fixed_point", "naive", "dorefa", "none"))
    pn.add_argument("--bits", type=int, default=4)
    pn.add_argument("--method", default="huffman", choices=("huffman", "linear", "fixed_point", "raw"))
    pn.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into convs first")
    pn.add_argument("--out", default="model.gpc")
    pn.set_defaults(fn=cmd_encode)

    pd = sub.add_parser("decode", help="decode a coded file to a safetensors state dict")
    pd.add_argument("coded")
    pd.add_argument("--out", default="weights.safetensors")
    for flag in ("--json", "--quiet", "--debug"):
        pd.add_argument(flag, action="store_true")
    pd.set_defaults(fn=cmd_decode)
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
