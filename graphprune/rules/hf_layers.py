"""Channel rules for layers of Hugging Face ``transformers`` that are not torch.nn classes.

They are registered by dotted class name, so importing graphprune never imports transformers.
``Conv1D`` (GPT-2, OpenAI GPT) is a linear layer with a transposed weight, ``(in, out)``: under
torch.fx it stays a leaf and this rule describes it; under torch.export it becomes
``view -> aten.addmm -> view`` (see ``aten.addmm``). Either way its resizer refreshes ``nf`` and
``nx``, which its forward reads (``x.view(*x.size()[:-1], self.nf)``).
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from .common import keep_axes, out_spec
from .elements import Builder, TInfo
from .registry import module_rule, resizer

CONV1D = "transformers.pytorch_utils.Conv1D"


@module_rule(CONV1D, leaf=True)
def conv1d(b: Builder, node: fx.Node, m: nn.Module) -> TInfo:
    """``y = x @ weight + bias`` over the last dim; weight ``(nx, nf)``."""
    x = b.info(node.args[0]) if node.args else None
    spec = out_spec(b, node)
    last = spec.ndim - 1
    path = node.target
    out = keep_axes(b, node, x, range(last), spec.shape,
                    f"channel axis spanning the features of '{path}'", consumed=[last])
    oa = b.new_axis(node.name, (last,), (m.nf,))
    b.source(oa.elems())
    b.member(f"{path}.weight", 1, oa.elems(), role="out", module=path)
    if getattr(m, "bias", None) is not None:
        b.member(f"{path}.bias", 0, oa.elems(), role="out", module=path)
    i = b.along(x, last)
    if i is None or i.size != m.nx:
        i = b.new_axis(f"{node.name}:input features", (last,), (m.nx,)).elems()
        b.freeze(i, f"input features of '{path}' are fed by a dim that is not a channel")
    b.member(f"{path}.weight", 0, i, role="in", module=path)
    out.axes.append(oa)
    return out


@resizer(CONV1D)
def resize_conv1d(m: nn.Module, in_shape: Any) -> None:
    m.nx, m.nf = int(m.weight.shape[0]), int(m.weight.shape[1])
