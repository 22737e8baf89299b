"""Bit packing for stage 7 (coding): MSB-first streams of variable- and fixed-width codes.

Everything is vectorised on 32/64-bit words, never on an array of single bits, so packing a
ResNet-50's codes costs a few bytes of memory per code rather than a few bytes per bit.
"""

from __future__ import annotations

import numpy as np

MAX_WIDTH = 32  # widest code pack() and unpack_fixed() handle
CHUNK = 1 << 20  # codes handled per vectorised step (bounds the temporary arrays)


def pack(values: np.ndarray, widths: np.ndarray) -> tuple[bytes, int]:
    """Concatenate ``values[i]`` on ``widths[i]`` bits each (1..32, MSB first, zero-padded to a
    whole byte); returns the bytes and the number of meaningful bits.

    Example:
        >>> pack(np.array([1, 0, 3]), np.array([1, 2, 2]))
        (b'\\x98', 5)
    """
    values, widths = np.asarray(values), np.asarray(widths)
    total = int(widths.sum(dtype=np.int64))
    out = np.zeros(total // 32 + 2, dtype=np.uint64)  # 32-bit words, kept in uint64 for OR
    base = np.uint64(0)
    for i in range(0, widths.size, CHUNK):
        w = widths[i:i + CHUNK].astype(np.uint64)
        start = np.cumsum(w) - w + base  # first bit of each code
        word = start >> np.uint64(5)  # the 32-bit word it starts in (sorted)
        # each code left-aligned in the 64-bit window made of its word and the next one
        v = values[i:i + CHUNK].astype(np.uint64) << (np.uint64(64) - w - (start & np.uint64(31)))
        first = np.flatnonzero(np.concatenate([[True], word[1:] != word[:-1]]))
        at = word[first].astype(np.int64)
        out[at] |= np.bitwise_or.reduceat(v >> np.uint64(32), first)
        out[at + 1] |= np.bitwise_or.reduceat(v & np.uint64(0xFFFFFFFF), first)
        base += w.sum(dtype=np.uint64)
    return out.astype(">u4").tobytes()[: (total + 7) // 8], total


def unpack_fixed(data: bytes, width: int, count: int) -> np.ndarray:
    """The ``count`` unsigned ``width``-bit codes (1..32) at the start of ``data`` as int64;
    the caller checks that ``data`` holds ``width * count`` bits.

    Example:
        >>> unpack_fixed(b'\\x9c', 2, 3).tolist()
        [2, 1, 3]
    """
    buf = np.zeros(len(data) + 8, dtype=np.uint8)
    buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    windows = np.lib.stride_tricks.sliding_window_view(buf, 8)
    out = np.empty(count, dtype=np.int64)
    for i in range(0, count, CHUNK):
        start = np.arange(i, min(count, i + CHUNK), dtype=np.int64) * width
        # the 8 bytes from each code's first byte, read as one big-endian 64-bit word
        win = windows[start >> 3].view(">u8")[:, 0].astype(np.uint64)
        out[i:i + CHUNK] = (win << (start & 7).astype(np.uint64)) >> np.uint64(64 - width)
    return out


def words32(data: bytes, nbytes: int) -> np.ndarray:
    """The big-endian 32-bit word starting at each of the first ``nbytes`` bytes of ``data``
    (zeros past its end): ``(words32(d, n)[p >> 3] << (p & 7)) >> (32 - k)`` is the k-bit
    window (k <= 25) at bit ``p``."""
    buf = np.zeros(nbytes + 4, dtype=np.uint32)
    m = min(nbytes, len(data))
    buf[:m] = np.frombuffer(data, dtype=np.uint8, count=m)
    return (buf[:-3] << 24) | (buf[1:-2] << 16) | (buf[2:-1] << 8) | buf[3:]
