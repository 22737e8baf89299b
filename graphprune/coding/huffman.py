"""Canonical Huffman coding of small-alphabet integer streams, vectorised with numpy.

Codes are canonical (ordered by length, then symbol), so a table of code lengths is all a
decoder needs. Decoding reads ``LOOKUP_BITS`` bits at a time through a table that yields every
whole symbol in the window, which keeps the Python loop several symbols per step.
"""

from __future__ import annotations

import heapq

import numpy as np

MAX_LEN = 24
LOOKUP_BITS = 12
BLOCK = 1 << 20  # bit positions whose lookup windows are computed at once


class HuffmanError(ValueError):
    pass


def code_lengths(freq: np.ndarray) -> np.ndarray:
    """Huffman code length per symbol (0 for unused symbols), capped at ``MAX_LEN``."""
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
        heap = [(f[s], int(s), (int(s),)) for s in used]
        heapq.heapify(heap)
        depth = dict.fromkeys((int(s) for s in used), 0)
        while len(heap) > 1:
            fa, ka, a = heapq.heappop(heap)
            fb, kb, b = heapq.heappop(heap)
            for s in a + b:
                depth[s] += 1
            heapq.heappush(heap, (fa + fb, min(ka, kb), a + b))
        for s, d in depth.items():
            lengths[s] = d
        if lengths.max() <= MAX_LEN:
            return lengths
        f = np.sqrt(f) + 1  # flatten the distribution until the longest code fits


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code value per symbol for the given lengths."""
    codes = np.zeros(lengths.size, dtype=np.int64)
    order = sorted((int(l), s) for s, l in enumerate(lengths) if l > 0)
    code, prev = 0, 0
    for i, (l, s) in enumerate(order):
        if i:
            code = (code + 1) << (l - prev)
        codes[s] = code
        prev = l
    return codes


def encode(symbols: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """Bitstream (MSB first) of ``symbols`` and its length in bits."""
    symbols = np.asarray(symbols, dtype=np.int64)
    if symbols.size == 0:
        return b"", 0
    codes = canonical_codes(lengths)
    ln = lengths[symbols]
    if (ln == 0).any():
        raise HuffmanError("a symbol to encode has no code")
    cv = codes[symbols]
    total = int(ln.sum())
    ends = np.cumsum(ln)
    starts = ends - ln
    pos = np.arange(total) - np.repeat(starts, ln)  # bit index within its code
    bits = (np.repeat(cv, ln) >> (np.repeat(ln, ln) - 1 - pos)) & 1
    return np.packbits(bits.astype(np.uint8)).tobytes(), total


def _tables(lengths: np.ndarray):
    codes = canonical_codes(lengths)
    L = LOOKUP_BITS
    single_sym = np.full(1 << L, -1, dtype=np.int64)
    single_len = np.zeros(1 << L, dtype=np.int64)
    long_codes = {}
    for s in np.flatnonzero(lengths):
        l, c = int(lengths[s]), int(codes[s])
        if l <= L:
            lo = c << (L - l)
            single_sym[lo:lo + (1 << (L - l))] = s
            single_len[lo:lo + (1 << (L - l))] = l
        else:
            long_codes[(l, c)] = int(s)
    # multi-symbol table: every whole symbol inside an L-bit window
    multi: list[tuple[tuple[int, ...], int]] = []
    for w in range(1 << L):
        syms, used = [], 0
        while used < L:
            rest = ((w << used) & ((1 << L) - 1))
            s = single_sym[rest]
            ln = single_len[rest]
            if s < 0 or used + ln > L:
                break
            syms.append(int(s))
            used += int(ln)
        multi.append((tuple(syms), used))
    return multi, long_codes, int(lengths.max())


def decode(data: bytes, nbits: int, count: int, lengths: np.ndarray) -> np.ndarray:
    """Decode ``count`` symbols from the first ``nbits`` bits of ``data``."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if bits.size < nbits:
        raise HuffmanError(f"bitstream truncated: {bits.size} bits, expected {nbits}")
    L = LOOKUP_BITS
    padded = np.concatenate([bits[:nbits], np.zeros(L + MAX_LEN, dtype=np.uint8)])
    multi, long_codes, maxlen = _tables(lengths)
    out = np.empty(count, dtype=np.int64)
    n, p = 0, 0
    base, win = 0, np.zeros(0, dtype=np.int64)
    while n < count:
        if p > nbits:
            raise HuffmanError("bitstream ended before all symbols were decoded")
        if p - base >= win.size:  # window values (next L bits as an int) for a block of positions
            base = p
            hi = min(nbits + 1, p + BLOCK)
            seg = padded[p:hi + L].astype(np.int64)
            win = np.zeros(hi - p, dtype=np.int64)
            for j in range(L):
                win = (win << 1) | seg[j:j + hi - p]
        syms, used = multi[win[p - base]]
        if syms:
            k = min(len(syms), count - n)
            out[n:n + k] = syms[:k]
            n += k
            p += used if k == len(syms) else _consumed(syms[:k], lengths)
            continue
        # a code longer than the lookup window
        code = 0
        for ln in range(1, maxlen + 1):
            code = (code << 1) | int(padded[min(p + ln - 1, padded.size - 1)])
            s = long_codes.get((ln, code))
            if s is not None:
                out[n] = s
                n += 1
                p += ln
                break
        else:
            raise HuffmanError("invalid code in bitstream (corrupted data)")
    if p > nbits:
        raise HuffmanError("bitstream ended before all symbols were decoded")
    return out


def _consumed(syms: tuple[int, ...], lengths: np.ndarray) -> int:
    return int(sum(int(lengths[s]) for s in syms))
