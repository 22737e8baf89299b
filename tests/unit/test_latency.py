"""Latency-aware pruning: the kernel model, the allocation, the table file, and (timed, on one
small net with one onnxruntime thread, latency / dense of models timed in one interleaved run)
predictions and targets against onnxruntime itself."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.errors import ConfigError
from graphprune.latency import (
    LatencyTable, LatencyTableError, build_table, kept_importance, latency_amounts,
    latency_report, recommend_round_to, speed_warning,
)
from graphprune.latency.build import design, uniform_widths
from graphprune.latency.measure import Kernel, export_variant, time_variants
from graphprune.latency.model import KernelModel, Predictor, attribute, fit_kernels
from graphprune.latency.table import Sample


def _block(i, o, s=1):
    return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())


def small_net():
    """Six convolutions (1 ms at 64x64 on one thread, 95% of it in kernels): enough groups of
    comparable cost that an allocation can land near any latency target, not only at the few
    ratios four groups allow (with four, a target of 0.5 could only be 0.46 or 0.55)."""
    torch.manual_seed(0)
    return nn.Sequential(_block(3, 32, 2), _block(32, 48), _block(48, 64, 2), _block(64, 96),
                         _block(96, 128, 2), _block(128, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).eval()


X64 = torch.randn(1, 3, 64, 64)


def l1(g):
    ctx = gp.criteria.ScoreContext(params=g.params, rng=np.random.default_rng(0), graph=g)
    return {grp.name: gp.criteria.score_group(gp.criteria.get_criterion("l1"), grp, ctx)
            for grp in g.prunable_groups}


# ---------------------------------------------------------------------- the kernel model
def _runs(widths, sizes, fn, concat=False):
    """Synthetic profiles: a conv A->B and a depthwise-like kernel on B, timed by ``fn``."""
    out = []
    for w in widths:
        a, b = w.get("A", sizes["A"]), w.get("B", sizes["B"])
        ks = {"conv": Kernel("Conv", ((1, a, 8, 8), (b, a, 3, 3)), ((1, b, 8, 8),), fn(a, b), fn(a, b)),
              "dw": Kernel("Conv", ((1, b, 8, 8), (b, 1, 3, 3)), ((1, -(-b // 16) * 16, 8, 8),),
                           0.01 * b, 0.01 * b),
              "pool": Kernel("GlobalAveragePool", ((1, 7, 8, 8),), ((1, 7, 1, 1),), 0.3, 0.3)}
        if concat:
            ks["cat"] = Kernel("Concat", ((1, a + b, 8, 8),), ((1, a + b, 8, 8),), 0.1, 0.1)
        out.append(ks)
    return out


def test_kernels_are_tied_to_the_groups_that_set_their_shapes():
    sizes = {"A": 64, "B": 128}
    widths = [{}] + design(sizes, 5, 16, 0.2, 16, np.random.default_rng(0))
    groups, unmatched = attribute(_runs(widths, sizes, lambda a, b: a * b * 1e-4, concat=True),
                                  widths, sizes, 16)
    assert groups["conv"] == ("A", "B")
    assert groups["dw"] == ("B",)  # its padded output follows B padded to the block
    assert groups["pool"] == ()
    assert unmatched == ["cat"]  # a + b follows no single group


def test_fitted_kernels_predict_unseen_widths():
    sizes = {"A": 64, "B": 128}
    widths = [{}] + design(sizes, 6, 16, 0.2, 16, np.random.default_rng(1))
    t = lambda a, b: 0.02 + 1e-4 * a * b + 1e-3 * a  # noqa: E731
    models, _ = fit_kernels(_runs(widths, sizes, t), widths, sizes, 16)
    p = Predictor(models, sizes, 16)
    for a, b in [(16, 32), (48, 128), (64, 64)]:
        want = t(a, b) + 0.01 * b + 0.3
        assert p.total({"A": a, "B": b}) == pytest.approx(want, rel=1e-6)
    # inside an NCHWc block the predicted cost does not change: a step curve
    assert p.total({"A": 64, "B": 113}) == pytest.approx(p.total({"A": 64, "B": 128}))


def test_calibration_recovers_how_wall_clock_grows_with_the_kernels():
    from graphprune.latency.build import calibrate
    from graphprune.latency.measure import Timing

    sizes = {"A": 64, "B": 128}
    widths = [{}] + design(sizes, 8, 16, 0.2, 16, np.random.default_rng(2))
    models, _ = fit_kernels(_runs(widths, sizes, lambda a, b: 1e-4 * a * b), widths, sizes, 16)
    p = Predictor(models, sizes, 16)
    x = np.array([p.total({**sizes, **w}) for w in widths])
    noise = 1 + 0.01 * np.random.default_rng(3).standard_normal(len(x))
    wall = 2.0 * (x / x[0]) ** 1.08 * noise
    jumpy = [m * (1.3 if k % 2 else 1.0) for k, m in enumerate(wall)]  # preempted every other
    exponent, clock = calibrate(p, sizes, widths, [Timing(m, j, {}, 0.0) for m, j in zip(wall, jumpy)])
    assert clock == "median" and exponent == pytest.approx(1.08, abs=0.03)
    exponent, clock = calibrate(p, sizes, widths, [Timing(j, m, {}, 0.0) for m, j in zip(wall, jumpy)])
    assert clock == "quartile" and exponent == pytest.approx(1.08, abs=0.03)
    # neither wall clock explained: the profiled one, whatever its fit
    exponent, clock = calibrate(p, sizes, widths, [Timing(j, j, {}, 0.0) for j in jumpy])
    assert clock == "profile"


def test_design_widths_identify_every_group():
    sizes = {"a": 64, "b": 64, "c": 64, "d": 32, "e": 24}
    ws = design(sizes, 6, 16, 0.2, 16, np.random.default_rng(0))
    seqs = {g: tuple(w.get(g, s) for w in ws) for g, s in sizes.items()}
    assert len(set(seqs.values())) == len(seqs)
    assert all(v % 16 == 0 or v == sizes[g] for w in ws for g, v in w.items())


# ---------------------------------------------------------------------- allocation
def _synthetic_table(g, round_to=16):
    """Early, high-resolution layers expensive per channel; late ones cheap."""
    names = [grp.name for grp in g.prunable_groups]
    sizes = {grp.name: grp.size for grp in g.prunable_groups}
    kernels = [KernelModel("k0", "Conv", (names[0],), (0.0, 1.0), 1.0)]
    for i, (a, b) in enumerate(zip(names, names[1:])):
        kernels.append(KernelModel(f"k{i + 1}", "Conv", (a, b), (0.0, 0.0, 0.0, 1.0 / (i + 1)), 1.0))
    kernels.append(KernelModel("fc", "Gemm", (names[-1],), (0.05, 0.05), 0.1))
    samples = [Sample("design", {}, {"median": 3.0}),
               Sample("uniform", {names[0]: 31}, {"median": 3.6}, 0.1, 1),
               Sample("uniform", {names[0]: 16}, {"median": 2.4}, 0.5, round_to)]
    return LatencyTable(key={"model": {"class": "Sequential"}, "machine": {"threads": 2}},
                        dense_ms=3.0, block=16, exponent=1.0, sizes=sizes,
                        kernels=tuple(kernels), samples=tuple(samples), round_to=round_to)


def test_allocation_meets_the_predicted_budget_on_rounded_widths():
    g = gp.trace(small_net(), X64)
    table = _synthetic_table(g)
    scores = l1(g)
    for target in (0.8, 0.5, 0.3):
        a = latency_amounts(g, scores, target, table)
        assert table.predict_ratio(a) <= target + 1e-9
        assert table.predict_ratio(a) > target - 0.15  # channels given back where they fit
        assert all(w % 16 == 0 for w in a.values())
    # any rounding: inside an NCHWc block a cut saves nothing, so only block edges are chosen
    a1 = latency_amounts(g, scores, 0.5, table, round_to=1)
    assert table.predict_ratio(a1) <= 0.5 + 1e-9 and all(w % 16 == 0 for w in a1.values())
    # the first group costs most per channel: it is cut hardest, the last least
    a = latency_amounts(g, scores, 0.5, table)
    frac = [a[grp.name] / grp.size for grp in g.prunable_groups]
    assert frac[0] < frac[-1]


def test_allocation_keeps_more_importance_than_uniform_at_the_same_prediction():
    g = gp.trace(small_net(), X64)
    table = _synthetic_table(g)
    scores = l1(g)
    sizes = {grp.name: grp.size for grp in g.prunable_groups}
    u = uniform_widths(sizes, 0.5, 16)
    a = latency_amounts(g, scores, table.predict_ratio(u), table)
    assert table.predict_ratio(a) <= table.predict_ratio(u) + 1e-9
    assert kept_importance(scores, a) >= kept_importance(scores, u)


def test_allocation_errors():
    g = gp.trace(small_net(), X64)
    table = _synthetic_table(g)
    with pytest.raises(ConfigError) as e:
        latency_amounts(g, l1(g), 1.5, table)
    assert str(e.value) == ("The 'target_latency' parameter of latency_amounts must be a float in "
                            "(0, 1]. Got 1.5 instead.")
    with pytest.raises(ConfigError, match="cannot be reached"):
        latency_amounts(g, l1(g), 0.01, table)
    other = gp.trace(nn.Sequential(_block(3, 48), nn.Conv2d(48, 8, 1)).eval(), X64)
    with pytest.raises(LatencyTableError, match="another model"):
        latency_amounts(other, l1(other), 0.5, table)


def test_rounding_and_warning_follow_the_measured_steps():
    assert recommend_round_to([1.3, 0.95, 0.8, 0.7], [1, 1, 16, 16], 16) == 16
    assert recommend_round_to([0.9, 0.8, 0.9, 0.8], [1, 1, 16, 16], 16) == 1
    assert recommend_round_to([1.3, 1.1], [1, 16], 8) == 16  # none safe: least slow
    g = gp.trace(small_net(), X64)
    table = _synthetic_table(g)
    first = g.prunable_groups[0].name
    msg = speed_warning(table, {first: 27})
    assert "1.20x the dense latency" in msg and "multiples of 16" in msg
    assert speed_warning(table, {first: 16}) is None


# ---------------------------------------------------------------------- the file
def test_table_round_trips_and_refuses_bad_files(tmp_path):
    g = gp.trace(small_net(), X64)
    table = _synthetic_table(g)
    p = tmp_path / "t.json"
    table.save(p)
    back = LatencyTable.load(p)
    assert back == table and back.to_json() == table.to_json()
    assert back.predict_ms({g.prunable_groups[1].name: 32}) == table.predict_ms(
        {g.prunable_groups[1].name: 32})
    d = json.loads(p.read_text())
    d["version"] = 99
    (tmp_path / "v.json").write_text(json.dumps(d))
    with pytest.raises(LatencyTableError, match="version 99"):
        LatencyTable.load(tmp_path / "v.json")
    d = json.loads(p.read_text())
    d["exponent"] = 0
    (tmp_path / "e.json").write_text(json.dumps(d))
    with pytest.raises(LatencyTableError, match="'exponent' must be a number in"):
        LatencyTable.load(tmp_path / "e.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LatencyTableError, match="not valid JSON"):
        LatencyTable.load(tmp_path / "bad.json")
    with pytest.raises(LatencyTableError, match="cannot read"):
        LatencyTable.load(tmp_path / "missing.json")


def test_plot_writes_the_step_curves(tmp_path):
    pytest.importorskip("matplotlib")
    g = gp.trace(small_net(), X64)
    _synthetic_table(g).plot(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


# ---------------------------------------------------------------------- onnxruntime itself
# One onnxruntime thread: `make test` runs another pytest worker on the second of the 2 cores, and a
# 2-thread session then waits at every parallel kernel for a thread the scheduler gave away (its
# median swung 2x between repeats). Timed alone on its core, a run is what the kernels cost.
THREADS = 1


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One table of the small net on this machine (a few seconds of exports and timing; 60
    rounds, where 20 left the wall clocks fitting the kernel model only within 4-10% under load
    and the table fell back to the profiled clock, inflated by the profiler's cost per kernel)."""
    model = small_net()
    g = gp.trace(model, X64)
    cache = tmp_path_factory.mktemp("latency")
    table = build_table(model, X64, g, threads=THREADS, samples=8, rounds=60, sparsities=(0.2, 0.4),
                        cache=cache)
    return model, g, table, cache


def measured_ratios(g, table, plans, tmp_path):
    """Latency / dense of each plan on the table's clock, the dense model and every plan timed
    together in one interleaved run (100 rounds): measured once, whatever it gives."""
    paths = [export_variant(g, w, X64, str(tmp_path / f"v{i}.onnx")) for i, w in enumerate([{}] + plans)]
    ts = time_variants(paths, X64, threads=THREADS, rounds=100)
    return [t.ms(table.clock) / ts[0].ms(table.clock) for t in ts[1:]]


def test_built_table_is_cached_per_model_and_machine(measured):
    model, g, table, cache = measured
    again = build_table(model, X64, g, threads=THREADS, samples=8, rounds=60, sparsities=(0.2, 0.4),
                        cache=cache)
    assert again == table  # read back, not measured again
    assert table.key["machine"]["threads"] == THREADS and table.key["model"]["class"] == "Sequential"
    assert set(table.sizes) == {grp.name for grp in g.prunable_groups}
    assert not table.unmatched and all(k.groups for k in table.kernels if k.op == "Conv")


# Timed against a fresh measurement, on a 2-core machine other jobs load: one thread, spinning
# stopped, each turn opened by two untimed runs (the first run after the other variants' turns is
# 4-10% slower, the small pruned nets more), the kernels mapped to wall clock by a power law through
# the dense model (a straight line over-predicted every plan: +3.1% +- 4.4, worst +12.9, over 12
# builds; 2 failures in 14 `-n 2` runs of this file). Over 24 builds at load 2-4, predicted /
# measured - 1 per plan: +2.1% +- 3.7, worst +10.8; the target re-measured -1.6% +- 4.0, worst
# -10.7. In 25 `-n 2` runs of this file at load 2-4 both passed every time (file 21-55 s, median 40).
def test_prediction_of_pruned_nets_within_15_percent_of_measured(measured, tmp_path):
    _, g, table, _ = measured
    plans = [uniform_widths(dict(table.sizes), 0.5, table.round_to),
             latency_amounts(g, l1(g), 0.6, table), latency_amounts(g, l1(g), 0.4, table)]
    predicted = [table.predict_ratio(w) for w in plans]
    got = measured_ratios(g, table, plans, tmp_path)
    assert max(predicted) < 0.8  # the plans really are faster: the check means something
    for p, m in zip(predicted, got):
        assert abs(p / m - 1) < 0.15, (table.clock, predicted, got)


def test_latency_target_is_met(measured, tmp_path):
    model, g, table, _ = measured
    amounts = latency_amounts(g, l1(g), 0.5, table)
    rep = latency_report(g, amounts, table, target=0.5, measure=False)
    assert rep.params[1] < rep.params[0] and rep.macs[1] < rep.macs[0]
    assert rep.predicted_ratio <= 0.5 + 1e-9 and rep.measured_ratio is None
    # what prune does with a target: allocate, time against dense, re-aim if it misses by > 5%
    r = gp.prune(model, X64, target_latency=0.5, latency_table=table, latency_rounds=60)
    kept = _kept(r.plan)
    assert r.latency.measured_ratio is not None
    # ... and a fresh measurement of the model it chose, independent of the one it aimed with
    (got,) = measured_ratios(g, table, [kept], tmp_path)
    assert math.isclose(got, 0.5, rel_tol=0.15), (table.clock, r.latency.predicted_ratio,
                                                 r.latency.measured_ratio, got)


# ---------------------------------------------------------------------- prune(target_latency=...)
def _kept(plan):
    return {n: len(g.keep) for n, g in plan.groups.items()}


def test_prune_allocates_under_the_latency_target(measured):
    from tests.conftest import assert_unchanged, snapshot

    model, g, table, cache = measured
    snap = snapshot(model)
    r = gp.prune(model, X64, target_latency=0.5, latency_table=str(cache), latency_rounds=0,
                 latency_threads=THREADS)
    assert_unchanged(model, snap)
    assert r.latency.dense_ms == table.dense_ms  # the cached table was read, not measured again
    want = latency_amounts(g, l1(g), 0.5, table,
                           max_group_sparsity=gp.PruneConfig().max_group_sparsity)  # prune's
    assert _kept(r.plan) == {n: k for n, k in want.items() if n in r.plan.groups}
    assert all(want[n] == g.group(n).size for n in want if n not in r.plan.groups)
    assert table.predict_ratio(_kept(r.plan)) <= 0.5 + 1e-9
    assert r.latency.predicted_ratio <= 0.5 + 1e-9 and r.latency.target == 0.5
    assert r.latency.measured_ratio is None  # latency_rounds=0: predicted only
    assert r.plan.meta["target_latency"] == 0.5 and r.plan.meta["latency_predicted"] <= 0.5
    assert r.report.params[1] < r.report.params[0]
    # the widths where latency steps: a cut group keeps a multiple of the block
    assert all(k % table.block == 0 for n, k in _kept(r.plan).items() if k < table.sizes[n])
    # a LatencyTable object serves as the file does
    r1 = gp.prune(model, X64, target_latency=0.5, latency_table=table, latency_rounds=0)
    assert r1.plan == r.plan and torch.equal(r1.model(X64), r.model(X64))


def test_selection_and_reconstruction_work_on_the_latency_counts(measured):
    model, g, table, _ = measured
    calib = torch.randn(24, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    base = gp.prune(model, X64, target_latency=0.6, latency_table=table, latency_rounds=0)
    r = gp.prune(model, X64, method="greedy", reconstruct=True, calibration=calib,
                 target_latency=0.6, latency_table=table, latency_rounds=0)
    assert _kept(r.plan) == _kept(base.plan)  # selectors allocate on l1, then choose channels
    assert r.plan.groups != base.plan.groups  # ... by their own rule
    plain = gp.prune(model, X64, method="greedy", calibration=calib, target_latency=0.6,
                     latency_table=table, latency_rounds=0)
    err = r.report.fidelity["total"]["rel_err"]
    assert err <= plain.report.fidelity["total"]["rel_err"] + 1e-6  # refit lowers the error


def test_round_to_auto_follows_the_table_and_warns_from_it(measured):
    model, g, table, _ = measured
    r = gp.prune(model, X64, sparsity=0.3, round_to="auto", latency_table=table)
    assert r.plan.meta["round_to"] == table.round_to
    assert all(k % table.round_to == 0 for k in _kept(r.plan).values())
    assert r.latency.target is None and r.latency.warning is None
    odd = gp.prune(model, X64, sparsity=0.3, latency_table=table)  # round_to=1: 22, 34, 45, 67...
    assert odd.latency.predicted_ratio < 1
    # the warning quotes what this machine measured: unaligned uniform prunings slower than dense
    slow = [q for r, pts in table.uniform_ratios().items() if r == 1 for _, q in pts if q >= 1.0]
    if slow and table.round_to > 1:
        assert "not multiples of" in odd.latency.warning
        assert f"{max(slow):.2f}x" in odd.latency.warning
    else:  # a busy machine may time no slowdown: then there is nothing to warn about
        assert odd.latency.warning is None
    assert odd.plan.meta.get("latency_warning") == odd.latency.warning


def test_prune_measures_the_pruned_model_against_the_dense_one(measured):
    model, g, table, _ = measured
    r = gp.prune(model, X64, target_latency=0.5, latency_table=table, latency_rounds=20)
    rep = r.latency
    assert rep.measured_ms > 0 and rep.dense_measured_ms > rep.measured_ms
    assert r.plan.meta["latency_measured"] == round(rep.measured_ratio, 4)
    assert "measured" in str(rep) and "timed together" in str(rep)


def test_a_table_file_of_another_model_is_refused_not_overwritten(measured, tmp_path):
    _, _, table, _ = measured
    path = tmp_path / "t.json"
    table.save(path)
    before = path.read_bytes()
    other = nn.Sequential(_block(3, 48), nn.Conv2d(48, 8, 1)).eval()
    with pytest.raises(LatencyTableError, match="was measured on another model"):
        gp.prune(other, X64, target_latency=0.5, latency_table=str(path))
    assert path.read_bytes() == before
    with pytest.raises(LatencyTableError, match="another model"):
        gp.prune(other, X64, target_latency=0.5, latency_table=table)


def test_cli_prunes_to_a_latency_target_and_prints_the_table(measured, tmp_path, capsys,
                                                             monkeypatch):
    from graphprune.cli import main

    _, g, table, cache = measured
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    spec = ["--model", "tests.unit.test_latency:small_net", "--input-shape", "1,3,64,64"]
    out = tmp_path / "out"
    code = main(["prune", *spec, "--data", "random", "--target-latency", "0.5", "--latency-table",
                 str(cache), "--latency-threads", str(THREADS), "--latency-rounds", "0", "--device",
                 "cpu", "--no-reconstruct", "--finetune-epochs", "0", "--quantize", "none",
                 "--exporter", "legacy", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["meta"]["target_latency"] == 0.5 and plan["meta"]["latency_predicted"] <= 0.5
    kept = {n: len(v["keep"]) for n, v in plan["groups"].items()}
    assert table.predict_ratio(kept) <= 0.5 + 1e-9
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["prune"]["device"] == "cpu" and recipe["prune"]["latency_table"] == str(cache)
    capsys.readouterr()
    assert main(["bench", "--latency-table", str(cache), "--threads", str(THREADS), *spec]) == 0
    shown = capsys.readouterr().out
    assert "latency table: Sequential" in shown and f"round_to='auto' -> {table.round_to}" in shown
    assert main(["prune", *spec, "--target-latency", "1.5", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("graphprune prune: error: --target-latency must be a float in (0, 1]. Got 1.5 "
                   "instead.")
    assert not (tmp_path / "bad").exists()
