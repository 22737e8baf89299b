"""Channel rules (stage 2 of the flow) and resizers for recurrent layers: ``nn.LSTM``, ``nn.GRU``,
``nn.RNN`` (fx keeps them as leaf modules), ``nn.LSTMCell`` / ``GRUCell`` / ``RNNCell``, and the
ATen ops ``torch.export`` emits for them (``aten.lstm.input``, ``gru.input``, ``rnn_tanh.input``,
``rnn_relu.input``, their ``.data`` overloads for packed sequences, and ``aten.*_cell``).

**Units.** A hidden unit ``j`` of a layer owns row ``g*H + j`` of every gate block ``g`` (4 for an
LSTM: i, f, g, o; 3 for a GRU: r, z, n; 1 for a plain RNN) of ``weight_ih``, ``weight_hh``,
``bias_ih`` and ``bias_hh``, and column ``j`` of ``weight_hh`` (its own recurrent input): all go
together. Removing them is exact: with its rows and biases zeroed an LSTM unit has gates
sigmoid(0) = 1/2 and candidate tanh(0) = 0, so its cell stays 0 and its output 1/2 * tanh(0) = 0;
a GRU unit has n = tanh(0) = 0 and z = 1/2, so h_t = h_{t-1} / 2 stays 0; an RNN unit outputs
tanh(0) = relu(0) = 0. The unit's column of the next layer's ``weight_ih`` (both halves,
``j`` and ``H + j``, when the layer is bidirectional: its input is [forward, backward]), of the
consumers of the output sequence and of ``h_n`` / ``c_n`` go with it.

**One group per module.** ``nn.LSTM`` has one ``hidden_size`` for every layer and direction, so
they must all keep the same count. The element space cannot say "same count" between groups, only
"same element", so unit ``j`` ties hidden channel ``j`` of every layer and direction: one group of
``hidden_size`` units per module (its score sums over all of them). This is exact and keeps the
module an ``nn.LSTM`` (so cuDNN/oneDNN kernels, ``state_dict`` keys, ``torch.save`` and the ONNX
``LSTM`` op keep working); per-layer sizes would need a stack of one-layer modules.

**Projections** (``proj_size`` P > 0, LSTMP): ``weight_hr_l{k}`` (P, H) maps the hidden units to
the output, which is also the recurrent input. Two groups: the hidden units (gate rows and
``weight_hr`` columns, ``c_n``) and the projected units (``weight_hr`` rows, ``weight_hh`` columns,
the next layer's ``weight_ih`` columns, the output and ``h_n``). Both prune; the pruned module
may end up with ``proj_size >= hidden_size``, which torch only refuses in the constructor.

**Inputs and states.** The input features (``weight_ih_l0`` columns, and ``_reverse``) couple
with whatever produced the input's last dim (an Embedding, a Linear, a Conv1d after a permute);
any other channel axis of the input (time, batch) is frozen. An initial state passed in (h0, c0)
must follow the units: its last dim couples with them, and a state of fixed size (``torch.zeros(
L, B, 32)`` written with a literal) freezes them. Under torch.export the zero state torch's own
forward makes when none is given (found by its module stack and source file) follows the units.
A subclass that overrides ``forward`` is opaque to fx, so what it touches is frozen there.

Packed sequences: fx cannot trace into ``pack_padded_sequence`` / ``pad_packed_sequence``
(``torch.as_tensor`` on a proxy) and torch.export cannot run ``nn.LSTM`` on a ``PackedSequence``
(its batch size is data-dependent). With ``torch.fx.wrap("pack_padded_sequence")`` (and
``"pad_packed_sequence"``) in the model's file they are fx leaves with the rules below: the
``.data`` (``(sum of lengths, features)``) carries the features on its last dim like a padded batch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .common import arg, empty_like_spec, freeze_inputs, keep_axes, out_spec
from .elements import Builder, TInfo
from .registry import module_rule, op_rule, resizer

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
# (param suffix, dim, elements, role) -> records that removing elements[i] removes index i
Slot = Callable[[str, int, np.ndarray, str], None]


@dataclass(frozen=True)
class Layout:
    """The shape of a recurrent module: gate blocks, sizes, layers, directions, biases."""

    gates: int
    hidden: int
    proj: int  # 0: no projection
    layers: int
    dirs: int
    bias: bool
    input_size: int

    @classmethod
    def of(cls, m: nn.RNNBase) -> Layout:
        return cls(GATES[m.mode], m.hidden_size, getattr(m, "proj_size", 0) or 0, m.num_layers,
                   2 if m.bidirectional else 1, bool(m.bias), m.input_size)

    @property
    def out(self) -> int:
        """Width of the output per direction (and of ``h_n``)."""
        return self.proj or self.hidden

    def cells(self) -> Iterator[tuple[int, str]]:
        for k in range(self.layers):
            for s in range(self.dirs):
                yield k, "_reverse" if s else ""


def wire(b: Builder, node: fx.Node, lay: Layout, x: np.ndarray, slot: Slot
         ) -> tuple[np.ndarray, np.ndarray]:
    """Units of one recurrent module consuming input features ``x``: returns the elements of the
    hidden units (H) and of the output units (P with a projection, else the hidden ones)."""
    hid = b.new_axis(f"{node.name}:hidden", (0,), (lay.hidden,)).elems()
    b.source(hid)
    out = hid
    if lay.proj:
        out = b.new_axis(f"{node.name}:proj", (0,), (lay.proj,)).elems()
        b.source(out)
    rows = np.tile(hid, lay.gates)  # row g*H + j of every gate block belongs to unit j
    for k, sfx in lay.cells():
        slot(f"weight_ih_l{k}{sfx}", 0, rows, "out")
        slot(f"weight_hh_l{k}{sfx}", 0, rows, "out")
        if lay.bias:
            slot(f"bias_ih_l{k}{sfx}", 0, rows, "out")
            slot(f"bias_hh_l{k}{sfx}", 0, rows, "out")
        slot(f"weight_hh_l{k}{sfx}", 1, out, "in")  # the recurrent input is the output
        if lay.proj:
            slot(f"weight_hr_l{k}{sfx}", 0, out, "out")
            slot(f"weight_hr_l{k}{sfx}", 1, hid, "in")
        # layer k > 0 reads [forward, backward] of layer k - 1: column s*O + j is unit j
        slot(f"weight_ih_l{k}{sfx}", 1, x if k == 0 else np.tile(out, lay.dirs), "in")
    return hid, out


def wire_cell(b: Builder, node: fx.Node, gates: int, hidden: int, bias: bool, x: np.ndarray,
              slot: Slot) -> np.ndarray:
    """Units of one cell call (``weight_ih``, ``weight_hh``, biases): returns the hidden units."""
    hid = b.new_axis(f"{node.name}:hidden", (0,), (hidden,)).elems()
    b.source(hid)
    rows = np.tile(hid, gates)
    slot("weight_ih", 0, rows, "out")
    slot("weight_hh", 0, rows, "out")
    if bias:
        slot("bias_ih", 0, rows, "out")
        slot("bias_hh", 0, rows, "out")
    slot("weight_hh", 1, hid, "in")
    slot("weight_ih", 1, x, "in")
    return hid


# ------------------------------------------------------------------ tensors in and out
def _data(b: Builder, v: Any) -> tuple[TInfo | None, Any]:
    """Info and spec of a tensor argument, or of the ``.data`` of a PackedSequence argument."""
    info = b.infos.get(v) if isinstance(v, fx.Node) else None
    spec = b.spec(v)
    if isinstance(v, tuple) and not isinstance(v, fx.Node) and v:  # a PackedSequence of nodes
        return _data(b, v[0])
    if isinstance(spec, (tuple, list)) and spec:  # a node whose value is a PackedSequence
        return (info[0] if isinstance(info, (tuple, list)) else None), spec[0]
    return (info if isinstance(info, TInfo) else None), spec


def features(b: Builder, node: fx.Node, v: Any, size: int, what: str) -> np.ndarray:
    """Elements of the last dim of input ``v`` (a frozen private axis if it is not a channel);
    any channel axis of ``v`` on another dim (time, batch) is frozen."""
    info, spec = _data(b, v)
    last = spec.ndim - 1
    e = b.along(info, last) if info is not None else None
    if e is None or e.size != size:
        e = b.new_axis(f"{node.name}:{what}", (last,), (size,)).elems()
        b.freeze(e, f"{what} of recurrent node '{node.name}' are fed by a dim that is not a "
                    "channel (a model input or an op without a channel rule)")
    if info is not None:
        for a in info.axes:
            if last not in a.dims:
                b.freeze(a.elems(), f"time/batch dim through recurrent node '{node.name}'")
    return e


_RNN_SOURCE = os.path.normcase(os.path.abspath(nn.modules.rnn.__file__))


def _made_inside(node: Any, path: str) -> bool:
    """Under torch.export: the zero state torch's own ``nn.LSTM``/``GRU``/``RNN``/cell forward
    makes when none is given (its size follows the module's refreshed attributes). A state made
    by user code, even inside a subclass, may hold a literal size and is not trusted."""
    if not isinstance(node, fx.Node) or not path or node.all_input_nodes:
        return False
    stack = node.meta.get("nn_module_stack") or {}
    frames = re.findall(r'File "([^"]+)"', node.meta.get("stack_trace") or "")
    if not stack or not frames:
        return False
    inner = list(stack.values())[-1]
    return ((inner[0] if isinstance(inner, tuple) else inner) == path
            and os.path.normcase(os.path.abspath(frames[-1])) == _RNN_SOURCE)


def states(b: Builder, hx: Any) -> list[tuple[Any, Any, Any]]:
    """(node, info, spec) of each tensor of a state argument: a node, a list/tuple of nodes
    (h0, c0), or a node whose value is a tuple (the ``(h_n, c_n)`` of another LSTM)."""
    if hx is None:
        return []
    if isinstance(hx, (tuple, list)):
        return [(v, b.infos.get(v) if isinstance(v, fx.Node) else None, b.spec(v)) for v in hx]
    info, spec = b.infos.get(hx), b.spec(hx)
    if isinstance(spec, (tuple, list)):
        infos = info if isinstance(info, (tuple, list)) else [None] * len(spec)
        return [(None, i, sp) for i, sp in zip(infos, spec)]
    return [(hx, info, spec)]


def link_states(b: Builder, node: fx.Node, hx: Any, units: list[np.ndarray], path: str = "") -> None:
    """An initial state given to the module (``(..., units)``: h0, then c0 of an LSTM): its last
    dim is the units; a state the module made itself (export graphs) follows them."""
    for i, ((v, info, spec), e) in enumerate(zip(states(b, hx), units)):
        what = "cell state" if i else "hidden state"
        if not hasattr(spec, "ndim"):
            continue
        if _made_inside(v, path):  # its size follows the module: give it the units' axis
            b.infos[v] = channels_out(b, v, spec, e, "units")
            continue
        info = info if isinstance(info, TInfo) else None
        last = spec.ndim - 1
        b.link(e, info, last, f"the initial {what} of recurrent node '{node.name}' has a fixed "
                              "size (made with a literal size or fed by an op without a channel "
                              "rule); pass no state (zeros) or one computed from the model's "
                              "channels")
        for a in info.axes if info is not None else []:
            if last not in a.dims:
                b.freeze(a.elems(), f"layer/batch dim of the state of recurrent node '{node.name}'")


def channels_out(b: Builder, node: fx.Node, spec: Any, e: np.ndarray, tag: str) -> Any:
    """Info of an output whose last dim is ``e`` (tiled if the dim is a multiple of it: the
    [forward, backward] output). A PackedSequence output carries it on its ``.data``."""
    if isinstance(spec, (tuple, list)):
        first = channels_out(b, node, spec[0], e, tag)
        return (first,) + tuple(TInfo(s.shape) if hasattr(s, "shape") else None for s in spec[1:])
    last = spec.ndim - 1
    a = b.new_axis(f"{node.name}:{tag}", (last,), (spec.shape[last],))
    b.couple(a.elems(), np.tile(e, spec.shape[last] // e.size))
    return TInfo(spec.shape, [a])


def member_slot(b: Builder, path: str) -> Slot:
    """Slots that record members of the module at ``path`` (fx: the module is a leaf)."""
    def slot(name: str, dim: int, e: np.ndarray, role: str) -> None:
        b.member(f"{path}.{name}", dim, e, role=role, module=path)
    return slot


def placeholder_slot(b: Builder, node: fx.Node, nodes: dict[str, fx.Node]) -> Slot:
    """Slots that couple with the parameter placeholders of an export graph (by parameter name)."""
    def slot(name: str, dim: int, e: np.ndarray, role: str) -> None:
        p = nodes.get(name)
        ax = b.along(b.info(p), dim) if p is not None else None
        if ax is None or ax.size != e.size:
            b.freeze(e, f"'{name}' of recurrent node '{node.name}' is not a parameter of the model")
            return
        b.couple(e, ax)
        b.set_roles(p, {dim: role})
    return slot


# ------------------------------------------------------------------ nn.LSTM / GRU / RNN (fx)
def _hx(node: fx.Node) -> Any:
    return arg(node, 1, "hx")


# forwards whose sizes all come from the module's attributes (which the resizers refresh)
_TORCH_FORWARDS = {c.forward for c in (nn.RNNBase, nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell,
                                         nn.GRUCell, nn.RNNCell)}


def _custom_forward(b: Builder, node: fx.Node, m: nn.Module) -> Any:
    freeze_inputs(b, node, f"'{node.target}' ({type(m).__name__}) overrides the forward of "
                           f"torch's recurrent layer, which fx cannot see into: its sizes stay")
    return empty_like_spec(out_spec(b, node))


@module_rule(nn.RNNBase)
def rnn_module(b: Builder, node: fx.Node, m: nn.RNNBase) -> Any:
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` called as a leaf: ``(output, h_n)`` or
    ``(output, (h_n, c_n))``."""
    if type(m).forward not in _TORCH_FORWARDS:
        return _custom_forward(b, node, m)
    path = node.target
    lay = Layout.of(m)
    x = features(b, node, node.args[0], lay.input_size, "input features")
    hid, out = wire(b, node, lay, x, member_slot(b, path))
    spec = out_spec(b, node)
    lstm = lay.gates == 4
    link_states(b, node, _hx(node), [out, hid], path)
    y = channels_out(b, node, spec[0], out, "output")
    if lstm:
        h, c = spec[1]
        return (y, (channels_out(b, node, h, out, "h_n"), channels_out(b, node, c, hid, "c_n")))
    return (y, channels_out(b, node, spec[1], out, "h_n"))


@module_rule(nn.RNNCellBase)
def cell_module(b: Builder, node: fx.Node, m: nn.RNNCellBase) -> Any:
    """``nn.LSTMCell`` -> ``(h', c')``; ``nn.GRUCell`` / ``nn.RNNCell`` -> ``h'``."""
    if type(m).forward not in _TORCH_FORWARDS:
        return _custom_forward(b, node, m)
    path = node.target
    gates = m.weight_ih.shape[0] // m.hidden_size
    x = features(b, node, node.args[0], m.input_size, "input features")
    hid = wire_cell(b, node, gates, m.hidden_size, bool(m.bias), x, member_slot(b, path))
    spec = out_spec(b, node)
    lstm = isinstance(m, nn.LSTMCell)
    link_states(b, node, _hx(node), [hid, hid], path)
    if lstm:
        return tuple(channels_out(b, node, s, hid, f"state{i}") for i, s in enumerate(spec))
    return channels_out(b, node, spec, hid, "h")


@resizer(nn.RNNBase)
def resize_rnn(m: nn.RNNBase, in_shape: Any) -> None:
    """Sizes from the sliced weights, then the flat weight list the kernels read is rebuilt."""
    m.input_size = m.weight_ih_l0.shape[1]
    m.hidden_size = m.weight_hh_l0.shape[0] // GATES[m.mode]
    if getattr(m, "proj_size", 0):
        m.proj_size = m.weight_hr_l0.shape[0]
    m._init_flat_weights()


@resizer(nn.RNNCellBase)
def resize_cell(m: nn.RNNCellBase, in_shape: Any) -> None:
    m.input_size, m.hidden_size = m.weight_ih.shape[1], m.weight_hh.shape[1]


# ------------------------------------------------------------------ ATen ops (torch.export)
aten = torch.ops.aten


def _ops(*names: str) -> list[Any]:
    out = []
    for n in names:
        packet, _, overload = n.partition(".")
        p = getattr(aten, packet, None)
        o = getattr(p, overload, None) if p is not None else None
        if o is not None:
            out.append(o)
    return out


def _owner(b: Builder, params: Any, cls: type) -> tuple[str, nn.Module, dict[str, fx.Node]] | None:
    """The one module of class ``cls`` owning every parameter placeholder in ``params``, and its
    placeholders by parameter name; None if they are not all its parameters."""
    nodes = [p for p in params if p is not None]
    names = [b.param_nodes.get(p) if isinstance(p, fx.Node) else None for p in nodes]
    if not names or any(n is None for n in names):
        return None
    paths = {n.rpartition(".")[0] for n in names}
    path = paths.pop()
    m = b.modules.get(path)
    if paths or not isinstance(m, cls):
        return None
    return path, m, {n.rpartition(".")[2]: p for n, p in zip(names, nodes)}


def _not_a_module(b: Builder, node: fx.Node, what: str) -> Any:
    freeze_inputs(b, node, f"the weights of recurrent node '{node.name}' are not those of one "
                           f"{what} module (a functional call): its channels stay")
    return empty_like_spec(out_spec(b, node))


@op_rule(*_ops("lstm.input", "lstm.data", "gru.input", "gru.data", "rnn_tanh.input",
               "rnn_tanh.data", "rnn_relu.input", "rnn_relu.data"))
def rnn_aten(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """``aten.lstm.input(input, hx, params, has_biases, num_layers, dropout, train,
    bidirectional, batch_first)`` and the ``.data`` overloads (packed: ``data, batch_sizes, hx,
    params, ...``): the flat weight list maps back to the module's parameters by name."""
    packed = node.target._overloadname == "data"
    hx, params = (node.args[2], node.args[3]) if packed else (node.args[1], node.args[2])
    found = _owner(b, params, nn.RNNBase)
    if found is None:
        return _not_a_module(b, node, "nn.LSTM/GRU/RNN")
    path, mod, nodes = found
    lay = Layout.of(mod)
    x = features(b, node, node.args[0], lay.input_size, "input features")
    hid, out = wire(b, node, lay, x, placeholder_slot(b, node, nodes))
    spec = out_spec(b, node)
    lstm = lay.gates == 4
    link_states(b, node, hx, [out, hid], path)
    y = channels_out(b, node, spec[0], out, "output")
    if lstm:
        return (y, channels_out(b, node, spec[1], out, "h_n"),
                channels_out(b, node, spec[2], hid, "c_n"))
    return (y, channels_out(b, node, spec[1], out, "h_n"))


@op_rule(*_ops("lstm_cell.default", "gru_cell.default", "rnn_tanh_cell.default",
               "rnn_relu_cell.default"))
def cell_aten(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """``aten.lstm_cell(input, [hx, cx], w_ih, w_hh, b_ih, b_hh)`` -> ``(hy, cy)`` and
    ``aten.gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh)`` -> ``hy`` (rnn_*_cell alike)."""
    hx, ws = node.args[1], list(node.args[2:6])
    found = _owner(b, ws, nn.RNNCellBase)
    if found is None:
        return _not_a_module(b, node, "nn.LSTMCell/GRUCell/RNNCell")
    path, mod, nodes = found
    gates = mod.weight_ih.shape[0] // mod.hidden_size
    x = features(b, node, node.args[0], mod.input_size, "input features")
    hid = wire_cell(b, node, gates, mod.hidden_size, bool(mod.bias), x,
                    placeholder_slot(b, node, nodes))
    link_states(b, node, hx, [hid, hid], path)
    spec = out_spec(b, node)
    if isinstance(spec, (tuple, list)):
        return tuple(channels_out(b, node, s, hid, f"state{i}") for i, s in enumerate(spec))
    return channels_out(b, node, spec, hid, "h")


# ------------------------------------------------------------------ packed sequences (fx)
@op_rule(torch.nn.utils.rnn.pack_padded_sequence)
def pack_padded(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """``(T, B, *F)`` or ``(B, T, *F)`` -> PackedSequence whose ``.data`` is ``(sum of lengths,
    *F)``: feature channels move from dim d to d - 1; time and batch are packed together.
    (fx traces it only when wrapped: ``torch.fx.wrap("pack_padded_sequence")``.)"""
    x, spec = b.info(node.args[0]), out_spec(b, node)
    data = spec[0]
    ndim = data.ndim + 1
    out = keep_axes(b, node, x, range(2, ndim), data.shape,
                    f"time/batch dim packed at '{node.name}'", {d: d - 1 for d in range(2, ndim)})
    return (out,) + tuple(TInfo(s.shape) if hasattr(s, "shape") else None for s in spec[1:])


@op_rule(torch.nn.utils.rnn.pad_packed_sequence)
def pad_packed(b: Builder, node: fx.Node, m: Any = None) -> Any:
    """PackedSequence -> ``(padded, lengths)``: the ``.data`` channels move from dim d to d + 1."""
    info, _ = _data(b, node.args[0])
    spec = out_spec(b, node)
    padded = spec[0]
    out = keep_axes(b, node, info, range(1, padded.ndim - 1), padded.shape,
                    f"packed dim at '{node.name}'", {d: d + 1 for d in range(1, padded.ndim - 1)})
    return (out, TInfo(spec[1].shape))
