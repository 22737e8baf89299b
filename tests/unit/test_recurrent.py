"""Recurrent layers: hidden units of nn.LSTM / GRU / RNN (multi-layer, bidirectional, proj_size),
the cells, packed sequences, initial states, under torch.fx and torch.export; the four reference
models of models/recurrent.py prune to < 0.6 of their parameters and equal their masked originals."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import graphprune as gp
from graphprune.models import audio_gru, bilstm_tagger, proj_lstm, text_lstm

from ..conftest import (assert_mask_equivalent, assert_same_state, assert_unchanged, healthy_init,
                        masked_copy, rel_err, snapshot)

torch.fx.wrap("pack_padded_sequence")  # fx cannot trace into it (torch.as_tensor on a proxy)
torch.fx.wrap("pad_packed_sequence")

REFERENCE = {
    "text_lstm": (text_lstm, lambda n: torch.randint(0, 1000, (n, 12))),
    "audio_gru": (audio_gru, lambda n: torch.randn(n, 1, 4000)),
    "bilstm_tagger": (bilstm_tagger, lambda n: torch.randint(0, 500, (n, 10))),
    "proj_lstm": (proj_lstm, lambda n: torch.randn(n, 15, 40)),
}


def _reference(name):
    fn, make = REFERENCE[name]
    torch.manual_seed(0)
    return healthy_init(fn().eval()), make(3)


def _assert_equivalent(model, r, inputs):
    """The oracle for several positional inputs: masked original == shrunk model."""
    with torch.no_grad():
        err = rel_err(r.model(*inputs), masked_copy(model, r.masks).eval()(*inputs))
    assert err < 1e-5, f"shrunk model differs from the masked original by {err:.2e}"


def _group_of(graph, param):
    return next(g for g in graph.groups if any(m.param == param for m in g.members))


def _flat_weights_are_parameters(model):
    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            assert all(w is getattr(m, n) for w, n in zip(m._flat_weights, m._flat_weights_names))


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_models_prune_to_a_smaller_equivalent_model(name):
    model, x = _reference(name)
    snap, fresh = snapshot(model), copy.deepcopy(model)
    r = gp.prune(model, x, sparsity=0.5, method="l1")
    assert_unchanged(model, snap)
    p0, p1 = r.report.params
    assert p1 < 0.6 * p0, f"{name}: {p0} -> {p1} parameters"
    with torch.no_grad():
        y0, y1 = model(x), r.model(x)
    assert y1.shape == y0.shape and rel_err(y1, y0) > 1e-2  # something real was removed
    assert_mask_equivalent(model, r, x)
    rebuilt = gp.apply_masks(fresh, r.masks, x)
    assert_same_state(rebuilt, r.model)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), y1)
    # the kernels read the sliced parameters, and the pruned module copies and runs
    _flat_weights_are_parameters(r.model)
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(r.model)(x), y1)
    rnn = next(m for m in r.model.modules() if isinstance(m, nn.RNNBase))
    assert rnn.hidden_size == rnn.weight_hh_l0.shape[0] // {"LSTM": 4, "GRU": 3}[rnn.mode]
    assert rnn.input_size == rnn.weight_ih_l0.shape[1]


@pytest.mark.parametrize("name", ["text_lstm", "audio_gru", "bilstm_tagger"])
def test_pruned_recurrent_models_export_to_onnx_with_parity(name, tmp_path):
    import onnxruntime as ort

    model, x = _reference(name)
    pruned = gp.prune(model, x, sparsity=0.5).model
    res = gp.export_onnx(pruned, x, tmp_path / "m.onnx", exporter="legacy")
    assert res.max_rel_err < 1e-4
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    xb = REFERENCE[name][1](5)  # another batch size: the batch axis is dynamic
    (y,) = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), pruned(xb).detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["bilstm_tagger", "proj_lstm"])
def test_torch_export_graph_gives_the_same_pruned_model(name):
    """aten.lstm.input's flat weight list maps back to the module's parameters: same groups,
    same scores, same masks as the fx graph."""
    model, x = _reference(name)
    g_fx, g_ex = gp.trace(model, x, tracer="fx"), gp.trace(model, x, tracer="export")
    assert g_ex.tracer == "torch.export"
    assert sorted((g.size, g.prunable) for g in g_fx.groups) == \
        sorted((g.size, g.prunable) for g in g_ex.groups)
    r_fx = gp.prune(model, x, sparsity=0.5, tracer="fx")
    r_ex = gp.prune(model, x, sparsity=0.5, tracer="export")
    assert sorted(r_fx.masks) == sorted(r_ex.masks)
    for k in r_fx.masks:
        assert torch.equal(r_fx.masks[k], r_ex.masks[k]), k
    assert_mask_equivalent(model, r_ex, x)
    _flat_weights_are_parameters(r_ex.model)


def test_an_lstm_left_whole_reads_its_own_parameters_under_torch_export():
    model, x = _reference("text_lstm")
    r = gp.prune(model, x, sparsity=0.5, tracer="export",
                 config=[{"op_names": ["lstm", "embed"], "exclude": True}])
    _flat_weights_are_parameters(r.model)


@pytest.mark.parametrize("name", ["text_lstm", "audio_gru", "bilstm_tagger"])
def test_taylor_scores_hidden_units_from_gradients(name):
    model, x = _reference(name)
    calib = REFERENCE[name][1](16)
    r = gp.prune(model, x, sparsity=0.5, method="taylor", calibration=calib)
    r_l1 = gp.prune(model, x, sparsity=0.5, method="l1")
    rnn = next(n for n, m in model.named_modules() if isinstance(m, nn.RNNBase))
    assert r.plan.groups[rnn].keep != r_l1.plan.groups[rnn].keep  # chosen by data, not norms
    assert_mask_equivalent(model, r, x)


# ---------------------------------------------------------------------- unit structure
class Tagger(nn.Module):
    def __init__(self, mode="LSTM", layers=2, bidirectional=True, batch_first=True, hidden=6,
                 **kw):
        super().__init__()
        self.embed = nn.Embedding(30, 5)
        cls = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}[mode]
        self.rnn = cls(5, hidden, num_layers=layers, bidirectional=bidirectional,
                       batch_first=batch_first, **kw)
        self.fc = nn.Linear((kw.get("proj_size") or hidden) * (2 if bidirectional else 1), 3)
        self.batch_first = batch_first

    def forward(self, tokens):  # (N, T)
        e = self.embed(tokens if self.batch_first else tokens.t())
        y, _ = self.rnn(e)
        return self.fc(y)


def _kept(mask, dim):
    other = tuple(d for d in range(mask.ndim) if d != dim)
    return set(np.flatnonzero(mask.any(dim=other).numpy()) if other else
               np.flatnonzero(mask.numpy()))


@pytest.mark.parametrize("mode,gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_a_hidden_unit_owns_its_gate_rows_its_recurrent_column_in_every_layer_and_direction(
        mode, gates):
    torch.manual_seed(0)
    m = Tagger(mode).eval()
    x = torch.randint(0, 30, (2, 7))
    g = gp.trace(m, x)
    grp = g.group("rnn")
    assert grp.size == 6 and grp.prunable
    plan = gp.Plan(groups={"rnn": gp.GroupPlan(6, (0, 2, 5))})
    masks = gp.apply_plan(g, plan).masks
    H = 6
    js = _kept(masks["rnn.weight_hh_l0"], 1)  # the recurrent columns of the kept units
    assert len(js) == 3
    rows = {gi * H + j for gi in range(gates) for j in js}
    both = js | {H + j for j in js}  # [forward, backward] halves of the next input
    for k in range(2):
        for sfx in ("", "_reverse"):
            for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                assert _kept(masks[f"rnn.{p}_l{k}{sfx}"], 0) == rows, (p, k, sfx)
            assert _kept(masks[f"rnn.weight_hh_l{k}{sfx}"], 1) == js
            if k == 1:
                assert _kept(masks[f"rnn.weight_ih_l1{sfx}"], 1) == both
    assert _kept(masks["fc.weight"], 1) == both
    assert "rnn.weight_ih_l0" in masks and masks["rnn.weight_ih_l0"].any(0).all()  # embed untouched


@pytest.mark.parametrize("mode,kw", [
    ("LSTM", {}), ("LSTM", {"proj_size": 4}), ("GRU", {}), ("RNN", {"nonlinearity": "tanh"}),
    ("RNN", {"nonlinearity": "relu"}), ("LSTM", {"bias": False}),
])
@pytest.mark.parametrize("batch_first,bidirectional", [(True, True), (False, False)])
def test_masked_recurrent_layers_equal_the_shrunk_ones(mode, kw, batch_first, bidirectional):
    torch.manual_seed(0)
    m = Tagger(mode, bidirectional=bidirectional, batch_first=batch_first, **kw).eval()
    x = torch.randint(0, 30, (3, 7))
    r = gp.prune(m, x, sparsity=0.5, method="random", seed=3)
    rnn = r.model.rnn
    assert rnn.hidden_size == 3 and rnn.input_size < 5
    if kw.get("proj_size"):
        assert rnn.proj_size == 2 and rnn.weight_hr_l0.shape == (2, 3)
    assert_mask_equivalent(m, r, x)


def test_unbatched_input():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.gru, self.fc = nn.Linear(4, 8), nn.GRU(8, 10, num_layers=2), nn.Linear(10, 2)

        def forward(self, x):  # (T, 4): one unbatched sequence
            y, h = self.gru(self.inp(x))
            return self.fc(y) + self.fc(h[-1])

    m = Net().eval()
    x = torch.randn(6, 4)
    r = gp.prune(m, x, sparsity=0.5)
    assert r.model.gru.hidden_size == 5
    assert_mask_equivalent(m, r, x)


# ---------------------------------------------------------------------- states
class Seq2Seq(nn.Module):
    """An encoder's final states, mapped by Linears, start the decoder."""

    def __init__(self, literal_state=False):
        super().__init__()
        self.enc = nn.GRU(4, 12, batch_first=True)
        self.to_h, self.to_c = nn.Linear(12, 10), nn.Linear(12, 10)
        self.dec = nn.LSTM(4, 10, batch_first=True)
        self.fc = nn.Linear(10, 3)
        self.literal_state = literal_state

    def forward(self, src, tgt):
        _, h = self.enc(src)
        if self.literal_state:
            state = (torch.zeros(1, src.shape[0], 10), torch.zeros(1, src.shape[0], 10))
        else:
            state = (torch.tanh(self.to_h(h)), self.to_c(h))
        y, _ = self.dec(tgt, state)
        return self.fc(y)


def test_an_initial_state_computed_by_layers_couples_with_the_units():
    torch.manual_seed(0)
    m = Seq2Seq().eval()
    x = (torch.randn(2, 5, 4), torch.randn(2, 6, 4))
    g = gp.trace(m, x)
    dec = _group_of(g, "dec.weight_hh_l0")
    assert dec.prunable and g.group("enc").prunable
    assert {"to_h.weight", "to_c.weight", "dec.weight_hh_l0"} <= {mm.param for mm in dec.members}
    r = gp.prune(m, x, sparsity=0.5)
    assert r.model.dec.hidden_size == 5 and r.model.to_h.out_features == 5
    _assert_equivalent(m, r, x)


class EncDec(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.LSTM(4, 10, num_layers=2, batch_first=True)
        self.dec = nn.LSTM(6, 10, num_layers=2, batch_first=True)
        self.fc = nn.Linear(10, 3)

    def forward(self, src, tgt):
        _, state = self.enc(src)
        y, _ = self.dec(tgt, hx=state)  # the encoder's (h_n, c_n) tuple starts the decoder
        return self.fc(y)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_a_decoder_started_from_an_encoders_states_shares_its_units(tracer):
    torch.manual_seed(0)
    m = EncDec().eval()
    x = (torch.randn(2, 5, 4), torch.randn(2, 6, 6))
    g = gp.trace(m, x, tracer=tracer)
    grp = _group_of(g, "dec.weight_hh_l1")
    assert grp.prunable and "enc.weight_hh_l0" in {mm.param for mm in grp.members}
    r = gp.prune(m, x, sparsity=0.5, tracer=tracer)
    assert r.model.enc.hidden_size == r.model.dec.hidden_size == 5
    _assert_equivalent(m, r, x)


def test_an_initial_state_of_literal_size_freezes_the_units():
    m = Seq2Seq(literal_state=True).eval()
    x = (torch.randn(2, 5, 4), torch.randn(2, 6, 4))
    for tracer in ("fx", "export"):
        g = gp.trace(m, x, tracer=tracer)
        dec = _group_of(g, "dec.weight_hh_l0")
        assert not dec.prunable and "fixed size" in dec.reason, (tracer, dec.reason)


# ---------------------------------------------------------------------- cells
class CellNet(nn.Module):
    def __init__(self, steps=5):
        super().__init__()
        self.steps = steps
        self.inp = nn.Linear(6, 8)
        self.lstm = nn.LSTMCell(8, 12)
        self.gru = nn.GRUCell(12, 10)
        self.rnn = nn.RNNCell(10, 8, nonlinearity="relu")
        self.fc = nn.Linear(8, 3)

    def forward(self, x):  # (N, steps, 6)
        x = self.inp(x)
        s, h, r = None, None, None
        for t in range(self.steps):
            s = self.lstm(x[:, t], s)
            h = self.gru(s[0], h)
            r = self.rnn(h, r)
        return self.fc(r)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_cells_unrolled_over_time(tracer):
    torch.manual_seed(0)
    m = CellNet().eval()
    x = torch.randn(2, 5, 6)
    g = gp.trace(m, x, tracer=tracer)
    for name in ("lstm", "gru", "rnn"):
        grp = _group_of(g, f"{name}.weight_hh")
        assert grp.prunable and grp.size == getattr(m, name).hidden_size
    r = gp.prune(m, x, sparsity=0.5, tracer=tracer)
    assert (r.model.lstm.hidden_size, r.model.gru.hidden_size, r.model.rnn.hidden_size) == (6, 5, 4)
    assert r.model.gru.input_size == 6 and r.model.lstm.weight_ih.shape == (24, 4)
    assert_mask_equivalent(m, r, x)


# ---------------------------------------------------------------------- packed sequences
class Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 8)
        self.lstm = nn.LSTM(8, 10, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(20, 3)

    def forward(self, tokens, lengths):
        p = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
        y, (h, _) = self.lstm(p)
        y, _ = pad_packed_sequence(y, batch_first=True, total_length=tokens.shape[1])
        return self.fc(y) + self.fc(torch.cat([h[0], h[1]], -1))[:, None]


def test_packed_sequences_prune_when_pack_and_pad_are_fx_leaves():
    torch.manual_seed(0)
    m = Packed().eval()
    x = (torch.randint(0, 40, (3, 7)), torch.tensor([7, 3, 5]))
    fresh = copy.deepcopy(m)
    g = gp.trace(m, x)
    assert g.group("lstm").prunable and g.group("embed").prunable
    r = gp.prune(m, x, sparsity=0.5)
    assert r.model.lstm.hidden_size == 5 and r.model.lstm.input_size == 4
    _assert_equivalent(m, r, x)
    assert_same_state(gp.apply_masks(fresh, r.masks, x), r.model)


# ---------------------------------------------------------------------- not torch's forward
class ZeroStateLSTM(nn.LSTM):
    def forward(self, x):  # a state of literal size that no resizer can refresh
        h0 = torch.zeros(1, x.shape[0], 12)
        return super().forward(x, (h0, h0))


class WithSubclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.lstm = ZeroStateLSTM(8, 12, batch_first=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(self.lstm(self.inp(x))[0])


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_a_subclass_making_its_own_state_freezes_instead_of_breaking(tracer):
    m = WithSubclass().eval()
    x = torch.randn(2, 5, 4)
    g = gp.trace(m, x, tracer=tracer)
    inp = _group_of(g, "inp.weight")
    hidden = [gr for gr in g.groups if any(mm.param == "lstm.weight_hh_l0" for mm in gr.members)]
    if tracer == "fx":  # a leaf whose forward fx cannot see: nothing it touches may change
        assert not inp.prunable and "overrides the forward" in inp.reason and not hidden
    else:  # the export graph shows the literal state: only the hidden units stay
        assert inp.prunable and not hidden[0].prunable and "fixed size" in hidden[0].reason
    r = gp.prune(m, x, sparsity=0.5, tracer=tracer)
    assert r.model.lstm.hidden_size == 12
    assert r.model.lstm.input_size == (8 if tracer == "fx" else 4)
    assert_mask_equivalent(m, r, x)


# ---------------------------------------------------------------------- not a module
class FunctionalLSTM(nn.Module):
    """Calls the LSTM kernel with its own parameters: no nn.LSTM whose sizes could be updated."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.w_ih, self.w_hh = nn.Parameter(torch.randn(32, 6)), nn.Parameter(torch.randn(32, 8))

    def forward(self, x):
        h0 = torch.zeros(1, x.shape[0], 8)
        y, _, _ = torch.lstm(self.inp(x), (h0, h0), [self.w_ih, self.w_hh], False, 1, 0.0, False,
                             False, True)
        return y


def test_a_functional_lstm_call_freezes_what_it_touches():
    g = gp.trace(FunctionalLSTM().eval(), torch.randn(2, 5, 4), tracer="export")
    grp = g.group("inp")
    assert not grp.prunable and "functional call" in grp.reason
