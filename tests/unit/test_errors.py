"""Bad input gets one clear, early error from graphprune; the caller's model is unchanged."""

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.errors import (
    ConfigError, ExportError, InputError, MaskFileError, PlanError, RegistryError, TraceError,
)
from graphprune.models import lenet5, resnet20

from ..conftest import assert_mask_equivalent, assert_unchanged, snapshot

X32 = torch.randn(1, 3, 32, 32)


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, "0.5", True])
def test_sparsity_outside_range(bad):
    model = resnet20().eval()
    snap = snapshot(model)
    with pytest.raises(ConfigError) as e:
        gp.prune(model, X32, sparsity=bad)
    assert str(e.value) == (f"The 'sparsity' parameter of prune must be a float in [0, 1). "
                            f"Got {bad!r} instead.")
    assert isinstance(e.value, ValueError) and isinstance(e.value, gp.GraphPruneError)
    assert_unchanged(model, snap)


def test_unknown_method_suggests_the_nearest():
    with pytest.raises(RegistryError) as e:
        gp.prune(resnet20().eval(), X32, method="fgpm")
    msg = str(e.value)
    assert "Unknown pruning method 'fgpm'" in msg and "l1, l2" in msg
    assert "Did you mean 'fpgm'?" in msg


def test_input_that_does_not_fit_names_the_node():
    model = lenet5().eval()
    snap = snapshot(model)
    with pytest.raises(InputError) as e:
        gp.prune(model, torch.randn(1, 1, 28, 28))
    assert "fc1" in str(e.value) and "example inputs do not fit" in str(e.value)
    assert_unchanged(model, snap)
    with pytest.raises(InputError, match="positional inputs"):
        gp.trace(model, (torch.randn(1, 1, 32, 32), torch.randn(1)))
    with pytest.raises(InputError, match="must be a tensor"):
        gp.trace(model, 3)


def test_token_ids_out_of_an_embeddings_range_name_the_node():
    """Shapes are recorded on the meta device, but integer inputs are read for real."""
    from graphprune.models.llama import llama_small

    with pytest.raises(InputError, match="node 'embed'.*index out of range"):
        gp.trace(llama_small(), torch.full((1, 8), 10**6))


def test_mask_file_from_another_architecture(tmp_path):
    r = gp.prune(lenet5().eval(), torch.randn(1, 1, 32, 32), sparsity=0.5)
    p = tmp_path / "lenet.safetensors"
    gp.save_masks(r.masks, p)
    model = resnet20().eval()
    snap = snapshot(model)
    with pytest.raises(PlanError, match="does not have: conv1.bias|from another architecture"):
        gp.apply_masks(model, p, X32)
    assert_unchanged(model, snap)


def test_mask_of_wrong_width(tmp_path):
    r = gp.prune(resnet20().eval(), X32, sparsity=0.5)
    masks = dict(r.masks)
    masks["conv1.weight"] = torch.ones(8, 3, 3, 3, dtype=torch.bool)
    with pytest.raises(PlanError, match="shape"):
        gp.apply_masks(resnet20().eval(), masks, X32)


def test_unstructured_mask_is_refused():
    model = lenet5().eval()
    m = torch.ones_like(model.conv2.weight, dtype=torch.bool)
    m[0, 0, 0, 0] = False
    with pytest.raises(PlanError, match="unstructured"):
        gp.apply_masks(model, {"conv2.weight": m}, torch.randn(1, 1, 32, 32))


def test_pickle_passed_as_mask_file_is_never_unpickled(tmp_path):
    p = tmp_path / "masks.pt"
    torch.save({"conv1.weight": torch.ones(6, 1, 5, 5)}, p)
    with pytest.raises(MaskFileError, match="pickle"):
        gp.load_masks(p)

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    p2 = tmp_path / "evil.bin"
    p2.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(MaskFileError, match="never unpickles"):
        gp.load_masks(p2)


def test_corrupted_and_truncated_mask_files(tmp_path):
    r = gp.prune(lenet5().eval(), torch.randn(1, 1, 32, 32), sparsity=0.5)
    p = tmp_path / "m.safetensors"
    gp.save_masks(r.masks, p)
    data = p.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MaskFileError, match="truncated or corrupted"):
        gp.load_masks(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(MaskFileError):
        gp.load_masks(tmp_path / "junk.safetensors")
    with pytest.raises(MaskFileError, match="cannot read"):
        gp.load_masks(tmp_path / "missing.safetensors")


def test_plan_errors(tmp_path):
    r = gp.prune(lenet5().eval(), torch.randn(1, 1, 32, 32), sparsity=0.5)
    with pytest.raises(PlanError, match="does not have"):
        gp.prune(resnet20().eval(), X32, plan=r.plan)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        gp.Plan.load(bad)
    d = r.plan.to_dict()
    d["groups"]["conv2"]["keep"] = []
    with pytest.raises(PlanError, match="keeps no channel"):
        gp.prune(lenet5().eval(), torch.randn(1, 1, 32, 32), plan=gp.Plan.from_dict(d))
    d["groups"]["conv2"]["keep"] = [0, 99]
    with pytest.raises(PlanError, match="outside"):
        gp.prune(lenet5().eval(), torch.randn(1, 1, 32, 32), plan=gp.Plan.from_dict(d))
    d = r.plan.to_dict()
    d["groups"]["fc3"] = {"size": 10, "keep": [0]}
    with pytest.raises(PlanError, match="cannot be pruned: model output"):
        gp.prune(lenet5().eval(), torch.randn(1, 1, 32, 32), plan=gp.Plan.from_dict(d))


def test_config_errors():
    m = resnet20().eval()
    with pytest.raises(ConfigError, match="No prunable group matches"):
        gp.prune(m, X32, config=[{"op_names": ["nope.*"], "sparsity": 0.5}])
    with pytest.raises(ConfigError, match="Unknown key 'sparcity'.*Did you mean 'sparsity'"):
        gp.prune(m, X32, config=[{"op_types": ["Conv2d"], "sparcity": 0.5}])
    # an entry naming neither op_types nor op_names selects the default layers (as in training)
    plain = gp.prune(m, X32, config=[{"sparsity": 0.5}]).plan
    default = gp.prune(m, X32, config=[{"op_types": ["default"], "sparsity": 0.5}]).plan
    assert plain.channels == default.channels and plain.groups
    with pytest.raises(ConfigError, match="sparsity' parameter of a config list entry"):
        gp.prune(m, X32, config=[{"op_types": ["Conv2d"], "sparsity": 2}])
    with pytest.raises(ConfigError, match="Did you mean 'layer1.0.conv[12]'"):
        gp.prune(m, X32, ignore=["layer1.0.conv"])
    with pytest.raises(ConfigError, match="round_to"):
        gp.prune(m, X32, round_to=0)


def test_not_a_module_and_untraceable_root():
    with pytest.raises(TraceError, match="must be a torch.nn.Module"):
        gp.trace(lambda x: x, X32)

    class Dyn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow in the root itself
                return self.c(x)
            return x

    with pytest.raises(TraceError, match="could not trace Dyn"):
        gp.trace(Dyn(), X32, tracer="fx")
    # auto falls back to the submodules that trace, as regions: the conv feeds the output
    g = gp.trace(Dyn(), X32.abs())
    assert g.tracer == "regions" and not g.prunable_groups
    with pytest.raises(TraceError, match="could not trace Dyn(.|\n)*no submodule of Dyn"):
        gp.trace(Dyn(), -X32.abs())  # the conv never runs: nothing to capture


class SamePad(nn.Module):
    """Shape-dependent Python control flow: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3)

    def forward(self, x):
        if x.shape[-1] % 2:
            x = F.pad(x, (1, 1, 1, 1))
        else:
            x = F.pad(x, (1, 1, 1, 1))
        return self.conv(x)


class WithOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.same = SamePad()
        self.b = nn.Conv2d(8, 16, 1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(self.same(F.relu(self.a(x))))))


def test_untraceable_submodule_becomes_an_opaque_leaf():
    model = WithOpaque().eval()
    g = gp.trace(model, X32, tracer="fx")
    assert "same" in g.leaves and "TraceError" in g.leaves["same"]
    assert not g.group("a").prunable and "could not be traced" in g.group("a").reason
    assert g.group("b").prunable
    r = gp.prune(model, X32, sparsity=0.5, tracer="fx")
    assert r.model.b.out_channels == 8 and r.model.same.conv.out_channels == 8


def test_auto_tracer_sees_through_the_opaque_leaf_with_torch_export():
    model = WithOpaque().eval()
    g = gp.trace(model, X32)
    assert g.tracer == "torch.export" and "same" in g.tracer_reason
    assert g.group("a").prunable and g.group("same.conv").prunable
    r = gp.prune(model, X32, sparsity=0.5)
    assert r.model.a.out_channels == 4 and r.model.same.conv.in_channels == 4
    assert_mask_equivalent(model, r, X32)


def test_export_to_unwritable_place_leaves_nothing(tmp_path):
    model = lenet5().eval()
    x = torch.randn(1, 1, 32, 32)
    with pytest.raises(ExportError, match="does not exist"):
        gp.export_onnx(model, x, tmp_path / "no" / "dir" / "m.onnx", exporter="legacy")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ExportError):
        gp.export_onnx(model, x, f / "m.onnx", exporter="legacy")
    with pytest.raises(ConfigError, match="exporter"):
        gp.export_onnx(model, x, tmp_path / "m.onnx", exporter="torchscript")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
