"""Latency-aware pruning for onnxruntime CPU deployment: the speed-up users measure, not the MACs
they count.

    table = LatencyTable.build(model, x, threads=2, cache="out/latency")   # measured, cached
    amounts = latency_amounts(graph, scores, 0.5, table)     # channels per group, half the latency
    plan = graphprune.plan.plan_from_scores(graph, scores, amounts, {"target_latency": 0.5})
    print(latency_report(graph, amounts, table, target=0.5))  # predicted vs measured, MACs, params

``measure`` exports width variants and times them interleaved (kernel profile + wall clock);
``model`` ties every onnxruntime kernel to the groups that set its shapes and fits its time;
``table`` is the cached, versioned value; ``build`` designs and runs the measurement;
``allocate`` spends the latency budget (and picks the channel rounding that stays fast);
``report`` times a pruned model against the dense one; ``target`` is what ``prune`` does with
``target_latency``, ``latency_table`` and ``round_to='auto'``.
"""

from .allocate import (
    default_round_to, kept_importance, latency_amounts, recommend_round_to, speed_warning,
)
from .build import build_table
from .measure import detect_block, machine_key, time_variants
from .report import LatencyReport, latency_report, measure_models, meet_latency
from .table import LatencyTable, LatencyTableError
from .target import default_cache

__all__ = ["LatencyReport", "LatencyTable", "LatencyTableError", "build_table", "default_cache",
           "default_round_to", "detect_block", "kept_importance", "latency_amounts", "latency_report",
           "machine_key", "measure_models", "meet_latency", "recommend_round_to", "speed_warning",
           "time_variants"]
