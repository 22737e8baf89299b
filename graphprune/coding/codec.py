"""Deep Compression storage (Han et al., ICLR 2016): sparse positions as relative indices,
codebook indices, Huffman coding; also plain fixed-width ("linear") and fixed-point coding.
Stage 7 of the flow (after quantization): ``encode`` writes a file, ``decode`` reads it back.

File format (version 1, little-endian)::

    b"GPCODE\\x00\\x01"        magic and format version
    u32 H, H bytes          header: zlib-compressed UTF-8 JSON, sorted keys (below)
    u32                     CRC-32 of the (compressed) header bytes
    payload                 the tensors' bytes, back to back, up to the end of the file

The header is ``{"format": "graphprune.coded", "version": 1, "tensors": [entry, ...]}``; each
entry has ``name``, ``shape``, ``dtype``, ``kind`` ('raw', 'huffman', 'linear', 'fixed_point'),
``crc32`` and ``span`` (offset and length of its bytes in the payload; the spans follow each
other and the last one ends the file) and, for coded kinds, the quantization (``scheme``,
``bits``, ``qmin``, ``dequant``: a codebook or scale/zero point/axis) and ``segments``: name ->
[offset, length, bits, count] inside the tensor's bytes. Codes are stored minus ``qmin``; a
fixed-width ``codes`` segment holds ``count`` codes of ``bits`` bits, MSB first. Huffman kinds
store the code lengths of their alphabets (one byte per symbol; canonical codes) and, in
``mode='sparse'``, the number of zeros before each stored entry (``gaps``, capped at
2**index_bits - 1 with filler entries, as in Deep Compression) followed by the stored codes;
``mode='dense'`` codes every entry. Decoding recomputes the values from the codes with the
quantizer's own ``dequantize``, so they are bit-exact. A float tensor that was not quantized
but has at most 256 distinct values is coded through its own codebook when that is smaller
than storing it raw.
"""

from __future__ import annotations

import fnmatch
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..io import atomic_write_bytes, read_file
from ..quantize.tensor import QuantizedTensor, dequantize
from . import bits, container, huffman
from .container import MAGIC, VERSION, CodingError

__all__ = ["MAGIC", "METHODS", "VERSION", "CodingError", "EncodeReport", "decode", "encode"]

METHODS = ("huffman", "linear", "fixed_point", "raw")


@dataclass
class EncodeReport:
    """What ``encode`` wrote: the file's bytes, the fp32 bytes of the same tensors, and per
    tensor its ``kind``, ``bytes`` and (Huffman) ``mode``; ``ratio`` is fp32 bytes over file
    bytes.

    Example:
        >>> report = encode(graphprune.quantize.quantize(model, KMeans(bits=4)), "model.gpc")
        >>> report.ratio                        # e.g. 5.3 for a dense model, more once pruned
        >>> report.tensors["0.weight"]
        {'kind': 'huffman', 'bytes': 184, 'mode': 'dense'}
    """

    path: str
    bytes: int
    fp32_bytes: int
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.bytes if self.bytes else 0.0


_DT = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
       torch.float64: "float64", torch.int64: "int64", torch.int32: "int32", torch.bool: "bool",
       torch.uint8: "uint8", torch.int8: "int8", torch.int16: "int16"}
_TD = {v: k for k, v in _DT.items()}


class _Seg:
    """Collects the byte segments of one tensor."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.segs: dict[str, list[int]] = {}

    def add(self, name: str, data: bytes, nbits: int = 0, count: int = 0) -> None:
        self.segs[name] = [len(self.buf), len(data), nbits, count]
        self.buf += data


class _Stream:
    """A symbol stream with its Huffman code lengths and its approximate coded size."""

    def __init__(self, sym: np.ndarray, alphabet: int) -> None:
        freq = np.bincount(sym, minlength=alphabet)
        self.sym, self.alphabet = sym, alphabet
        self.lengths = huffman.code_lengths(freq)
        self.cost = int((self.lengths * freq).sum() // 8) + alphabet

    def add_to(self, seg: _Seg, name: str) -> None:
        data, nbits = huffman.encode(self.sym, self.lengths)
        seg.add(name + "_lengths", self.lengths.astype(np.uint8).tobytes(), 0, self.alphabet)
        seg.add(name, data, nbits, int(self.sym.size))


def _sparse_stream(codes: np.ndarray, zero: int, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(gaps, stored codes): zeros before each stored entry, fillers where a gap is too long."""
    maxgap = (1 << index_bits) - 1
    pos = np.flatnonzero(codes != zero)
    gaps = np.diff(np.concatenate([[-1], pos])) - 1
    n_fill = gaps // (maxgap + 1)
    rest = gaps - n_fill * (maxgap + 1)
    reps = n_fill + 1
    out_gaps = np.full(int(reps.sum()), maxgap, dtype=np.int64)
    out_vals = np.full(out_gaps.size, zero, dtype=np.int64)
    last = np.cumsum(reps) - 1  # index of each real entry after its fillers
    out_gaps[last] = rest
    out_vals[last] = codes[pos]
    return out_gaps, out_vals


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


def _encode_tensor(name: str, t: torch.Tensor, q: QuantizedTensor | None, kind: str,
                   index_bits: int) -> tuple[dict[str, Any], bytes]:
    entry: dict[str, Any] = {"name": name, "shape": list(t.shape), "dtype": _DT[t.dtype]}
    seg = _Seg()
    if q is None or kind == "raw":
        seg.add("data", _raw_bytes(t))
        entry["kind"] = "raw"
    else:
        codes = q.codes.to(torch.int64).flatten().numpy()
        qmin = int(codes.min()) if codes.size else 0
        sym = codes - qmin
        alphabet = int(sym.max()) + 1 if sym.size else 1
        entry.update(kind=kind, scheme=q.scheme, bits=q.bits, qmin=qmin)
        if q.codebook is not None:
            entry["dequant"] = {"type": "codebook"}
            seg.add("codebook", q.codebook.to(torch.float32).numpy().tobytes())
        else:
            entry["dequant"] = {"type": "affine", "axis": q.axis}
            seg.add("scale", q.scale.to(torch.float32).reshape(-1).numpy().tobytes())
            seg.add("zero_point", q.zero_point.to(torch.int32).reshape(-1).numpy().tobytes())
            entry["dequant"]["scale_shape"] = list(q.scale.shape)
        if kind in ("linear", "fixed_point"):
            width = max(1, int(alphabet - 1).bit_length())
            packed, _ = bits.pack(sym, np.full(sym.size, width))
            seg.add("codes", packed, width, int(sym.size))  # 'bits' holds the code width
        else:  # huffman: sparse (relative indices) or dense, whichever is smaller
            zero = _zero_code(q) - qmin if _zero_code(q) is not None else None
            entry["index_bits"] = index_bits
            dense, sparse = _Stream(sym, alphabet), None
            if zero is not None and 0 <= zero < alphabet:
                g, v = _sparse_stream(sym, zero, index_bits)
                sparse = _Stream(g, 1 << index_bits), _Stream(v, alphabet)
                if sparse[0].cost + sparse[1].cost >= dense.cost:
                    sparse = None
            if sparse:
                entry.update(mode="sparse", zero=int(zero))
                sparse[0].add_to(seg, "gaps")
                sparse[1].add_to(seg, "values")
            else:
                entry["mode"] = "dense"
                dense.add_to(seg, "values")
    data = bytes(seg.buf)
    entry["segments"] = seg.segs
    entry["crc32"] = zlib.crc32(data)
    return entry, data


def _zero_code(q: QuantizedTensor) -> int | None:
    """The code whose value is exactly 0.0 (where pruned weights sit), if any."""
    if q.codebook is not None:
        hit = np.flatnonzero(q.codebook.numpy() == 0)
        return int(hit[0]) if hit.size else None
    zp = q.zero_point.reshape(-1)
    return int(zp[0]) if bool((zp == zp[0]).all()) else None


def _auto_quantized(t: torch.Tensor) -> QuantizedTensor | None:
    """A float tensor with at most 256 distinct values is coded exactly through its own codebook."""
    if not t.is_floating_point() or t.numel() < 64:
        return None
    vals, inv = torch.unique(t.detach().float().flatten(), return_inverse=True)
    if vals.numel() > 256 or not torch.equal(vals[inv].view_as(t), t.detach().float()):
        return None
    zero = (vals == 0).nonzero().flatten()
    if zero.numel():  # code 0 <-> 0.0 so that pruned weights are cheap
        order = torch.cat([zero, (vals != 0).nonzero().flatten()])
        remap = torch.empty_like(order)
        remap[order] = torch.arange(order.numel())
        vals, inv = vals[order], remap[inv]
    bits_ = max(1, int(vals.numel() - 1).bit_length())
    return QuantizedTensor(inv.view_as(t).to(torch.int32), "codebook", bits_, codebook=vals)


def encode(obj: Any, path: str | os.PathLike, *, method: str = "huffman",
           rules: Mapping[str, str] | None = None, index_bits: int = 8) -> EncodeReport:
    """Code a model, a state dict, or a ``QuantizedModel`` into ``path`` (atomically).

    Quantized weights (from ``graphprune.quantize``) are coded with ``method``: 'huffman' (Deep
    Compression: relative indices of the non-zeros plus Huffman-coded codebook indices),
    'linear' (log2(levels) bits per weight) or 'fixed_point' (the fixed-point integers as they
    are). A float tensor that was not quantized but has at most 256 distinct values gets its
    own codebook and is coded the same way when that takes fewer bytes than storing it raw;
    every other tensor is stored raw. ``rules`` maps state_dict name patterns (shell globs) to
    a method, overriding ``method``.

    Example:
        >>> q = graphprune.quantize.quantize(model, KMeans(bits=4))
        >>> report = encode(q, "model.gpc")
        >>> report.bytes, report.ratio  # the file's size, fp32 bytes over it

    Raises:
        ConfigError: an unknown method, ``index_bits`` outside [1, 16], an unsupported tensor,
            or quantized weights that no longer match their codes.
    """
    from ..quantize.api import QuantizedModel

    for m in [method, *(rules or {}).values()]:
        if m not in METHODS:
            from ..errors import unknown_name

            raise unknown_name("coding method", m, METHODS)
    if not 1 <= int(index_bits) <= 16:
        raise ConfigError(f"The 'index_bits' parameter of encode must be an int in [1, 16]. "
                          f"Got {index_bits!r} instead.")
    qt: dict[str, QuantizedTensor] = {}
    if isinstance(obj, QuantizedModel):
        qt = dict(obj.tensors)
        state = obj.model.state_dict()
    elif isinstance(obj, nn.Module):
        state = obj.state_dict()
    elif isinstance(obj, Mapping):
        state = dict(obj)
    else:
        raise ConfigError(f"encode() takes a model, a state dict or a QuantizedModel. Got "
                          f"{type(obj).__name__}.")
    entries, blobs, fp32 = [], [], 0
    report = EncodeReport(os.fspath(path), 0, 0)
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in _DT:
            raise ConfigError(f"cannot code '{name}': not a tensor of a supported dtype.")
        kind = next((m for pat, m in (rules or {}).items() if fnmatch.fnmatchcase(name, pat)),
                    method)
        q, auto = qt.get(name), False
        if q is None and kind != "raw":
            q = _auto_quantized(t)
            auto = q is not None
        if kind == "fixed_point" and q is not None and q.scheme != "fixed_point":
            raise ConfigError(f"'{name}' is quantized with '{q.scheme}', not fixed point: code it "
                              "with 'huffman' or 'linear'.")
        if q is not None and not torch.equal(dequantize(q).to(t.dtype), t.detach().cpu()):
            raise ConfigError(f"'{name}' differs from its quantized codes: quantize the model "
                              "again (weights were changed after quantization).")
        entry, data = _encode_tensor(name, t, q, kind, int(index_bits))
        if auto:  # our own codebook, not the user's quantization: keep it only if it pays
            raw = _encode_tensor(name, t, None, "raw", int(index_bits))
            if container.entry_cost(*raw) <= container.entry_cost(entry, data):
                entry, data = raw
        entries.append(entry)
        blobs.append(data)
        fp32 += t.numel() * 4 if t.is_floating_point() else t.numel() * t.element_size()
        report.tensors[name] = {"kind": entry["kind"], "bytes": len(data),
                                **({"mode": entry["mode"]} if "mode" in entry else {})}
    out = container.pack(entries, blobs)
    atomic_write_bytes(path, out)
    report.bytes, report.fp32_bytes = len(out), fp32
    return report


def _segment(data: bytes, segs: dict[str, Any], key: str) -> tuple[bytes, int, int]:
    seg = segs.get(key)
    if not (isinstance(seg, list) and len(seg) == 4
            and all(isinstance(v, int) and v >= 0 for v in seg)):
        raise CodingError(f"segment '{key}' is missing from the header or malformed")
    off, ln, nbits, count = seg
    if off + ln > len(data):
        raise CodingError(f"segment '{key}' (bytes {off}..{off + ln}) lies outside its "
                          f"{len(data)} bytes")
    return data[off:off + ln], nbits, count


def _huffman_stream(data: bytes, segs: dict[str, Any], key: str) -> np.ndarray:
    raw, nbits, count = _segment(data, segs, key)
    lengths, _, alphabet = _segment(data, segs, key + "_lengths")
    if len(lengths) != alphabet:
        raise CodingError(f"segment '{key}_lengths' has {len(lengths)} code lengths for an "
                          f"alphabet of {alphabet}")
    return huffman.decode(raw, nbits, count, np.frombuffer(lengths, dtype=np.uint8))


_FIELDS = {"shape": list, "dtype": str, "kind": str, "segments": dict}
_CODED_FIELDS = {"scheme": str, "bits": int, "qmin": int, "dequant": dict}


def _check_entry(e: dict[str, Any]) -> tuple[tuple[int, ...], torch.dtype, int]:
    """(shape, dtype, numel) of a header entry whose fields have the documented types."""
    fields = _FIELDS if e.get("kind") == "raw" else {**_FIELDS, **_CODED_FIELDS}
    bad = [k for k, typ in fields.items() if not isinstance(e.get(k), typ)]
    if bad:
        raise CodingError(f"header entry lacks a valid {', '.join(repr(k) for k in bad)}")
    if e["dtype"] not in _TD:
        raise CodingError(f"unknown dtype '{e['dtype']}'")
    if e["kind"] not in METHODS:
        raise CodingError(f"unknown kind '{e['kind']}'")
    shape = e["shape"]
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CodingError(f"invalid shape {shape}")
    return tuple(shape), _TD[e["dtype"]], int(np.prod(shape, dtype=np.int64)) if shape else 1


def _decode_tensor(e: dict[str, Any], data: bytes) -> torch.Tensor:
    shape, dtype, numel = _check_entry(e)
    segs = e["segments"]
    if e["kind"] == "raw":
        raw, _, _ = _segment(data, segs, "data")
        width = torch.empty(0, dtype=dtype).element_size()
        if len(raw) != numel * width:
            raise CodingError(f"{len(raw)} bytes stored, shape {list(shape)} of {e['dtype']} "
                              f"needs {numel * width}")
        if dtype == torch.bfloat16:
            return torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(shape).clone()
        arr = np.frombuffer(raw, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
        return torch.from_numpy(arr.copy()).reshape(shape)
    if e["kind"] in ("linear", "fixed_point"):
        raw, width, count = _segment(data, segs, "codes")
        if not 1 <= width <= bits.MAX_WIDTH or width * count > 8 * len(raw):
            raise CodingError(f"{count} codes of {width} bits do not fit its {len(raw)} bytes")
        sym = bits.unpack_fixed(raw, width, count)
    elif e.get("mode") == "sparse":
        gaps = _huffman_stream(data, segs, "gaps")
        vals = _huffman_stream(data, segs, "values")
        if gaps.size != vals.size:
            raise CodingError(f"{gaps.size} relative indices for {vals.size} stored codes")
        pos = np.cumsum(gaps + 1) - 1
        if pos.size and pos[-1] >= numel:
            raise CodingError(f"relative indices run past its {numel} entries")
        sym = np.full(numel, int(e["zero"]), dtype=np.int64)
        sym[pos] = vals
    elif e.get("mode") == "dense":
        sym = _huffman_stream(data, segs, "values")
    else:
        raise CodingError(f"unknown Huffman mode {e.get('mode')!r}")
    if sym.size != numel:
        raise CodingError(f"{sym.size} codes decoded, shape {list(shape)} needs {numel}")
    codes = torch.from_numpy((sym + int(e["qmin"])).astype(np.int32)).reshape(shape)
    dq = e["dequant"]
    if dq.get("type") == "codebook":
        cb, _, _ = _segment(data, segs, "codebook")
        book = torch.from_numpy(np.frombuffer(cb, dtype=np.float32).copy())
        if numel and not (0 <= int(codes.min()) and int(codes.max()) < book.numel()):
            raise CodingError(f"codes outside its {book.numel()}-entry codebook")
        q = QuantizedTensor(codes, e["scheme"], e["bits"], codebook=book)
    else:
        s, _, _ = _segment(data, segs, "scale")
        z, _, _ = _segment(data, segs, "zero_point")
        sshape = tuple(dq.get("scale_shape", []))
        scale = torch.from_numpy(np.frombuffer(s, dtype=np.float32).copy()).reshape(sshape)
        zp = torch.from_numpy(np.frombuffer(z, dtype=np.int32).copy()).reshape(sshape)
        q = QuantizedTensor(codes, e["scheme"], e["bits"], scale=scale, zero_point=zp,
                            axis=dq.get("axis"))
    return dequantize(q).to(dtype)


def decode(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a coded file back into a state dict (quantized values restored bit-exactly).

    Example:
        >>> model.load_state_dict(decode("model.gpc"))

    Raises:
        CodingError: the file cannot be read, is not a coded file, is truncated, corrupted
            (checksums, length fields, codes) or has data after its last tensor.
    """
    path = os.fspath(path)
    blob = read_file(path, "coded file", CodingError)
    out = {}
    for e, data in container.unpack(blob, path):
        try:
            out[e["name"]] = _decode_tensor(e, data)
        except (CodingError, huffman.HuffmanError) as err:
            raise CodingError(f"'{path}' is corrupted: tensor '{e['name']}': {err}.") from err
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, OverflowError) as err:
            # a checksummed entry that does not add up: written by something else than encode()
            raise CodingError(f"'{path}' is corrupted: tensor '{e['name']}' has an inconsistent "
                              f"header entry ({type(err).__name__}: {err}).") from err
    return out
