"""A channel rule that crashes: with strict checks off its channels are frozen with a reason
naming the failure and the rest of the model still prunes; with strict checks on, a
GraphPruneError names the node (``graphprune.checking``, ``graphprune/_checks.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.rules import registry

from ..conftest import assert_mask_equivalent, healthy_init


class Opaque(nn.Module):
    """A custom module fx cannot trace into (Python control flow on a shape): it becomes a leaf,
    and its registered rule, if any, describes it."""

    def forward(self, x):
        if x.shape[1] > 0:
            return x * 2.0
        return x


class Net(nn.Module):
    """c1 -> mid (the module or op under test) -> c2, plus an independent branch d1 -> d2."""

    def __init__(self, use_op: bool):
        super().__init__()
        self.use_op = use_op
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.mid = Opaque()
        self.d1, self.d2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        h = self.c1(x)
        h = torch.cumsum(h, 2) if self.use_op else self.mid(h)
        return self.c2(h) + self.d2(F.relu(self.d1(x)))


X = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def restore_rules():
    """Whatever a test registers is gone afterwards."""
    tables = [v for k, v in vars(registry).items() if k.startswith("_")
              and isinstance(v, (dict, set))]  # _MODULES, _CALLABLES, _RESIZERS, ...
    saved = [v.copy() for v in tables]
    yield
    for t, s in zip(tables, saved):
        t.clear()
        t.update(s)


def _crash(b, node, m=None):
    raise RuntimeError("boom in the test rule")


def _garbage(b, node, m=None):
    return "not a channel info"


CASES = {
    # (how the rule is registered, what a frozen reason / strict error must contain)
    "module rule raises": (lambda: registry.module_rule(Opaque)(_crash),
                           False, "Opaque 'mid'", "boom in the test rule"),
    "module rule returns garbage": (lambda: registry.module_rule(Opaque)(_garbage),
                                    False, "Opaque 'mid'", "rule produced"),
    "op rule raises": (lambda: registry.op_rule(torch.cumsum)(_crash),
                       True, "torch.cumsum", "boom in the test rule"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_crashing_rule_freezes_its_channels_when_not_strict(case, restore_rules):
    register, use_op, op, why = CASES[case]
    register()
    model = healthy_init(Net(use_op).eval())
    node = "cumsum" if use_op else "mid"
    with gp.checking(strict=False):
        g = gp.trace(model, X)
        c1 = g.group("c1")
        assert not c1.prunable
        assert f"the channel rule for {op} failed at node '{node}'" in c1.reason and why in c1.reason
        assert g.group("d1").prunable
        assert node in sum(g.unsupported.values(), [])
        r = gp.prune(model, X, sparsity=0.5)
    assert r.plan.channels == {"d1": (6, 3)}
    assert r.model.c1.out_channels == 8 and r.model.d1.out_channels == 3
    assert_mask_equivalent(model, r, X)


@pytest.mark.parametrize("case", list(CASES))
def test_a_crashing_rule_raises_naming_the_node_when_strict(case, restore_rules):
    register, use_op, op, why = CASES[case]
    register()
    model = Net(use_op).eval()
    node = "cumsum" if use_op else "mid"
    with gp.checking(strict=True):
        with pytest.raises(gp.GraphPruneError, match=f"failed at node '{node}'") as e:
            gp.trace(model, X)
        assert op in str(e.value) and why in str(e.value)
        with pytest.raises(gp.GraphPruneError, match=f"failed at node '{node}'"):
            gp.prune(model, X, sparsity=0.5)
        # an explicit argument wins over the context
        assert not gp.trace(model, X, strict=False).group("c1").prunable
    with gp.checking(strict=False):
        with pytest.raises(gp.GraphPruneError, match=f"failed at node '{node}'"):
            gp.prune(model, X, sparsity=0.5, strict=True)


def test_the_fixture_restores_the_registry(restore_rules):
    """Without a rule the opaque module freezes its inputs as untraceable, not as a crash."""
    assert registry.module_rule_for(Opaque()) is None
    g = gp.trace(Net(False).eval(), X)
    assert not g.group("c1").prunable and "could not be traced" in g.group("c1").reason
