"""Shared helpers: healthy random init, the mask-equivalence oracle, exact state comparison."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.probe import masked_copy

# a rule that crashes fails the test suite; every intermediate shape of a pruned model is checked
gp.set_checks(strict=True, verify="full")
torch.set_num_threads(1)


def healthy_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random init that keeps activations alive: BN stats/affine randomised, zero-initialised
    layers (ViT heads, zero-gamma residuals) given small random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.affine:
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            for name, p in m.named_parameters(recurse=False):
                if p.numel() and bool((p == 0).all()) and name == "weight":
                    p.normal_(0, 0.02, generator=g)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_mask_equivalent(model: nn.Module, result, x, rtol: float = 1e-5) -> None:
    """The oracle: the original model with its masks applied as zeros computes what the
    physically shrunk model computes."""
    ref = masked_copy(model, result.masks).eval()
    with torch.no_grad():
        want = ref(x)
        got = result.model.eval()(x)
    assert got.shape == want.shape
    err = rel_err(got, want)
    assert err < rtol, f"shrunk model differs from the masked original by {err:.2e}"


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k


def snapshot(model: nn.Module) -> dict:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "modes": [m.training for m in model.modules()]}


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    sd = model.state_dict()
    assert list(sd) == list(snap["state"])
    for k, v in snap["state"].items():
        assert torch.equal(sd[k], v), f"caller's model changed: {k}"
    assert [m.training for m in model.modules()] == snap["modes"]


@pytest.fixture
def tmpdir_path(tmp_path):
    return str(tmp_path)
