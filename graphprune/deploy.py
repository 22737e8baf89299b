"""Stage 9: run an exported model in onnxruntime, compare it with its PyTorch source, time it.

    sess = graphprune.deploy.Session("out/model.onnx", threads=2)
    y = sess.run(x)                         # numpy in, numpy out; shapes and dtypes checked
    sess.benchmark(x)                       # latency percentiles in milliseconds
    graphprune.deploy.check("out/model.onnx", model, x)   # max abs / relative error vs PyTorch
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ExportError, InputError

_NP = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
       "tensor(bool)": np.bool_, "tensor(float16)": np.float16}

OPT_LEVELS = ("none", "basic", "extended", "all")


def ort_session(path: str, *, threads: int | None = None, optimization: str = "all",
                providers: Sequence[str] = ("CPUExecutionProvider",),
                profile_prefix: str | None = None, config: Mapping[str, str] | None = None,
                owner: str = "ort_session") -> Any:
    """The onnxruntime ``InferenceSession`` every graphprune runner uses: ``threads`` intra-op
    threads (one inter-op), an optimization level, quiet logs, the kernel profiler if asked;
    ``config``: session config entries (``{"session.force_spinning_stop": "1"}``); ``owner``
    names the caller in errors.

    Example:
        >>> sess = ort_session("model.onnx", threads=2)

    Raises:
        ConfigError: an unknown ``optimization``.
        ExportError: onnxruntime cannot load the file.
    """
    import onnxruntime as ort

    from ._validate import check_choice

    check_choice(optimization, "optimization", owner, OPT_LEVELS)

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
    so.log_severity_level = 3
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    try:
        return ort.InferenceSession(path, so, providers=list(providers))
    except Exception as e:  # onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime cannot load '{path}': {str(e).splitlines()[0]}") from e


class Session:
    """An onnxruntime session (CPU) with input checking and timing helpers. ``threads`` sets
    onnxruntime's intra-op threads; ``optimization`` is its graph optimization level, 'none',
    'basic', 'extended' or 'all'.

    Example:
        >>> sess = Session("model.onnx", threads=2)
        >>> sess.inputs                         # name, shape ('batch' when dynamic), type
        [('input', ['batch', 3, 224, 224], 'tensor(float)')]
        >>> x = torch.randn(1, 3, 224, 224)
        >>> logits, = sess.run(x)               # numpy (1, 1000)
        >>> sess.benchmark(x)["p50"]            # median latency in milliseconds

    Raises:
        InputError: the file does not exist.
        ExportError: onnxruntime cannot load it (not an ONNX model, or an unsupported one).
        ConfigError: an unknown optimization level.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None,
                 optimization: str = "all"):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise InputError(f"ONNX model '{path}' does not exist.")
        self.sess = ort_session(path, threads=threads, optimization=optimization, owner="Session")
        self.path = path
        self.inputs = [(i.name, list(i.shape), i.type) for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def _feeds(self, arrays: tuple[Any, ...]) -> dict[str, np.ndarray]:
        if len(arrays) != len(self.inputs):
            raise InputError(f"'{self.path}' takes {len(self.inputs)} input(s) "
                             f"({', '.join(n for n, _, _ in self.inputs)}); got {len(arrays)}.")
        feeds = {}
        for (name, shape, typ), a in zip(self.inputs, arrays):
            a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
            want = _NP.get(typ)
            if want is not None and a.dtype != want:
                if np.can_cast(a.dtype, want, casting="same_kind"):
                    a = a.astype(want)
                else:
                    raise InputError(f"input '{name}' of '{self.path}' is {typ}; got {a.dtype}.")
            if len(shape) != a.ndim or any(isinstance(s, int) and s != d for s, d in zip(shape, a.shape)):
                raise InputError(f"input '{name}' of '{self.path}' has shape "
                                 f"{['N' if not isinstance(s, int) else s for s in shape]}; got "
                                 f"{list(a.shape)}.")
            feeds[name] = a
        return feeds

    def run(self, *arrays: Any) -> list[np.ndarray]:
        """Run the model; inputs are numpy arrays or tensors, outputs numpy arrays.

        Raises:
            InputError: the wrong number of inputs, a dtype that cannot be cast safely to the
                model's, or a shape that does not match the model's fixed dims.
        """
        return self.sess.run(None, self._feeds(arrays))

    def benchmark(self, *arrays: Any, warmup: int = 10, runs: int = 100) -> dict[str, float]:
        """Latency in milliseconds: median, p90, p99, mean and min over ``runs`` runs."""
        feeds = self._feeds(arrays)
        for _ in range(warmup):
            self.sess.run(None, feeds)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            self.sess.run(None, feeds)
            times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
        return {"p50": statistics.median(times), "p90": q(0.9), "p99": q(0.99),
                "mean": statistics.fmean(times), "min": times[0], "runs": runs}


def check(path: str | os.PathLike, model: nn.Module, *inputs: Any) -> dict[str, float]:
    """Max absolute and relative error (relative to each output's largest magnitude) of the
    ONNX model vs ``model`` on ``inputs``; ``model`` runs in eval mode, its mode is restored.

    Example:
        >>> check("model.onnx", model, torch.randn(2, 3, 224, 224))
        {'max_abs_err': 8.9e-08, 'max_rel_err': 1.4e-07}

    Raises:
        InputError: the file does not exist or the inputs do not fit it (see ``Session.run``).
        ExportError: onnxruntime cannot load the file.
    """
    from .trace import preserved_state

    sess = Session(path)
    got = sess.run(*inputs)
    tens = [torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x for x in inputs]
    with preserved_state(model, "eval"):
        want = model(*tens)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    abs_err = rel_err = 0.0
    for g, w in zip(got, want):
        w = w.detach().cpu().numpy().astype(np.float64)
        d = float(np.max(np.abs(g.astype(np.float64) - w))) if w.size else 0.0
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        abs_err, rel_err = max(abs_err, d), max(rel_err, d / scale if scale else d)
    return {"max_abs_err": abs_err, "max_rel_err": rel_err}
