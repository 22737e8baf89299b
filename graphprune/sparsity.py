"""Sparsity arithmetic, shared by every stage that turns a fraction into a count: the channel plan
(how many channels a group keeps), the mask pruners (how many weights a layer loses), ADMM's
projections and the joint budgets.

The rule, everywhere: at ``sparsity`` s, of ``n`` items **floor(s·n) are removed**, where s·n is
first snapped to the nearest integer when it lies within float error of it. So a sparsity never
removes more than asked, and never one less because of binary floating point: 0.58 of 100 removes
58 (``0.58 * 100`` is 57.99999999999999 in floats, which ``int()`` makes 57), 0.3 of 10 removes 3,
0.5 of 3 removes 1, and ``1 - 0.8 ** 2`` (0.3599999999999999) of 100 removes 36. "Within float
error" is ``math.isclose(s·n, round(s·n), rel_tol=1e-12, abs_tol=1e-9)``: far wider than the error
of a few float operations (~1e-16 relative), far narrower than any fraction a user means.

The number kept is the rest, at least ``min_keep`` (1 by default: a layer or group never loses
everything) and, with ``round_to`` > 1, the nearest multiple of ``round_to`` (ties to the even
multiple), at least ``round_to`` and at most the largest multiple of ``round_to`` not above ``n``
(groups smaller than ``round_to`` are not rounded).

Which items go, given the count, is ``keep_largest``: the highest scores stay; among equal scores
the lower index stays (the channel plan's tie rule).
"""

from __future__ import annotations

import math
import numbers

import torch

from .errors import ConfigError

REL_TOL = 1e-12
ABS_TOL = 1e-9


def _check(n: object, sparsity: object, owner: str) -> None:
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"The 'n' parameter of {owner} must be an int >= 0. Got {n!r} instead.")
    ok = isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool)
    if not ok or not 0.0 <= float(sparsity) <= 1.0:
        raise ConfigError(f"The 'sparsity' parameter of {owner} must be a float in [0, 1]. Got "
                          f"{sparsity!r} instead.")


def n_pruned(n: int, sparsity: float) -> int:
    """How many of ``n`` items sparsity ``sparsity`` removes: floor(sparsity·n), snapped to the
    nearest integer first when within float error of it (see the module docstring).

    Example:
        >>> n_pruned(100, 0.58), int(0.58 * 100)
        (58, 57)
        >>> n_pruned(3, 0.5)
        1

    Raises:
        ConfigError: ``n`` is not an int >= 0 or ``sparsity`` not in [0, 1].
    """
    _check(n, sparsity, "n_pruned")
    x = float(sparsity) * int(n)
    r = round(x)
    if math.isclose(x, r, rel_tol=REL_TOL, abs_tol=ABS_TOL):
        return min(int(n), int(r))
    return int(math.floor(x))


def n_kept(n: int, sparsity: float, *, round_to: int = 1, min_keep: int = 1) -> int:
    """How many of ``n`` items stay at ``sparsity``: ``n - n_pruned(n, sparsity)``, then rounded
    to the nearest multiple of ``round_to`` (ties to the even multiple; only when ``n >=
    round_to``; at least ``round_to``, at most the largest multiple not above ``n``), and at least
    ``min(min_keep, n)``.

    Example:
        >>> n_kept(100, 0.58)
        42
        >>> n_kept(64, 0.3, round_to=8)   # 45 kept, rounded to a multiple of 8
        48
        >>> n_kept(10, 1.0), n_kept(10, 1.0, min_keep=0)
        (1, 0)

    Raises:
        ConfigError: a parameter is out of range.
    """
    _check(n, sparsity, "n_kept")
    if not isinstance(round_to, numbers.Integral) or isinstance(round_to, bool) or round_to < 1:
        raise ConfigError(f"The 'round_to' parameter of n_kept must be an int >= 1. Got "
                          f"{round_to!r} instead.")
    if not isinstance(min_keep, numbers.Integral) or isinstance(min_keep, bool) or min_keep < 0:
        raise ConfigError(f"The 'min_keep' parameter of n_kept must be an int >= 0. Got "
                          f"{min_keep!r} instead.")
    n = int(n)
    keep = n - n_pruned(n, sparsity)
    if round_to > 1 and n >= round_to:
        q, rem = divmod(keep, round_to)
        if 2 * rem > round_to or (2 * rem == round_to and q % 2):  # nearest, ties to even
            q += 1
        keep = min(max(round_to, q * round_to), n - n % round_to)
    return max(min(int(min_keep), n), min(n, keep))


def keep_largest(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Boolean mask (shape of ``scores``) of the ``n_keep`` highest scores; among equal scores
    the lower (flat) index is kept.

    Example:
        >>> keep_largest(torch.tensor([0.5, 2.0, 0.5, 1.0]), 3)
        tensor([ True,  True, False,  True])
    """
    flat = scores.detach().flatten()
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    n_keep = max(0, min(int(n_keep), flat.numel()))
    if n_keep:
        order = torch.argsort(flat, descending=True, stable=True)  # ties: index order
        keep[order[:n_keep]] = True
    return keep.view(scores.shape)


def magnitude_mask(scores: torch.Tensor, sparsity: float, *, min_keep: int = 1) -> torch.Tensor:
    """Boolean mask keeping ``n_kept(scores.numel(), sparsity, min_keep=min_keep)`` entries of
    the largest ``scores`` (e.g. ``w.abs()``): exactly that many, whatever the ties.

    Example:
        >>> int(magnitude_mask(torch.randn(10, 10).abs(), 0.58).sum())
        42
    """
    return keep_largest(scores, n_kept(scores.numel(), sparsity, min_keep=min_keep))


__all__ = ["keep_largest", "magnitude_mask", "n_kept", "n_pruned"]
