"""Conformance of every channel rule: each registered module class and each function / method
op prunes correctly on a one-op net (producer -> op -> consumer: ``cases.py``, with the
tables in ``module_cases.py`` and ``op_cases.py``).

The oracle, for ``prune(net, x, sparsity=0.5, method="random", strict=True, verify="full")``
(a crashing rule fails the case; every intermediate shape of the pruned model is checked):

- the case really exercises the op (it is in the traced graph);
- some group shrinks (or, for the cases that must freeze, nothing the op touches does, with a
  reason naming the op);
- the pruned model runs and keeps its output shape; for module cases and value-coupled ones,
  ``apply_masks`` on a fresh copy rebuilds it exactly;
- where the pruned channels are independent in value, the masked original computes what the
  shrunk model computes, for that plan and for one keeping a random number of random channels
  per group (a coupling a rule forgot splits a group in two, which a uniform sparsity would keep
  in step by luck); where some group is value-coupled (LayerNorm, RMSNorm, a transformer's
  residual stream), that holds for the plan restricted to the other groups.

Every module class with a rule (``torch.nn`` classes, and classes of optional libraries that are
installed) and every non-ATen op must have a case or an exemption with a reason, so a new rule
without a conformance case fails here.
ATen rules are exercised by running a selection of the same nets through ``tracer="export"``.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util

import numpy as np
import pytest
import torch
import torch.fx as fx

import graphprune as gp
from graphprune.plan import plan_from_scores
from graphprune.rules import registered

from ..conftest import assert_same_state, masked_copy, rel_err
from .cases import Case, build, example_inputs
from .module_cases import MODULE_CASES, MODULE_EXEMPT
from .op_cases import FREEZE_CASES, KNOWN_WRONG, OP_CASES, OP_EXEMPT, OP_XFAIL


def op_name(node: fx.Node) -> str | None:
    """The name ``registered()`` gives the op a node calls."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op != "call_function":
        return None
    t = node.target
    mod = getattr(t, "__module__", None) or ""
    return f"{mod}.{getattr(t, '__name__', str(t))}".lstrip(".")


def _called(graph: gp.ChannelGraph) -> tuple[set[str], set[type]]:
    ops, mods = set(), set()
    for t in graph.traced:
        for node in t.graph.nodes:
            if node.op == "call_module":
                mods.add(type(graph.modules[node.target]))
            elif (name := op_name(node)) is not None:
                ops.add(name)
    return ops, mods


def _run(model: torch.nn.Module, xs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*xs)


def _inputs(xs: tuple):
    return xs[0] if len(xs) == 1 else xs


def check_case(case: Case, key: str | type | None, tracer: str = "fx") -> gp.PruneResult:
    """The oracle of the module docstring; returns the prune result."""
    net, xs = build(case), example_inputs(case)
    fresh = copy.deepcopy(net)
    r = gp.prune(net, _inputs(xs), sparsity=0.5, method="random", seed=1, tracer=tracer,
                 strict=True, verify="full")  # a crashing rule fails; every value's shape checked
    ops, mods = _called(r.graph)
    if tracer == "fx" and key is not None:
        exercised = any(issubclass(m, key) for m in mods) if isinstance(key, type) else key in ops
        assert exercised, f"the case does not call {key}: the graph calls {sorted(ops)}"
    reasons = [g.reason for g in r.graph.groups if not g.prunable]
    if case.freezes is not None:
        assert any(case.freezes in (why or "") for why in reasons), \
            f"expected a group frozen for '{case.freezes}', got {reasons}"
    shrunk = [k for k, g in r.plan.groups.items() if len(g.keep) < g.size]
    if case.prunes:
        assert shrunk and r.report.params[1] < r.report.params[0], \
            f"nothing was pruned: {[str(g) for g in r.graph.groups]}"
    else:
        assert not shrunk, f"groups {shrunk} were pruned though the op must freeze them"
    y0, y1 = _run(net, xs), _run(r.model, xs)
    assert y1.shape == y0.shape and torch.isfinite(y1).all()
    coupled = {g.name for g in r.graph.groups if g.value_coupled}
    if isinstance(key, type) or coupled:  # ops whose channels are independent: the oracle below
        assert_same_state(gp.apply_masks(fresh, r.masks, _inputs(xs)), r.model)
    if not coupled & set(shrunk):
        _assert_equivalent(net, r, xs)
        if shrunk:
            _assert_equivalent(net, gp.apply_plan(r.graph, _uneven_plan(r.graph), verify=True), xs)
        return r
    # value-coupled groups: the masked original differs by design; the others must still match
    rest = gp.Plan({k: g for k, g in r.plan.groups.items() if k not in coupled}, r.plan.meta)
    if any(len(g.keep) < g.size for g in rest.groups.values()):
        _assert_equivalent(net, gp.prune(net, _inputs(xs), plan=rest, tracer=tracer), xs)
    return r


def _uneven_plan(graph: gp.ChannelGraph, seed: int = 2) -> gp.Plan:
    """Random channels, a random count per group: channels a rule forgot to couple end up in
    groups of their own, and a uniform sparsity would keep them in step by luck."""
    rng = np.random.default_rng(seed)
    amounts = {g.name: int(rng.integers(1, g.size)) for g in graph.prunable_groups if g.size > 1}
    scores = {n: rng.random(graph.group(n).size) for n in amounts}
    return plan_from_scores(graph, scores, amounts, {"method": "uneven"})


def _assert_equivalent(model: torch.nn.Module, r, xs: tuple) -> None:
    """``r``: a PruneResult or apply_plan's result (both have ``model`` and ``masks``)."""
    want, got = _run(masked_copy(model, r.masks), xs), _run(r.model, xs)
    assert got.shape == want.shape
    err = rel_err(got, want)
    assert err < 1e-5, f"shrunk model differs from the masked original by {err:.2e}"


def _resolve(qualname: str) -> type:
    mod, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(mod), name)


def _is_aten(name: str) -> bool:
    return name.startswith("torch._ops.")


# ---------------------------------------------------------------------- modules
def _installed(qualname: str) -> bool:
    return importlib.util.find_spec(qualname.split(".")[0]) is not None


@pytest.mark.parametrize("key", list(MODULE_CASES),
                         ids=lambda k: k if isinstance(k, str) else k.__name__)
def test_module_rule(key):
    check_case(MODULE_CASES[key], _resolve(key) if isinstance(key, str) else key)


def test_every_registered_module_class_has_a_case():
    """graphprune's own rules (torch.nn classes, and classes of optional libraries that are
    installed here, registered by dotted name) each have a one-op case."""
    have = tuple(_resolve(k) if isinstance(k, str) else k for k in MODULE_CASES)
    missing = []
    for qualname in registered()["modules"]:
        if qualname in MODULE_EXEMPT or not _installed(qualname):
            continue
        cls = _resolve(qualname)
        if not any(issubclass(k, cls) for k in have):
            missing.append(qualname)
    assert not missing, ("module classes with a channel rule but no conformance case: add them to "
                         f"MODULE_CASES (or MODULE_EXEMPT with a reason) in module_cases.py: {missing}")


def test_every_case_is_a_registered_module_class():
    from graphprune.rules.registry import module_rule_for

    classes = [_resolve(k) if isinstance(k, str) else k for k in MODULE_CASES]
    stale = [c.__name__ for c in classes if module_rule_for(object.__new__(c)) is None]
    assert not stale, f"cases for classes that have no rule: {stale}"
    known = set(registered()["modules"])
    assert set(MODULE_EXEMPT) <= known, set(MODULE_EXEMPT) - known


# ---------------------------------------------------------------------- functions and methods
def _params(names, xfail: dict[str, str], raises: dict[str, type] | None = None) -> list:
    """``names`` as parameters, those in ``xfail`` marked xfail(strict=True) with their reason
    (failing with an AssertionError of the oracle unless ``raises`` says otherwise)."""
    raises = raises or {}
    return [pytest.param(n, marks=pytest.mark.xfail(
        strict=True, reason=xfail[n], raises=raises.get(n, AssertionError))) if n in xfail else n
        for n in names]


@pytest.mark.parametrize("name", _params(OP_CASES, OP_XFAIL))
def test_op_rule(name):
    check_case(OP_CASES[name], name)


def test_every_registered_op_has_a_case():
    ops = [o for o in registered()["ops"] if not _is_aten(o)]
    missing = [o for o in ops if o not in OP_CASES and o not in OP_EXEMPT]
    assert not missing, ("ops with a channel rule but no conformance case: add them to OP_CASES "
                         f"(or OP_EXEMPT with a reason) in op_cases.py: {missing}")
    stale = sorted((set(OP_CASES) | set(OP_EXEMPT)) - set(ops))
    assert not stale, f"cases for ops that have no rule: {stale}"


@pytest.mark.parametrize("what", list(FREEZE_CASES))
def test_ops_that_cannot_follow_pruning_freeze(what):
    check_case(FREEZE_CASES[what], None)


@pytest.mark.parametrize("what", [
    pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=v[2], raises=AssertionError))
    for k, v in KNOWN_WRONG.items()])
def test_known_silent_mismatches(what):
    case, key, _ = KNOWN_WRONG[what]
    check_case(case, key)


# ---------------------------------------------------------------------- the ATen rules
EXPORT_MODULES = [getattr(torch.nn, n) for n in (
    "Conv1d", "Conv3d", "Linear", "Embedding", "BatchNorm1d", "BatchNorm2d", "GroupNorm",
    "LayerNorm", "ReLU", "ELU", "GELU", "Hardswish", "Hardsigmoid", "Sigmoid", "Tanh", "Softmax",
    "Dropout", "MaxPool2d", "AvgPool1d", "AvgPool2d", "AdaptiveAvgPool2d", "Upsample",
    "UpsamplingNearest2d", "ZeroPad2d", "Flatten", "MultiheadAttention", "LSTM", "GRU", "RNN",
    "LSTMCell", "GRUCell", "RNNCell")]
EXPORT_OPS = [
    "torch.cat", "torch.stack", "torch.chunk", "Tensor.split_with_sizes", "torch.unbind",
    "_operator.getitem", "Tensor.view", "Tensor.expand", "Tensor.permute", "Tensor.transpose",
    "Tensor.unflatten", "Tensor.squeeze", "Tensor.unsqueeze", "Tensor.repeat", "torch.mean",
    "torch.amax", "torch.std", "torch.var", "torch.sum", "Tensor.sqrt", "Tensor.rsqrt",
    "torch.exp", "torch.erf", "Tensor.abs", "torch.maximum", "_operator.truediv", "_operator.sub",
    "Tensor.pow", "torch.where", "torch.nn.functional.pad", "torch.constant_pad_nd",
    "torch.nn.functional.interpolate",
    "torch.nn.functional.softmax", "torch.nn.functional.log_softmax", "torch.nn.functional.layer_norm",
    "torch.nn.functional.group_norm", "torch.nn.functional.batch_norm", "torch._C._nn.linear",
    "torch.conv1d", "torch.conv2d", "torch.nn.functional.max_pool1d", "torch.max_pool2d",
    "torch.nn.functional.adaptive_max_pool2d", "torch.bmm", "torch.matmul",
    "torch._C._nn.scaled_dot_product_attention", "torch.nn.functional.hardtanh",
    "torch._C._nn.leaky_relu", "torch._C._nn.mish", "torch._C._nn.softplus",
    "torch.nn.functional.relu6", "torch.nn.functional.silu", "Tensor.clamp", "Tensor.to",
    "torch.neg", "torch.sin", "torch.cos", "Tensor.log", "Tensor.reciprocal", "torch.square",
    "torch.minimum", "Tensor.masked_fill", "torch.t", "Tensor.split", "torch.amin", "Tensor.clone",
    "Tensor.sigmoid_", "Tensor.relu_", "Tensor.add_", "Tensor.mul_", "Tensor.sub_", "Tensor.div_",
    "Tensor.clamp_", "torch.concat", "_operator.mul", "_operator.pow", "Tensor.half",
]
EXPORT_CASES = {**{c.__name__: (MODULE_CASES[c], c) for c in EXPORT_MODULES},
                **{n: (OP_CASES[n], n) for n in EXPORT_OPS}}
EXPORT_XFAIL = {
    **{n: f"torch.export emits aten.{n[6:]}.dim for torch.{n[6:]}(x, dim), which has no rule (only "
          f"aten.{n[6:]}.correction is registered): the channels freeze"
       for n in ("torch.std", "torch.var")},
}


@pytest.mark.parametrize("name", _params(EXPORT_CASES, EXPORT_XFAIL))
def test_aten_rules_through_torch_export(name):
    case, key = EXPORT_CASES[name]
    r = check_case(case, key, tracer="export")
    assert r.graph.tracer == "torch.export"
    ops, _ = _called(r.graph)
    aten = {o for o in ops if _is_aten(o)}
    assert aten, f"the export graph calls no ATen op: {sorted(ops)}"


def test_export_selection_is_a_subset_of_the_cases():
    assert all(c in MODULE_CASES for c in EXPORT_MODULES)
    assert all(n in OP_CASES for n in EXPORT_OPS)
