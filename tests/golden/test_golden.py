"""Exact bytes of a plan JSON and a mask file: the formats are stable and deterministic."""

import os

import torch

import graphprune as gp

from .golden_model import HERE, golden_lenet, golden_result


def test_plan_json_is_exactly_the_golden_file(tmp_path):
    r = golden_result()
    p = tmp_path / "plan.json"
    r.plan.save(p)
    with open(os.path.join(HERE, "lenet5_plan.json"), "rb") as f:
        assert p.read_bytes() == f.read()


def test_mask_file_bytes_are_exactly_the_golden_file(tmp_path):
    r = golden_result()
    p = tmp_path / "m.safetensors"
    gp.save_masks(r.masks, p, plan=r.plan)
    with open(os.path.join(HERE, "lenet5_masks.safetensors"), "rb") as f:
        golden = f.read()
    assert p.read_bytes() == golden
    gp.save_masks(r.masks, p, plan=r.plan)  # and again: deterministic
    assert p.read_bytes() == golden


def test_golden_mask_file_reads_with_the_official_library_and_rebuilds():
    from safetensors.torch import load_file

    path = os.path.join(HERE, "lenet5_masks.safetensors")
    official = load_file(path)
    ours = gp.load_masks(path)
    assert set(official) == set(ours)
    for k in ours:
        assert official[k].dtype == torch.bool and torch.equal(official[k], ours[k])
    model = gp.apply_masks(golden_lenet(), path, torch.zeros(1, 1, 32, 32))
    assert (model.conv1.out_channels, model.conv2.out_channels) == (3, 8)
    assert (model.fc1.in_features, model.fc1.out_features, model.fc2.out_features) == (200, 60, 42)
