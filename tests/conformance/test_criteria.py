"""Conformance of every registered criterion (``graphprune.list_criteria()``, read at collection
time, so a criterion registered later is checked too) on three small nets with calibration data:

- a score criterion returns one finite float per unit of every prunable group, is a pure
  function (model untouched, no hook left behind) and is deterministic for a fixed seed;
- every criterion, score or selector, prunes through ``graphprune.prune`` to exactly the
  requested channel counts, deterministically, and the pruned model runs with the same output
  shape.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphprune as gp
from graphprune.calibration import as_calibration
from graphprune.criteria import Criterion, ScoreContext, get_criterion, score_group
from graphprune.plan import keep_count

from ..conftest import assert_unchanged, healthy_init, snapshot
from .nets import CRITERIA_NETS

CRITERIA = sorted(gp.list_criteria())
SCORERS = [n for n in CRITERIA if get_criterion(n).kind == "score"]
NETS = sorted(CRITERIA_NETS)
SPARSITY = 0.5


def _model(net: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return healthy_init(CRITERIA_NETS[net][0]().eval())


def _context(graph: gp.ChannelGraph, net: str, seed: int = 0) -> ScoreContext:
    _, x, calib = CRITERIA_NETS[net]
    return ScoreContext(params=graph.params, rng=np.random.default_rng(seed),
                        calibration=as_calibration(calib, x), graph=graph)


def check_scores(crit: Criterion, graph: gp.ChannelGraph, ctx: ScoreContext) -> dict[str, np.ndarray]:
    """The criterion's raw output for every prunable group: one finite real per unit."""
    out = {}
    for g in graph.prunable_groups:
        raw = np.asarray(crit.fn(g, ctx))
        assert raw.dtype.kind in "biuf", \
            f"criterion '{crit.name}' returned {raw.dtype} scores for group '{g.name}'"
        raw = raw.astype(np.float64).ravel()
        assert raw.shape == (g.size,), \
            f"criterion '{crit.name}' returned {raw.size} scores for group '{g.name}' of {g.size} units"
        assert np.all(np.isfinite(raw)), \
            f"criterion '{crit.name}' returned non-finite scores for group '{g.name}': {raw}"
        checked = score_group(crit, g, ctx)
        assert checked.shape == (g.size,) and checked.dtype == np.float64
        out[g.name] = raw
    return out


def _no_hooks(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("name", SCORERS)
def test_score_criterion_gives_one_finite_score_per_unit_and_is_deterministic(name, net):
    crit = get_criterion(name)
    model = _model(net)
    x = CRITERIA_NETS[net][1]
    snap = snapshot(model)
    graph = gp.trace(model, x)
    assert graph.prunable_groups, f"net '{net}' has nothing to score"
    first = check_scores(crit, graph, _context(graph, net))
    assert_unchanged(model, snap)  # a criterion is a pure function of the model...
    assert not _no_hooks(model), f"criterion '{name}' left hooks on {_no_hooks(model)}"
    # ... and of the seed: a fresh graph and context give the same scores
    again = check_scores(crit, gp.trace(model, x), _context(gp.trace(model, x), net))
    assert first.keys() == again.keys()
    for g in first:
        np.testing.assert_array_equal(first[g], again[g], err_msg=f"'{name}' on group '{g}'")


def _expected_counts(graph: gp.ChannelGraph) -> dict[str, int]:
    return {g.name: keep_count(g.size, SPARSITY) for g in graph.prunable_groups}


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("name", CRITERIA)
def test_every_criterion_prunes_to_exactly_the_requested_counts(name, net):
    model = _model(net)
    _, x, calib = CRITERIA_NETS[net]
    snap = snapshot(model)
    r = gp.prune(model, x, method=name, calibration=calib, sparsity=SPARSITY, seed=3)
    assert_unchanged(model, snap)
    want = _expected_counts(r.graph)
    got = {k: len(g.keep) for k, g in r.plan.groups.items()}
    assert got == {k: v for k, v in want.items() if v < r.graph.group(k).size}, \
        f"method '{name}' kept {got}, asked for {want}"
    for g in r.plan.groups.values():
        assert list(g.keep) == sorted(set(g.keep)) and 0 <= g.keep[0] and g.keep[-1] < g.size
    assert r.report.params[1] < r.report.params[0]
    with torch.no_grad():
        y0, y1 = model(x), r.model(x)
    assert y1.shape == y0.shape and torch.isfinite(y1).all()
    # the same seed chooses the same channels
    again = gp.prune(model, x, method=name, calibration=calib, sparsity=SPARSITY, seed=3)
    assert again.plan.groups == r.plan.groups, f"method '{name}' is not deterministic"


def test_selectors_are_covered():
    """lasso and greedy are registered as selectors (the brief of this suite names them)."""
    kinds = {n: get_criterion(n).kind for n in CRITERIA}
    assert {"lasso", "greedy"} <= {n for n, k in kinds.items() if k == "select"}
    assert set(kinds.values()) <= {"score", "select"}
    for n in CRITERIA:
        assert isinstance(get_criterion(n).needs_data, bool)


@pytest.mark.parametrize("bad,what", [
    (lambda g, ctx: np.full(g.size, np.nan), "non-finite"),
    (lambda g, ctx: np.ones(g.size + 1), "scores for group"),
    (lambda g, ctx: np.full(g.size, np.inf), "non-finite"),
])
def test_the_checks_reject_a_broken_criterion(bad, what):
    """The oracle itself: a criterion returning NaN, inf or the wrong length is caught."""
    model = _model("mlp")
    graph = gp.trace(model, CRITERIA_NETS["mlp"][1])
    with pytest.raises(AssertionError, match=what):
        check_scores(Criterion("broken", bad), graph, _context(graph, "mlp"))
