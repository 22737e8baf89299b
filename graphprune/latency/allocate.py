"""Latency stage, allocating: how many channels each group keeps under a latency budget, and the
channel rounding that keeps a pruned model fast.

``latency_amounts`` maximises the importance kept (any criterion's scores, each group's divided
by its mean so groups compare) under the predicted latency budget, greedily as in HALP (Shen et
al. 2022): from the dense widths it repeatedly takes the cut that loses least importance per
millisecond saved, looking up to ``lookahead`` steps down each group's curve (one step may save
little, the next a lot), then gives channels back where they still fit in the budget. Widths are
multiples of ``round_to`` (by default the rounding the table measured fast), and only the widest
at each size the kernels pad to: the widths where latency steps (inside an NCHWc block a cut
saves nothing and loses importance).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._validate import check_int
from ..errors import ConfigError
from .table import LatencyTable, LatencyTableError, aligned_widths


def recommend_round_to(ratios: Sequence[float], roundings: Sequence[int], default: int,
                       tolerance: float = 0.02) -> int:
    """The channel rounding for pruning by default, from measured uniform prunings (latency /
    dense ``ratios[i]`` at rounding ``roundings[i]``): among the roundings whose every pruned
    variant ran faster than dense, the smallest whose mean ratio is within ``tolerance`` of the
    best one; if none is always faster, the one with the smallest worst ratio.

    Example:
        >>> recommend_round_to([1.3, 0.9, 0.8, 0.7], [1, 1, 16, 16], default=16)
        16
    """
    by_r: dict[int, list[float]] = {}
    for q, r in zip(ratios, roundings):
        by_r.setdefault(int(r), []).append(float(q))
    if not by_r:
        return int(default)
    safe = {r: float(np.mean(q)) for r, q in by_r.items() if max(q) < 1.0}
    if not safe:
        return min(by_r, key=lambda r: (max(by_r[r]), r))
    best = min(safe.values())
    return min(r for r, m in safe.items() if m <= best * (1 + tolerance))


@functools.lru_cache(maxsize=8)
def _block(threads: int, providers: tuple[str, ...]) -> int:
    from .measure import detect_block

    return detect_block(threads=threads, providers=providers)


def default_round_to(table: LatencyTable | None = None, *, threads: int = 2,
                     providers: Sequence[str] = ("CPUExecutionProvider",)) -> int:
    """The channel rounding to prune with when the caller gives none: the table's measured
    choice; without a table, the channel block onnxruntime's convolutions pad to on this machine
    (16 with AVX-512, 8 with AVX2; probed once per process in a few milliseconds), so that no
    layer falls off the fast blocked kernels.

    Example:
        >>> graphprune.prune(model, x, sparsity=0.3, round_to=default_round_to())
    """
    if table is not None:
        return int(table.round_to)
    return max(1, _block(int(threads), tuple(providers)))


def speed_warning(table: LatencyTable, widths: Mapping[str, int]) -> str | None:
    """A sentence if these channel counts are likely to make the model slower than dense, with
    the ratio measured on this machine; ``None`` if not.

    Example:
        >>> speed_warning(table, {"features.1.conv.1": 13})
        "channel counts that are not multiples of 16 ... ran 1.30x the dense latency ..."
    """
    ratio = table.predict_ratio(widths)
    cut = {g: int(w) for g, w in widths.items() if g in table.sizes and int(w) < table.sizes[g]}
    if not cut:
        return None
    if not table.aligned(cut):
        worst = None
        for r, pts in table.uniform_ratios().items():
            if all(w % r == 0 for w in cut.values()) or r == 1:
                for s, q in pts:
                    if q >= 1.0 and (worst is None or q > worst[2]):
                        worst = (r, s, q)
        off = sum(1 for w in cut.values() if w % table.round_to)
        if worst is not None:
            return (f"{off} group(s) keep channel counts that are not multiples of "
                    f"{table.round_to}; on this machine uniform pruning at sparsity {worst[1]:g} "
                    f"with round_to={worst[0]} ran {worst[2]:.2f}x the dense latency in "
                    f"onnxruntime. Round channel counts to multiples of {table.round_to}.")
    if ratio >= 1.0:
        return (f"the pruned model is predicted to run {ratio:.2f}x the dense latency in "
                f"onnxruntime on this machine: the channels removed do not cross latency steps.")
    return None


def _importance(scores: Any, size: int, name: str) -> np.ndarray:
    """Prefix sums of the group's normalised scores, highest first: ``c[w]`` = kept with ``w``."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size != size:
        raise ConfigError(f"The scores of group '{name}' must hold {size} values (one per channel "
                          f"unit). Got {s.size} instead.")
    if not np.isfinite(s).all():
        raise ConfigError(f"The scores of group '{name}' hold non-finite values.")
    mean = np.abs(s).mean()
    s = s / mean if mean > 0 else np.ones_like(s)
    return np.concatenate([[0.0], np.cumsum(np.sort(s)[::-1])])


def latency_amounts(graph: Any, scores: Mapping[str, Any], target_latency: float,
                    table: LatencyTable, *, round_to: int | str = "auto",
                    allowed: Mapping[str, bool] | None = None, max_group_sparsity: float = 0.8,
                    lookahead: int = 4) -> dict[str, int]:
    """Channels kept per prunable group so that the predicted latency is at most
    ``target_latency`` times the dense model's, keeping as much importance as possible.

    Args:
        graph: the model's ``ChannelGraph``.
        scores: group name -> one score per channel unit (higher = keep), from any criterion.
        target_latency: fraction of the dense latency to keep, in (0, 1].
        table: the model's ``LatencyTable`` on the deployment machine.
        round_to: 'auto' (the table's measured rounding) or an int.
        allowed: group name -> may be pruned (default: every group the table and scores cover).
        max_group_sparsity: no group loses more than this fraction of its channels.
        lookahead: how many steps down a group's curve each greedy move may take.

    Returns:
        group name -> channels kept, for every prunable group (as ``compute_amounts``).

    Example:
        >>> amounts = latency_amounts(g, scores, 0.5, table)
        >>> plan = graphprune.plan.plan_from_scores(g, scores, amounts, {"target_latency": 0.5})

    Raises:
        ConfigError: the target is out of range or cannot be reached.
        LatencyTableError: the table was measured on another model.
    """
    if isinstance(target_latency, bool) or not isinstance(target_latency, (int, float)) or \
            not 0.0 < float(target_latency) <= 1.0:
        raise ConfigError(f"The 'target_latency' parameter of latency_amounts must be a float in "
                          f"(0, 1]. Got {target_latency!r} instead.")
    if not 0.0 <= max_group_sparsity < 1.0:
        raise ConfigError(f"The 'max_group_sparsity' parameter of latency_amounts must be a float "
                          f"in [0, 1). Got {max_group_sparsity!r} instead.")
    step = table.round_to if round_to == "auto" else check_int(round_to, "round_to",
                                                               "latency_amounts", low=1)
    check_int(lookahead, "lookahead", "latency_amounts", low=1)
    names = []
    for g in graph.prunable_groups:
        if g.name not in table.sizes:
            continue
        if table.sizes[g.name] != g.size:
            raise LatencyTableError(
                f"the latency table has {table.sizes[g.name]} channels for group '{g.name}' but "
                f"the model has {g.size}: the table was measured on another model or width.")
        if g.name in scores and (allowed is None or allowed.get(g.name, False)):
            names.append(g.name)
    missing = [g.name for g in graph.prunable_groups if g.name not in table.sizes]
    if missing and len(missing) == len(graph.prunable_groups):
        raise LatencyTableError("the latency table names none of the model's groups: it was "
                                f"measured on another model (e.g. no '{missing[0]}').")
    sizes = {n: graph.group(n).size for n in names}
    choices = {n: steps(aligned_widths(s, step, max(1, math.ceil((1 - max_group_sparsity) * s))),
                        table.block) for n, s in sizes.items()}
    imp = {n: _importance(scores[n], sizes[n], n) for n in names}
    alloc = _Greedy(table, choices, imp)
    alloc.cut(target_latency, lookahead)
    alloc.refill(lookahead)
    out = {g.name: g.size for g in graph.prunable_groups if g.name in scores
           and (allowed is None or allowed.get(g.name, False))}
    out.update(alloc.widths_of(names))
    return out


def steps(widths: Sequence[int], block: int) -> list[int]:
    """Of ``widths``, the largest one at each padded size: the only ones worth keeping, since
    within a block the kernels cost the same and more channels keep more importance."""
    top: dict[int, int] = {}
    for w in widths:
        p = -(-w // block) * block
        top[p] = max(top.get(p, 0), w)
    return sorted(top.values())


class _Greedy:
    """Widths as positions in each group's list of allowed widths; the predictor's per-group
    kernel times cached for the current widths."""

    def __init__(self, table: LatencyTable, choices: Mapping[str, list[int]],
                 imp: Mapping[str, np.ndarray]):
        self.t, self.p = table, table.predictor
        self.choices, self.imp = choices, imp
        self.widths = dict(table.sizes)
        self.pos = {n: len(c) - 1 for n, c in choices.items()}
        self.cur = {n: self.p.group_ms(n, self.widths) for n in choices}
        self.total = self.p.total(self.widths)

    def widths_of(self, names: Sequence[str]) -> dict[str, int]:
        return {n: self.widths[n] for n in names}

    def _move(self, n: str, k: int) -> tuple[float, float]:
        """(kernel ms change, importance change) of moving group ``n`` to position ``k``."""
        w = self.choices[n][k]
        d_ms = self.p.group_ms(n, {**self.widths, n: w}) - self.cur[n]
        d_imp = self.imp[n][w] - self.imp[n][self.widths[n]]
        return d_ms, d_imp

    def _apply(self, n: str, k: int, d_ms: float) -> None:
        self.pos[n] = k
        self.widths[n] = self.choices[n][k]
        self.total += d_ms
        touched = {g for i in self.p.by_group.get(n, ()) for g in self.p.kernels[i].groups}
        for g in touched & set(self.cur):
            self.cur[g] = self.p.group_ms(g, self.widths)

    def _budget(self, target: float) -> float:
        return self.t.kernel_budget(target)

    def cut(self, target: float, lookahead: int) -> None:
        budget = self.budget = self._budget(target)
        while self.total > budget + 1e-12:
            best = None
            for n, k0 in self.pos.items():
                for k in range(k0 - 1, max(-1, k0 - 1 - lookahead), -1):
                    d_ms, d_imp = self._move(n, k)
                    if d_ms < -1e-12:
                        cost = -d_imp / -d_ms
                        if best is None or cost < best[0]:
                            best = (cost, n, k, d_ms)
            if best is None:
                reach = self.t.ratio_of(self.total)
                raise ConfigError(
                    f"target_latency={target:g} cannot be reached: with every prunable group cut "
                    f"as far as allowed the predicted latency is {reach:.3f} of the dense model's. "
                    "Raise the target or max_group_sparsity.")
            self._apply(best[1], best[2], best[3])

    def refill(self, lookahead: int) -> None:
        """Give back channels (most importance per ms first) while the budget allows."""
        budget = self.budget
        while True:
            best = None
            for n, k0 in self.pos.items():
                for k in range(k0 + 1, min(len(self.choices[n]), k0 + 1 + lookahead)):
                    d_ms, d_imp = self._move(n, k)
                    if self.total + d_ms <= budget + 1e-12 and d_imp > 0:
                        gain = d_imp / max(d_ms, 1e-9)
                        if best is None or gain > best[0]:
                            best = (gain, n, k, d_ms)
            if best is None:
                return
            self._apply(best[1], best[2], best[3])


def kept_importance(scores: Mapping[str, Any], amounts: Mapping[str, int]) -> float:
    """Fraction of the total normalised importance kept (each group's scores divided by their
    mean, the top ``amounts[g]`` kept), over the groups of ``scores``."""
    kept = total = 0.0
    for n, s in scores.items():
        c = _importance(s, len(np.asarray(s).reshape(-1)), n)
        kept += c[min(int(amounts.get(n, len(c) - 1)), len(c) - 1)]
        total += c[-1]
    return kept / total if total else 1.0
