"""The coded file's container (stage 7, coding): magic, checksummed header, tensor payload.

``pack`` lays tensors' entries and bytes out as documented in ``graphprune.coding.codec``;
``unpack`` checks every length field against the file's size before trusting it, so a file
that is cut short, damaged, or has bytes appended raises a ``CodingError`` naming the file,
what was expected and what was found, and nothing else.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

from ..errors import GraphPruneError

MAGIC = b"GPCODE\x00\x01"
VERSION = 1
FORMAT = "graphprune.coded"
_FIXED = len(MAGIC) + 4 + 4  # magic, header length, header checksum
# the header is sorted-key JSON, so every coded header decompresses to text starting with this
_HEADER_START = b'{"format":"' + FORMAT.encode() + b'"'


class CodingError(GraphPruneError, ValueError):
    """A coded file is truncated, corrupted, or not a graphprune coded file."""


def pack(entries: list[dict[str, Any]], blobs: list[bytes]) -> bytes:
    """The file's bytes: entries (their ``span`` filled in here) and the tensors' bytes."""
    offset = 0
    for e, b in zip(entries, blobs):
        e["span"] = [offset, len(b)]
        offset += len(b)
    header = zlib.compress(json.dumps({"format": FORMAT, "version": VERSION, "tensors": entries},
                                      sort_keys=True, separators=(",", ":")).encode("utf-8"), 9)
    return b"".join([MAGIC, struct.pack("<I", len(header)), header,
                     struct.pack("<I", zlib.crc32(header)), *blobs])


def entry_cost(entry: dict[str, Any], data: bytes) -> int:
    """Bytes a tensor adds to a file: its payload and its header entry (deflated on its own)."""
    text = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return len(data) + len(zlib.compress(text, 9))


def unpack(blob: bytes, path: str) -> list[tuple[dict[str, Any], bytes]]:
    """(header entry, checksum-verified bytes) of each tensor of the coded file ``blob``."""
    n = len(blob)
    head = blob[: len(MAGIC) - 1]
    if head != MAGIC[: len(head)]:
        raise CodingError(f"'{path}' is not a graphprune coded file (bad magic bytes).")
    if n >= len(MAGIC) and blob[len(MAGIC) - 1] != VERSION:
        raise CodingError(f"'{path}' has coded-format version {blob[len(MAGIC) - 1]}; this "
                          f"graphprune reads version {VERSION}.")
    if n < len(MAGIC) + 4:
        raise CodingError(f"'{path}' is truncated: a coded file has at least {_FIXED} bytes "
                          f"(magic, header length, header, header checksum); this one has {n}.")
    (hlen,) = struct.unpack_from("<I", blob, len(MAGIC))
    start = len(MAGIC) + 4
    need = _FIXED + hlen
    if n < need:
        if _starts_like_header(blob[start:start + hlen]):
            raise CodingError(f"'{path}' is truncated: its header length field says {hlen} bytes, "
                              f"so the file should have at least {need} bytes; it has {n}.")
        raise CodingError(f"'{path}' is corrupted: its header length field says {hlen} bytes but "
                          f"the file has only {n - start} after it, and those do not start a "
                          "coded header: the file is damaged, not truncated.")
    header = blob[start:start + hlen]
    (crc,) = struct.unpack_from("<I", blob, start + hlen)
    if zlib.crc32(header) != crc:
        raise CodingError(f"'{path}' is corrupted: header checksum mismatch.")
    try:
        meta = json.loads(zlib.decompress(header))
    except (zlib.error, ValueError) as err:
        raise CodingError(f"'{path}' has an unreadable header: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CodingError(f"'{path}' is not a graphprune coded file.")
    if meta.get("version") != VERSION or not isinstance(meta.get("tensors"), list):
        raise CodingError(f"'{path}' has a malformed header: expected format version {VERSION} "
                          "with a list of tensors.")
    return _payload(blob, need, meta["tensors"], path)


def _payload(blob: bytes, start: int, entries: list, path: str) -> list[tuple[dict[str, Any], bytes]]:
    """Each entry with its bytes; spans must follow each other from the payload's first byte
    to the file's last."""
    out, offset, names = [], 0, set()
    for i, e in enumerate(entries):
        span = e.get("span") if isinstance(e, dict) else None
        name = e.get("name") if isinstance(e, dict) else None
        if (not isinstance(name, str) or name in names or not isinstance(e.get("crc32"), int)
                or not isinstance(span, list) or len(span) != 2
                or not all(isinstance(v, int) and v >= 0 for v in span)):
            raise CodingError(f"'{path}' has a malformed header: tensor entry {i} needs a new "
                              "'name', a 'crc32' and a 'span' [offset, length].")
        if span[0] != offset:
            raise CodingError(f"'{path}' has a malformed header: tensor '{name}' starts at "
                              f"payload byte {span[0]}, the previous tensor ends at {offset}.")
        names.add(name)
        end = start + offset + span[1]
        if end > len(blob):
            raise CodingError(f"'{path}' is truncated: tensor '{name}' ends at byte {end} but the "
                              f"file has {len(blob)} bytes.")
        data = blob[start + offset:end]
        if zlib.crc32(data) != e["crc32"]:
            raise CodingError(f"'{path}' is corrupted: checksum mismatch in tensor '{name}'.")
        out.append((e, data))
        offset += span[1]
    if start + offset != len(blob):
        last = f"its last tensor '{out[-1][0]['name']}'" if out else "its header"
        extra = len(blob) - start - offset
        raise CodingError(f"'{path}' has {extra} byte{'s' if extra > 1 else ''} of trailing data "
                          f"after {last}: the coded data ends at byte {start + offset} of "
                          f"{len(blob)} (the file is corrupted, or something was appended to it).")
    return out


def _starts_like_header(prefix: bytes) -> bool:
    """Whether ``prefix`` can be the start of a coded header (a deflate stream whose text
    starts like one); too few bytes to tell count as yes."""
    try:
        text = zlib.decompressobj().decompress(prefix[:512], len(_HEADER_START))
    except zlib.error:
        return False
    return _HEADER_START.startswith(text)
