"""Export a (pruned) model to a single-file ONNX model with a dynamic batch axis.

The file is checked with ``onnx.checker``, run once in onnxruntime against PyTorch on the example
inputs, and only then moved into place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validate import check_choice
from ..errors import ExportError, ParityError
from ..io import OutputError, atomic_path
from ..trace import normalize_inputs, preserved_state

EXPORTERS = ("auto", "dynamo", "legacy")


@dataclass
class ExportResult:
    path: str
    exporter: str
    opset: int
    max_abs_err: float
    max_rel_err: float
    bytes: int


def _batched(args: tuple[Any, ...], n: int = 2) -> tuple[Any, ...]:
    """Repeat every tensor's batch so the exporter sees a batch > 1 (dynamic axis)."""
    return tuple(a.repeat(n, *([1] * (a.ndim - 1)))[: max(n, a.shape[0])]
                 if isinstance(a, torch.Tensor) and a.ndim > 0 else a for a in args)


def _export(model: nn.Module, args: tuple[Any, ...], path: str, exporter: str,
            dynamic_batch: bool, opset: int | None) -> None:
    n_in = sum(isinstance(a, torch.Tensor) for a in args)
    in_names = ["input"] if n_in == 1 else [f"input{i}" for i in range(n_in)]
    kw: dict[str, Any] = {"input_names": in_names}
    if opset is not None:
        kw["opset_version"] = opset
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            shapes = tuple({0: torch.export.Dim("batch", min=1)} if isinstance(a, torch.Tensor)
                           and a.ndim > 0 else None for a in args) if dynamic_batch else None
            torch.onnx.export(model, _batched(args) if dynamic_batch else args, path,
                              dynamo=True, external_data=False, dynamic_shapes=shapes,
                              verbose=False, **kw)
        else:
            axes = {n: {0: "batch"} for n in in_names} if dynamic_batch else None
            torch.onnx.export(model, args, path, dynamo=False, dynamic_axes=axes, **kw)


def _flatten_out(y: Any) -> list[np.ndarray]:
    if isinstance(y, torch.Tensor):
        return [y.detach().cpu().numpy()]
    if isinstance(y, (list, tuple)):
        return [a for v in y for a in _flatten_out(v)]
    if isinstance(y, dict):
        return [a for v in y.values() for a in _flatten_out(v)]
    return []


def onnx_parity(path: str, model: nn.Module, example_inputs: Any) -> tuple[float, float]:
    """Max absolute and relative error of onnxruntime vs PyTorch on ``example_inputs``."""
    import onnxruntime as ort

    args, _ = normalize_inputs(example_inputs)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().cpu().numpy()
             for i, a in zip(sess.get_inputs(), [a for a in args if isinstance(a, torch.Tensor)])}
    got = sess.run(None, feeds)
    with preserved_state(model, "eval"):
        want = _flatten_out(model(*args))
    if len(got) != len(want):
        raise ParityError(f"ONNX model '{path}' has {len(got)} outputs, PyTorch {len(want)}.")
    abs_err = rel_err = 0.0
    for g, w in zip(got, want):
        d = float(np.max(np.abs(g.astype(np.float64) - w))) if w.size else 0.0
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        abs_err = max(abs_err, d)
        rel_err = max(rel_err, d / scale if scale > 0 else d)
    return abs_err, rel_err


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                dynamic_batch: bool = True, opset: int | None = None, exporter: str = "auto",
                check: bool = True, rtol: float = 1e-4) -> ExportResult:
    """Export ``model`` to a single ONNX file at ``path`` (written atomically).

    ``exporter`` is 'dynamo' (torch.export based), 'legacy' (TorchScript based; faster, deprecated
    upstream) or 'auto' (dynamo, falling back to legacy). With ``check`` the file must pass
    ``onnx.checker`` and match PyTorch in onnxruntime within ``rtol`` (relative to the output's
    largest magnitude), else nothing is written and a ``ParityError`` is raised.

    Example:
        >>> graphprune.export_onnx(result.model, torch.randn(1, 3, 224, 224), "model.onnx")
    """
    import onnx

    check_choice(exporter, "exporter", "export_onnx", EXPORTERS)
    args, kwargs = normalize_inputs(example_inputs)
    if kwargs:
        raise ExportError("export_onnx takes positional example inputs (a tensor or a tuple), "
                          f"not keyword inputs ({', '.join(kwargs)}).")
    path = os.fspath(path)
    order = ["dynamo", "legacy"] if exporter == "auto" else [exporter]
    errors = []
    try:
        with atomic_path(path) as tmp:
            for ex in order:
                try:
                    with preserved_state(model, "eval"):
                        _export(model, args, tmp, ex, dynamic_batch, opset)
                    onnx.checker.check_model(tmp, full_check=True)
                    used = ex
                    break
                except Exception as e:  # exporter failures come in many types
                    errors.append(f"{ex}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            else:
                raise ExportError(f"exporting {type(model).__name__} to ONNX failed; nothing was "
                                  "written. " + " | ".join(errors))
            abs_err = rel_err = 0.0
            if check:
                abs_err, rel_err = onnx_parity(tmp, model, args)
                if rel_err > rtol:
                    raise ParityError(
                        f"the ONNX model differs from PyTorch by {rel_err:.2e} (relative, max "
                        f"abs {abs_err:.2e}) > rtol={rtol:g}; nothing was written.")
            opset_used = max((o.version for o in onnx.load(tmp, load_external_data=False).opset_import
                              if o.domain in ("", "ai.onnx")), default=0)
            size = os.path.getsize(tmp)
    except OutputError as e:
        raise ExportError(str(e)) from e
    return ExportResult(path, used, opset_used, abs_err, rel_err, size)
