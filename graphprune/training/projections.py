"""ADMM's constraint sets, each given by its Euclidean projection: unstructured sparsity, channel
sparsity through the dependency graph, k-level quantization, their intersection, or your own.

A projection maps a weight to the nearest point of its set (``project(w, name)``); a global one
(``JointBudget``) maps all the weights it constrains at once (``project_all``). ``keeps_zeros``
says whether the zeros of the projection are kept while fine-tuning after ``ADMM.finalize()``:
``None`` (the default) keeps them if the projection produced any, ``True``/``False`` always /
never (quantization levels, whose zero is just one level, say ``False``).
"""

from __future__ import annotations

import torch

from .._validate import check_fraction
from ..errors import ConfigError
from ..sparsity import magnitude_mask


class Projection:
    """A constraint set, given by its projection. Subclass and implement ``project``.

    Example:
        >>> class PowerOfTwo(Projection):
        ...     def project(self, w, name):
        ...         e = torch.round(torch.log2(w.abs().clamp_min(2 ** -8)))
        ...         return torch.where(w.abs() < 2 ** -9, 0.0, torch.sign(w) * 2 ** e)
        >>> admm = ADMM(model, [{"op_types": ["Conv2d"], "projection": PowerOfTwo()}])
    """

    keeps_zeros: bool | None = None

    def project(self, w: torch.Tensor, name: str) -> torch.Tensor:
        """The nearest point of the set to ``w`` (the weight called ``name``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement project(w, name)")

    def project_all(self, W: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Project every weight this projection constrains (one by one unless overridden)."""
        return {n: self.project(w, n) for n, w in W.items()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Sparsity(Projection):
    """At most (1 - sparsity) of the entries non-zero: keep the largest |w|. Exactly
    ``graphprune.sparsity.n_kept(w.numel(), sparsity)`` entries stay (ties: lower index).

    Example:
        >>> int((Sparsity(0.58).project(torch.randn(10, 10), "w") != 0).sum())
        42

    Raises:
        ConfigError: ``sparsity`` is not a float in [0, 1).
    """

    keeps_zeros = True

    def __init__(self, sparsity: float):
        self.sparsity = check_fraction(sparsity, "sparsity", "Sparsity")

    def __repr__(self) -> str:
        return f"Sparsity({self.sparsity!r})"

    def project(self, w: torch.Tensor, name: str) -> torch.Tensor:
        if self.sparsity == 0:
            return w.clone()
        return torch.where(magnitude_mask(w.abs(), self.sparsity), w, torch.zeros_like(w))


class Levels(Projection):
    """Quantization to 2**(bits-1)-1 symmetric levels alpha*{-m..m} (Leng et al.): alpha and the
    assignment are found by alternating minimisation; zeros stay zero.

    Example:
        >>> len(Levels(bits=3).project(torch.randn(100), "w").abs().unique()) <= 4
        True

    Raises:
        ConfigError: ``bits`` is not an int in [2, 8].
    """

    keeps_zeros = False  # zero is one of the levels; retraining may move a weight off it

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
    """Project onto each set in turn (e.g. prune, then quantize the survivors).

    Example:
        >>> p = Intersection(Sparsity(0.9), Levels(bits=3))
        >>> admm = ADMM(model, [{"op_types": ["Conv2d"], "projection": p}])

    Raises:
        ConfigError: no projection, an argument that is not a ``Projection``, or a
            ``ChannelSparsity`` (which ends in a physical shrink).
    """

    def __init__(self, *projections: Projection):
        if not projections:
            raise ConfigError("Intersection needs at least one projection, e.g. "
                              "Intersection(Sparsity(0.9), Levels(bits=3)).")
        for p in projections:
            if not isinstance(p, Projection):
                raise ConfigError(f"Every argument of Intersection must be a Projection. Got "
                                  f"{p!r} instead.")
            if isinstance(p, ChannelSparsity):
                raise ConfigError("ChannelSparsity cannot be part of an Intersection: it ends in "
                                  "a physical shrink. Constrain the channels alone, then run a "
                                  "second ADMM (e.g. Levels) on the smaller model finalize() returns.")
        self.projections = projections
        flags = [p.keeps_zeros for p in projections]
        self.keeps_zeros = True if True in flags else (None if None in flags else False)

    def __repr__(self) -> str:
        return f"Intersection({', '.join(map(repr, self.projections))})"

    def project(self, w: torch.Tensor, name: str) -> torch.Tensor:
        return self.project_all({name: w})[name]

    def project_all(self, W: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for p in self.projections:
            W = p.project_all(W)
        return W


class ChannelSparsity(Projection):
    """Remove ``sparsity`` of the channel units of every group the layer produces, units chosen
    by ``criterion`` (l1, l2, fpgm, random) on W + U over all producers of the group; ends in a
    physical shrink through the dependency graph (``ADMM.finalize`` returns the smaller model).

    Example:
        >>> admm = ADMM(model, ChannelSparsity(0.5), example_inputs=x)

    Raises:
        ConfigError: ``sparsity`` is not a float in [0, 1).
        RegistryError: an unknown ``criterion``.
    """

    keeps_zeros = True

    def __init__(self, sparsity: float, criterion: str = "l1"):
        from ..criteria import get_criterion

        self.sparsity = check_fraction(sparsity, "sparsity", "ChannelSparsity")
        get_criterion(criterion)
        self.criterion = criterion

    def __repr__(self) -> str:
        return f"ChannelSparsity({self.sparsity!r}, criterion={self.criterion!r})"

    def project(self, w: torch.Tensor, name: str) -> torch.Tensor:
        raise ConfigError("ChannelSparsity projects the coupled weights of a channel group "
                          "together: use it through ADMM (with example_inputs=...).")


__all__ = ["ChannelSparsity", "Intersection", "Levels", "Projection", "Sparsity"]
