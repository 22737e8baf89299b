"""Weight-only quantization of an exported ONNX model's MatMuls (stage 8, after ``export_decoder``).

Every MatMul whose weight is a constant becomes onnxruntime's ``MatMulNBits`` (com.microsoft):
the weight is stored as 4- or 8-bit integers in blocks of ``block_size`` input channels, each
block with its own scale (and zero point unless ``symmetric``), and dequantized inside the
kernel; activations stay float. This is onnxruntime's own quantizer
(``onnxruntime.quantization.matmul_nbits_quantizer``, round-to-nearest), so the file runs on
every onnxruntime CPU build. The embedding table (a ``Gather``) can be stored in 4 bits too
(``GatherBlockQuantized``).

The file is written atomically after ``onnx.checker`` and a comparison with the float model in
onnxruntime (cosine of the logits, top-1 agreement); a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validate import check_choice, check_int
from ..errors import ConfigError, ExportError, InputError, ParityError
from ..io import OutputError, atomic_path


@dataclass
class WeightOnlyResult:
    path: str
    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int | None
    bytes: int
    source_bytes: int
    quantized: int  # MatMuls (and Gathers) now stored in ``bits`` bits
    kept_float: list[str]  # modules whose MatMul stayed float (``exclude``)
    cosine: float | None  # logits vs the float model in onnxruntime, flattened
    agreement: float | None  # top-1 agreement of the next-token prediction with the float model


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizers log every node at INFO level (some on the root logger)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def module_of(node: Any) -> str:
    """The PyTorch module a node came from (``model.layers.0.mlp.down_proj``, ``lm_head``), read
    from the dynamo exporter's name scopes or the legacy exporter's node name; without the
    ``model.`` of export_decoder's wrapper."""
    import ast

    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    if scopes:
        with contextlib.suppress(ValueError, SyntaxError):
            path = ast.literal_eval(scopes)[-2]
            return path[len("model."):] if path.startswith("model.") else path
    parts = node.name.strip("/").split("/")[:-1]
    return ".".join(parts[1:] if parts[:1] == ["model"] else parts) or node.name


def _constant_matmuls(model: Any) -> dict[str, str]:
    """Node name -> module path of every MatMul whose weight is an initializer."""
    inits = {i.name for i in model.graph.initializer}
    return {n.name: module_of(n) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits}


def probe_feeds(sess: Any, input_ids: np.ndarray | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a decoder exported by ``export_decoder``: ``input_ids`` (random ids over the
    vocabulary, ``(2, 32)``, unless given), a full mask, positions and an empty past."""
    ins = {i.name: i for i in sess.get_inputs()}
    if "input_ids" not in ins:
        raise InputError(f"the ONNX model has no 'input_ids' input (inputs: {', '.join(ins)}); "
                         "quantize_weights checks decoders written by export_decoder.")
    if input_ids is None:
        vocab = sess.get_outputs()[0].shape[-1]
        vocab = vocab if isinstance(vocab, int) else 2
        input_ids = np.random.default_rng(seed).integers(0, vocab, (2, 32))
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2:
        raise InputError(f"The 'input_ids' parameter of quantize_weights must be a 2-D (batch, "
                         f"sequence) array of token ids. Got shape {ids.shape} instead.")
    b, n = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((b, n), np.int64)}
    if "position_ids" in ins:
        feeds["position_ids"] = np.broadcast_to(np.arange(n, dtype=np.int64), (b, n)).copy()
    for name, i in ins.items():
        if name.startswith("past_key_values."):
            dtype = np.float16 if i.type == "tensor(float16)" else np.float32
            feeds[name] = np.zeros((b, i.shape[1], 0, i.shape[3]), dtype)
    return feeds


def logits_agreement(fp_path: str, q_path: str, feeds: dict[str, np.ndarray]) -> tuple[float, float]:
    """Cosine of ``q_path``'s logits with ``fp_path``'s (flattened) and the fraction of positions
    whose most likely next token is the same."""
    import onnxruntime as ort

    a, b = (ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
            .astype(np.float64) for p in (fp_path, q_path))
    cos = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))
    return cos, float((a.argmax(-1) == b.argmax(-1)).mean())


def quantize_weights(onnx_in: str | os.PathLike, onnx_out: str | os.PathLike, *, bits: int = 4,
                     block_size: int = 32, symmetric: bool = False, accuracy_level: int | None = 4,
                     exclude: Sequence[str] = (), embeddings: bool = False, check: bool = True,
                     min_cosine: float = 0.98, input_ids: np.ndarray | None = None
                     ) -> WeightOnlyResult:
    """Store the constant weights of ``onnx_in``'s MatMuls in ``bits`` (4 or 8) bits, blockwise,
    as onnxruntime ``MatMulNBits``, and write the result to ``onnx_out`` (atomically).

    ``block_size`` (a power of two >= 16) input channels share one scale; smaller blocks are more
    accurate and a little larger. ``accuracy_level`` is MatMulNBits' compute type: 4 (default)
    quantizes the activations to int8 per block inside the kernel, the fast path on CPUs with
    int8 dot products (on this machine 8-bit decoding is ~5x slower without it); None keeps
    float activations (the exact weight-only numerics). MatMuls of the modules whose path contains
    one of ``exclude`` (e.g. ``"lm_head"``, ``"mlp.down_proj"``) stay float; ``embeddings`` also
    stores the token embedding table in 4 bits. With ``check`` (decoders from
    ``export_decoder``) the logits must keep a cosine of at least ``min_cosine`` with the float
    model's on ``input_ids`` (random ids if None), else nothing is written.

    Raises:
        ConfigError: a setting is out of range.
        InputError: ``onnx_in`` is missing or not an ONNX model.
        ExportError: ``onnx_out`` cannot be written, or nothing was quantized.
        ParityError: the quantized logits drift below ``min_cosine`` (nothing is written).

    Example:
        >>> export_decoder(model, "out/model.onnx")
        >>> quantize_weights("out/model.onnx", "out/model.int4.onnx", bits=4).cosine > 0.99
        True
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    owner = "quantize_weights"
    check_choice(bits, "bits", owner, (4, 8))
    block_size = check_int(block_size, "block_size", owner, low=16)
    if block_size & (block_size - 1):
        raise ConfigError(f"The 'block_size' parameter of {owner} must be a power of two >= 16. Got "
                          f"{block_size} instead.", param="block_size")
    if accuracy_level is not None:
        check_choice(accuracy_level, "accuracy_level", owner, (0, 1, 2, 3, 4))
    if embeddings and bits != 4:
        raise ConfigError(f"{owner}(embeddings=True) needs bits=4: onnxruntime stores embedding tables "
                          f"only in 4 bits (GatherBlockQuantized). Got bits={bits}.", param="embeddings")
    src, dst = os.fspath(onnx_in), os.fspath(onnx_out)
    try:
        model = onnx.load(src)
    except Exception as e:  # missing file, not protobuf
        raise InputError(f"cannot read the ONNX model '{src}': {type(e).__name__}: {e}") from e
    targets = _constant_matmuls(model)
    if isinstance(exclude, str):
        exclude = [exclude]
    kept = [n for n, mod in targets.items() if any(x in mod for x in exclude)]
    if len(kept) == len(targets):
        raise ExportError(f"'{src}' has no MatMul with a constant weight to quantize"
                          + (f" outside exclude={list(exclude)}." if targets else "."))
    ops = ("MatMul", "Gather") if embeddings else ("MatMul",)
    try:
        with _quiet():
            q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level, nodes_to_exclude=kept,
                                     op_types_to_quantize=ops)
            q.process()
        out = q.model.model
        done = sum(n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in out.graph.node)
        with atomic_path(dst) as tmp:
            onnx.save(out, tmp)
            onnx.checker.check_model(tmp, full_check=True)
            cos = agree = None
            if check:
                import onnxruntime as ort

                sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
                cos, agree = logits_agreement(src, tmp, probe_feeds(sess, input_ids))
                if cos < min_cosine:
                    raise ParityError(
                        f"the {bits}-bit model's logits have cosine {cos:.4f} with the float model's "
                        f"(< {min_cosine}); nothing was written. Try a smaller block_size or "
                        "exclude=['lm_head'].")
            size = os.path.getsize(tmp)
    except OutputError as e:
        raise ExportError(str(e)) from e
    return WeightOnlyResult(dst, bits, block_size, symmetric, accuracy_level, size,
                            os.path.getsize(src), done, [targets[n] for n in kept], cos, agree)
