"""ADMM compression (Zhang et al., ECCV 2018; Leng et al., AAAI 2018; Ren et al., ASPLOS 2019).

Training minimises loss(W) + rho/2 * sum ||W - Z + U||^2 while every ``update_interval`` steps
Z = Proj(W + U) (the nearest point of the constraint set) and U = U + W - Z. A constraint is a
``Projection``: unstructured sparsity, channel sparsity through the dependency graph, k-level
quantization, their intersection, or your own (implement ``project``)::

    admm = ADMM(model, {"conv*": Sparsity(0.9), "fc": Intersection(Sparsity(0.8), Levels(bits=3))},
                rho=1e-3, update_interval=50)
    for x, y in loader:
        loss = admm.loss(criterion(model(x), y))   # adds the augmented-Lagrangian term
        loss.backward(); opt.step(); admm.step()
    admm.apply_projection(); evaluate(model); admm.restore()   # look at the projected model
    masks = admm.finalize()     # project for good; then fine-tune with admm.grad_mask() active
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..opmatch import op_matches


class Projection:
    """A constraint set, given by its Euclidean projection. Subclass and implement ``project``
    (and ``keeps_zeros`` if the projection produces a sparsity pattern to keep when fine-tuning)."""

    keeps_zeros = False

    def project(self, w: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement project(w, name)")


class Sparsity(Projection):
    """At most (1 - sparsity) of the entries non-zero: keep the largest |w|."""

    keeps_zeros = True

    def __init__(self, sparsity: float):
        from .._validate import check_fraction

        self.sparsity = check_fraction(sparsity, "sparsity", "Sparsity")

    def project(self, w: torch.Tensor, name: str) -> torch.Tensor:
        k = int(self.sparsity * w.numel())
        if k == 0:
            return w.clone()
        thr = w.abs().flatten().kthvalue(k).values
        out = torch.where(w.abs() > thr, w, torch.zeros_like(w))
        extra = int((out != 0).sum()) - (w.numel() - k)  # ties at the threshold
        if extra > 0:
            nz = (out != 0).flatten().nonzero().flatten()
            order = torch.argsort(w.abs().flatten()[nz], stable=True)[:extra]
            out.view(-1)[nz[order]] = 0
        return out


class Levels(Projection):
    """Quantization to 2**(bits-1)-1 symmetric levels alpha*{-m..m} (Leng et al.): alpha and the
    assignment are found by alternating minimisation; zeros stay zero."""

    def __init__(self, bits: int = 3, iters: int = 20):
        if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
            raise ConfigError(f"The 'bits' parameter of Levels must be an int in [2, 8]. Got "
                              f"{bits!r} instead.")
        self.bits, self.iters = bits, iters

    def project(self, w: torch.Tensor, name: str) -> torch.Tensor:
        m = (1 << (self.bits - 1)) - 1
        nz = w != 0
        v = w[nz]
        if v.numel() == 0:
            return w.clone()
        alpha = v.abs().max() / m
        for _ in range(self.iters):
            q = torch.clamp(torch.round(v / alpha), -m, m)
            denom = (q * q).sum()
            if denom == 0:
                break
            new = (v * q).sum() / denom
            if torch.isclose(new, alpha):
                break
            alpha = new
        out = torch.zeros_like(w)
        out[nz] = torch.clamp(torch.round(v / alpha), -m, m) * alpha
        return out


class Intersection(Projection):
    """Project onto each set in turn (e.g. prune, then quantize the survivors)."""

    def __init__(self, *projections: Projection):
        if not projections:
            raise ConfigError("Intersection needs at least one projection.")
        self.projections = projections
        self.keeps_zeros = any(p.keeps_zeros for p in projections)

    def project(self, w: torch.Tensor, name: str) -> torch.Tensor:
        for p in self.projections:
            w = p.project(w, name)
        return w


class ChannelSparsity(Projection):
    """Remove ``sparsity`` of the channel units of every group the layer produces, units chosen
    by ``criterion`` (l1, l2, fpgm, random) on W + U over all producers of the group; ends in a
    physical shrink through the dependency graph (``ADMM.finalize``)."""

    keeps_zeros = True

    def __init__(self, sparsity: float, criterion: str = "l1"):
        from .._validate import check_fraction
        from ..criteria import get_criterion

        self.sparsity = check_fraction(sparsity, "sparsity", "ChannelSparsity")
        get_criterion(criterion)
        self.criterion = criterion

    def project(self, w: torch.Tensor, name: str) -> torch.Tensor:  # pragma: no cover
        raise RuntimeError("ChannelSparsity is projected jointly by ADMM over its groups")


def _resolve(model: nn.Module, constraints: Any) -> dict[str, Projection]:
    """Weight name -> projection, from a Projection (all Conv/Linear weights), a dict of module
    path globs -> Projection, or a list of {'projection', 'op_types', 'op_names', 'exclude'}."""
    from .targets import DEFAULT_TYPES

    mods = dict(model.named_modules())
    out: dict[str, Projection] = {}

    def add(name: str, p: Projection | None) -> None:
        w = getattr(mods[name], "weight", None)
        if isinstance(w, torch.Tensor):
            key = f"{name}.weight" if name else "weight"
            if p is None:
                out.pop(key, None)
            else:
                out[key] = p

    if isinstance(constraints, Projection):
        for n, m in mods.items():
            if type(m).__name__ in DEFAULT_TYPES:
                add(n, constraints)
    elif isinstance(constraints, Mapping):
        for pat, p in constraints.items():
            if not isinstance(p, Projection):
                raise ConfigError(f"ADMM: constraint for '{pat}' must be a Projection. Got {p!r}.")
            hit = [n for n in mods if n and fnmatch.fnmatchcase(n, pat)]
            if not hit:
                from ..errors import did_you_mean

                raise ConfigError(f"ADMM: '{pat}' matches no module.{did_you_mean(pat, mods)}")
            for n in hit:
                add(n, p)
    elif isinstance(constraints, Sequence):
        for i, e in enumerate(constraints):
            if not isinstance(e, Mapping) or ("projection" not in e and not e.get("exclude")):
                raise ConfigError(f"ADMM: constraint entry {i} must be a dict with 'projection'.")
            types = e.get("op_types", ["default"])
            names = e.get("op_names", [])
            for n, m in mods.items():
                if op_matches(n, type(m).__name__, types, names, DEFAULT_TYPES):
                    add(n, None if e.get("exclude") else e["projection"])
    else:
        raise ConfigError(f"ADMM: constraints must be a Projection, a dict or a list. Got "
                          f"{constraints!r}.")
    if not out:
        raise ConfigError("ADMM: the constraints match no weight of the model.")
    return out


class ADMM:
    """The ADMM driver (see the module docstring)."""

    def __init__(self, model: nn.Module, constraints: Any, *, rho: float = 1e-3,
                 rho_growth: float = 1.0, rho_max: float | None = None, update_interval: int = 100,
                 example_inputs: Any = None, global_projection: Any = None):
        if not isinstance(rho, (int, float)) or isinstance(rho, bool) or rho <= 0:
            raise ConfigError(f"The 'rho' parameter of ADMM must be a float > 0. Got {rho!r} instead.")
        if not isinstance(rho_growth, (int, float)) or rho_growth < 1:
            raise ConfigError(f"The 'rho_growth' parameter of ADMM must be >= 1. Got {rho_growth!r}.")
        if not isinstance(update_interval, int) or update_interval < 1:
            raise ConfigError(f"The 'update_interval' parameter of ADMM must be an int >= 1. Got "
                              f"{update_interval!r} instead.")
        self.model = model
        self.constraints = _resolve(model, constraints)
        self.rho, self.rho_growth, self.rho_max = float(rho), float(rho_growth), rho_max
        self.interval = update_interval
        self.global_projection = global_projection
        self.params = dict(model.named_parameters())
        self.graph = None
        if any(isinstance(p, ChannelSparsity) for p in self.constraints.values()):
            if example_inputs is None:
                raise ConfigError("ADMM with ChannelSparsity removes coupled channels through the "
                                  "dependency graph: pass example_inputs=... .")
            from ..capture import trace

            self.graph = trace(model, example_inputs)
        self.steps = 0
        self.updates = 0
        self.U = {n: torch.zeros_like(self.params[n]) for n in self.constraints}
        self.Z = self._project({n: self.params[n].detach() for n in self.constraints})
        self._saved: dict[str, torch.Tensor] | None = None
        self._hooks: list[Any] = []
        self._plan = None

    # ------------------------------------------------------------------ projection
    def _project(self, V: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        channel = {n: p for n, p in self.constraints.items() if isinstance(p, ChannelSparsity)}
        for n, p in self.constraints.items():
            if n not in channel:
                out[n] = p.project(V[n].detach().clone(), n)
        if channel:
            out.update(self._project_channels(V, channel))
        if self.global_projection is not None:
            out.update(self.global_projection.project_all(out))
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
        for name, gp in plan.groups.items():
            g = self.graph.group(name)
            drop = torch.ones(g.size, dtype=torch.bool)
            drop[list(gp.keep)] = False
            for m in g.sources:
                alias = next((a for a, c in self.graph.aliases.items()
                              if c == m.param and a in out), None)
                if alias is None:
                    continue
                sel = drop[torch.as_tensor(m.unit)]
                idx = torch.as_tensor(m.index)[sel].unique()
                out[alias].index_fill_(m.dim, idx, 0)
        return out

    # ------------------------------------------------------------------ training hooks
    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` plus rho/2 * sum ||W - Z + U||^2 (call before ``backward``)."""
        reg = sum(((self.params[n] - self.Z[n] + self.U[n]) ** 2).sum() for n in self.constraints)
        return loss + 0.5 * self.rho * reg

    @torch.no_grad()
    def step(self) -> None:
        """Call after every optimizer step: every ``update_interval`` steps Z and U are updated."""
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

    # ------------------------------------------------------------------ evaluation helpers
    @torch.no_grad()
    def apply_projection(self) -> None:
        """Replace the weights by their projection (save them first; ``restore()`` undoes)."""
        self._saved = {n: self.params[n].detach().clone() for n in self.constraints}
        proj = self._project({n: self.params[n].detach() for n in self.constraints})
        for n, z in proj.items():
            self.params[n].copy_(z)

    @torch.no_grad()
    def restore(self) -> None:
        if self._saved is None:
            raise ConfigError("ADMM.restore() without apply_projection().")
        for n, w in self._saved.items():
            self.params[n].copy_(w)
        self._saved = None

    def masks(self) -> dict[str, torch.Tensor]:
        """Non-zero patterns of the projected weights of sparsity constraints."""
        proj = self._project({n: self.params[n].detach() for n in self.constraints})
        return {n: proj[n] != 0 for n, p in self.constraints.items()
                if p.keeps_zeros or self.global_projection is not None}

    def grad_mask(self, masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Mask gradients (and keep the weights masked at ``step_masked()``) so pruned weights stay
        exactly zero during fine-tuning. Returns the masks."""
        masks = masks if masks is not None else self.masks()
        for h in self._hooks:
            h.remove()
        self._hooks = [self.params[n].register_hook(lambda g, m=m: g * m.to(g.dtype))
                       for n, m in masks.items()]
        self._grad_masks = masks
        return masks

    @torch.no_grad()
    def step_masked(self) -> None:
        """After an optimizer step in masked fine-tuning: re-apply the masks."""
        for n, m in getattr(self, "_grad_masks", {}).items():
            self.params[n].mul_(m.to(self.params[n].dtype))

    @torch.no_grad()
    def finalize(self) -> nn.Module:
        """Project for good. Returns the model, physically shrunk if channel sparsity was a
        constraint (a new module; fine-tune it). Masks of the kept sparsity are in
        ``self.final_masks``; ``grad_mask()`` keeps them during fine-tuning."""
        proj = self._project({n: self.params[n].detach() for n in self.constraints})
        for n, z in proj.items():
            self.params[n].copy_(z)
        self.final_masks = {n: z != 0 for n, z in proj.items()
                            if self.constraints[n].keeps_zeros or self.global_projection is not None}
        if self._plan is not None and self.graph is not None and self._plan.groups:
            from ..apply import apply_plan

            return apply_plan(self.graph, self._plan).model
        return self.model
