"""ADMM compression (Zhang et al., ECCV 2018; Leng et al., AAAI 2018; Ren et al., ASPLOS 2019).

Training minimises loss(W) + rho/2 * sum ||W - Z + U||^2 while every ``update_interval`` steps
Z = Proj(W + U) (the nearest point of the constraint set) and U = U + W - Z. Constraints are a
config list like the mask pruners' (or one ``Projection`` for every conv and linear layer), the
projections are in ``projections.py`` (``JointBudget`` in ``joint.py``)::

    admm = ADMM(model, [{"op_types": ["Conv2d"], "projection": Sparsity(0.9)},
                        {"op_names": ["fc"], "projection": Intersection(Sparsity(0.8), Levels(3))}],
                update_interval=50)
    for x, y in loader:                              # 1. ADMM training
        loss = admm.loss(criterion(model(x), y))     #    adds the augmented-Lagrangian term
        loss.backward(); opt.step(); opt.zero_grad()
        admm.step()                                  #    Z/U updates every update_interval steps
    with admm.projected():                           # look at the projected model
        evaluate(model)
    model = admm.finalize()                          # 2. project for good, install the masks
    for x, y in loader:                              # 3. masked retraining: the same loop; the
        ...; admm.step()                             #    zeros of the projection stay exactly 0
    admm.finalize()                                  # 4. (quantization) back onto the levels
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .projections import ChannelSparsity, Intersection, Levels, Projection, Sparsity
from .targets import SELECTION_KEYS, resolve_config, weight_name

DEFAULT_RHO = 0.2
_EXAMPLE = "[{'op_types': ['Conv2d'], 'projection': Sparsity(0.8)}]"


def resolve_constraints(model: nn.Module, constraints: Any) -> dict[str, Projection]:
    """Weight name -> projection, from a config list (the selection keys and ``projection``) or
    one ``Projection`` (shorthand for ``[{"op_types": ["default"], "projection": p}]``).

    Example:
        >>> resolve_constraints(net, Sparsity(0.5))
        {'conv1.weight': Sparsity(sparsity=0.5), 'conv2.weight': Sparsity(sparsity=0.5), ...}

    Raises:
        ConfigError: see ``targets.resolve_config``; an entry without a Projection.
    """
    if isinstance(constraints, Projection):
        constraints = [{"op_types": ["default"], "projection": constraints}]
    elif isinstance(constraints, Mapping):
        if any(k in constraints for k in (*SELECTION_KEYS, "projection", "sparsity")):
            raise ConfigError(f"The constraints of ADMM are a list of entries: wrap the dict in a "
                              f"list, [{dict(constraints)!r}]. Got a dict instead.")
        listed = [{"op_names": [str(k)], "projection": v} for k, v in constraints.items()]
        warnings.warn("A dict of module globs -> Projection as ADMM constraints is deprecated; "
                      f"write the config list {listed!r}.", FutureWarning, stacklevel=3)
        constraints = listed
    elif isinstance(constraints, Sequence) and not isinstance(constraints, (str, bytes)):
        for i, e in enumerate(constraints):
            if isinstance(e, Mapping) and "sparsity" in e and "projection" not in e:
                raise ConfigError(f"Entry {i} of the config list of ADMM gives 'sparsity'; ADMM "
                                  f"entries give a 'projection': write {{'projection': "
                                  f"Sparsity({e['sparsity']!r}), ...}} instead.")
    else:
        raise ConfigError(f"The constraints of ADMM must be a config list such as {_EXAMPLE} or a "
                          f"Projection. Got {constraints!r} instead.")

    def parse(e: Mapping[str, Any], where: str) -> Projection:
        p = e.get("projection")
        if not isinstance(p, Projection):
            raise ConfigError(f"The 'projection' of {where} must be a Projection (Sparsity, "
                              f"ChannelSparsity, Levels, Intersection, JointBudget or a subclass "
                              f"of your own). Got {p!r} instead.")
        return p

    chosen = resolve_config(model, constraints, parse, keys=("projection",), owner="ADMM",
                            example=_EXAMPLE)
    return {weight_name(n): p for n, p in chosen.items()}


def _check_positive(v: Any, name: str, low: float, strict: bool) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v > low if strict else v >= low)
    if not ok:
        raise ConfigError(f"The '{name}' parameter of ADMM must be a float {'>' if strict else '>='} "
                          f"{low:g}. Got {v!r} instead.")
    return float(v)


class ADMM:
    """The ADMM driver (see the module docstring).

    ``rho`` (0.2) weighs the augmented-Lagrangian term, multiplied by ``rho_growth`` after every
    Z/U update up to ``rho_max``; ``update_interval`` is in calls of ``step()`` (about one epoch
    is usual). ``example_inputs`` are needed with ``ChannelSparsity`` (to trace the graph).

    Example:
        >>> admm = ADMM(model, Sparsity(0.9), rho_growth=1.05, update_interval=len(loader))

    Raises:
        ConfigError: bad constraints or hyper-parameters (at construction).
    """

    def __init__(self, model: nn.Module, constraints: Any, *, rho: float = DEFAULT_RHO,
                 rho_growth: float = 1.0, rho_max: float | None = None, update_interval: int = 100,
                 example_inputs: Any = None, global_projection: Any = None):
        self.rho = _check_positive(rho, "rho", 0, True)
        self.rho_growth = _check_positive(rho_growth, "rho_growth", 1, False)
        self.rho_max = None if rho_max is None else _check_positive(rho_max, "rho_max", 0, True)
        if not isinstance(update_interval, int) or isinstance(update_interval, bool) or update_interval < 1:
            raise ConfigError(f"The 'update_interval' parameter of ADMM must be an int >= 1. Got "
                              f"{update_interval!r} instead.")
        if global_projection is not None:
            raise ConfigError(f"The 'global_projection' parameter of ADMM is gone: pass the global "
                              f"projection as the constraint, ADMM(model, {global_projection!r}) or "
                              f"ADMM(model, [{{'op_names': [...], 'projection': "
                              f"{type(global_projection).__name__}(...)}}]).")
        self.model = model
        self.constraints = resolve_constraints(model, constraints)
        self.interval = update_interval
        self.params = dict(model.named_parameters())
        self._groups: dict[int, tuple[Projection, list[str]]] = {}
        for n, p in self.constraints.items():
            self._groups.setdefault(id(p), (p, []))[1].append(n)
        channel = {p.criterion for p in self.constraints.values() if isinstance(p, ChannelSparsity)}
        if len(channel) > 1:
            raise ConfigError(f"All ChannelSparsity constraints of one ADMM must use the same "
                              f"criterion. Got {sorted(channel)}.")
        self.graph = None
        if channel:
            if example_inputs is None:
                raise ConfigError("ADMM with ChannelSparsity removes coupled channels through the "
                                  "dependency graph: pass example_inputs=... .")
            from ..capture import trace

            self.graph = trace(model, example_inputs)
        self.steps = 0
        self.updates = 0
        self._plan = None
        self.U = {n: torch.zeros_like(self.params[n]) for n in self.constraints}
        self.Z = self._project({n: self.params[n].detach() for n in self.constraints})
        self._saved: dict[str, torch.Tensor] | None = None
        self._hooks: list[Any] = []
        self.masks: dict[str, torch.Tensor] = {}
        self._final: nn.Module | None = None

    # ------------------------------------------------------------------ projection
    def _project(self, V: dict[str, torch.Tensor], *, channels: bool = True) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for p, names in self._groups.values():
            if isinstance(p, ChannelSparsity):
                continue
            got = p.project_all({n: V[n].detach().clone() for n in names})
            for n in names:
                z = got.get(n) if isinstance(got, Mapping) else None
                if not isinstance(z, torch.Tensor) or z.shape != V[n].shape:
                    raise ConfigError(
                        f"{p!r} must map weight '{n}' of shape {tuple(V[n].shape)} to a tensor of "
                        f"the same shape. Got {type(z).__name__ if z is None else tuple(z.shape)}.")
                out[n] = z.to(V[n].dtype)
        channel = {n: p for n, p in self.constraints.items() if isinstance(p, ChannelSparsity)}
        if channel and channels:
            out.update(self._project_channels(V, channel))
        return out

    def _project_channels(self, V: dict[str, torch.Tensor],
                          channel: dict[str, ChannelSparsity]) -> dict[str, torch.Tensor]:
        from .structured import group_plan

        crit = next(iter(channel.values())).criterion
        canon = {self.graph.aliases[n]: V[n] for n in channel}
        plan = group_plan(self.graph, {n.rpartition(".")[0]: p.sparsity for n, p in channel.items()},
                          crit, projected=canon)
        self._plan = plan
        out = {n: V[n].detach().clone() for n in channel}
        by_canon = {self.graph.aliases[n]: n for n in channel}
        for name, gp in plan.groups.items():
            g = self.graph.group(name)
            drop = torch.ones(g.size, dtype=torch.bool)
            drop[list(gp.keep)] = False
            for m in g.sources:
                alias = by_canon.get(m.param)
                if alias is None:
                    continue
                sel = drop[torch.as_tensor(m.unit)]
                idx = torch.as_tensor(m.index)[sel].unique()
                out[alias].index_fill_(m.dim, idx, 0)
        return out

    # ------------------------------------------------------------------ the training loop
    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` plus rho/2 * sum ||W - Z + U||^2 (call before ``backward``); after
        ``finalize()`` the loss unchanged."""
        if self._final is not None:
            return loss
        reg = sum(((self.params[n] - self.Z[n] + self.U[n]) ** 2).sum() for n in self.constraints)
        return loss + 0.5 * self.rho * reg

    @torch.no_grad()
    def step(self) -> None:
        """Call after every optimizer step: every ``update_interval`` steps Z and U are updated;
        after ``finalize()`` it re-applies the masks instead (pruned weights stay exactly zero)."""
        if self._final is not None:
            self._apply_masks()
            return
        self.steps += 1
        if self.steps % self.interval:
            return
        V = {n: self.params[n].detach() + self.U[n] for n in self.constraints}
        self.Z = self._project(V)
        for n in self.constraints:
            self.U[n] += self.params[n].detach() - self.Z[n]
        self.updates += 1
        self.rho *= self.rho_growth
        if self.rho_max is not None:
            self.rho = min(self.rho, self.rho_max)

    def residuals(self) -> dict[str, float]:
        """Relative primal residual ||W - Z|| / ||W|| per constrained weight (-> 0 at the end)."""
        with torch.no_grad():
            return {n: float((self.params[n] - self.Z[n]).norm()
                             / self.params[n].norm().clamp_min(1e-12)) for n in self.constraints}

    # ------------------------------------------------------------------ looking at the result
    @contextmanager
    def projected(self) -> Iterator[nn.Module]:
        """Inside the block the weights are their projection (e.g. to evaluate the model ADMM is
        heading for); on leaving, the trained weights are back.

        Example:
            >>> with admm.projected():
            ...     acc = evaluate(model, x, y)
        """
        self.apply_projection()
        try:
            yield self.model
        finally:
            self.restore()

    @torch.no_grad()
    def apply_projection(self) -> None:
        """Replace the weights by their projection (``restore()`` undoes; see ``projected``)."""
        if self._final is not None:
            raise ConfigError("ADMM.apply_projection() after finalize(): the weights are already "
                              "projected (call finalize() again to re-project after fine-tuning).")
        self._saved = {n: self.params[n].detach().clone() for n in self.constraints}
        for n, z in self._project({n: self.params[n].detach() for n in self.constraints}).items():
            self.params[n].copy_(z)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights ``apply_projection()`` replaced."""
        if self._saved is None:
            raise ConfigError("ADMM.restore() without apply_projection().")
        for n, w in self._saved.items():
            self.params[n].copy_(w)
        self._saved = None

    # ------------------------------------------------------------------ the end
    @torch.no_grad()
    def finalize(self) -> nn.Module:
        """Project for good and keep the zeros: returns the model to fine-tune (a new, physically
        smaller module if ``ChannelSparsity`` removed channels, else the model). Every constrained
        weight whose projection keeps zeros (``Projection.keeps_zeros``) gets a mask in
        ``self.masks``; from now on gradients are masked and ``step()`` re-applies the masks
        after each optimizer step, so masked retraining is the same loop as ADMM training.

        Called again (after fine-tuning), it projects the weights onto their sets once more,
        masks kept (e.g. back onto the quantization levels).

        Example:
            >>> small = admm.finalize()
            >>> opt = torch.optim.SGD(small.parameters(), lr=1e-3)   # then train; admm.step()
        """
        if self._final is not None:
            return self._reproject()
        proj = self._project({n: self.params[n].detach() for n in self.constraints})
        for n, z in proj.items():
            self.params[n].copy_(z)
        model = self.model
        shrunk = self._plan is not None and bool(self._plan.groups)
        if shrunk:
            from ..apply import apply_plan

            model = apply_plan(self.graph, self._plan).model
        params = dict(model.named_parameters())
        masks = {}
        for n, p in self.constraints.items():
            if shrunk and isinstance(p, ChannelSparsity):
                continue  # the channels are gone
            w = params[n]
            if p.keeps_zeros or (p.keeps_zeros is None and bool((w == 0).any())):
                masks[n] = (w != 0).detach()
        self._final = model
        self._install(masks)
        return model

    def _reproject(self) -> nn.Module:
        params = dict(self._final.named_parameters())
        names = [n for n, p in self.constraints.items() if not isinstance(p, ChannelSparsity)]
        for n, z in self._project({n: params[n].detach() for n in names}, channels=False).items():
            params[n].copy_(z)
        self._apply_masks()
        return self._final

    def _install(self, masks: dict[str, torch.Tensor]) -> None:
        for h in self._hooks:
            h.remove()
        model = self._final if self._final is not None else self.model
        params = dict(model.named_parameters())
        self._hooks = [params[n].register_hook(lambda g, m=m: g * m.to(g.dtype))
                       for n, m in masks.items() if params[n].requires_grad]
        self._masked = {n: params[n] for n in masks}
        self.masks = masks
        self._apply_masks()

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for n, m in self.masks.items():
            p = self._masked[n]
            p.mul_(m.to(p.dtype))

    def release(self) -> None:
        """Remove the gradient hooks ``finalize()`` installed (the weights keep their zeros)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def export_masks(self, path: Any) -> None:
        """Save the masks of ``finalize()`` (safetensors, names of the model's state_dict).

        Raises:
            ConfigError: before ``finalize()``.
        """
        if self._final is None:
            raise ConfigError("ADMM.export_masks() before finalize(): the masks are made by "
                              "finalize().")
        from ..export.masks import save_masks

        save_masks(self.masks, path)

    # ------------------------------------------------------------------ deprecated
    @property
    def final_masks(self) -> dict[str, torch.Tensor]:
        """The masks of ``finalize()`` (the same as ``self.masks``)."""
        return self.masks

    def grad_mask(self, masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Deprecated: ``finalize()`` installs the masks and ``step()`` keeps them."""
        warnings.warn("ADMM.grad_mask() is deprecated: finalize() installs the masks and step() "
                      "keeps them after every optimizer step.", FutureWarning, stacklevel=2)
        if self._final is None:
            self.finalize()
        if masks is not None:
            self._install(masks)
        return self.masks

    def step_masked(self) -> None:
        """Deprecated: call ``step()`` (after ``finalize()`` it re-applies the masks)."""
        warnings.warn("ADMM.step_masked() is deprecated: call step(); after finalize() it "
                      "re-applies the masks.", FutureWarning, stacklevel=2)
        self._apply_masks()


__all__ = ["ADMM", "ChannelSparsity", "DEFAULT_RHO", "Intersection", "Levels", "Projection",
           "Sparsity", "resolve_constraints"]
