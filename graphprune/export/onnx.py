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
from ..errors import ConfigError, ExportError, ParityError
from ..io import OutputError, atomic_path
from ..trace import normalize_inputs, preserved_state

EXPORTERS = ("auto", "dynamo", "legacy")


@dataclass
class ExportResult:
    path: str
    exporter: str
    opset: int
    max_abs_err: float  # onnxruntime vs PyTorch on the example inputs
    max_rel_err: float
    bytes: int
    quantize: str | None = None
    cosine: float | None = None  # int8: output cosine vs PyTorch fp32 on the calibration data
    agreement: float | None = None  # int8: top-1 agreement with PyTorch on the calibration data


def _batched(args: tuple[Any, ...], n: int = 2) -> tuple[Any, ...]:
    """Repeat every tensor's batch so the exporter sees a batch > 1 (dynamic axis)."""
    return tuple(a.repeat(n, *([1] * (a.ndim - 1)))[: max(n, a.shape[0])]
                 if isinstance(a, torch.Tensor) and a.ndim > 0 else a for a in args)


def _export(model: nn.Module, args: tuple[Any, ...], path: str, exporter: str,
            dynamic_batch: bool, opset: int | None) -> None:
    n_in = sum(isinstance(a, torch.Tensor) for a in args)
    in_names = ["input"] if n_in == 1 else [f"input{i}" for i in range(n_in)]
    with torch.no_grad(), preserved_state(model, "eval"):
        y = model(*args)
    n_out = len(_flatten_out(y))
    out_names = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    kw: dict[str, Any] = {"input_names": in_names, "output_names": out_names}
    if opset is not None:
        kw["opset_version"] = opset
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            shapes = tuple({0: torch.export.Dim("batch", min=1)} if isinstance(a, torch.Tensor)
                           and a.ndim > 0 else None for a in args) if dynamic_batch else None
            torch.onnx.export(model, _batched(args) if dynamic_batch else args, path,
                              dynamo=True, external_data=False, dynamic_shapes=shapes,
                              verbose=False, **kw)
        else:
            axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
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
                check: bool = True, rtol: float = 1e-4, quantize: str | None = None,
                calibration: Any = None, calibrate_method: str = "minmax",
                min_cosine: float = 0.98) -> ExportResult:
    """Export ``model`` to a single ONNX file at ``path`` (written atomically).

    ``exporter`` is 'dynamo' (torch.export based), 'legacy' (TorchScript based; faster, deprecated
    upstream) or 'auto' (dynamo, falling back to legacy). With ``check`` the file must pass
    ``onnx.checker`` and match PyTorch in onnxruntime within ``rtol`` (relative to the output's
    largest magnitude), else nothing is written and a ``ParityError`` is raised.

    ``quantize="int8"`` writes a statically quantized QDQ model (int8 per-channel weights, uint8
    activations calibrated on ``calibration`` with ``calibrate_method``), which onnxruntime runs
    with QLinearConv / QGemm kernels; its outputs must keep a cosine of at least ``min_cosine``
    with PyTorch's on the calibration data.

    Example:
        >>> graphprune.export_onnx(result.model, torch.randn(1, 3, 224, 224), "model.onnx")

    Raises:
        ExportError: the exporters failed (nothing is written).
        ParityError: onnxruntime does not compute what PyTorch computes (nothing is written).
        ConfigError: a bad setting, or int8 without calibration data.
    """
    import onnx

    check_choice(exporter, "exporter", "export_onnx", EXPORTERS)
    if quantize not in (None, "none", "int8"):
        from ..errors import did_you_mean

        raise ConfigError(f"The 'quantize' parameter of export_onnx must be None or 'int8'. Got "
                          f"{quantize!r} instead.{did_you_mean(str(quantize), ['int8'])}")
    quantize = None if quantize == "none" else quantize
    calib = None
    if quantize == "int8":
        from ..calibration import as_calibration
        from .int8 import METHODS

        check_choice(calibrate_method, "calibrate_method", "export_onnx", METHODS)
        if calibration is None:
            raise ConfigError("export_onnx(quantize='int8') needs calibration=... (inputs shaped "
                              "like the example inputs) to choose the activation ranges.")
        calib = as_calibration(calibration, example_inputs)
    from ..quantize.qat import has_qat, strip_qat

    qat = has_qat(model)
    if qat and quantize == "int8":  # weights are on the int8 grid; activations calibrated here
        model = strip_qat(model)
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
            cos = agree = None
            if quantize == "int8":
                from .int8 import quantize_static_int8

                fp32_tmp = tmp + ".fp32"
                try:
                    os.replace(tmp, fp32_tmp)
                    quantize_static_int8(fp32_tmp, tmp, calib, method=calibrate_method)
                finally:
                    if os.path.exists(fp32_tmp):
                        os.unlink(fp32_tmp)
                onnx.checker.check_model(tmp, full_check=True)
                abs_err, rel_err = onnx_parity(tmp, model, args)
                cos, agree = int8_agreement(tmp, model, calib)
                if check and cos < min_cosine:
                    raise ParityError(
                        f"the int8 model's outputs have cosine {cos:.4f} with PyTorch's on the "
                        f"calibration data (< {min_cosine}); nothing was written. Try "
                        "calibrate_method='percentile' or more calibration data.")
            if qat and quantize is None:  # fake-quant graph: store its weights as int8
                from ..quantize.qat import int8_initializers

                int8_initializers(tmp)
            opset_used = max((o.version for o in onnx.load(tmp, load_external_data=False).opset_import
                              if o.domain in ("", "ai.onnx")), default=0)
            size = os.path.getsize(tmp)
    except OutputError as e:
        raise ExportError(str(e)) from e
    return ExportResult(path, used, opset_used, abs_err, rel_err, size, quantize, cos, agree)


def int8_agreement(path: str, model: nn.Module, calib: Any) -> tuple[float, float]:
    """Cosine of the ONNX outputs vs PyTorch's, and top-1 agreement, over the calibration data."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    dot = na = nb = 0.0
    same = total = 0
    for xs, _ in calib:
        got = sess.run(None, {n: x.numpy() for n, x in zip(names, xs)})[0].astype(np.float64)
        with preserved_state(model, "eval"):
            want = _flatten_out(model(*xs))[0].astype(np.float64)
        dot += float((got * want).sum())
        na += float((got * got).sum())
        nb += float((want * want).sum())
        if got.ndim == 2:
            same += int((got.argmax(1) == want.argmax(1)).sum())
            total += got.shape[0]
    cos = dot / (na * nb) ** 0.5 if na and nb else 1.0
    return cos, (same / total if total else float("nan"))
