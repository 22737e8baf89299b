"""Parameters, multiply-accumulates (MACs) and bytes of a model, counted from the traced graph.

MACs count the multiply-accumulates of convolutions, linear layers, matrix products and
attention (the convention of most papers); element-wise ops and normalisation are not counted.
After pruning, MACs are counted from the shapes the plan implies, without running the model.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .trace import TensorSpec

_aten = torch.ops.aten
_MATMUL = (torch.matmul, operator.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm",
           _aten.matmul.default, _aten.bmm.default, _aten.mm.default)
_LINEAR = (torch.nn.functional.linear, _aten.linear.default)
_EINSUM = (torch.einsum, _aten.einsum.default)
_CONV = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
         torch.conv2d, torch.conv1d, torch.conv3d, _aten.conv1d.default, _aten.conv2d.default,
         _aten.conv3d.default)
_SDPA = (torch.nn.functional.scaled_dot_product_attention,
         _aten.scaled_dot_product_attention.default)
_RNN_OPS = {getattr(getattr(_aten, op), ov): g for op, g in (("lstm", 4), ("gru", 3), ("rnn_tanh", 1),
                                                              ("rnn_relu", 1)) for ov in ("input", "data")}
_CELL_OPS = {_aten.lstm_cell.default: 4, _aten.gru_cell.default: 3, _aten.rnn_tanh_cell.default: 1,
             _aten.rnn_relu_cell.default: 1}


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_bytes(model: nn.Module) -> int:
    """Bytes of all distinct parameters and buffers."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _numel(shape: Any) -> int:
    return math.prod(shape) if isinstance(shape, tuple) and all(isinstance(s, int) for s in shape) else 0


def _conv_macs(m: nn.Module, in_shape: tuple, out_shape: tuple) -> int:
    """From the value shapes, so that it also counts a conv whose channels a plan reduced."""
    if not (isinstance(in_shape, tuple) and isinstance(out_shape, tuple)):
        return 0
    cdim = len(in_shape) - (m.weight.ndim - 1)
    cin, cout = in_shape[cdim], out_shape[cdim]
    depthwise = m.groups > 1 and m.in_channels // m.groups == 1
    g = cin if depthwise else m.groups
    k = math.prod(m.weight.shape[2:])
    if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return _numel(in_shape) * (cout // g) * k
    return _numel(out_shape) * (cin // g) * k


def _mha_macs(m: nn.MultiheadAttention, q: tuple, k: tuple) -> int:
    e = m.embed_dim
    lq = q[0] if not m.batch_first and len(q) == 3 else (q[1] if len(q) == 3 else q[0])
    lk = k[0] if not m.batch_first and len(k) == 3 else (k[1] if len(k) == 3 else k[0])
    batch = _numel(q) // (lq * e) if lq * e else 1
    kd, vd = m.kdim, m.vdim
    return batch * (lq * e * e + lk * kd * e + lk * vd * e + 2 * lq * lk * e + lq * e * e)


def _rnn_macs(gates: int, layers: int, dirs: int, x: Any, y: Any, h_n: Any, hidden: Any) -> int:
    """Input and recurrent gate products of every layer and direction at every step, plus the
    projection of an LSTM with ``proj_size``: steps * sum_k dirs * (gates*H*(in_k + O) [+ O*H])."""
    if isinstance(x, tuple) and x and isinstance(x[0], tuple):  # PackedSequence: its .data
        x, y = x[0], y[0]
    if not all(isinstance(s, tuple) and s and isinstance(s[-1], int) for s in (x, y, h_n, hidden)):
        return 0
    o, h = h_n[-1], hidden[-1]
    per = 0
    for k in range(layers):
        fin = x[-1] if k == 0 else dirs * o
        per += dirs * (gates * h * (fin + o) + (o * h if o != h else 0))
    return _numel(y) // y[-1] * per


def node_macs(node: fx.Node, modules: dict[str, nn.Module], shapes: dict[str, Any],
              params: dict[str, torch.Tensor]) -> int:
    """MACs of one node given the shapes of the values (node name -> shape)."""
    def shp(a: Any) -> Any:
        return shapes.get(a.name) if isinstance(a, fx.Node) else None

    out = shapes.get(node.name)
    if node.op == "call_module":
        m = modules.get(node.target)
        if m is None or not node.args:
            return 0
        x = shp(node.args[0])
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                          nn.ConvTranspose3d)):
            return _conv_macs(m, x, out)
        if isinstance(m, nn.Linear):
            return _numel(out) * (x[-1] if isinstance(x, tuple) and x else m.in_features)
        if type(m).__name__ == "Conv1D" and hasattr(m, "nf"):  # transformers' Conv1D (in, out)
            return _numel(out) * (x[-1] if isinstance(x, tuple) and x else m.nx)
        if isinstance(m, nn.Bilinear):
            return _numel(out) * m.in1_features * m.in2_features
        if isinstance(m, nn.MultiheadAttention) and len(node.args) >= 2:
            return _mha_macs(m, x, shp(node.args[1]) or x)
        if isinstance(m, nn.RNNBase) and isinstance(out, tuple) and len(out) == 2:
            lstm = m.mode == "LSTM"
            h_n = out[1][0] if lstm else out[1]
            return _rnn_macs({"LSTM": 4, "GRU": 3}.get(m.mode, 1), m.num_layers,
                             2 if m.bidirectional else 1, x, out[0], h_n, out[1][1] if lstm else h_n)
        if isinstance(m, nn.RNNCellBase) and out is not None:
            h = out[0] if isinstance(m, nn.LSTMCell) else out
            g = m.weight_ih.shape[0] // m.hidden_size
            return _rnn_macs(g, 1, 1, x, h, h, h)
        return 0
    if node.op in ("call_function", "call_method"):
        t = node.target
        if t in _MATMUL:
            a = shp(node.args[0])
            if isinstance(a, tuple) and a:
                return _numel(out) * a[-1]
        if t in _EINSUM and node.args and isinstance(node.args[0], str):
            from .rules.einsum import einsum_macs

            ops = node.args[1:]
            if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
                ops = ops[0]
            return einsum_macs(node.args[0], [shp(o) for o in ops]) if all(
                isinstance(shp(o), tuple) for o in ops) else 0
        if t in (_aten.addmm.default, torch.addmm, "addmm") and len(node.args) > 1:
            a = shp(node.args[1])
            if isinstance(a, tuple) and a:
                return _numel(out) * a[-1]
        if t in _LINEAR:
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            ws = shp(w)
            if isinstance(ws, tuple) and len(ws) == 2:
                return _numel(out) * ws[1]
        if t in _CONV:
            ws = shp(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
            if isinstance(ws, tuple):
                return _numel(out) * math.prod(ws[1:])
        if t in _RNN_OPS and isinstance(out, tuple) and len(out) >= 2:
            packed = t._overloadname == "data"
            layers, bidi = node.args[5:9:3] if packed else node.args[4:8:3]
            return _rnn_macs(_RNN_OPS[t], layers, 2 if bidi else 1, shp(node.args[0]), out[0],
                             out[1], out[2] if len(out) > 2 else out[1])
        if t in _CELL_OPS and out is not None:
            h = out[0] if isinstance(out, tuple) and out and isinstance(out[0], tuple) else out
            return _rnn_macs(_CELL_OPS[t], 1, 1, shp(node.args[0]), h, h, h)
        if t in _SDPA:
            q, k = shp(node.args[0]), shp(node.args[1])
            if isinstance(q, tuple) and isinstance(k, tuple):
                return _numel(q) * k[-2] * 2
    return 0


def layer_of(node: fx.Node, params: dict[str, str]) -> str | None:
    """The module a node computes: its target for ``call_module``; for a functional layer whose
    weight is an export placeholder (``params``: placeholder -> parameter name), that owner;
    otherwise None."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_function" and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
        name = params.get(node.args[1].name)
        if name is not None and name.endswith(".weight"):
            return name.rpartition(".")[0]
    return None


def spec_shapes(values: dict[fx.Node, Any]) -> dict[str, Any]:
    """node name -> shape (or tuple of shapes) from recorded values."""
    def f(v: Any) -> Any:
        if isinstance(v, TensorSpec):
            return v.shape
        if isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
            return tuple(f(x) for x in v)
        return None
    return {n.name: f(v) for n, v in values.items()}
