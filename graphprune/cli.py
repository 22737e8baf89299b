"""The command line: each subcommand is one library call; options mirror the API's arguments.

A user error prints one line and exits 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .config import add_arguments


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
    from .hf.loading import example_inputs, is_hf_model

    if is_hf_model(model):  # token ids (and masks, pixels...) as the model takes them
        kw = {"batch": shape[0], "seq_len": shape[1]} if shape is not None and len(shape) == 2 else {}
        return model, example_inputs(model, **kw)
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
    _output_flags(p)


def _output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


SCHEMES = ("linear", "kmeans", "fixed_point", "naive", "dorefa")


def _quantize_args(p: argparse.ArgumentParser, scheme: str, bits: int, schemes: tuple[str, ...],
                   out: str) -> None:
    """Model, masks and quantizer flags shared by ``quantize`` and ``encode``."""
    _common(p)
    p.add_argument("--masks", help="mask file to apply first")
    p.add_argument("--scheme", default=scheme, choices=schemes)
    p.add_argument("--bits", type=int, default=bits)
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into convs first")
    p.add_argument("--out", default=out)


# ---------------------------------------------------------------------- inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    from .capture import trace

    model, x = _model_and_input(args)
    graph = trace(model, x, tracer=args.tracer or "auto")
    if args.dot:
        from .io import atomic_write_text

        atomic_write_text(args.dot, graph.to_dot())
    if args.png:
        from .viz import draw_png

        highlight = None
        if args.plan:
            from .plan import Plan

            highlight = {n for n, gp in Plan.load(args.plan).groups.items() if len(gp.keep) < gp.size}
        draw_png(graph, args.png, highlight=highlight)
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
    if graph.unsupported:
        con.print("ops without a channel rule (channels frozen): " + ", ".join(
            f"{k} x{len(v)}" for k, v in graph.unsupported.items()))
    if graph.tracer_reason:
        con.print(f"traced with {graph.tracer}: {graph.tracer_reason[:300]}")
    return 0


def _graph_json(graph: Any) -> dict[str, Any]:
    return {
        "model": type(graph.model).__name__,
        "tracer": graph.tracer,
        "tracer_reason": graph.tracer_reason,
        "opaque_modules": graph.leaves,
        "unsupported_ops": {k: len(v) for k, v in graph.unsupported.items()},
        "groups": [{"name": g.name, "channels": g.size, "prunable": g.prunable,
                    "reason": g.reason, "value_coupled": g.value_coupled,
                    "members": [{"param": m.param, "dim": m.dim, "role": m.role,
                                 "module": m.module} for m in g.members]}
                   for g in graph.groups],
    }


# ---------------------------------------------------------------------- prune
def _recipe_from_args(args: argparse.Namespace):
    """The recipe file (or the default main job) with the flags given on top of it."""
    from .config import given_options, resolve
    from .recipe import Recipe
    from .specs import parse_shape

    r = Recipe.load(args.recipe) if args.recipe else Recipe()
    if args.model is not None:
        r.model.spec = args.model
    if args.weights is not None:
        r.model.weights = args.weights
    if args.input_shape is not None:
        r.model.input_shape = list(parse_shape(args.input_shape))
    if args.data is not None:
        r.data.source = args.data
    r.prune = resolve(r.prune, given_options(args))
    if args.finetune_epochs is not None:
        r.finetune.epochs = args.finetune_epochs
    if args.quantize is not None:
        r.quantize.mode = args.quantize
    if args.code:
        r.code.enabled = True
    if args.exporter is not None:
        r.export.exporter = args.exporter
    if args.seed is not None:
        r.seed = args.seed
    if args.sensitivity:
        r.sensitivity = True
    r.validate()
    return r


def cmd_prune(args: argparse.Namespace) -> int:
    from .distributed import dist_env
    from .pipeline import run, table_rows

    recipe = _recipe_from_args(args)
    main_rank = dist_env().is_main  # under torchrun only rank 0 speaks
    quiet = args.quiet or args.json or not main_rank
    con = _console(quiet)
    if quiet:
        report = run(recipe, args.out)
    else:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                      "{task.total}"), TimeElapsedColumn(), console=con, transient=True) as bar:
            task = {}

            def progress(group: str, i: int, n: int) -> None:
                if "id" not in task:
                    task["id"] = bar.add_task("reconstructing", total=n)
                what = group if group.startswith("latency") else f"reconstructing {group}"
                bar.update(task["id"], completed=i, total=n, description=what)

            report = run(recipe, args.out, log=lambda m: con.print(f"[dim]{m}[/]"),
                         progress=progress)
    if not main_rank:
        return 0
    if args.json:
        print(json.dumps({k: report[k] for k in ("model", "before", "after", "timings_s")} |
                         {"out": os.path.abspath(args.out)}, indent=1, default=str))
        return 0
    from rich.table import Table

    r = recipe
    t = Table(title=f"{report['model']}: {r.prune.method}" + (" + reconstruction" if r.prune.reconstruct
                                                             else "")
              + (f", fine-tune {r.finetune.epochs} ep" if "finetune" in report.get("timings_s", {})
                 else ", no fine-tune") + f", {report['after']['precision']}")
    for c in ("", "before", "after", "after/before"):
        t.add_column(c, justify="left" if not c else "right")
    for row in table_rows(report):
        t.add_row(*row)
    con.print(t)
    for w in report.get("warnings", []):
        con.print(f"warning: {w}")
    files = report.get("files") or sorted(f for f in os.listdir(args.out) if not f.startswith("."))
    con.print(f"wrote {os.path.abspath(args.out)}/: {', '.join(files)}")
    return 0


# ---------------------------------------------------------------------- export / deploy
def _model_with_masks(args: argparse.Namespace):
    model, x = _model_and_input(args)
    if getattr(args, "masks", None):
        from .export.masks import apply_masks

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

    if args.latency_table is not None:
        return _latency_table(args)
    if args.onnx is None:
        raise ConfigError("give an ONNX file to time, or --latency-table with --model to measure "
                          "how the model's latency depends on its channels.")
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


def _latency_table(args: argparse.Namespace) -> int:
    """``bench --latency-table``: measure (or read) the model's latency table and print it."""
    from .errors import ConfigError
    from .latency.target import cached_table, default_cache

    if args.onnx is not None:
        raise ConfigError("--latency-table measures the model given by --model (exported in many "
                          f"widths), not an ONNX file: drop '{args.onnx}'.")
    model, x = _model_and_input(args)
    model.eval()
    con = _console(args.quiet or args.json)
    with con.status("measuring the latency table (minutes the first time)") as st:
        table = cached_table(model, x, path=args.latency_table, threads=args.threads or 2,
                             progress=lambda what, i, n: st.update(f"latency table: {what} {i + 1}/{n}"))
    if args.plot:
        table.plot(args.plot)
    if args.json:
        print(json.dumps(table.to_dict(), indent=1))
    else:
        con.print(table.summary(max_rows=args.max_rows), markup=False)
        con.print(f"table in {args.latency_table or default_cache()}"
                  + (f"; step curves in {args.plot}" if args.plot else ""))
    return 0


def _quantized(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(quantized model or the model for scheme 'none', the fp32 model, an example input)."""
    from .quantize import quantize

    model, x = _model_with_masks(args)
    if args.fold_bn:
        from .fold import fold_batchnorm

        model = fold_batchnorm(model, x)
    bits = {"bits": args.bits} if args.scheme in ("linear", "kmeans", "dorefa") else {}
    obj = model if args.scheme == "none" else quantize(model, {"scheme": args.scheme, **bits})
    return obj, model, x


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from ._safetensors import dumps
    from .io import atomic_write_bytes

    q, model, x = _quantized(args)
    with torch.no_grad():
        y0, y1 = model.eval()(x), q.model.eval()(x)
    err = float((y1 - y0).norm() / y0.norm().clamp_min(1e-30))
    state = {k: v.detach().contiguous() for k, v in q.model.state_dict().items()}
    atomic_write_bytes(args.out, dumps(state, {"format": "graphprune.quantized",
                                              "scheme": args.scheme, "bits": str(args.bits)}))
    layers = {k: {"scheme": t.scheme, "bits": t.bits, "distinct": int(t.dequantize().unique().numel())}
              for k, t in q.tensors.items()}
    if args.json:
        print(json.dumps({"path": args.out, "output_rel_err": err, "layers": layers}))
    else:
        con = _console(args.quiet)
        con.print(q.summary())
        con.print(f"wrote {args.out} ({len(state)} tensors, weights as their quantized values; load "
                  f"with --weights); output vs fp32 on a random input: rel err {err:.3e}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from .coding import encode

    obj, _, _ = _quantized(args)
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
class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (``--help`` shows the usage), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphprune", description="Prune PyTorch models physically "
                "through their channel-dependency graph and ship them to ONNX.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    pi = sub.add_parser("inspect", help="show the channel groups of a model")
    _common(pi)
    pi.add_argument("--dot", help="write the channel graph as Graphviz DOT")
    pi.add_argument("--png", help="draw the channel graph to a PNG")
    pi.add_argument("--plan", help="colour the groups this plan.json prunes (red) in --png")
    pi.add_argument("--max-rows", type=int, default=80)
    add_arguments(pi, only=("tracer",))
    pi.set_defaults(fn=cmd_inspect)

    pp = sub.add_parser("prune", help="prune, fine-tune, quantize, export: the main job")
    pp.add_argument("--model", default=None,
                    help="SPEC: a models/ name (digits, resnet56...), torchvision:NAME, timm:NAME, "
                         "hf:DIR (a local save_pretrained directory with its tokenizer) or "
                         "package.module:callable (default: the embedded digits classifier)")
    pp.add_argument("--input-shape", help="example input shape, batch first, e.g. 1,3,224,224 "
                                          "(a language model: 1,SEQ_LEN, the window length)")
    pp.add_argument("--weights", help="weights to load: .safetensors, or a state dict (.pt/.pth, "
                                     "read with weights_only=True)")
    pp.add_argument("--data", help="digits (scikit-learn's 8x8 digits: a fixed stratified split, "
                                   "standardised with the train split's statistics; --seed does "
                                   "not change it), photos (crops of scikit-learn's sample "
                                   "photos), random, a .npz/.npy file, a folder of images, or "
                                   "a text file (.txt, .md, .rst) for an hf: language model")
    from .recipe import _main_job_prune

    add_arguments(pp, shown=_main_job_prune())
    pp.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs after pruning (5)")
    pp.add_argument("--quantize", choices=("none", "int8"), help="ONNX precision (int8)")
    pp.add_argument("--code", action="store_true", help="also write model.gpc: 4-bit k-means + "
                                                       "Huffman (Deep Compression)")
    pp.add_argument("--sensitivity", action="store_true", help="also plot per-group sensitivity")
    pp.add_argument("--recipe", help="YAML/JSON recipe (or a report.json) to run; flags override it")
    pp.add_argument("--seed", type=int)
    pp.add_argument("--exporter", choices=("auto", "dynamo", "legacy"))
    pp.add_argument("--out", default="out", help="output directory (default %(default)s)")
    _output_flags(pp)
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
    _output_flags(pr)
    pr.set_defaults(fn=cmd_run)

    pc = sub.add_parser("check", help="compare an ONNX model with its PyTorch source")
    pc.add_argument("onnx")
    _common(pc)
    pc.add_argument("--masks", help="mask file the ONNX model was pruned with")
    pc.add_argument("--input", action="append", help=".npy input (default: random of --input-shape)")
    pc.set_defaults(fn=cmd_check)

    pb = sub.add_parser("bench", help="latency percentiles of an ONNX model in onnxruntime; "
                        "with --latency-table, a model's latency as a function of its channels")
    pb.add_argument("onnx", nargs="?", help="the ONNX model to time")
    pb.add_argument("--input", action="append", help=".npy input (default: random)")
    pb.add_argument("--input-shape", help="shape of a random input, e.g. 1,3,224,224")
    pb.add_argument("--threads", type=int, default=None)
    pb.add_argument("--latency-table", nargs="?", const="", default=None, metavar="PATH",
                    help="measure (or read from PATH: a .json file or a folder; default "
                         "~/.cache/graphprune/latency) the latency table of --model and print it")
    pb.add_argument("--model", default=DEFAULT_MODEL,
                    help="with --latency-table: SPEC as for prune (default: %(default)s)")
    pb.add_argument("--weights", help="with --latency-table: weights to load")
    pb.add_argument("--plot", metavar="PNG", help="with --latency-table: draw the step curves")
    pb.add_argument("--max-rows", type=int, default=40, help="groups shown (default %(default)s)")
    pb.add_argument("--runs", type=int, default=100)
    pb.add_argument("--warmup", type=int, default=10)
    _output_flags(pb)
    pb.set_defaults(fn=cmd_bench)

    pq = sub.add_parser("quantize", help="quantize the weights; write them as safetensors")
    _quantize_args(pq, "linear", 8, SCHEMES, "quantized.safetensors")
    pq.set_defaults(fn=cmd_quantize)

    pn = sub.add_parser("encode", help="quantize and code the weights (Deep Compression)")
    _quantize_args(pn, "kmeans", 4, ("kmeans", "linear", "fixed_point", "naive", "dorefa", "none"),
                   "model.gpc")
    pn.add_argument("--method", default="huffman", choices=("huffman", "linear", "fixed_point", "raw"))
    pn.set_defaults(fn=cmd_encode)

    pd = sub.add_parser("decode", help="decode a coded file to a safetensors state dict")
    pd.add_argument("coded")
    pd.add_argument("--out", default="weights.safetensors")
    _output_flags(pd)
    pd.set_defaults(fn=cmd_decode)
    from .finetune_cmd import add_finetune_parser

    add_finetune_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import GraphPruneError

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except GraphPruneError as e:
        if args.debug:
            raise
        msg = " ".join(_cli_message(e).split("\n")[0].split())
        print(f"graphprune {args.cmd}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _cli_message(e: Exception) -> str:
    """The library's message, naming the command-line option of the setting at fault."""
    from .config import cli_message

    msg = cli_message(e)
    param = getattr(e, "param", None)
    flag = "--" + param.replace("_", "-") if param else None
    if flag and flag not in msg:
        msg = f"{flag}: {msg}"
    return msg


if __name__ == "__main__":
    sys.exit(main())
