"""Latency stage, measuring: export width variants of a model and time them in onnxruntime.

Every variant is a physically pruned copy (the first ``w`` channels of each group kept: latency
does not depend on which) exported to ONNX. Sessions take turns round-robin, so noise from other
processes hits every variant alike. Every measuring session stops its thread pool's spinning
when a run ends: by default an onnxruntime worker spins for 20-50 ms of CPU after each run, long
enough to steal a core from the next variant's turn (2 threads on 2 idle cores: the ratio of a
pruned 1 ms model to dense then read 0.25 to 0.57 in three repeats). Every turn opens with
untimed warm-up runs (``WARM_RUNS``), so that each variant is timed at its steady state, as a
deployed model runs back to back, not with the caches the other variants left. Two phases: with
onnxruntime's profiler on, the median time of every kernel (after graph optimisation: fused
convolutions, NCHWc reorders...), with its input and output shapes; with it off, the median
wall-clock latency of a run.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import ConfigError, InputError

if TYPE_CHECKING:
    from ..graph import ChannelGraph

OPTIMIZATIONS = ("none", "basic", "extended", "all")


def cpu_name() -> str:
    """The CPU model string (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(threads: int, providers: Sequence[str], optimization: str) -> dict[str, Any]:
    """What a latency measurement depends on besides the model: CPU, cores, threads, runtime."""
    import onnxruntime as ort

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": int(threads),
            "onnxruntime": ort.__version__, "providers": list(providers),
            "optimization": optimization}


def make_session(path: str, *, threads: int, providers: Sequence[str], optimization: str = "all",
                 profile_prefix: str | None = None):
    """``deploy.ort_session`` whose thread pool stops spinning when a run ends, so that sessions
    timed in turns do not slow each other down (a worker otherwise spins 20-50 ms after every
    run, on the core the next variant needs).

    Raises:
        ExportError: onnxruntime cannot load the file.
    """
    from ..deploy import ort_session

    return ort_session(path, threads=threads, optimization=optimization, providers=providers,
                       profile_prefix=profile_prefix, config={"session.force_spinning_stop": "1"})


def feeds_for(session: Any, example_inputs: Any) -> dict[str, np.ndarray]:
    """The session's inputs from a tensor or a tuple of tensors (batch as given)."""
    from ..trace import normalize_inputs

    args, kwargs = normalize_inputs(example_inputs)
    if kwargs:
        raise InputError("latency measurement takes positional example inputs (a tensor or a "
                         f"tuple), not keyword inputs ({', '.join(kwargs)}).")
    arrays = [a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
              for a in args if isinstance(a, (torch.Tensor, np.ndarray))]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(arrays):
        raise InputError(f"the exported model takes {len(names)} input(s) ({', '.join(names)}); "
                         f"the example inputs hold {len(arrays)} tensor(s).")
    return dict(zip(names, arrays))


# ---------------------------------------------------------------------- variants
def variant_model(graph: ChannelGraph, widths: Mapping[str, int]) -> torch.nn.Module:
    """The model with group ``g`` cut to its first ``widths[g]`` channels (others whole)."""
    from ..apply import apply_plan
    from ..plan import plan_from_scores

    zeros = {n: np.zeros(graph.group(n).size) for n in widths}
    plan = plan_from_scores(graph, zeros, dict(widths), {"purpose": "latency measurement"})
    return apply_plan(graph, plan, verify=False).model


def export_variant(graph: ChannelGraph, widths: Mapping[str, int], example_inputs: Any,
                   path: str, exporter: str = "legacy") -> str:
    """Export ``variant_model(graph, widths)`` to ``path``, for timing only: no checker and no
    parity run (the legacy exporter directly; ``export_onnx`` if it fails or another is asked)."""
    from ..export import export_onnx
    from ..trace import normalize_inputs

    model = variant_model(graph, widths)
    if exporter == "legacy":
        args, _ = normalize_inputs(example_inputs)
        n = sum(isinstance(a, torch.Tensor) for a in args)
        names = ["input"] if n == 1 else [f"input{i}" for i in range(n)]
        try:
            with torch.no_grad(), warnings.catch_warnings(), \
                    contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(model, tuple(args), path, dynamo=False, input_names=names)
            return path
        except Exception:  # the legacy exporter fails on some models: the default chain
            exporter = "auto"
    return export_onnx(model, example_inputs, path, exporter=exporter, check=False).path


# ---------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Kernel:
    """One onnxruntime kernel of a profiled run: op type, input and output shapes, median ms."""

    op: str
    inputs: tuple[tuple[int, ...], ...]
    outputs: tuple[tuple[int, ...], ...]
    ms: float
    low_ms: float = 0.0  # 25th percentile: the kernel's time when nothing preempted it


CLOCKS = ("median", "quartile", "profile")
# Untimed runs that open every turn: the first run after the other variants' turns is 4% slower
# for a 1 ms dense net and 10% for its pruned variants (weights and activations evicted, and
# the small nets gain more from cache), the second still 1-3%; from the third on a variant runs
# at its steady state, the latency of a model timed on its own back to back.
WARM_RUNS = 2


@dataclass(frozen=True)
class Timing:
    """One variant: the median and 25th percentile of its wall-clock runs; with the profiler, its
    kernels by name and the time a profiled run spends outside kernels (25th percentile)."""

    wall_ms: float
    wall_low_ms: float
    kernels: Mapping[str, Kernel]
    overhead_ms: float = 0.0

    def ms(self, clock: str = "median") -> float:
        """The latency on ``clock``: 'median' or 'quartile' (25th percentile) of the wall-clock
        runs, or 'profile' (kernels at their 25th percentile plus the time between them: what a
        run costs when no other process preempts it)."""
        if clock == "median":
            return self.wall_ms
        if clock == "quartile":
            return self.wall_low_ms
        return self.overhead_ms + self.kernel_low_ms

    @property
    def kernel_ms(self) -> float:
        return float(sum(k.ms for k in self.kernels.values()))

    @property
    def kernel_low_ms(self) -> float:
        return float(sum(k.low_ms for k in self.kernels.values()))


def _shapes(v: Any) -> tuple[tuple[int, ...], ...]:
    out = []
    for d in v or ():
        s = next(iter(d.values()), []) if isinstance(d, dict) else []
        out.append(tuple(int(x) for x in s))
    return tuple(out)


def _parse_profile(path: str, skip_runs: int, turn: tuple[int, int] = (0, 1)
                   ) -> tuple[dict[str, Kernel], float]:
    """Median (and 25th percentile) duration per kernel over the profiled runs, the first
    ``skip_runs`` dropped and, with ``turn = (warm, timed)``, the ``warm`` runs that open every
    turn of ``warm + timed`` runs; and the time a run spends outside kernels: the 25th percentile
    of every gap (before, between, after its kernels) summed, so that, as for the kernels, a run
    preempted anywhere counts only where it was preempted (the 25th percentile of whole runs'
    gaps took in the preemptions of most runs on a busy machine)."""
    with open(path, encoding="utf-8") as f:
        events = json.load(f)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    warm, timed = turn
    counted = [i >= skip_runs and (i - skip_runs) % (warm + timed) >= warm for i in range(len(runs))]
    counted = counted if any(counted) else [True] * len(runs)  # too few runs: every one
    starts = [r[0] for r in runs]
    spans: list[list[tuple[float, float]]] = [[] for _ in runs]
    durs: dict[str, list[float]] = defaultdict(list)
    meta: dict[str, tuple[str, Any, Any]] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        r = bisect.bisect_right(starts, e["ts"]) - 1
        if r < 0 or counted[r]:
            durs[node].append(e["dur"] / 1e3)
        if r >= 0:
            spans[r].append((e["ts"], e["ts"] + e["dur"]))
        if node not in meta:
            a = e.get("args", {})
            meta[node] = (a.get("op_name", "?"), _shapes(a.get("input_type_shape")),
                          _shapes(a.get("output_type_shape")))
    out = {}
    for node, d in durs.items():
        op, ins, outs = meta[node]
        out[node] = Kernel(op, ins, outs, float(statistics.median(d)), float(np.quantile(d, 0.25)))
    keep = [i for i, c in enumerate(counted) if c]
    return out, _overhead([runs[i] for i in keep], [spans[i] for i in keep])


def _overhead(runs: Sequence[tuple[float, float]], spans: Sequence[list[tuple[float, float]]]
             ) -> float:
    """Milliseconds a run spends outside kernels (``_parse_profile``), from each run's span and
    its kernels' spans (microseconds)."""
    if not runs:
        return 0.0
    per_run = []
    for (a, b), ks in zip(runs, spans):
        ks = sorted(ks)
        ends = [a] + [e for _, e in ks]
        begins = [t for t, _ in ks] + [b]
        per_run.append([max(0.0, t - e) for e, t in zip(ends, begins)])
    if len({len(g) for g in per_run}) == 1:  # the same kernels every run: gap by gap
        return float(np.quantile(np.array(per_run), 0.25, axis=0).sum() / 1e3)
    return float(np.quantile([(b - a - sum(e - s for s, e in ks)) / 1e3
                              for (a, b), ks in zip(runs, spans)], 0.25))


def _interleave(sessions: Sequence[Any], feeds: Sequence[dict], rounds: int, per_round: int,
                pause: float, warm: int = 0) -> list[list[float]]:
    """``rounds`` turns of every session: ``warm`` runs not timed, then ``per_round`` timed."""
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for k, (s, f) in enumerate(zip(sessions, feeds)):
            if pause:
                time.sleep(pause)
            for _ in range(warm):
                s.run(None, f)
            for _ in range(per_round):
                t = time.perf_counter()
                s.run(None, f)
                times[k].append((time.perf_counter() - t) * 1e3)
    return times


def time_variants(paths: Sequence[str], example_inputs: Any, *, threads: int = 2,
                  providers: Sequence[str] = ("CPUExecutionProvider",),
                  optimization: str = "all", rounds: int = 20, per_round: int = 3,
                  profile: bool | Sequence[bool] = True, pause: float = 0.0,
                  warm: int = WARM_RUNS) -> list[Timing]:
    """Time the ONNX files ``paths`` against each other, interleaved (see the module docstring).

    Returns one ``Timing`` per path: its wall-clock latency over ``rounds * per_round`` runs
    and, with ``profile`` (one flag, or one per path), the time of every kernel. Every turn
    opens with ``warm`` runs that are not counted (``WARM_RUNS``): what is timed is each model's
    steady state, whatever ran before it and however many variants take turns. Turns follow
    each other without a ``pause`` by default: sleeping 30 ms before each turn (meant to let
    spinning pools park, which stopping the spin now does) left each turn on a cold core, spread
    the ratios about 1.5x wider and made a table take 2.5x as long to measure.

    Example:
        >>> t = time_variants(["dense.onnx", "pruned.onnx"], torch.randn(1, 3, 224, 224))
        >>> t[1].ms("median") / t[0].ms("median")
    """
    if rounds < 1 or per_round < 1:
        raise ConfigError(f"The 'rounds' and 'per_round' parameters of time_variants must be ints "
                          f">= 1. Got {rounds!r} and {per_round!r} instead.")
    if warm < 0:
        raise ConfigError(f"The 'warm' parameter of time_variants must be an int >= 0. Got {warm!r} "
                          "instead.")
    kernels: list[dict[str, Kernel]] = [{} for _ in paths]
    overhead = [0.0] * len(paths)
    flags = [bool(profile)] * len(paths) if isinstance(profile, bool) else [bool(f) for f in profile]
    which = [k for k, f in enumerate(flags) if f]
    if which:
        with tempfile.TemporaryDirectory(prefix="gp-latency-") as d:
            sessions = [make_session(paths[k], threads=threads, providers=providers,
                                     optimization=optimization,
                                     profile_prefix=os.path.join(d, f"v{k}")) for k in which]
            feeds = [feeds_for(s, example_inputs) for s in sessions]
            _interleave(sessions, feeds, 2, 1, 0.0)
            _interleave(sessions, feeds, max(3, rounds // 2), per_round, pause, warm)
            for k, s in zip(which, sessions):
                kernels[k], overhead[k] = _parse_profile(s.end_profiling(), skip_runs=2,
                                                         turn=(warm, per_round))
            del sessions
    sessions = [make_session(p, threads=threads, providers=providers, optimization=optimization)
                for p in paths]
    feeds = [feeds_for(s, example_inputs) for s in sessions]
    _interleave(sessions, feeds, 2, 2, 0.0)
    walls = _interleave(sessions, feeds, rounds, per_round, pause, warm)
    return [Timing(float(statistics.median(w)), float(np.quantile(w, 0.25)), kernels[k], overhead[k])
            for k, w in enumerate(walls)]


def detect_block(*, threads: int = 2, providers: Sequence[str] = ("CPUExecutionProvider",),
                 optimization: str = "all") -> int:
    """The channel block onnxruntime's convolution kernels pad to on this machine (16 with
    AVX-512, 8 with AVX2), read from the output shape of a profiled 36-channel convolution;
    1 when it does not pad."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((36, 64, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="probe"),
         helper.make_node("Relu", ["c"], ["y"])], "block_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 36, 8, 8])], [w])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with tempfile.TemporaryDirectory(prefix="gp-latency-") as d:
        path = os.path.join(d, "probe.onnx")
        onnx.save(m, path)
        s = make_session(path, threads=threads, providers=providers, optimization=optimization,
                         profile_prefix=os.path.join(d, "p"))
        x = {"x": rng.standard_normal((1, 64, 8, 8)).astype(np.float32)}
        for _ in range(3):
            s.run(None, x)
        kernels, _ = _parse_profile(s.end_profiling(), 0)
    seen = [k.outputs[0][1] for k in kernels.values() if k.op == "Conv" and k.outputs
            and len(k.outputs[0]) > 1]
    c = max(seen, default=36)
    return next((b for b in (1, 2, 4, 8, 16, 32, 64, 128) if -(-36 // b) * b == c), 1)
