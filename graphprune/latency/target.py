"""Latency stage, inside ``prune``: which latency table a run uses, what ``round_to='auto'``
means, and the channel counts under ``target_latency``.

A run uses a table when it has a latency target or names a table (``latency_table``): read from
the file or folder when one was measured there for this model shape and machine, measured (a few
minutes) and stored there otherwise; the default folder is ``~/.cache/graphprune/latency``. A run
with neither never measures: ``round_to='auto'`` is then the channel block onnxruntime's
convolutions pad to on this CPU, probed in milliseconds.

Under a target, the channels per group come from ``latency_amounts`` (greedy on importance per
millisecond, snapped to the widths where latency steps) and, unless ``latency_rounds`` is 0,
the pruned widths are timed against the dense model in one interleaved run and allocated again
when the measurement misses the target by more than 5% (``meet_latency``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConfigError
from .allocate import default_round_to, latency_amounts
from .build import build_table
from .report import LatencyReport, latency_report, meet_latency
from .table import LatencyTable


def default_cache() -> str:
    """Where tables go when the run names no ``latency_table``: ``$XDG_CACHE_HOME/graphprune/
    latency`` (``~/.cache/graphprune/latency``).

    Example:
        >>> LatencyTable.load(os.path.join(default_cache(), "latency-MobileNetV2-....json"))
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "graphprune", "latency")


def table_for_run(graph: Any, example_inputs: Any, cfg: Any, table: Any = None,
                  progress: Callable[[str, int, int], None] | None = None) -> LatencyTable | None:
    """The latency table of a run with settings ``cfg`` (a ``PruneConfig``): ``table`` if given,
    else read or measured when ``cfg`` has a latency target or a ``latency_table`` path, else
    None (nothing is measured).

    Example:
        >>> t = table_for_run(g, x, PruneConfig(target_latency=0.5, latency_table="out/lat"))

    Raises:
        ConfigError: ``table`` is not a ``LatencyTable``.
        LatencyTableError: a ``.json`` file given holds another model's or machine's table.
    """
    if table is not None:
        if not isinstance(table, LatencyTable):
            raise ConfigError(f"The 'latency_table' parameter of prune must be a LatencyTable or a "
                              f"path. Got {type(table).__name__} instead.", param="latency_table")
        return table
    if cfg.target_latency is None and cfg.latency_table is None:
        return None
    stage = None if progress is None else (
        lambda what, i, n: progress(f"latency table: {what}", i, n))
    return cached_table(graph.model, example_inputs, graph, path=cfg.latency_table,
                        threads=cfg.latency_threads, progress=stage)


def cached_table(model: Any, example_inputs: Any, graph: Any = None, *, path: str | None = None,
                 threads: int = 2, progress: Any = None) -> LatencyTable:
    """The model's table read from ``path`` (a ``.json`` file must hold this model's; a folder,
    default ``default_cache()``, is keyed by model and machine), or measured and stored there."""
    path = path or default_cache()
    return build_table(model, example_inputs, graph, threads=threads, cache=path,
                       stale="raise" if path.endswith(".json") else "measure", progress=progress)


def run_round_to(cfg: Any, table: LatencyTable | None) -> int:
    """``cfg.round_to`` as an int: 'auto' is the rounding the table measured fast, or without a
    table the channel block onnxruntime pads convolutions to on this CPU.

    Example:
        >>> run_round_to(PruneConfig(round_to="auto"), None)   # 16 with AVX-512, 8 with AVX2
    """
    if cfg.round_to != "auto":
        return int(cfg.round_to)
    return default_round_to(table, threads=cfg.latency_threads)


def target_amounts(graph: Any, scores: Mapping[str, Any], cfg: Any, table: LatencyTable,
                   allowed: Mapping[str, bool], round_to: int,
                   example_inputs: Any = None) -> tuple[dict[str, int], LatencyReport]:
    """Channels kept per group for ``cfg.target_latency`` (most importance by ``scores`` kept),
    and the latency report: predicted, and measured against the dense model unless
    ``cfg.latency_rounds`` is 0.

    Raises:
        ConfigError: the target cannot be reached within ``cfg.max_group_sparsity``.
        LatencyTableError: the table was measured on another model.
    """
    target = float(cfg.target_latency)
    options = {"round_to": round_to, "allowed": allowed,
               "max_group_sparsity": cfg.max_group_sparsity}
    if cfg.latency_rounds:
        return meet_latency(graph, scores, target, table, example_inputs=example_inputs,
                            rounds=cfg.latency_rounds, **options)
    amounts = latency_amounts(graph, scores, target, table, **options)
    return amounts, latency_report(graph, amounts, table, target=target, measure=False)


def run_report(graph: Any, amounts: Mapping[str, int], table: LatencyTable) -> LatencyReport:
    """The predicted latency of a run without a target (no timing), with the table's warning when
    the channel counts are likely to run slower than dense."""
    return latency_report(graph, amounts, table, measure=False)


def meta_of(rep: LatencyReport) -> dict[str, Any]:
    """What a plan's meta records of the latency (JSON values)."""
    out: dict[str, Any] = {"latency_predicted": round(rep.predicted_ratio, 4),
                           "latency_dense_ms": round(rep.dense_ms, 4), "latency_clock": rep.clock}
    if rep.measured_ratio is not None:
        out["latency_measured"] = round(rep.measured_ratio, 4)
    if rep.warning:
        out["latency_warning"] = rep.warning
    return out
