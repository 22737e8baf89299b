"""torch.einsum: the channel rule read from the equation, on single ops and on a ViT whose
attention is written with einsum (whole heads go, under torch.fx and torch.export)."""

import copy

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.rules.einsum import EquationError, einsum_macs, parse_equation

from ..conftest import assert_mask_equivalent, assert_same_state


def test_parse_equation_expands_ellipsis_and_the_implicit_output():
    assert parse_equation("bhnd,bhmd->bhnm", [4, 4]) == (
        [list("bhnd"), list("bhmd")], list("bhnm"))
    assert parse_equation("b...d,de->b...e", [4, 2]) == (
        [["b", ".0", ".1", "d"], ["d", "e"]], ["b", ".0", ".1", "e"])
    # implicit output: broadcast dims, then the letters seen once, sorted (uppercase first)
    assert parse_equation("...ij,jk", [3, 2]) == ([[".0", "i", "j"], ["j", "k"]], [".0", "i", "k"])
    assert parse_equation("ba,Ab", [2, 2])[1] == ["A", "a"]
    with pytest.raises(EquationError, match="does not fit a 3-dim operand"):
        parse_equation("ij,jk", [3, 2])
    with pytest.raises(EquationError, match="names one no operand has"):
        parse_equation("ij->iz", [2])
    assert einsum_macs("bhnd,bhmd->bhnm", [(2, 4, 6, 8), (2, 4, 5, 8)]) == 2 * 4 * 6 * 8 * 5
    assert einsum_macs("ij->ji", [(3, 4)]) == 0


class Weight(nn.Module):
    def __init__(self, *shape):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(*shape) / shape[-1])


class Bilinear(nn.Module):
    """y_o = sum_ij a_i W_oij b_j: both inputs' channels are consumed by W, W produces o."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 5)
        self.w = Weight(8, 6, 5)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.einsum("bi,bj,oij->bo", self.a(x), self.b(x), self.w.weight))


class BatchedMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.v = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(4, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):  # (B, N, 4)
        s = torch.einsum("bnc,bmc->bnm", self.a(x), self.b(x)).softmax(-1)
        return self.fc(torch.einsum("bnm,bmc->bnc", s, self.v(x)))


class Outer(nn.Module):
    """An outer product keeps both operands' channels on separate dims; the sublist form of
    einsum contracts them with a weight."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 5)
        self.w = Weight(3, 6, 5)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        outer = torch.einsum("bi,bj->bij", self.a(x), self.b(x))
        return self.fc(torch.einsum(outer, [0, 1, 2], self.w.weight, [3, 1, 2], [0, 3]))


def _names(g):
    return {gr.name: gr for gr in g.groups}


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_bilinear_couples_each_input_with_its_weight_dim(tracer):
    torch.manual_seed(0)
    m, x = Bilinear().eval(), torch.randn(3, 4)
    g = _names(gp.trace(m, x, tracer=tracer))
    assert g["a"].prunable and g["a"].size == 6 and g["b"].prunable and g["b"].size == 5
    assert {"a.weight[out]", "w.weight[in]"} <= {mm.label() for mm in g["a"].members}
    assert {"b.weight[out]", "w.weight[in]"} <= {mm.label() for mm in g["b"].members}
    assert g["w"].prunable and g["w"].size == 8  # W produces o, consumed by fc
    assert {mm.label() for mm in g["w"].members} == {"w.weight[out]", "fc.weight[in]"}
    r = gp.prune(m, x, sparsity=0.5, method="l1", tracer=tracer)
    assert r.model.w.weight.shape == (4, 3, 3) and r.model.fc.in_features == 4
    assert_mask_equivalent(m, r, x)


def test_batched_matmul_and_outer_product_prune_exactly():
    torch.manual_seed(0)
    m, x = BatchedMatmul().eval(), torch.randn(2, 5, 4)
    g = _names(gp.trace(m, x))
    # the contracted c of a and b goes together; v's channels pass to the output
    assert {"a.weight[out]", "b.weight[out]"} <= {mm.label() for mm in g["a"].members}
    assert g["a"].prunable and g["v"].prunable
    r = gp.prune(m, x, sparsity=0.5, method="l1")
    assert r.model.a.out_features == r.model.b.out_features == 3 and r.model.v.out_features == 4
    assert_mask_equivalent(m, r, x)

    m, x = Outer().eval(), torch.randn(3, 4)
    g = _names(gp.trace(m, x))
    assert g["a"].prunable and g["b"].prunable and g["w"].prunable
    r = gp.prune(m, x, sparsity=0.5, method="l1")
    assert r.model.w.weight.shape == (2, 3, 3)
    assert_mask_equivalent(m, r, x)


class OneOperand(nn.Module):
    def __init__(self, eq):
        super().__init__()
        self.eq = eq
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        square = torch.einsum("bi,bj->bij", self.a(x), self.b(x))
        y = torch.einsum(self.eq, square)
        return self.fc(y if y.dim() == 2 else y[:, None] * torch.ones(1, 6))


@pytest.mark.parametrize("eq, why", [
    ("bii->bi", "repeats a letter in one operand (a diagonal)"),
    ("bii->b", "repeats a letter in one operand (a diagonal)"),
    ("bij->bi", "sums over channels of one operand"),
])
def test_diagonal_trace_and_sums_freeze_with_the_reason(eq, why):
    m = OneOperand(eq).eval()
    g = _names(gp.trace(m, torch.randn(2, 4), tracer="export"))
    frozen = g["b"] if "j" in eq else g["a"]
    assert not frozen.prunable and why in frozen.reason and f"einsum '{eq}'" in frozen.reason


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(torch.einsum("bi,i->bi", self.a(x), torch.arange(6.0)))


def test_an_operand_of_fixed_size_pins_the_channels_it_meets():
    g = _names(gp.trace(Scaled().eval(), torch.randn(2, 4)))
    assert not g["a"].prunable and "combines channels with a tensor of fixed size" in g["a"].reason


# ---------------------------------------------------------------- a ViT written with einsum
class EinsumAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).reshape(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)
        k = self.k(x).reshape(B, N, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(B, N, self.heads, self.head_dim).transpose(1, 2)
        a = torch.einsum("bhnd,bhmd->bhnm", q, k) * self.head_dim ** -0.5
        y = torch.einsum("bhnm,bhmd->bhnd", a.softmax(-1), v)
        return self.out(y.transpose(1, 2).reshape(B, N, -1))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = EinsumAttention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.fc2(torch.relu(self.fc1(self.n2(x))))


class EinsumViT(nn.Module):
    def __init__(self, dim=32, heads=4, depth=2, classes=5, patch=4):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_einsum_vit_loses_whole_heads(tracer, tmp_path):
    torch.manual_seed(0)
    m, x = EinsumViT().eval(), torch.randn(2, 3, 16, 16)
    g = _names(gp.trace(m, x, tracer=tracer))
    heads = g["blocks.0.attn.q"]
    assert heads.prunable and heads.size == 4  # units are heads
    assert {"blocks.0.attn.k.weight[out]", "blocks.0.attn.v.weight[out]",
            "blocks.0.attn.out.weight[in]"} <= {mm.label() for mm in heads.members}
    fresh = copy.deepcopy(m)
    r = gp.prune(m, x, sparsity=0.5, method="l1", ignore=["embed"], tracer=tracer)
    for blk in r.model.blocks:
        attn = blk.attn
        assert attn.q.out_features == attn.k.out_features == attn.v.out_features == 16
        assert attn.out.in_features == 16 and attn.heads == 2 and attn.head_dim == 8
    assert r.report.params[1] < 0.75 * r.report.params[0]
    assert_mask_equivalent(m, r, x)
    assert_same_state(gp.apply_masks(fresh, r.masks, x, inplace=True), r.model)
    res = gp.export_onnx(r.model, x, tmp_path / "vit.onnx", exporter="legacy")
    assert res.max_rel_err < 1e-4
