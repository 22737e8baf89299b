"""Mask pruners that plug into your training loop: level (magnitude), AGP (gradual), lottery
ticket (prune and rewind), and staged sparsities (Deep Compression).

One API for all::

    pruner = AGPPruner(model, [{"sparsity": 0.9, "op_types": ["default"]}], end_step=1000)
    pruner.compress()                       # install the masks
    for x, y in loader:
        loss(model(x), y).backward(); opt.step()
        pruner.step()                       # after every optimizer step: schedule + re-mask
    pruner.export_masks("masks.safetensors")
    small = pruner.finalize()               # remove the machinery; shrink filter/channel pruning

Masked weights stay exactly zero through any optimizer: their gradients are masked (a hook) and
the weights are masked again after every step. With ``granularity='filter'`` or ``'channel'`` the
masks cover whole coupled channel units of the dependency graph (a conv's filters, its BatchNorm,
its consumers' input channels), so ``finalize()`` returns the physically smaller model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..sparsity import magnitude_mask
from .targets import Target, resolve


class MaskPruner:
    """Base class: masks per parameter, applied after every step; subclasses set the schedule
    (``target_sparsity``) and override ``compute_masks`` to change the criterion. Used as is, it
    prunes once to each entry's sparsity by magnitude (``criterion`` scores the channel units of
    filter/channel granularity).

    Example:
        >>> pruner = MaskPruner(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}])
        >>> pruner.compress()                   # half of every conv's weights set to zero
        >>> pruner.sparsity()
        {'0.weight': 0.5}

    Raises:
        ConfigError: a bad config list (not a list of dicts, an unknown key, an entry that selects
            no layer, a sparsity outside [0, 1) or a decreasing schedule, an unknown
            granularity), or filter/channel granularity without ``example_inputs``.
        RegistryError: an unknown ``criterion`` (filter/channel granularity).
        TraceError: filter/channel granularity on a model that cannot be traced.
    """

    def __init__(self, model: nn.Module, config_list: Sequence[Mapping[str, Any]], *,
                 granularity: str = "element", criterion: str = "l1",
                 example_inputs: Any = None, seed: int = 0):
        self.model = model
        self.targets: list[Target] = resolve(model, config_list, granularity=granularity,
                                             owner=type(self).__name__)
        self.criterion = criterion
        self.seed = seed
        self.stage = 0
        self.masks: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._params = dict(model.named_parameters())
        self._params.update(dict(model.named_buffers()))
        self.graph = None
        if any(t.granularity in ("filter", "channel") for t in self.targets):
            if example_inputs is None:
                raise ConfigError(f"{type(self).__name__}: filter/channel granularity removes "
                                  "coupled channels through the dependency graph; pass "
                                  "example_inputs=... .")
            from ..criteria import get_criterion
            from ..capture import trace

            get_criterion(criterion)
            self.graph = trace(model, example_inputs)

    # ------------------------------------------------------------------ schedule
    def target_sparsity(self, t: Target) -> float:
        """The sparsity ``t`` should have now (default: the current stage's)."""
        return t.sparsity[min(self.stage, len(t.sparsity) - 1)]

    # ------------------------------------------------------------------ masks
    def compute_masks(self) -> dict[str, torch.Tensor]:
        masks: dict[str, torch.Tensor] = {}
        structured = [t for t in self.targets if t.granularity in ("filter", "channel")]
        for t in self.targets:
            if t.granularity in ("element", "kernel"):
                masks[t.param] = _unstructured(self._params[t.param].detach(),
                                               self.target_sparsity(t), t.granularity)
        if structured:
            masks.update(self._structured_masks(structured))
        return masks

    def _structured_masks(self, targets: list[Target]) -> dict[str, torch.Tensor]:
        from ..apply.shrink import comp_keep_from_plan, kept_indices, masks_from_kept
        from .structured import group_plan

        plan = group_plan(self.graph, {t.module: self.target_sparsity(t) for t in targets},
                          self.criterion, self.seed)
        self._plan = plan
        kept = kept_indices(self.graph, comp_keep_from_plan(self.graph, plan))
        return masks_from_kept(self.graph, kept)

    def apply_masks(self) -> None:
        with torch.no_grad():
            for name, m in self.masks.items():
                p = self._params[name]
                p.mul_(m.to(p.dtype))

    def _install_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for name, m in self.masks.items():
            p = self._params[name]
            if isinstance(p, nn.Parameter) and p.requires_grad:
                self._hooks.append(p.register_hook(lambda g, m=m: g * m.to(g.dtype)))

    def update_masks(self) -> None:
        """Recompute the masks from the current weights and apply them."""
        self.masks = self.compute_masks()
        self._install_hooks()
        self.apply_masks()

    # ------------------------------------------------------------------ public API
    def compress(self) -> nn.Module:
        """Install the masks (at the current stage's sparsity)."""
        self.update_masks()
        return self.model

    def step(self) -> None:
        """Call after every optimizer step: advances the schedule and re-applies the masks."""
        self.apply_masks()

    def update_epoch(self, epoch: int) -> None:
        """Call at the start of every epoch (schedules driven by epochs use it)."""

    def sparsity(self) -> dict[str, float]:
        """Fraction of exactly-zero entries of every compressed weight now."""
        return {t.param: float((self._params[t.param] == 0).float().mean()) for t in self.targets}

    def export_masks(self, path: str | os.PathLike) -> None:
        """Save the masks (safetensors, names of the model's state_dict)."""
        from ..export.masks import save_masks

        save_masks(self.masks, path)

    def finalize(self) -> nn.Module:
        """Remove the masking machinery, leaving the masked weights at zero. With filter/channel
        granularity returns the physically smaller model (a new module); else the model."""
        self.apply_masks()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.graph is None or not getattr(self, "_plan", None):
            return self.model
        from ..apply import apply_plan

        return apply_plan(self.graph, self._plan).model


def _unstructured(w: torch.Tensor, sparsity: float, granularity: str) -> torch.Tensor:
    """Magnitude mask: remove exactly ``n_pruned(n, sparsity)`` weights (or kernels) of least |w|
    (``graphprune.sparsity``; at least one kept, ties: the lower index stays)."""
    if granularity == "kernel" and w.ndim > 2:
        scores = w.abs().flatten(2).sum(-1)  # (out, in): L1 of each kernel
    else:
        scores = w.abs()
    keep = magnitude_mask(scores, sparsity)
    if keep.shape != w.shape:
        keep = keep.view(*keep.shape, *([1] * (w.ndim - keep.ndim))).expand_as(w).clone()
    return keep


class LevelPruner(MaskPruner):
    """Magnitude pruning to each layer's sparsity (NNI's level pruner). A list of sparsities in a
    config entry is a staged schedule (Deep Compression's prune / retrain stages): ``next_stage()``
    or ``update_epoch`` with ``stage_epochs`` moves on. ``StagedPruner`` is the same class.

    Example:
        >>> pruner = LevelPruner(model, [{"sparsity": [0.5, 0.8, 0.9], "op_types": ["Conv2d"]}],
        ...                      stage_epochs=[0, 10, 20])
        >>> pruner.compress()                   # stage 0: 50% of every conv's weights
        >>> for epoch in range(30):
        ...     pruner.update_epoch(epoch)      # 80% from epoch 10, 90% from epoch 20
        ...     train_one_epoch(model)          # opt.step(); pruner.step() at every batch

    Raises:
        ConfigError: ``stage_epochs`` that do not increase.
        ConfigError: a bad config list (not a list of dicts, an unknown key, an entry that selects
            no layer, a sparsity outside [0, 1) or a decreasing schedule, an unknown
            granularity), or filter/channel granularity without ``example_inputs``.
        RegistryError: an unknown ``criterion`` (filter/channel granularity).
        TraceError: filter/channel granularity on a model that cannot be traced.
    """

    def __init__(self, model: nn.Module, config_list: Sequence[Mapping[str, Any]], *,
                 stage_epochs: Sequence[int] | None = None, **kw: Any):
        super().__init__(model, config_list, **kw)
        self.stage_epochs = list(stage_epochs or [])
        if any(b <= a for a, b in zip(self.stage_epochs, self.stage_epochs[1:])):
            raise ConfigError(f"stage_epochs must increase. Got {self.stage_epochs}.")

    def next_stage(self) -> None:
        """Move to the next stage's sparsities and re-prune from the current weights."""
        self.stage += 1
        self.update_masks()

    def update_epoch(self, epoch: int) -> None:
        """``stage_epochs[i]`` is the epoch at which stage ``i`` begins."""
        stage = max([i for i, e in enumerate(self.stage_epochs) if epoch >= e], default=0)
        if stage != self.stage:
            self.stage = stage
            self.update_masks()


StagedPruner = LevelPruner


class AGPPruner(MaskPruner):
    """Automated gradual pruning (Zhu & Gupta 2017): sparsity follows
    s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_end - t_0))^3 from ``start_step`` to ``end_step``
    (optimizer steps, counted by ``step()``), masks recomputed every ``frequency`` steps and at
    ``end_step`` exactly. s_f is each entry's sparsity (the last one of a list), s_i
    ``initial_sparsity``.

    Example:
        >>> pruner = AGPPruner(model, [{"sparsity": 0.9, "op_types": ["default"]}], end_step=1000,
        ...                    frequency=10)
        >>> pruner.compress()
        >>> for x, y in loader:                 # 0% -> 90% over 1000 steps, fast at first
        ...     loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        ...     pruner.step()

    Raises:
        ConfigError: not 0 <= ``start_step`` < ``end_step``, a ``frequency`` that is not an int
            >= 1, or a final sparsity below ``initial_sparsity``.
        ConfigError: a bad config list (not a list of dicts, an unknown key, an entry that selects
            no layer, a sparsity outside [0, 1) or a decreasing schedule, an unknown
            granularity), or filter/channel granularity without ``example_inputs``.
        RegistryError: an unknown ``criterion`` (filter/channel granularity).
        TraceError: filter/channel granularity on a model that cannot be traced.
    """

    def __init__(self, model: nn.Module, config_list: Sequence[Mapping[str, Any]], *,
                 end_step: int, start_step: int = 0, frequency: int = 1,
                 initial_sparsity: float = 0.0, **kw: Any):
        super().__init__(model, config_list, **kw)
        if not (isinstance(end_step, int) and isinstance(start_step, int) and 0 <= start_step < end_step):
            raise ConfigError(f"AGPPruner needs 0 <= start_step < end_step. Got start_step="
                              f"{start_step!r}, end_step={end_step!r}.")
        if not isinstance(frequency, int) or frequency < 1:
            raise ConfigError(f"The 'frequency' parameter of AGPPruner must be an int >= 1. Got "
                              f"{frequency!r} instead.")
        for t in self.targets:
            if t.sparsity[-1] < initial_sparsity:
                raise ConfigError(f"AGPPruner: the final sparsity {t.sparsity[-1]} of '{t.module}' "
                                  f"is below initial_sparsity={initial_sparsity}: sparsity "
                                  "schedules must not decrease.")
        self.t0, self.t1, self.freq, self.s0 = start_step, end_step, frequency, initial_sparsity
        self.step_count = 0

    def target_sparsity(self, t: Target) -> float:
        sf = t.sparsity[-1]
        if self.step_count <= self.t0:
            return self.s0
        if self.step_count >= self.t1:
            return sf
        frac = (self.step_count - self.t0) / (self.t1 - self.t0)
        return sf + (self.s0 - sf) * (1 - frac) ** 3

    def step(self) -> None:
        self.step_count += 1
        n = self.step_count
        if self.t0 <= n <= self.t1 and ((n - self.t0) % self.freq == 0 or n == self.t1):
            self.update_masks()
        else:
            self.apply_masks()


class LotteryTicketPruner(MaskPruner):
    """The lottery ticket procedure (Frankle & Carbin 2019): ``compress()`` stores the initial
    weights; after each round of training, ``next_round()`` prunes ``sparsity`` of the remaining
    weights by magnitude (cumulative 1 - (1 - p)^round) and rewinds every weight to its initial
    value, masks kept. ``rounds`` rounds in all; the last ticket is then trained once more.

    Example:
        >>> pruner = LotteryTicketPruner(model, [{"sparsity": 0.5, "op_types": ["default"]}],
        ...                              rounds=3)
        >>> pruner.compress()                   # stores the initial weights; nothing pruned yet
        >>> for r in range(3):
        ...     train(model, pruner)            # opt.step(); pruner.step() at every batch
        ...     pruner.next_round()             # 50%, 75%, 87.5% pruned; weights rewound
        >>> train(model, pruner)                # train the winning ticket

    Raises:
        ConfigError: ``rounds`` is not an int >= 1.
        ConfigError: a bad config list (not a list of dicts, an unknown key, an entry that selects
            no layer, a sparsity outside [0, 1) or a decreasing schedule, an unknown
            granularity), or filter/channel granularity without ``example_inputs``.
        RegistryError: an unknown ``criterion`` (filter/channel granularity).
        TraceError: filter/channel granularity on a model that cannot be traced.
    """

    def __init__(self, model: nn.Module, config_list: Sequence[Mapping[str, Any]], *,
                 rounds: int = 3, **kw: Any):
        super().__init__(model, config_list, **kw)
        if not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"The 'rounds' parameter of LotteryTicketPruner must be an int >= 1. "
                              f"Got {rounds!r} instead.")
        self.rounds = rounds
        self.round = 0
        self.initial: dict[str, torch.Tensor] = {}

    def target_sparsity(self, t: Target) -> float:
        p = t.sparsity[-1]
        return 1 - (1 - p) ** self.round

    def compress(self) -> nn.Module:
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return super().compress()

    def next_round(self) -> None:
        """Prune from the trained weights, then rewind to the initial weights.

        Raises:
            ConfigError: all ``rounds`` rounds are done already.
        """
        if self.round >= self.rounds:
            raise ConfigError(f"LotteryTicketPruner: all {self.rounds} rounds are done.")
        self.round += 1
        self.masks = self.compute_masks()
        self.model.load_state_dict(self.initial)
        self._install_hooks()
        self.apply_masks()


def masked_weights_are_zero(pruner: MaskPruner) -> bool:
    """True if every masked entry of every masked tensor is exactly zero.

    Example:
        >>> pruner = LevelPruner(model, [{"sparsity": 0.8}])
        >>> pruner.compress()
        >>> ...                                 # train: opt.step(); pruner.step()
        >>> masked_weights_are_zero(pruner)
        True
    """
    return all(bool((pruner._params[n][~m] == 0).all()) for n, m in pruner.masks.items())


__all__ = ["AGPPruner", "LevelPruner", "LotteryTicketPruner", "MaskPruner", "StagedPruner",
           "masked_weights_are_zero"]
