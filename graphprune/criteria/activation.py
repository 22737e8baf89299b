"""Scores from the activations the consumers see: Wanda-sp (Sun et al. 2023, structured as in An
et al. 2024) and FLAP's fluctuation metric (An et al., AAAI 2024).

Both read, for every consumer of a group (members with role 'in': the Linear columns / conv
input channels that read the group's channels), the statistics of that input channel over the
calibration data, and weigh them by the consumer's weight column:

- ``wanda``: ``sum_o |W[o, c]| * ||X_c||_2`` (the input-channel norm over every token, or every
  image position of a conv);
- ``flap``: ``Var(X_c) * sum_o W[o, c]^2`` (the input's fluctuation around its mean over the
  calibration samples, weighted by the column's squared norm).

A unit's score sums over its entries (a head: every column of the output projection it owns;
an MLP channel: its ``down_proj`` column; a conv channel: every conv reading it). Removing a
channel with a steady input loses little once its mean is put back: FLAP's *bias compensation*
adds ``W[:, removed] @ mean(X[removed])`` to the consumer's bias (``mean_contribution``); the
decoder runner (``graphprune.lm.blockwise``) applies it, and graphprune's least-squares
reconstruction subsumes it (its intercept is the best constant, not only the mean).

The statistics are ``ChannelStats`` per consumer module path, kept in ``ctx.cache[STATS_KEY]``:
a runner that has them already (the block-by-block decoder runner, on the pruned-so-far model)
puts them there; otherwise one pass of the model over ``ctx.calibration`` collects them for
every consumer of every prunable group. Consumers that are not ``nn.Linear`` /
``nn.Conv1d/2d/3d`` modules (or Hugging Face's ``Conv1D``) called as modules are not seen; a
group with no seen consumer is scored by ``l1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..graph import Group, GroupMember
from .registry import ScoreContext, criterion

STATS_KEY = "activation_stats"
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class ChannelStats:
    """Sums over the calibration positions of one layer input: ``n`` positions, per input channel
    ``total`` (sum of x) and ``sumsq`` (sum of x^2), float64."""

    n: int
    total: np.ndarray
    sumsq: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.n, 1)

    @property
    def norm(self) -> np.ndarray:
        """||X_c||_2 over the positions."""
        return np.sqrt(np.clip(self.sumsq, 0, None))

    @property
    def var(self) -> np.ndarray:
        """Unbiased sample variance of each channel (its *fluctuation*)."""
        n = max(self.n, 2)
        return np.clip((self.sumsq - self.total * self.mean) / (n - 1), 0, None)

    @classmethod
    def of(cls, x: torch.Tensor, channel_dim: int) -> ChannelStats:
        """The sums of one batch ``x`` whose channels lie along ``channel_dim``."""
        x = x.detach().movedim(channel_dim, -1)
        x = x.reshape(-1, x.shape[-1]).double()
        return cls(int(x.shape[0]), x.sum(0).cpu().numpy(), (x * x).sum(0).cpu().numpy())

    def __add__(self, other: ChannelStats) -> ChannelStats:
        return ChannelStats(self.n + other.n, self.total + other.total, self.sumsq + other.sumsq)


def seen(m: nn.Module | None) -> bool:
    """Layers whose input statistics are collected (called as modules)."""
    return isinstance(m, (nn.Linear, *_CONV)) or type(m).__name__ == "Conv1D"


def _channel_dim(m: nn.Module) -> int:
    return 1 if isinstance(m, _CONV) else -1


def column_values(m: nn.Module, w: torch.Tensor, p: int) -> np.ndarray:
    """Per input channel of layer ``m`` (weight ``w``): sum over the outputs (and kernel) that
    read it of ``|w|`` (p=1) or ``w^2`` (p=2). A grouped conv's channel is read only by the
    outputs of its own conv group."""
    w = w.detach().double()
    v = w.abs() if p == 1 else w * w
    if type(m).__name__ == "Conv1D":  # Hugging Face's transposed Linear: (in, out)
        return v.sum(1).cpu().numpy()
    if isinstance(m, nn.Linear):
        return v.sum(0).cpu().numpy()
    groups = m.groups
    out, ipg = v.shape[0], v.shape[1]
    per = v.reshape(groups, out // groups, ipg, -1).sum((1, 3))  # (groups, ipg)
    return per.reshape(-1).cpu().numpy()  # channel c = group * ipg + local index


def _consumers(group: Group, ctx: ScoreContext) -> list[tuple[GroupMember, nn.Module]]:
    mods = ctx.graph.modules if ctx.graph is not None else {}
    out = []
    for m in group.members:
        mod = mods.get(m.module)
        if m.role == "in" and seen(mod) and m.param == f"{m.module}.weight":
            out.append((m, mod))
    return out


def consumer_paths(groups: list[Group], ctx: ScoreContext) -> list[str]:
    """Module paths of every seen consumer of ``groups``."""
    return sorted({m.module for g in groups for m, _ in _consumers(g, ctx)})


def collect_stats(model: nn.Module, calibration, paths: list[str]) -> dict[str, ChannelStats]:
    """One pass of ``model`` over the calibration batches, summing each layer's input at
    ``paths`` per channel (a layer called twice contributes both calls). The model's mode is
    restored; it is not otherwise changed."""
    from ..datadriven.collect import batch_inputs
    from ..datadriven.sequential import model_device

    mods = dict(model.named_modules(remove_duplicate=False))
    got: dict[str, ChannelStats] = {}

    def hook(m, inp, path):
        s = ChannelStats.of(inp[0], _channel_dim(m))
        got[path] = got[path] + s if path in got else s

    handles = [mods[p].register_forward_pre_hook(lambda m, i, p=p: hook(m, i, p)) for p in paths]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for xs, _ in calibration:
                model(*batch_inputs(xs, model_device(model)))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return got


def channel_stats(group: Group, ctx: ScoreContext) -> dict[str, ChannelStats]:
    """The input statistics of the group's consumers: from ``ctx.cache`` if a runner put them
    there, else collected (once, for every prunable group's consumers) on ``ctx.calibration``."""
    cache = ctx.cache.setdefault(STATS_KEY, {})
    want = {m.module for m, _ in _consumers(group, ctx)}
    if want - cache.keys() and ctx.calibration is not None and ctx.graph is not None:
        paths = [p for p in consumer_paths(ctx.graph.prunable_groups, ctx) if p not in cache]
        cache.update(collect_stats(ctx.graph.model, ctx.calibration, sorted(set(paths) | want)))
    return cache


def entry_scores(group: Group, ctx: ScoreContext, kind: str) -> tuple[np.ndarray, bool]:
    """Per unit: the sum over the group's seen consumer entries of ``kind`` ('wanda' or 'flap');
    and whether any consumer was seen."""
    stats = channel_stats(group, ctx)
    total = np.zeros(group.size)
    found = False
    for m, mod in _consumers(group, ctx):
        s = stats.get(m.module)
        if s is None:
            continue
        col = column_values(mod, ctx.params[m.param], 1 if kind == "wanda" else 2)
        act = s.norm if kind == "wanda" else s.var
        pos = m.pos if m.pos is not None else m.index
        total += np.bincount(m.unit, weights=col[pos] * act[pos], minlength=group.size)
        found = True
    return total, found


def _or_l1(group: Group, ctx: ScoreContext, kind: str) -> np.ndarray:
    s, found = entry_scores(group, ctx, kind)
    if found:
        return s
    from .magnitude import l1

    return l1(group, ctx)


@criterion("wanda", needs_data=True)
def wanda(group: Group, ctx: ScoreContext) -> np.ndarray:
    """Wanda-sp (Sun et al. 2023; structured as An et al. 2024): |W| times the input-channel norm
    ||X||_2 of each consumer column, summed over the unit's columns."""
    return _or_l1(group, ctx, "wanda")


@criterion("flap", needs_data=True)
def flap(group: Group, ctx: ScoreContext) -> np.ndarray:
    """FLAP (An et al., AAAI 2024): the fluctuation (variance over the calibration samples) of
    each consumer input channel times the squared norm of its weight column, summed over the
    unit; the removed channels' mean contribution goes into the consumer's bias."""
    return _or_l1(group, ctx, "flap")


def mean_contribution(m: nn.Module, w: torch.Tensor, stats: ChannelStats,
                      removed: np.ndarray) -> torch.Tensor:
    """FLAP's bias compensation for layer ``m`` (a Linear, or Conv1D) whose input channels
    ``removed`` go: ``W[:, removed] @ mean(X[removed])``, shape (out,), in ``w``'s dtype."""
    idx = torch.as_tensor(np.asarray(removed, dtype=np.int64), device=w.device)
    mu = torch.as_tensor(stats.mean, dtype=torch.float64, device=w.device)[idx]
    cols = (w.t() if type(m).__name__ == "Conv1D" else w).detach().double()[:, idx]
    return (cols @ mu).to(w.dtype)
