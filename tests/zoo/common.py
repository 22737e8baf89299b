"""The properties every architecture must satisfy after pruning."""

import copy
import gc

import torch

import graphprune as gp
from graphprune.apply.shrink import verify_layers

from ..conftest import assert_mask_equivalent, assert_same_state


def check_prunes(model, x, sparsity, method="random", seed=0, equivalence=None):
    """Forward works, output shape unchanged, params and MACs strictly decrease, apply_masks on a
    fresh copy reproduces the pruned model exactly, and (for models whose channels are
    independent in value) the masked original computes what the shrunk model computes."""
    fresh = copy.deepcopy(model)
    r = gp.prune(model, x, sparsity=sparsity, method=method, seed=seed)
    with torch.no_grad():
        y0, y1 = model(x), r.model(x)
    assert y1.shape == y0.shape
    # the default check passes too (layer boundaries; stock layers stand in where the shapes were
    # recorded on meta tensors), not only the full re-trace the tests run with
    verify_layers(r.graph, r.model, r._applied.shapes)
    assert r.report.params[1] < r.report.params[0], "no parameter was removed"
    assert r.report.macs[1] < r.report.macs[0], "no MAC was removed"
    rebuilt = gp.apply_masks(fresh, r.masks, x, inplace=True)
    del fresh
    assert_same_state(rebuilt, r.model)
    del rebuilt  # the zoo holds models of 600M parameters: keep at most ~4 copies alive
    gc.collect()
    pruned = {g.name for g in r.graph.groups if g.name in r.plan.groups}
    coupled = any(g.value_coupled for g in r.graph.groups if g.name in pruned)
    if equivalence is None:
        equivalence = not coupled
    if equivalence:
        assert_mask_equivalent(model, r, x)
    return r
