"""Latency stage, checking: time a pruned model against its dense original in onnxruntime and
report predicted vs measured latency, per-group channel counts, MACs and parameters.

Both models are exported and timed in the same interleaved run, so their ratio is what the
machine's noise hurts least. The latency reported is the table's clock (``LatencyTable.clock``): the
median wall-clock run on a quiet machine, a preemption-robust reading on a busy one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from .measure import CLOCKS, time_variants
from .table import LatencyTable


@dataclass(frozen=True)
class LatencyReport:
    """Predicted vs measured latency of one pruned model, with its size.

    ``groups``: group -> (channels before, after); ``macs`` / ``params``: (before, after);
    ``measured_ms`` / ``dense_measured_ms``: timed together now (None if not measured);
    ``warning``: why the pruned model may be slower than dense, if it may.
    """

    target: float | None
    predicted_ms: float
    dense_ms: float
    groups: Mapping[str, tuple[int, int]]
    macs: tuple[int, int]
    params: tuple[int, int]
    clock: str
    measured_ms: float | None = None
    dense_measured_ms: float | None = None
    warning: str | None = None
    conditions: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", MappingProxyType(dict(self.groups)))
        object.__setattr__(self, "conditions", MappingProxyType(dict(self.conditions)))

    @property
    def predicted_ratio(self) -> float:
        return self.predicted_ms / self.dense_ms

    @property
    def measured_ratio(self) -> float | None:
        if self.measured_ms is None or not self.dense_measured_ms:
            return None
        return self.measured_ms / self.dense_measured_ms

    def to_dict(self) -> dict[str, Any]:
        return {"target_latency": self.target, "clock": self.clock,
                "dense_ms": self.dense_ms, "predicted_ms": self.predicted_ms,
                "predicted_ratio": self.predicted_ratio,
                "dense_measured_ms": self.dense_measured_ms, "measured_ms": self.measured_ms,
                "measured_ratio": self.measured_ratio, "macs": list(self.macs),
                "params": list(self.params), "warning": self.warning,
                "conditions": dict(self.conditions),
                "groups": {g: list(v) for g, v in self.groups.items()}}

    def summary(self, max_rows: int = 30) -> str:
        c = self.conditions
        lines = [f"latency ({self.clock} clock; {c.get('threads', '?')} threads, "
                 f"onnxruntime {c.get('onnxruntime', '?')}, {c.get('cpu', '?')})"]
        if self.target is not None:
            lines.append(f"  target          {self.target:.3f} of dense")
        lines.append(f"  predicted       {self.predicted_ms:.3f} ms ({self.predicted_ratio:.3f} of "
                     f"{self.dense_ms:.3f} ms)")
        if self.measured_ratio is not None:
            lines.append(f"  measured        {self.measured_ms:.3f} ms ({self.measured_ratio:.3f} of "
                         f"{self.dense_measured_ms:.3f} ms, timed together)")
        lines.append(f"  MACs            {self.macs[0]:,} -> {self.macs[1]:,} "
                     f"({self.macs[1] / max(1, self.macs[0]):.3f})")
        lines.append(f"  parameters      {self.params[0]:,} -> {self.params[1]:,} "
                     f"({self.params[1] / max(1, self.params[0]):.3f})")
        if self.warning:
            lines.append(f"  warning: {self.warning}")
        cut = [(g, a, b) for g, (a, b) in self.groups.items() if b < a]
        lines.append(f"  {len(cut)} of {len(self.groups)} groups cut:")
        for g, a, b in cut[:max_rows]:
            lines.append(f"    {g:<44} {a:>6} -> {b:<6}")
        if len(cut) > max_rows:
            lines.append(f"    ... {len(cut) - max_rows} more")
        return "\n".join(lines)

    __str__ = summary


def measure_models(models: list[nn.Module], example_inputs: Any, *, threads: int = 2,
                   providers: tuple[str, ...] = ("CPUExecutionProvider",), rounds: int = 20,
                   per_round: int = 3, exporter: str = "legacy") -> list[dict[str, float]]:
    """Latency of each model on every clock (``measure.CLOCKS``), exported and timed
    interleaved.

    Example:
        >>> dense, pruned = measure_models([model, r.model], x, threads=2)
        >>> pruned["median"] / dense["median"]
    """
    from ..export import export_onnx

    with tempfile.TemporaryDirectory(prefix="gp-latency-") as d:
        paths = []
        for i, m in enumerate(models):
            p = os.path.join(d, f"m{i}.onnx")
            try:
                paths.append(export_onnx(m, example_inputs, p, exporter=exporter, check=False).path)
            except Exception:  # the legacy exporter fails on some models: the default chain
                paths.append(export_onnx(m, example_inputs, p, exporter="auto", check=False).path)
        ts = time_variants(paths, example_inputs, threads=threads, providers=providers,
                           rounds=rounds, per_round=per_round)
    return [{c: t.ms(c) for c in CLOCKS} for t in ts]


def latency_report(graph: Any, amounts: Mapping[str, int], table: LatencyTable, *,
                   target: float | None = None, measure: bool = True, model: nn.Module | None = None,
                   example_inputs: Any = None, rounds: int = 20) -> LatencyReport:
    """Report on ``graph``'s model pruned to ``amounts`` (group -> channels kept): predicted
    latency from ``table``; with ``measure``, the pruned model (``model``, or one with those
    channel counts) and the dense one timed together on ``example_inputs`` (default: the inputs
    the graph was traced with).

    Example:
        >>> rep = latency_report(g, amounts, table, target=0.5, example_inputs=x)
        >>> print(rep)
    """
    from ..budget import plan_cost

    widths = {n: int(k) for n, k in amounts.items()}
    m = dict(table.key.get("machine", {}))
    measured = dense_measured = None
    if measure:
        from .measure import variant_model

        x = example_inputs if example_inputs is not None else tuple(graph.traced[0].inputs[0])
        pruned = model if model is not None else variant_model(graph, widths)
        res = measure_models([graph.model, pruned], x,
                             threads=int(m.get("threads", 2)),
                             providers=tuple(m.get("providers", ("CPUExecutionProvider",))),
                             rounds=rounds, exporter=str(table.key["model"].get("exporter", "legacy")))
        dense_measured, measured = res[0][table.clock], res[1][table.clock]
    from .allocate import speed_warning

    macs0, params0 = plan_cost(graph, {})
    macs1, params1 = plan_cost(graph, widths)
    groups = {g.name: (g.size, min(g.size, widths.get(g.name, g.size))) for g in graph.prunable_groups}
    return LatencyReport(target=target, predicted_ms=table.predict_ms(widths), dense_ms=table.dense_ms,
                         groups=groups, macs=(macs0, macs1), params=(params0, params1),
                         clock=table.clock, measured_ms=measured, dense_measured_ms=dense_measured,
                         warning=speed_warning(table, widths),
                         conditions={**m, "rounds": rounds})


def meet_latency(graph: Any, scores: Mapping[str, Any], target: float, table: LatencyTable, *,
                 example_inputs: Any = None, tolerance: float = 0.05, max_rounds: int = 2,
                 rounds: int = 20, **options: Any) -> tuple[dict[str, int], LatencyReport]:
    """``latency_amounts`` closed by measurement: allocate, time the pruned model against the
    dense one, and while the measured ratio misses ``target`` by more than ``tolerance``
    (relative), allocate again for the target scaled by predicted / measured, then on the secant
    through the last two (predicted, measured) pairs (at most ``max_rounds`` times). Returns the
    amounts and the report of the measured model closest to the target.

    Example:
        >>> amounts, rep = meet_latency(g, scores, 0.5, table, example_inputs=x)
        >>> rep.measured_ratio      # within 5% of 0.5, or the closest of the tries
    """
    from .allocate import latency_amounts

    aim, best, prev = float(target), None, None
    for _ in range(max_rounds + 1):
        amounts = latency_amounts(graph, scores, min(1.0, aim), table, **options)
        rep = latency_report(graph, amounts, table, target=target, example_inputs=example_inputs,
                             rounds=rounds)
        err = rep.measured_ratio / target - 1
        if best is None or abs(err) < abs(best[2]):
            best = (amounts, rep, err)
        if abs(err) <= tolerance:
            break
        p2, m2 = rep.predicted_ratio, rep.measured_ratio
        if prev is not None and abs(m2 - prev[1]) > 1e-3:  # secant through the last two
            p1, m1 = prev  # measurements: the table's error need not be a ratio
            aim = p2 + (target - m2) * (p2 - p1) / (m2 - m1)
        else:
            aim *= p2 / m2
        prev = (p2, m2)
        aim = min(1.0, max(aim, 0.02))
    return best[0], best[1]
