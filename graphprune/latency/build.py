"""Latency stage, building a table: design width variants, export them, time them interleaved,
fit the kernel models, and cache the result per model shape and machine.

The variants: the dense model; ``samples`` variants where every group keeps a multiple of the
step (the NCHWc block, at least 8) between ``lowest`` and all of its channels (half of them
spread over the range of model latencies, half drawn group by group: ``design``), redrawn until
no two groups follow the same sequence of widths (so that every kernel's shapes name their
groups); and the uniformly pruned models ``prune(sparsity=s, round_to=r)`` would make, for
each ``s`` in ``sparsities`` and ``r`` in ``round_candidates`` (the measured steps that
``round_to='auto'`` is chosen from, and held-out checks of the predictions).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from torch import nn

from .._validate import check_choice, check_int
from ..errors import ConfigError
from .measure import (
    CLOCKS, OPTIMIZATIONS, Timing, detect_block, export_variant, machine_key, time_variants,
)
from .model import Predictor, fit_kernels, pad
from .table import LatencyTable, LatencyTableError, Sample, aligned_widths, key_digest


def model_key(model: nn.Module, example_inputs: Any, sizes: Mapping[str, int],
              exporter: str) -> dict[str, Any]:
    """What a table depends on in the model: class, input shapes, prunable groups, parameters."""
    from ..trace import normalize_inputs

    args, _ = normalize_inputs(example_inputs)
    shapes = [[*a.shape, str(a.dtype)] for a in args if hasattr(a, "shape")]
    groups = ";".join(f"{g}:{s}" for g, s in sizes.items())
    return {"class": type(model).__name__, "inputs": shapes, "groups": len(sizes),
            "groups_digest": key_digest({"g": groups}),
            "params": int(sum(p.numel() for p in model.parameters())), "exporter": exporter}


def cache_path(cache: str | os.PathLike, key: Mapping[str, Any]) -> str:
    """``cache`` itself if it names a ``.json`` file, else a file named by the key inside it."""
    cache = os.fspath(cache)
    if cache.endswith(".json"):
        return cache
    os.makedirs(cache, exist_ok=True)
    return os.path.join(cache, f"latency-{key['model']['class']}-{key_digest(key)}.json")


def design(sizes: Mapping[str, int], samples: int, step: int, lowest: float, block: int,
           rng: np.random.Generator, jitter: float = 0.3) -> list[dict[str, int]]:
    """``samples`` width assignments, on multiples of ``step`` from ``lowest`` of a group to all of
    it. The first half spreads the whole model over the range of latencies: variant ``k`` keeps
    about a fraction ``f_k`` (evenly spaced, random order) of every group, jittered by up to
    ``jitter`` (the calibration needs small and large models); the second half draws every
    group's width independently (a layer's input and output widths far apart, as a latency-aware
    allocation makes them). Draws are repeated until the per-group sequences of widths (exact and
    padded to the block) differ between groups with more than one width to choose from."""
    choices = {g: aligned_widths(s, step, math.ceil(lowest * s)) for g, s in sizes.items()}
    free = [g for g, c in choices.items() if len(c) > 1]
    spread = (samples + 1) // 2
    levels = rng.permutation(np.linspace(lowest + (1 - lowest) / (2 * spread), 1.0, spread))

    def draw(g: str) -> list[int]:
        c = np.asarray(choices[g])
        want = levels * sizes[g] * rng.uniform(1 - jitter, 1 + jitter, size=spread)
        return [int(c[np.argmin(np.abs(c - v))]) for v in want] + \
            [int(rng.choice(c)) for _ in range(samples - spread)]

    cols = {g: draw(g) for g in free}
    for _ in range(300):
        seen: dict[tuple[int, ...], str] = {}
        clash = []
        for g in free:
            seqs = {tuple(cols[g]), tuple(pad(w, block) for w in cols[g])}
            if any(seen.setdefault(s, g) != g for s in seqs) or len(set(cols[g])) == 1:
                clash.append(g)
        if not clash:
            break
        for g in clash:
            cols[g] = draw(g)
    return [{g: cols[g][k] for g in free if cols[g][k] < sizes[g]} for k in range(samples)]


def uniform_widths(sizes: Mapping[str, int], sparsity: float, round_to: int) -> dict[str, int]:
    """The channels ``prune(sparsity=, round_to=)`` keeps per group (no config, nothing ignored)."""
    from ..plan import keep_count

    return {g: keep_count(s, sparsity, round_to) for g, s in sizes.items()
            if keep_count(s, sparsity, round_to) < s}


def build_table(model: nn.Module, example_inputs: Any, graph: Any = None, *, threads: int = 2,
                providers: Sequence[str] = ("CPUExecutionProvider",), optimization: str = "all",
                samples: int = 8, rounds: int = 20, per_round: int = 3, exporter: str = "legacy",
                sparsities: Sequence[float] = (0.1, 0.2, 0.3, 0.4),
                round_candidates: Sequence[int] | None = None, lowest: float = 0.2,
                seed: int = 0, cache: str | os.PathLike | None = None, stale: str = "measure",
                progress: Callable[[str, int, int], None] | None = None) -> LatencyTable:
    """Measure how ``model``'s onnxruntime latency depends on the channels of each group.

    Args:
        model, example_inputs: the model and an input batch (its batch size is the one timed).
        graph: the model's ``ChannelGraph`` (traced if not given).
        threads, providers, optimization: the onnxruntime session to time (as deployed).
        samples: random width variants to fit on (more: better fits, longer build).
        rounds, per_round: interleaved rounds, and runs per variant per round.
        exporter: 'legacy' (fast; falls back to the default chain), 'dynamo' or 'auto'.
        sparsities, round_candidates: uniform prunings measured for the default rounding
            (default candidates: 1 and the step, the NCHWc block or 8).
        lowest: the smallest fraction of a group's channels a random variant keeps.
        cache: a directory (the file is named by the model and machine) or a ``.json`` path; a
            table there for the same model shape and machine is returned without measuring.
        stale: what a cached table of another model shape or machine leads to: 'measure' (the
            table is measured again and the file overwritten) or 'raise' (LatencyTableError).
        progress: ``fn(stage, i, n)`` called as variants are exported.

    Example:
        >>> t = build_table(torchvision.models.mobilenet_v2(), torch.randn(1, 3, 224, 224),
        ...                 threads=2, cache="out/latency")
        >>> print(t.summary())

    Raises:
        ConfigError: an option is out of range.
        LatencyTableError: with ``stale='raise'``, the cache file holds another model's or
            machine's table.
    """
    from .. import trace

    check_int(threads, "threads", "build_table", low=1)
    check_int(samples, "samples", "build_table", low=3)
    check_int(rounds, "rounds", "build_table", low=1)
    check_int(per_round, "per_round", "build_table", low=1)
    check_choice(optimization, "optimization", "build_table", OPTIMIZATIONS)
    check_choice(exporter, "exporter", "build_table", ("legacy", "dynamo", "auto"))
    check_choice(stale, "stale", "build_table", ("measure", "raise"))
    if not 0.0 < lowest <= 1.0:
        raise ConfigError(f"The 'lowest' parameter of build_table must be a float in (0, 1]. "
                          f"Got {lowest!r} instead.")
    if any(not 0.0 <= s < 1.0 for s in sparsities):
        raise ConfigError(f"The 'sparsities' parameter of build_table must hold floats in [0, 1). "
                          f"Got {list(sparsities)!r} instead.")
    t0 = time.perf_counter()
    graph = graph if graph is not None else trace(model, example_inputs)
    sizes = {g.name: g.size for g in graph.prunable_groups}
    if not sizes:
        raise ConfigError(f"{type(model).__name__} has no prunable channel group: there is no "
                          "latency to trade for channels.")
    key = {"model": model_key(model, example_inputs, sizes, exporter),
           "machine": machine_key(threads, providers, optimization)}
    path = cache_path(cache, key) if cache is not None else None
    if path is not None and os.path.exists(path):
        try:
            cached = LatencyTable.load(path)
        except LatencyTableError:
            cached = None  # unreadable: measured again and overwritten
        if cached is not None and cached.key == LatencyTable.normalize_key(key):
            return cached
        if stale == "raise":
            raise LatencyTableError(_stale_message(path, cached, LatencyTable.normalize_key(key)))
    block = detect_block(threads=threads, providers=providers, optimization=optimization)
    step = max(block, 8)
    cands = sorted({int(r) for r in (round_candidates or (1, step))})
    rng = np.random.default_rng(seed)
    variants: list[tuple[Sample, dict[str, int]]] = [(Sample("design", {}, {}), {})]
    for w in design(sizes, samples, step, lowest, block, rng):
        variants.append((Sample("design", w, {}), w))
    for r in cands:
        for s in sparsities:
            variants.append((Sample("uniform", {}, {}, float(s), r), uniform_widths(sizes, s, r)))
    unique: dict[tuple, int] = {}
    for _, w in variants:
        unique.setdefault(tuple(sorted(w.items())), len(unique))
    with tempfile.TemporaryDirectory(prefix="gp-latency-") as d:
        paths = []
        for i, wt in enumerate(unique):
            if progress is not None:
                progress("export", i, len(unique))
            paths.append(export_variant(graph, dict(wt), example_inputs,
                                        os.path.join(d, f"v{i}.onnx"), exporter))
        if progress is not None:
            progress("time", 0, 1)
        timings = time_variants(paths, example_inputs, threads=threads, providers=providers,
                                optimization=optimization, rounds=rounds, per_round=per_round)
    measured = []
    for s, w in variants:
        t = timings[unique[tuple(sorted(w.items()))]]
        measured.append(Sample(s.kind, w, {c: t.ms(c) for c in CLOCKS}, s.sparsity, s.round_to))
    design_ix = [unique[tuple(sorted(w.items()))] for s, w in variants if s.kind == "design"]
    widths = [dict(w) for s, w in variants if s.kind == "design"]
    kernels, unmatched = fit_kernels([timings[i].kernels for i in design_ix], widths, sizes, block,
                                     stat="low_ms")
    exponent, clock = calibrate(Predictor(kernels, sizes, block), sizes, widths,
                                [timings[i] for i in design_ix])
    from .allocate import recommend_round_to

    meta = {"method": "profile", "clock": clock, "step": step, "rounds": rounds,
            "per_round": per_round, "samples": samples, "seed": seed,
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    dense_ms = measured[0].ms[clock]
    table = LatencyTable(key=key, dense_ms=dense_ms, block=block, exponent=exponent,
                         sizes=sizes, kernels=tuple(kernels), samples=tuple(measured), round_to=step,
                         unmatched=tuple(unmatched), meta=meta)
    uniform = [s for s in measured if s.kind == "uniform"]
    round_to = recommend_round_to([table.measured_ms(s) / dense_ms for s in uniform],
                                  [int(s.round_to) for s in uniform], step)
    meta["build_seconds"] = round(time.perf_counter() - t0, 1)
    table = dataclasses.replace(table, round_to=round_to, meta=meta)
    if path is not None:
        table.save(path)
    return table


def _stale_message(path: str, cached: LatencyTable | None, key: Mapping[str, Any]) -> str:
    """Why the table at ``path`` does not serve this model on this machine."""
    if cached is None:
        why = "is not a readable latency table"
    else:
        part = "model" if dict(cached.key.get("model", {})) != key["model"] else "machine"
        got, want = dict(cached.key.get(part, {})), key[part]
        diff = [k for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
        shown = ", ".join(f"{k} {got.get(k)!r} (here {want.get(k)!r})" for k in diff[:3])
        why = f"was measured on another {part}: {shown}"
    return (f"the latency table '{path}' {why}. Give a folder instead (tables are named by model "
            "and machine there), another file name, or delete the file to measure again.")


def calibrate(p: Predictor, sizes: Mapping[str, int], widths: Sequence[Mapping[str, int]],
              timings: Sequence[Timing], tolerance: float = 0.03,
              clocks: Sequence[str] = CLOCKS) -> tuple[float, str]:
    """``latency / dense = (kernels / dense kernels) ** exponent`` over the design variants (the
    first is the dense model): a line through the dense point in log-log space, fitted by least
    squares on log ratios (relative errors; predictions are judged by ratios). Wall-clock runs
    grow a little faster than the profiled kernels (exponent 1.05-1.10 on the 1 ms test net: the
    profiler's 25th percentiles flatter the long runs that other processes preempt more often);
    ``alpha + beta * kernels``, the straight line fitted before, over-predicted pruned variants
    of 0.3-0.6 of dense by 2.5-3.5% in-sample and +5.9% against fresh measurements, the power
    +0.2-0.4% and +2.0% (10 tables). The clock is the one the kernel model explains best: the
    'median' run (a quiet machine) or its 'quartile' (25th percentile: robust to other
    processes preempting some runs); if neither stays within ``tolerance`` (RMS log residual,
    exponent in (0.5, 2)), the last of ``clocks``, by default the 'profile' (kernels at their
    25th percentile plus the time between them: preemption-free, but the profiler's own cost
    per kernel makes small models look relatively slower). Returns the exponent and clock."""
    x = np.array([p.total({**sizes, **w}) for w in widths])
    fits = []
    if np.ptp(x) > 0.05 * x.max() and x.min() > 0:
        lx = np.log(x[1:] / x[0])
        for clock in clocks:
            y = np.array([t.ms(clock) for t in timings])
            if y.min() <= 0:
                continue
            ly = np.log(y[1:] / y[0])
            exponent = float(lx @ ly / (lx @ lx))
            rms = float(np.sqrt(np.mean((exponent * lx - ly) ** 2)))
            if 0.5 < exponent < 2.0 and (rms < tolerance or clock == clocks[-1]):
                fits.append((clock == clocks[-1], rms, exponent, clock))
    if fits:
        _, _, exponent, clock = min(fits)
        return exponent, clock
    return 1.0, clocks[-1]
