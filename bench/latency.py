"""Latency-aware pruning vs uniform channel pruning at the same measured onnxruntime latency.

For each model (torchvision, random init, batch 1 at 224x224): build the latency table on this
machine (cached in out/latency/), allocate channels for ``target_latency=0.5`` from l1 scores
(``meet_latency``: the allocation is measured and, if it misses by more than 5%, redone once or
twice with the target scaled by predicted/measured), then time in one interleaved run the dense
model, the latency-aware model and uniform l1 prunings (the table's ``round_to``) around the same
latency; uniform parameters / importance are interpolated at the latency-aware model's measured
latency. Then the default-safety check: uniform pruning at 10-40% with ``round_to=1`` and with
the table's rounding, and the predictions of the table on those models.

Latency is the table's clock (``LatencyTable.clock``): the median wall-clock run on a quiet
machine; on a busy one, where the medians do not follow the kernel times, their 25th percentile
or the profiled run time (kernels at their 25th percentile plus the time between them). The
median wall-clock ratio is printed beside it.

    python bench/latency.py [--models mobilenet_v2,efficientnet_b0,resnet50] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphprune as gp  # noqa: E402
from graphprune.budget import plan_cost  # noqa: E402
from graphprune.criteria import ScoreContext, get_criterion, score_group  # noqa: E402
from graphprune.latency import (  # noqa: E402
    build_table, kept_importance, measure_models, meet_latency,
)
from graphprune.latency.build import uniform_widths  # noqa: E402
from graphprune.latency.measure import variant_model  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "out", "latency")


def l1_scores(g):
    ctx = ScoreContext(params=g.params, rng=np.random.default_rng(0), calibration=None, graph=g)
    crit = get_criterion("l1")
    return {grp.name: score_group(crit, grp, ctx) for grp in g.prunable_groups}


def uniform_near(table, sizes, ratio, step, spread=0.04):
    """Uniform sparsities whose predicted latency ratio brackets ``ratio``."""
    grid = np.round(np.arange(0.0, 0.95, 0.01), 2)
    pred = np.array([table.predict_ratio(uniform_widths(sizes, s, step)) for s in grid])
    s0 = float(grid[int(np.argmin(np.abs(pred - ratio)))])
    return sorted({round(min(0.94, max(0.0, s0 + d)), 2) for d in (-spread, 0.0, spread)})


def interp_at(x, xs, ys):
    """Linear interpolation of ys(xs) at x (xs need not be sorted); None outside the range."""
    order = np.argsort(xs)
    xs, ys = np.asarray(xs)[order], np.asarray(ys)[order]
    if x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def run(name, args):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    g = gp.trace(model, x)
    sizes = {grp.name: grp.size for grp in g.prunable_groups}
    t0 = time.perf_counter()
    table = build_table(model, x, g, threads=args.threads, samples=args.samples, rounds=args.rounds,
                        cache=OUT)
    built = time.perf_counter() - t0
    print(f"\n## {name}: table ready in {built:.0f} s (measuring took {table.meta.get('build_seconds')} s"
          f" when built); clock {table.clock}, round_to auto -> {table.round_to}", flush=True)
    if args.plot:
        try:
            table.plot(os.path.join(OUT, f"{name}.png"))
        except gp.ConfigError as e:
            print("  (no plot:", e, ")")
    scores = l1_scores(g)
    t0 = time.perf_counter()
    amounts, rep = meet_latency(g, scores, args.target, table, example_inputs=x, rounds=args.rounds)
    print(f"  allocation + measurement {time.perf_counter() - t0:.0f} s; predicted "
          f"{rep.predicted_ratio:.3f}, measured {rep.measured_ratio:.3f}", flush=True)
    # one interleaved run: dense, latency-aware, uniform around the same latency
    sps = uniform_near(table, sizes, rep.measured_ratio, table.round_to)
    uni = [uniform_widths(sizes, s, table.round_to) for s in sps]
    models = [model, variant_model(g, amounts)] + [variant_model(g, u) for u in uni]
    res = measure_models(models, x, threads=args.threads, rounds=args.rounds)
    lat = [r[table.clock] for r in res]
    ratio = [v / lat[0] for v in lat]
    wall_ratio = [r["median"] / res[0]["median"] for r in res]
    macs0, p0 = plan_cost(g, {})
    ours_macs, ours_p = plan_cost(g, amounts)
    u_cost = [plan_cost(g, u) for u in uni]
    u_imp = [kept_importance(scores, u) for u in uni]
    up = interp_at(ratio[1], ratio[2:], [c[1] for c in u_cost])
    ui = interp_at(ratio[1], ratio[2:], u_imp)
    print(f"  uniform l1 (round_to={table.round_to}) at sparsity "
          + ", ".join(f"{s:.2f}: {q:.3f} (wall {w:.3f})" for s, q, w in zip(sps, ratio[2:], wall_ratio[2:])))
    return {"model": name, "dense_ms": lat[0], "dense_wall": res[0]["median"], "target": args.target,
            "predicted": rep.predicted_ratio, "measured": ratio[1], "measured_wall": wall_ratio[1],
            "params": (p0, ours_p), "macs": (macs0, ours_macs), "imp": kept_importance(scores, amounts),
            "u_params": up, "u_imp": ui, "clock": table.clock, "round_to": table.round_to,
            "table": table, "sizes": sizes, "g": g, "model_obj": model, "x": x}


def safety(r, args):
    """Uniform 10-40% by l1: round_to=1 and the table's rounding, measured and predicted."""
    table, sizes, g, x = r["table"], r["sizes"], r["g"], r["x"]
    rows = []
    for rt in sorted({1, table.round_to}):
        for s in (0.1, 0.2, 0.3, 0.4):
            rows.append((rt, s, uniform_widths(sizes, s, rt)))
    res = measure_models([r["model_obj"]] + [variant_model(g, w) for _, _, w in rows], x,
                         threads=args.threads, rounds=args.rounds)
    c = table.clock
    print(f"  default safety ({r['model']}): measured latency / dense ({c}; median wall in "
          "brackets), predicted")
    for (rt, s, w), m in zip(rows, res[1:]):
        print(f"    round_to={rt:<3} sparsity {s:.1f}: {m[c] / res[0][c]:.3f} "
              f"({m['median'] / res[0]['median']:.3f})  predicted {table.predict_ratio(w):.3f}"
              f"{'' if table.aligned(w) else ' (unaligned: not modelled)'}")


def compare(name, args):
    """In-context profile vs an isolated-layer lookup table: fit both on the same design variants,
    predict held-out prunings measured in the same run."""
    import tempfile

    import torchvision

    from graphprune.latency.build import calibrate, design
    from graphprune.latency.isolate import isolated_runs
    from graphprune.latency.measure import CLOCKS, detect_block, export_variant, time_variants
    from graphprune.latency.model import Predictor, fit_kernels

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    g = gp.trace(model, x)
    sizes = {grp.name: grp.size for grp in g.prunable_groups}
    block = detect_block(threads=args.threads)
    step = max(8, block)
    widths = [{}] + design(sizes, args.samples, step, 0.2, block, np.random.default_rng(0))
    held = {f"uniform {s:.1f}": uniform_widths(sizes, s, step) for s in (0.3, 0.5, 0.7)}
    for k, w in enumerate(design(sizes, 3, step, 0.1, block, np.random.default_rng(7))):
        held[f"random {k}"] = w
    every = widths + list(held.values())
    with tempfile.TemporaryDirectory() as d:
        paths = [export_variant(g, w, x, os.path.join(d, f"v{i}.onnx")) for i, w in enumerate(every)]
        ts = time_variants(paths, x, threads=args.threads, rounds=args.rounds)
    n = len(widths)
    runs = [t.kernels for t in ts]
    t0 = time.perf_counter()
    iso = isolated_runs(runs, threads=args.threads)
    iso_s = time.perf_counter() - t0
    preds, clock = {}, "median"
    for tag, rr in (("context", runs), ("isolated", iso)):
        km, _ = fit_kernels(rr[:n], widths, sizes, block, stat="low_ms")
        p = Predictor(km, sizes, block)
        e, clock = calibrate(p, sizes, widths, ts[:n], clocks=CLOCKS if tag == "context" else (clock,))
        preds[tag] = lambda w, p=p, e=e: (p.total({**sizes, **w}) / p.total(sizes)) ** e
        if tag == "isolated":  # a lookup table as published: layer sum + the dense remainder
            run0 = ts[0].ms(clock)
            c = run0 - p.total(sizes)
            preds["isolated LUT"] = lambda w, p=p, c=c: (c + p.total({**sizes, **w})) / (c + p.total(sizes))
    print(f"\n## {name}: prediction / measured latency ratio ({clock} clock; isolated layers timed "
          f"in {iso_s:.0f} s)")
    print("| pruning | measured | " + " | ".join(preds) + " |")
    print("| --- | ---: |" + " ---: |" * len(preds))
    errs = {k: [] for k in preds}
    for i, (tag, w) in enumerate(held.items(), n):
        m = ts[i].ms(clock) / ts[0].ms(clock)
        cells = []
        for k, f in preds.items():
            errs[k].append(abs(f(w) / m - 1))
            cells.append(f"{f(w):.3f} ({f(w) / m - 1:+.1%})")
        print(f"| {tag} | {m:.3f} | " + " | ".join(cells) + " |")
    print("| mean abs error | |" + " |".join(f" {np.mean(v):.1%}" for v in errs.values()) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mobilenet_v2,efficientnet_b0,resnet50")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--no-safety", dest="safety", action="store_false")
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--compare", action="store_true",
                    help="only compare the in-context profile with isolated-layer timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(OUT, exist_ok=True)
    import onnxruntime

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores (load {load:.1f}), "
          f"onnxruntime {onnxruntime.__version__}, batch 1, {args.threads} threads, "
          f"{args.rounds} interleaved rounds")
    if args.compare:
        for name in args.models.split(","):
            compare(name, args)
        return
    rows = []
    for name in args.models.split(","):
        r = run(name, args)
        rows.append(r)
        if args.safety and name != "resnet50":
            safety(r, args)
    print("\n| model | dense ms | target | predicted | measured | measured (wall) | params kept | "
          "MACs kept | l1 importance kept | uniform params at same latency | uniform importance |")
    print("| --- |" + " ---: |" * 10)
    for r in rows:
        up = f"{r['u_params'] / r['params'][0]:.3f}" if r["u_params"] else "n/a"
        ui = f"{r['u_imp']:.3f}" if r["u_imp"] is not None else "n/a"
        print(f"| {r['model']} | {r['dense_ms']:.2f} ({r['clock']}) | {r['target']:.2f} | "
              f"{r['predicted']:.3f} | {r['measured']:.3f} | {r['measured_wall']:.3f} | "
              f"{r['params'][1] / r['params'][0]:.3f} | {r['macs'][1] / r['macs'][0]:.3f} | "
              f"{r['imp']:.3f} | {up} | {ui} |")


if __name__ == "__main__":
    main()
