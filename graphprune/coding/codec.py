"""Deep Compression storage (Han et al., ICLR 2016): sparse positions as relative indices,
codebook indices, Huffman coding; also plain fixed-width ("linear") and fixed-point coding.

File format (version 1, little-endian)::

    b"GPCODE\\x00\\x01"        magic and format version
    u32 H, H bytes          header: zlib-compressed UTF-8 JSON, sorted keys (below)
    u32                     CRC-32 of the (compressed) header bytes
    payload                 the tensors' segments, back to back

The header is ``{"format": "graphprune.coded", "version": 1, "tensors": [entry, ...]}``; each
entry has ``name``, ``shape``, ``dtype``, ``kind`` ('raw', 'huffman', 'linear', 'fixed_point'),
``crc32`` and ``span`` (offset and length of its bytes in the payload) and, for coded kinds, the
quantization (``scheme``, ``bits``, ``qmin``, ``dequant``: a codebook or scale/zero point/axis) and
``segments``: name -> [offset, length, bits, count] inside the tensor's bytes. Huffman kinds store
the code lengths of their alphabets (canonical codes) and, in ``mode='sparse'``, the number of
zeros before each stored entry (``gaps``, capped at 2**index_bits - 1 with filler entries, as in
Deep Compression) followed by the stored codes; ``mode='dense'`` codes every entry.
Decoding recomputes the values from the codes with the quantizer's own ``dequantize``, so they
are bit-exact.
"""

from __future__ import annotations

import fnmatch
import json
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, GraphPruneError
from ..io import atomic_write_bytes, read_file
from ..quantize.tensor import QuantizedTensor, dequantize
from . import huffman

MAGIC = b"GPCODE\x00\x01"
VERSION = 1
METHODS = ("huffman", "linear", "fixed_point", "raw")


class CodingError(GraphPruneError, ValueError):
    """A coded file is truncated, corrupted, or not a graphprune coded file."""


@dataclass
class EncodeReport:
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


def _pack_fixed(sym: np.ndarray, bits: int) -> bytes:
    """Unsigned ``sym`` at ``bits`` bits each, MSB first."""
    if sym.size == 0:
        return b""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    b = ((sym[:, None].astype(np.int64) >> shifts) & 1).astype(np.uint8).ravel()
    return np.packbits(b).tobytes()


def _unpack_fixed(data: bytes, bits: int, count: int) -> np.ndarray:
    b = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if b.size < bits * count:
        raise CodingError("fixed-width code segment is truncated")
    b = b[: bits * count].reshape(count, bits).astype(np.int64)
    return (b << np.arange(bits - 1, -1, -1, dtype=np.int64)).sum(axis=1)


def _huff(seg: _Seg, name: str, sym: np.ndarray, alphabet: int) -> int:
    lengths = huffman.code_lengths(np.bincount(sym, minlength=alphabet))
    data, nbits = huffman.encode(sym, lengths)
    seg.add(name + "_lengths", lengths.astype(np.uint8).tobytes(), 0, alphabet)
    seg.add(name, data, nbits, int(sym.size))
    return len(data) + alphabet


def _huff_cost(sym: np.ndarray, alphabet: int) -> int:
    f = np.bincount(sym, minlength=alphabet)
    return int((huffman.code_lengths(f) * f).sum() // 8) + alphabet


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


def _encode_tensor(name: str, t: torch.Tensor, q: QuantizedTensor | None, kind: str,
                   index_bits: int) -> tuple[dict[str, Any], bytes]:
    entry: dict[str, Any] = {"name": name, "shape": list(t.shape), "dtype": _DT[t.dtype]}
    seg = _Seg()
    if q is None or kind == "raw":
        seg.add("data", t.detach().contiguous().cpu().numpy().tobytes())
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
            seg.add("codes", _pack_fixed(sym, width), width, int(sym.size))
        else:  # huffman: sparse (relative indices) or dense, whichever is smaller
            zero = _zero_code(q) - qmin if _zero_code(q) is not None else None
            entry["index_bits"] = index_bits
            use_sparse = False
            if zero is not None and 0 <= zero < alphabet:
                g, v = _sparse_stream(sym, zero, index_bits)
                sparse_cost = _huff_cost(g, 1 << index_bits) + _huff_cost(v, alphabet)
                use_sparse = sparse_cost < _huff_cost(sym, alphabet)
            if use_sparse:
                entry.update(mode="sparse", zero=int(zero))
                _huff(seg, "gaps", g, 1 << index_bits)
                _huff(seg, "values", v, alphabet)
            else:
                entry["mode"] = "dense"
                _huff(seg, "values", sym, alphabet)
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
    bits = max(1, int(vals.numel() - 1).bit_length())
    return QuantizedTensor(inv.view_as(t).to(torch.int32), "codebook", bits, codebook=vals)


def encode(obj: Any, path: str | os.PathLike, *, method: str = "huffman",
           rules: Mapping[str, str] | None = None, index_bits: int = 8) -> EncodeReport:
    """Code a model, a state dict, or a ``QuantizedModel`` into ``path`` (atomically).

    Quantized weights (from ``graphprune.quantize``, or any float tensor with at most 256
    distinct values) are coded with ``method``: 'huffman' (Deep Compression: relative indices of
    the non-zeros plus Huffman-coded codebook indices), 'linear' (log2(levels) bits per weight)
    or 'fixed_point' (the fixed-point integers as they are); every other tensor is stored raw.
    ``rules`` maps state_dict name patterns (shell globs) to a method, overriding ``method``.
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
    entries, blobs, offset, fp32 = [], [], 0, 0
    report = EncodeReport(os.fspath(path), 0, 0)
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in _DT:
            raise ConfigError(f"cannot code '{name}': not a tensor of a supported dtype.")
        kind = next((m for pat, m in (rules or {}).items() if fnmatch.fnmatchcase(name, pat)),
                    method)
        q = qt.get(name)
        if q is None and kind != "raw":
            q = _auto_quantized(t)
        if kind == "fixed_point" and q is not None and q.scheme != "fixed_point":
            raise ConfigError(f"'{name}' is quantized with '{q.scheme}', not fixed point: code it "
                              "with 'huffman' or 'linear'.")
        if q is not None and not torch.equal(dequantize(q).to(t.dtype), t.detach().cpu()):
            raise ConfigError(f"'{name}' differs from its quantized codes: quantize the model "
                              "again (weights were changed after quantization).")
        entry, data = _encode_tensor(name, t, q, kind, int(index_bits))
        entry["span"] = [offset, len(data)]
        offset += len(data)
        entries.append(entry)
        blobs.append(data)
        fp32 += t.numel() * 4 if t.is_floating_point() else t.numel() * t.element_size()
        report.tensors[name] = {"kind": entry["kind"], "bytes": len(data),
                                **({"mode": entry["mode"]} if "mode" in entry else {})}
    header = zlib.compress(json.dumps(
        {"format": "graphprune.coded", "version": VERSION, "tensors": entries},
        sort_keys=True, separators=(",", ":")).encode("utf-8"), 9)
    out = MAGIC + struct.pack("<I", len(header)) + header + struct.pack("<I", zlib.crc32(header))
    out += b"".join(blobs)
    atomic_write_bytes(path, out)
    report.bytes, report.fp32_bytes = len(out), fp32
    return report


def _segment(data: bytes, segs: dict[str, list[int]], key: str, name: str) -> tuple[bytes, int, int]:
    if key not in segs:
        raise CodingError(f"tensor '{name}': segment '{key}' missing from the header")
    off, ln, nbits, count = segs[key]
    if off < 0 or off + ln > len(data):
        raise CodingError(f"tensor '{name}': segment '{key}' lies outside its data")
    return data[off:off + ln], nbits, count


def _decode_tensor(e: dict[str, Any], data: bytes) -> torch.Tensor:
    name, shape, dtype = e["name"], tuple(e["shape"]), _TD[e["dtype"]]
    numel = int(np.prod(shape)) if shape else 1
    segs = e["segments"]
    if e["kind"] == "raw":
        raw, _, _ = _segment(data, segs, "data", name)
        np_dt = torch.empty(0, dtype=dtype).numpy().dtype if dtype != torch.bfloat16 else None
        if np_dt is None:
            return torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(shape).clone()
        arr = np.frombuffer(raw, dtype=np_dt)
        if arr.size != numel:
            raise CodingError(f"tensor '{name}': {arr.size} values stored, shape needs {numel}")
        return torch.from_numpy(arr.copy()).reshape(shape)
    qmin = int(e["qmin"])
    if e["kind"] in ("linear", "fixed_point"):
        raw, width, count = _segment(data, segs, "codes", name)
        sym = _unpack_fixed(raw, width, count)
    elif e["kind"] == "huffman":
        vraw, vbits, vcount = _segment(data, segs, "values", name)
        lraw, _, alpha = _segment(data, segs, "values_lengths", name)
        vals = huffman.decode(vraw, vbits, vcount, np.frombuffer(lraw, dtype=np.uint8).astype(np.int64))
        if e["mode"] == "sparse":
            graw, gbits, gcount = _segment(data, segs, "gaps", name)
            glraw, _, _ = _segment(data, segs, "gaps_lengths", name)
            gaps = huffman.decode(graw, gbits, gcount,
                                  np.frombuffer(glraw, dtype=np.uint8).astype(np.int64))
            pos = np.cumsum(gaps + 1) - 1
            if pos.size and pos[-1] >= numel:
                raise CodingError(f"tensor '{name}': relative indices run past its {numel} entries")
            sym = np.full(numel, int(e["zero"]), dtype=np.int64)
            sym[pos] = vals
        else:
            sym = vals
    else:
        raise CodingError(f"tensor '{name}': unknown kind '{e['kind']}'")
    if sym.size != numel:
        raise CodingError(f"tensor '{name}': {sym.size} codes decoded, shape needs {numel}")
    codes = torch.from_numpy((sym + qmin).astype(np.int32)).reshape(shape)
    dq = e["dequant"]
    if dq["type"] == "codebook":
        cb, _, _ = _segment(data, segs, "codebook", name)
        q = QuantizedTensor(codes, e["scheme"], e["bits"],
                            codebook=torch.from_numpy(np.frombuffer(cb, dtype=np.float32).copy()))
    else:
        s, _, _ = _segment(data, segs, "scale", name)
        z, _, _ = _segment(data, segs, "zero_point", name)
        sshape = tuple(dq.get("scale_shape", []))
        scale = torch.from_numpy(np.frombuffer(s, dtype=np.float32).copy()).reshape(sshape)
        zp = torch.from_numpy(np.frombuffer(z, dtype=np.int32).copy()).reshape(sshape)
        q = QuantizedTensor(codes, e["scheme"], e["bits"], scale=scale, zero_point=zp,
                            axis=dq.get("axis"))
    return dequantize(q).to(dtype)


def decode(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a coded file back into a state dict (quantized values restored bit-exactly)."""
    path = os.fspath(path)
    blob = read_file(path, "coded file", CodingError)
    if blob[: len(MAGIC) - 1] != MAGIC[:-1]:
        raise CodingError(f"'{path}' is not a graphprune coded file (bad magic bytes).")
    if blob[len(MAGIC) - 1] != MAGIC[-1]:
        raise CodingError(f"'{path}' has coded-format version {blob[len(MAGIC) - 1]}; this "
                          f"graphprune reads version {VERSION}.")
    p = len(MAGIC)
    if len(blob) < p + 4:
        raise CodingError(f"'{path}' is truncated (no header).")
    (hlen,) = struct.unpack_from("<I", blob, p)
    p += 4
    if len(blob) < p + hlen + 4:
        raise CodingError(f"'{path}' is truncated: the header needs {hlen} bytes, the file has "
                          f"{max(0, len(blob) - p)} left.")
    header = blob[p:p + hlen]
    (crc,) = struct.unpack_from("<I", blob, p + hlen)
    if zlib.crc32(header) != crc:
        raise CodingError(f"'{path}' is corrupted: header checksum mismatch.")
    try:
        meta = json.loads(zlib.decompress(header))
    except (zlib.error, ValueError) as err:
        raise CodingError(f"'{path}' has an unreadable header: {err}") from err
    if meta.get("format") != "graphprune.coded":
        raise CodingError(f"'{path}' is not a graphprune coded file.")
    payload = blob[p + hlen + 4:]
    out = {}
    for e in meta["tensors"]:
        off, ln = e["span"]
        if off + ln > len(payload):
            raise CodingError(f"'{path}' is truncated: tensor '{e['name']}' needs bytes "
                              f"{off}..{off + ln} of a {len(payload)}-byte payload.")
        data = payload[off:off + ln]
        if zlib.crc32(data) != e["crc32"]:
            raise CodingError(f"'{path}' is corrupted: checksum mismatch in tensor '{e['name']}'.")
        try:
            out[e["name"]] = _decode_tensor(e, data)
        except huffman.HuffmanError as err:
            raise CodingError(f"'{path}': tensor '{e['name']}': {err}") from err
    return out
