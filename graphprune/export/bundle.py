"""Export a deployable bundle: ``model.onnx`` with, next to it, the mask file (safetensors), the
plan (JSON) and ``report.json`` (params, MACs, bytes, quantization settings, parity figures).
Everything is staged and moved into place at the end, so a failure leaves nothing behind."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from torch import nn

from ..io import atomic_write_text, staged_dir
from .onnx import export_onnx


def export_bundle(out_dir: str | os.PathLike, model: nn.Module, example_inputs: Any, *,
                  result: Any = None, quantize: str | None = None, calibration: Any = None,
                  exporter: str = "auto", report: dict[str, Any] | None = None,
                  calibrate_method: str = "minmax",
                  finish: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Write the bundle for ``model`` (the pruned model of ``result``, a ``PruneResult``, whose
    masks, plan and report are saved too). Returns the report written to ``report.json``.

    ``finish(stage_dir, report)`` runs after the model, masks and plan are staged and before
    ``report.json`` is written: it may add files to the bundle and figures to the report (the
    main job evaluates the staged model there). If anything fails, nothing is left behind.

    Raises:
        ExportError / ConfigError: the export failed or a setting is wrong (nothing is written).
        OutputError: ``out_dir`` cannot be written.

    Example:
        >>> r = graphprune.prune(model, x, sparsity=0.5)
        >>> graphprune.export_bundle("out/bundle", r.model, x, result=r)
    """
    from .masks import save_masks

    rep: dict[str, Any] = dict(report or {})
    if result is not None:
        rep.update(result.report.to_dict())
    with staged_dir(out_dir) as stage:
        ex = export_onnx(model, example_inputs, os.path.join(stage, "model.onnx"),
                         exporter=exporter, quantize=quantize, calibration=calibration,
                         calibrate_method=calibrate_method)
        rep["onnx"] = {"file": "model.onnx", "bytes": ex.bytes, "exporter": ex.exporter,
                       "opset": ex.opset, "quantize": ex.quantize or "fp32",
                       "max_abs_err": ex.max_abs_err, "max_rel_err": ex.max_rel_err,
                       **({"int8_cosine": ex.cosine, "int8_top1_agreement": ex.agreement}
                          if ex.quantize else {}),
                       **({"calibrate_method": calibrate_method, "weights": "int8 per channel",
                           "activations": "uint8 per tensor"} if ex.quantize else {})}
        if result is not None:
            save_masks(result.masks, os.path.join(stage, "masks.safetensors"), plan=result.plan)
            result.plan.save(os.path.join(stage, "plan.json"))
        if finish is not None:
            finish(stage, rep)
        atomic_write_text(os.path.join(stage, "report.json"),
                          json.dumps(rep, indent=1, default=_jsonable) + "\n")
    return rep


def _jsonable(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)
