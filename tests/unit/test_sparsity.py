"""Sparsity arithmetic (graphprune.sparsity): exact counts against decimal arithmetic, the
round_to rule of the channel plan, tie-breaking, and every user of the helper counting the same."""

import math
from decimal import Decimal

import pytest
import torch
from torch import nn

from graphprune.errors import ConfigError
from graphprune.sparsity import keep_largest, magnitude_mask, n_kept, n_pruned


def _legacy_keep_count(n, sparsity, round_to=1):
    """plan.keep_count as it was written before the shared helper (the semantics to keep)."""
    keep = n - int(math.floor(sparsity * n + 1e-9))
    if round_to > 1 and n >= round_to:
        keep = max(round_to, int(round(keep / round_to)) * round_to)
        keep = min(keep, n - n % round_to if n % round_to else n)
    return max(1, min(n, keep))


@pytest.mark.parametrize("n, sparsity, pruned", [
    (100, 0.58, 58), (10, 0.3, 3), (10, 0.7, 7), (100, 0.29, 29), (100, 0.57, 57), (3, 0.5, 1),
    (7, 0.99, 6), (1000, 0.001, 1), (100, 1 - 0.8 ** 2, 36), (64, 1 - (1 - 0.5) ** 3, 56),
    (288, 0.58, 167), (1, 0.9, 0), (10, 0.0, 0), (10, 1.0, 10), (0, 0.5, 0),
    (10 ** 9, 0.58, 580_000_000), (25_557_032, 0.9, 23_001_328),
])
def test_known_counts(n, sparsity, pruned):
    assert n_pruned(n, sparsity) == pruned
    assert n_kept(n, sparsity, min_keep=0) == n - pruned


def test_the_issue_case():
    assert int(0.58 * 100) == 57  # what the old arithmetic did
    assert n_pruned(100, 0.58) == 58 and n_kept(100, 0.58) == 42


def test_counts_equal_exact_decimal_arithmetic_on_a_grid():
    """For every sparsity a user types (up to 3 decimals) and n up to 2000, the count is
    floor(sparsity * n) computed on the decimal the user wrote, never off by one."""
    bad = []
    for k in range(0, 1001, 11):
        text = f"{k / 1000:.3f}"
        s, exact = float(text), Decimal(text)
        for n in range(0, 2001, 7):
            want = int(exact * n)  # floor (non-negative)
            if n_pruned(n, s) != want:
                bad.append((n, text, n_pruned(n, s), want))
    assert not bad, bad[:5]


def test_computed_sparsities_are_exact_too():
    """Schedules compute their sparsity in floats (lottery ticket 1 - (1 - p)^r)."""
    for p in (0.2, 0.3, 0.5, 0.8):
        for r in range(1, 5):
            exact = 1 - (1 - Decimal(str(p))) ** r
            for n in (10, 100, 1000, 4608):
                assert n_pruned(n, 1 - (1 - p) ** r) == int(exact * n), (p, r, n)


def test_round_to_keeps_the_plan_semantics():
    for n in range(1, 130):
        for k in range(0, 100, 7):
            s = k / 100
            for r in (1, 3, 8, 16):
                assert n_kept(n, s, round_to=r) == _legacy_keep_count(n, s, r), (n, s, r)


@pytest.mark.parametrize("n, sparsity, round_to, kept", [
    (64, 0.5, 8, 32), (64, 0.3, 8, 48), (20, 0.5, 8, 8), (12, 0.5, 8, 8), (7, 0.5, 8, 4),
    (32, 0.625, 8, 16),   # 12 kept -> 1.5 multiples -> ties to even: 16
    (40, 0.5, 8, 16),     # 20 kept -> 2.5 multiples -> ties to even: 16
    (10, 0.99, 1, 1), (10, 0.99, 4, 4), (100, 0.58, 4, 40), (100, 0.58, 8, 40),
])
def test_round_to_cases(n, sparsity, round_to, kept):
    assert n_kept(n, sparsity, round_to=round_to) == kept


def test_min_keep():
    assert n_kept(10, 1.0) == 1 and n_kept(10, 1.0, min_keep=0) == 0
    assert n_kept(10, 0.9, min_keep=3) == 3 and n_kept(2, 0.9, min_keep=3) == 2
    assert n_kept(0, 0.5) == 0


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match=r"^The 'sparsity' parameter of n_kept must be a float in "
                                          r"\[0, 1\]. Got 1.5 instead.$"):
        n_kept(10, 1.5)
    with pytest.raises(ConfigError, match="'round_to' parameter of n_kept must be an int >= 1"):
        n_kept(10, 0.5, round_to=0)
    with pytest.raises(ConfigError, match="'n' parameter of n_pruned must be an int >= 0"):
        n_pruned(-1, 0.5)
    with pytest.raises(ConfigError, match="'sparsity' parameter of n_pruned"):
        n_pruned(10, float("nan"))


def test_keep_largest_exact_count_and_ties():
    assert keep_largest(torch.tensor([0.5, 2.0, 0.5, 1.0, 0.5]), 3).tolist() == [
        True, True, False, True, False]  # among the equal 0.5s the lower index stays
    flat = torch.zeros(10)
    assert keep_largest(flat, 4).tolist() == [True] * 4 + [False] * 6
    assert int(keep_largest(torch.ones(3, 4), 5).sum()) == 5
    assert not keep_largest(torch.ones(3), 0).any() and keep_largest(torch.ones(3), 9).all()
    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, 4, (50, 20), generator=g).float()  # heavy ties
    for s in (0.1, 0.35, 0.58, 0.9):
        m = magnitude_mask(w, s)
        assert int(m.sum()) == n_kept(w.numel(), s)
        assert float(w[m].min()) >= float(w[~m].max())  # the largest are the ones kept


def test_every_user_counts_the_same():
    """The ADMM projection, the mask pruners, the channel plan and the joint budget all remove
    exactly n_pruned(n, s) on the issue's 0.58-of-100 case."""
    from graphprune.plan import keep_count
    from graphprune.training import JointBudget, LevelPruner, Sparsity

    torch.manual_seed(0)
    w = torch.randn(10, 10)
    assert int((Sparsity(0.58).project(w, "w") != 0).sum()) == 42
    assert int((Sparsity(0.58).project(torch.ones(10, 10), "w") != 0).sum()) == 42  # ties
    lin = nn.Sequential(nn.Linear(10, 10))
    p = LevelPruner(lin, [{"sparsity": 0.58}])
    p.compress()
    assert int((lin[0].weight == 0).sum()) == 58 and int(p.masks["0.weight"].sum()) == 42
    assert keep_count(100, 0.58) == 42
    jb = JointBudget(nnz_budget=0.42, bit_budget=8)  # 8 bits: no |w| in [1, 2] rounds to 0
    W = {k: torch.randn(n).sign() * (1 + torch.rand(n)) for k, n in (("a", 60), ("b", 40))}
    assert sum(int((v != 0).sum()) for v in jb.project_all(W).values()) == 42
    W = {"a": torch.ones(60), "b": torch.full((40,), 0.5)}  # ties across layers: still 42
    out = jb.project_all(W)
    assert int((out["a"] != 0).sum()) == 41 and int((out["b"] != 0).sum()) == 1  # b keeps 1
