"""The settings added to PruneConfig for latency targets and devices: validation (the sentence
asserted verbatim), the command-line options generated from them, and the device plumbing of
prune on the CPU (the GPU path is the same code: the model copy, the inputs and the data-driven
work go where ``device`` says)."""

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.cli import build_parser
from graphprune.config import PruneConfig, cli_message, given_options
from graphprune.errors import ConfigError
from tests.conftest import assert_unchanged, snapshot


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.Conv2d(24, 40, 3, padding=1), nn.BatchNorm2d(40), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(40, 5)).eval()


X = torch.randn(2, 3, 16, 16)
CALIB = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _error(**kw) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        PruneConfig(**kw)
    return e.value


@pytest.mark.parametrize("kw,msg", [
    ({"target_latency": 0.0}, "The 'target_latency' parameter of prune must be a float in (0, 1]. "
                              "Got 0.0 instead."),
    ({"target_latency": 1.5}, "The 'target_latency' parameter of prune must be a float in (0, 1]. "
                              "Got 1.5 instead."),
    ({"target_latency": "half"}, "The 'target_latency' parameter of prune must be a float in (0, 1]. "
                                 "Got 'half' instead."),
    ({"target_latency": 0.5, "target_macs": 0.5}, "Give one target, not both 'target_macs' and "
                                                  "'target_latency'."),
    ({"target_latency": 0.5, "sparsity": 0.3}, "Give either 'sparsity' or a target ('target_latency'), "
                                               "not both: the target decides the sparsity."),
    ({"round_to": "fast"}, "The 'round_to' parameter of prune must be an int >= 1 or 'auto'. Got "
                           "'fast' instead."),
    ({"round_to": 0}, "The 'round_to' parameter of prune must be an int >= 1 or 'auto'. Got 0 "
                      "instead."),
    ({"latency_threads": 0}, "The 'latency_threads' parameter of prune must be an int >= 1. Got 0 "
                             "instead."),
    ({"latency_rounds": -1}, "The 'latency_rounds' parameter of prune must be an int >= 0. Got -1 "
                             "instead."),
    ({"latency_table": 3}, "The 'latency_table' parameter of prune must be a path (a .json file or "
                           "a folder). Got int instead (pass a LatencyTable object to "
                           "prune(..., latency_table=...))."),
    ({"device": "gpu"}, "The 'device' parameter of prune must be 'cpu', 'cuda', 'cuda:N' or 'auto'. "
                        "Got 'gpu' instead."),
    ({"device": "cuda:x"}, "The 'device' parameter of prune must be 'cpu', 'cuda', 'cuda:N' or "
                           "'auto'. Got 'cuda:x' instead."),
    ({"device": torch.device("meta")}, "The 'device' parameter of prune must be 'cpu', 'cuda', "
                                       "'cuda:N' or 'auto'. Got device(type='meta') instead. (the "
                                       "meta device holds no weights: prune a model that has them)"),
])
def test_bad_settings_name_the_parameter(kw, msg):
    e = _error(**kw)
    assert str(e) == msg
    blamed = {"target_macs": "target_latency", "sparsity": "sparsity"}
    assert e.param == next((blamed[k] for k in kw if k in blamed), next(iter(kw)))


def test_settings_are_json_values():
    cfg = PruneConfig(target_latency=0.5, latency_table="out/latency", device=torch.device("cpu"),
                      round_to="auto")
    assert cfg.device == "cpu" and cfg.target == ("latency", 0.5)
    assert PruneConfig.from_dict(cfg.to_dict()) == cfg
    assert PruneConfig(device="cuda:1").device == "cuda:1"  # checked against the machine at run time
    # a target given on top replaces the base's amount, as sparsity and the other targets do
    assert cfg.replace(sparsity=0.3).target is None
    assert PruneConfig(target_macs=0.5).replace(target_latency=0.4).target == ("latency", 0.4)


def test_command_line_options_come_from_the_fields():
    args = build_parser().parse_args(["prune", "--target-latency", "0.5", "--latency-table", "t.json",
                                      "--latency-threads", "4", "--latency-rounds", "0",
                                      "--round-to", "auto", "--device", "cuda:0"])
    assert given_options(args) == {"target_latency": 0.5, "latency_table": "t.json",
                                   "latency_threads": 4, "latency_rounds": 0, "round_to": "auto",
                                   "device": "cuda:0"}
    assert given_options(build_parser().parse_args(["prune", "--round-to", "8"]))["round_to"] == 8
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--round-to", "eight"])
    assert cli_message(_error(device="tpu")) == ("--device must be 'cpu', 'cuda', 'cuda:N' or "
                                                 "'auto'. Got 'tpu' instead.")


# ---------------------------------------------------------------------- devices
def test_cpu_and_auto_resolve_and_leave_the_callers_model_alone():
    m = net()
    snap = snapshot(m)
    ref = gp.prune(m, X, sparsity=0.4, method="greedy", reconstruct=True, calibration=CALIB)
    for dev in ("cpu", "auto", torch.device("cpu")):
        r = gp.prune(m, X, sparsity=0.4, method="greedy", reconstruct=True, calibration=CALIB,
                     device=dev)
        want = torch.device("cuda", 0) if dev == "auto" and torch.cuda.is_available() else \
            torch.device("cpu")
        assert all(p.device == want for p in r.model.parameters())
        if want.type == "cpu":  # the same run as without a device
            assert r.plan == ref.plan
            assert torch.equal(r.model(X), ref.model(X))
    assert_unchanged(m, snap)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ConfigError) as e:
        gp.prune(net(), X, device="cuda")
    assert str(e.value) == ("The 'device' parameter is 'cuda' but CUDA is not available on this "
                            "machine: use 'cpu' or 'auto'.")
    assert e.value.param == "device"


def test_data_driven_work_runs_where_the_device_says(monkeypatch):
    """The data-driven runner gets the run's device, and the calibration batches reach the
    model there one at a time (captured from inside the runner)."""
    from graphprune.datadriven import sequential

    seen = {}
    real = sequential.run

    def spy(graph, calib, *a, device=None, **kw):
        seen["device"] = device
        seen["model"] = next(graph.model.parameters()).device
        seen["batches"] = {t.device for xs, _ in calib for t in xs}
        return real(graph, calib, *a, device=device, **kw)

    monkeypatch.setattr(sequential, "run", spy)
    r = gp.prune(net(), X, sparsity=0.5, method="lasso", calibration=CALIB, device="cpu")
    assert seen["device"] == torch.device("cpu") and seen["model"] == torch.device("cpu")
    assert seen["batches"] == {torch.device("cpu")}
    assert r.report.fidelity["total"]["cosine"] > 0.5


def test_inplace_moves_the_model_itself():
    m = net()
    r = gp.prune(m, X, sparsity=0.5, device="cpu", inplace=True)
    assert r.model is m and m[0].out_channels == 12
