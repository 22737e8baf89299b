"""Canonical Huffman coding of small-alphabet integer streams (stage 7, coding).

Codes are canonical (ordered by length, then symbol), so a table of code lengths is all a
decoder needs. Encoding packs the codes on 64-bit words with numpy. Decoding uses bitarray's
C canonical decoder when ``bitarray`` is installed (imported on first use); without it, a numpy
decoder computes the symbol at every bit position from lookup tables on k-bit windows and a
short Python walk follows the chain of code starts (correct, about 4x slower).
"""

from __future__ import annotations

import heapq
from functools import lru_cache

import numpy as np

from . import bits

MAX_LEN = 24
TABLE_BITS = 16  # window of the numpy decoder's lookup table; longer codes use a binary search
BLOCK = 1 << 20  # bit positions whose windows the numpy decoder computes at once


class HuffmanError(ValueError):
    """A bitstream or code-length table that cannot be decoded (the codec names the file)."""


def code_lengths(freq: np.ndarray) -> np.ndarray:
    """Huffman code length per symbol (0 for unused symbols), capped at ``MAX_LEN``.

    Example:
        >>> code_lengths(np.array([5, 1, 1, 0])).tolist()
        [1, 2, 2, 0]
    """
    freq = np.asarray(freq, dtype=np.int64)
    used = np.flatnonzero(freq > 0)
    lengths = np.zeros(freq.size, dtype=np.int64)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used] = 1
        return lengths
    f = freq.astype(np.float64)
    while True:
        lengths[used] = _depths(f[used].tolist(), used.tolist())
        if lengths.max() <= MAX_LEN:
            return lengths
        f = np.sqrt(f) + 1  # flatten the distribution until the longest code fits


def _depths(weights: list[float], keys: list[int]) -> list[int]:
    """Leaf depths of the Huffman tree; ties broken by the smallest symbol below a node, which
    makes the lengths (and so the coded bytes) deterministic."""
    n = len(weights)
    heap = [(w, k, i) for i, (w, k) in enumerate(zip(weights, keys))]
    heapq.heapify(heap)
    parent = [0] * (2 * n - 1)
    node = n
    while len(heap) > 1:
        fa, ka, a = heapq.heappop(heap)
        fb, kb, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (fa + fb, min(ka, kb), node))
        node += 1
    depth = [0] * (2 * n - 1)
    for i in range(2 * n - 3, -1, -1):  # parents are created after their children
        depth[i] = depth[parent[i]] + 1
    return depth[:n]


def check_lengths(lengths: np.ndarray) -> None:
    """Raise ``HuffmanError`` unless ``lengths`` (0 = unused) describe a prefix code of codes
    at most ``MAX_LEN`` bits long (Kraft sum <= 1)."""
    ln = np.asarray(lengths, dtype=np.int64)
    if ln.size and (ln.min() < 0 or ln.max() > MAX_LEN):
        raise HuffmanError(f"a code length is outside [0, {MAX_LEN}]")
    used = ln[ln > 0]
    if int(np.left_shift(1, MAX_LEN - used).sum()) > 1 << MAX_LEN:
        raise HuffmanError("the code lengths do not describe a prefix code (Kraft sum above 1)")


def _canonical(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(symbols in canonical order, their lengths, their codes left-aligned on the longest
    length, that length). Canonical codes tile the code space in this order."""
    ln = np.asarray(lengths, dtype=np.int64)
    syms = np.flatnonzero(ln)
    order = syms[np.lexsort((syms, ln[syms]))]
    ls = ln[order]
    maxlen = int(ls.max()) if ls.size else 0
    cover = np.left_shift(1, maxlen - ls)
    left = np.concatenate([[0], np.cumsum(cover)[:-1]]).astype(np.int64)
    return order, ls, left, maxlen


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code value per symbol for the given lengths.

    Example:
        >>> canonical_codes(np.array([1, 2, 2, 0])).tolist()
        [0, 2, 3, 0]
    """
    codes = np.zeros(np.asarray(lengths).size, dtype=np.int64)
    order, ls, left, maxlen = _canonical(lengths)
    codes[order] = left >> (maxlen - ls)
    return codes


def encode(symbols: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """Bitstream (MSB first) of ``symbols`` and its length in bits.

    Example:
        >>> encode(np.array([0, 1, 0, 2]), np.array([1, 2, 2]))
        (b'L', 6)
    """
    symbols = np.asarray(symbols)
    if symbols.size == 0:
        return b"", 0
    lengths = np.asarray(lengths, dtype=np.int64)
    ln = lengths.astype(np.uint8)[symbols]
    if not ln.all():
        raise HuffmanError("a symbol to encode has no code")
    return bits.pack(canonical_codes(lengths).astype(np.uint32)[symbols], ln)


def decode(data: bytes, nbits: int, count: int, lengths: np.ndarray) -> np.ndarray:
    """Decode ``count`` symbols that fill exactly the first ``nbits`` bits of ``data``.

    Example:
        >>> decode(b'L', 6, 4, np.array([1, 2, 2])).tolist()
        [0, 1, 0, 2]

    Raises:
        HuffmanError: if the lengths are no prefix code, the data is shorter than ``nbits``,
            a code is invalid, or the symbols do not fill the ``nbits`` bits exactly.
    """
    check_lengths(lengths)
    if len(data) != (nbits + 7) // 8:
        raise HuffmanError(f"the bitstream has {len(data)} bytes, {nbits} bits need "
                           f"{(nbits + 7) // 8}")
    if count == 0 or nbits == 0:
        if count or nbits:
            raise HuffmanError(f"{count} symbols cannot fill {nbits} bits")
        return np.zeros(0, dtype=np.int64)
    canon = _canonical(lengths)
    if canon[0].size == 0:
        raise HuffmanError("the code-length table has no code")
    ba = _bitarray()
    if ba is not None:
        return _decode_bitarray(ba, data, nbits, count, canon)
    return _decode_numpy(data, nbits, count, canon)


@lru_cache(maxsize=1)
def _bitarray():
    try:
        import bitarray
        import bitarray.util
    except ImportError:
        return None
    return bitarray


def _decode_bitarray(ba, data: bytes, nbits: int, count: int, canon) -> np.ndarray:
    order, ls, _, maxlen = canon
    stream = ba.bitarray(endian="big")
    stream.frombytes(data)
    del stream[nbits:]
    per_len = np.bincount(ls, minlength=maxlen + 1).tolist()
    it = ba.util.canonical_decode(stream, per_len, order.tolist())
    try:
        out = np.fromiter(it, dtype=np.int64, count=count)
    except ValueError as err:  # an invalid code, or fewer symbols than announced
        raise HuffmanError(f"the bitstream does not decode to {count} symbols "
                           "(corrupted data)") from err
    try:
        extra = next(it, None) is not None
    except ValueError:  # leftover bits that are not a whole code
        extra = True
    if extra:
        raise HuffmanError(f"the bitstream holds more than the {count} symbols announced")
    return out


def _decode_numpy(data: bytes, nbits: int, count: int, canon) -> np.ndarray:
    order, ls, left, maxlen = canon
    k = min(maxlen, TABLE_BITS)
    table = _window_table(canon, k)
    words = bits.words32(data, (nbits + 7) // 8)
    pieces, p = [], 0
    while p < nbits and sum(x.size for x in pieces) <= count:
        a = p & ~7
        b = min(nbits, a + BLOCK)
        w = words[a >> 3:(b + 7) >> 3]
        win = np.empty((w.size, 8), dtype=np.uint32)
        for j in range(8):  # the k-bit window at every bit position of the block
            win[:, j] = (w << np.uint32(j)) >> np.uint32(32 - k)
        v = table[win.reshape(-1)[: b - a]]  # (b - a,) symbol << 5 | length at each position
        longer = np.flatnonzero(v == 0)
        if longer.size:  # codes longer than the window: binary search on the maxlen-bit window
            q = longer + a
            full = ((words[q >> 3] << (q & 7).astype(np.uint32)) >> np.uint32(32 - maxlen))
            i = np.searchsorted(left, full.astype(np.int64), side="right") - 1
            ok = full < left[i] + np.left_shift(1, maxlen - ls[i])
            v[longer] = np.where(ok, (order[i] << 5) | ls[i], -1)
        step = np.where(v > 0, v & 31, 1).tolist()
        r, n, starts = p - a, b - a, []
        add = starts.append
        while r < n:  # the chain of code starts (list indexing: the only per-symbol Python)
            add(r)
            r += step[r]
        pieces.append(v[starts])
        p = a + r
    out = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if (out <= 0).any():
        raise HuffmanError("invalid code in the bitstream (corrupted data)")
    if out.size != count or p != nbits:
        raise HuffmanError(f"the bitstream does not decode to exactly {count} symbols "
                           "(corrupted data)")
    return out >> 5


def _window_table(canon, k: int) -> np.ndarray:
    """``symbol << 5 | length`` for every k-bit window; 0 where the code is longer than k
    bits, -1 where no code starts (an incomplete code)."""
    order, ls, left, maxlen = canon
    table = np.full(1 << k, -1, dtype=np.int64)
    short = ls <= k
    cover = np.left_shift(1, k - ls[short])
    n = int(cover.sum())
    table[:n] = np.repeat((order[short] << 5) | ls[short], cover)  # canonical codes are in order
    if not short.all():
        end = int(left[-1]) + (1 << (maxlen - int(ls[-1])))
        table[n:-(-end >> (maxlen - k))] = 0
    return table
