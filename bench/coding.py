"""Deep-Compression coding speed: encode and decode throughput of graphprune.coding on a pruned,
4-bit quantized torchvision ResNet, against the pure-Python Huffman coder it replaced.

The model has random init; 90% of every conv/linear weight is zeroed by magnitude, then
quantized with graphprune.quantize (4-bit k-means by default, or linear), so the weights code
as Deep Compression does: relative indices of the non-zeros plus Huffman-coded codebook
indices. Three coders run in the same process, interleaved, and the median of ``--repeats``
runs is printed, with MB/s counting the fp32 bytes of the state dict:

- ``reference``: the previous pure-Python coder (copied below, swapped in for its runs only);
- ``numpy``: the current coder without bitarray (numpy lookup tables on k-bit windows);
- ``bitarray``: the current coder with bitarray's C canonical decoder (the default path).

Every run's decoded state dict is checked bit-exact against the model, and the files written
by the reference and the current encoder must be byte-identical (the format did not change).

    python bench/coding.py [--model resnet18] [--quant kmeans|linear] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from graphprune.coding import decode, encode, huffman  # noqa: E402
from graphprune.quantize import KMeans, Linear, quantize  # noqa: E402


# ---- the previous pure-Python Huffman coder (reference only; not part of graphprune) ----------

REF_MAX_LEN, REF_LOOKUP_BITS, REF_BLOCK = 24, 12, 1 << 20


def ref_code_lengths(freq):
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
        if lengths.max() <= REF_MAX_LEN:
            return lengths
        f = np.sqrt(f) + 1


def ref_canonical_codes(lengths):
    codes = np.zeros(lengths.size, dtype=np.int64)
    order = sorted((int(l), s) for s, l in enumerate(lengths) if l > 0)
    code, prev = 0, 0
    for i, (l, s) in enumerate(order):
        if i:
            code = (code + 1) << (l - prev)
        codes[s] = code
        prev = l
    return codes


def ref_encode(symbols, lengths):
    symbols = np.asarray(symbols, dtype=np.int64)
    if symbols.size == 0:
        return b"", 0
    codes = ref_canonical_codes(lengths)
    ln = lengths[symbols]
    cv = codes[symbols]
    total = int(ln.sum())
    ends = np.cumsum(ln)
    starts = ends - ln
    pos = np.arange(total) - np.repeat(starts, ln)
    bits = (np.repeat(cv, ln) >> (np.repeat(ln, ln) - 1 - pos)) & 1
    return np.packbits(bits.astype(np.uint8)).tobytes(), total


def _ref_tables(lengths):
    codes = ref_canonical_codes(lengths)
    L = REF_LOOKUP_BITS
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
    multi = []
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


def ref_decode(data, nbits, count, lengths):
    lengths = np.asarray(lengths, dtype=np.int64)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    L = REF_LOOKUP_BITS
    padded = np.concatenate([bits[:nbits], np.zeros(L + REF_MAX_LEN, dtype=np.uint8)])
    multi, long_codes, maxlen = _ref_tables(lengths)
    out = np.empty(count, dtype=np.int64)
    n, p = 0, 0
    base, win = 0, np.zeros(0, dtype=np.int64)
    while n < count:
        if p - base >= win.size:
            base = p
            hi = min(nbits + 1, p + REF_BLOCK)
            seg = padded[p:hi + L].astype(np.int64)
            win = np.zeros(hi - p, dtype=np.int64)
            for j in range(L):
                win = (win << 1) | seg[j:j + hi - p]
        syms, used = multi[win[p - base]]
        if syms:
            k = min(len(syms), count - n)
            out[n:n + k] = syms[:k]
            n += k
            p += used if k == len(syms) else int(sum(int(lengths[s]) for s in syms[:k]))
            continue
        code = 0
        for ln in range(1, maxlen + 1):
            code = (code << 1) | int(padded[min(p + ln - 1, padded.size - 1)])
            s = long_codes.get((ln, code))
            if s is not None:
                out[n] = s
                n += 1
                p += ln
                break
    return out


# ---- the benchmark -------------------------------------------------------------------------------

@contextlib.contextmanager
def coder(name: str, clock: dict[str, float]):
    """Swap in the Huffman functions of coder ``name`` for graphprune.coding to call, timing
    them into ``clock`` ('huffman encode': code lengths + bitstreams, 'huffman decode')."""
    saved = huffman.code_lengths, huffman.encode, huffman.decode, huffman._bitarray
    fns = (ref_code_lengths, ref_encode, ref_decode) if name == "reference" else saved[:3]
    if name == "numpy":
        huffman._bitarray = lambda: None

    def timed(fn, key):
        def run(*args):
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                clock[key] = clock.get(key, 0.0) + time.perf_counter() - t
        return run

    huffman.code_lengths = timed(fns[0], "huffman encode")
    huffman.encode = timed(fns[1], "huffman encode")
    huffman.decode = timed(fns[2], "huffman decode")
    try:
        yield
    finally:
        huffman.code_lengths, huffman.encode, huffman.decode, huffman._bitarray = saved


def pruned_quantized(model_name: str, quant: str, sparsity: float = 0.9):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:  # conv / linear weights: zero the smallest |w| of each
                thr = p.abs().flatten().kthvalue(int(sparsity * p.numel())).values
                p.mul_(p.abs() > thr)
    return quantize(model, KMeans(bits=4) if quant == "kmeans" else Linear(bits=4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--quant", choices=["kmeans", "linear"], default="kmeans")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    q = pruned_quantized(args.model, args.quant)
    ref = q.model.state_dict()
    print(f"{args.model}: random init, 90% magnitude-pruned, 4-bit {args.quant} "
          f"({time.perf_counter() - t0:.0f} s to prepare)")
    coders = ("reference", "numpy", "bitarray")
    keys = ("encode", "huffman encode", "decode", "huffman decode")
    times = {c: {k: [] for k in keys} for c in coders}
    with tempfile.TemporaryDirectory() as d:
        files = {c: os.path.join(d, f"{c}.gpc") for c in coders}
        for _ in range(args.repeats):
            for c in coders:
                clock: dict[str, float] = {}
                with coder(c, clock):
                    t = time.perf_counter()
                    rep = encode(q, files[c])
                    times[c]["encode"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    out = decode(files[c])
                    times[c]["decode"].append(time.perf_counter() - t)
                for k in ("huffman encode", "huffman decode"):
                    times[c][k].append(clock[k])
                bad = [k for k in ref if not torch.equal(out[k], ref[k])]
                if list(out) != list(ref) or bad:
                    raise SystemExit(f"{c}: decoded state dict differs from the model: {bad[:3]}")
            blobs = {c: open(files[c], "rb").read() for c in coders}
            if len(set(blobs.values())) != 1:
                raise SystemExit("the reference and current encoders wrote different bytes")
    mb = rep.fp32_bytes / 1e6
    sparse = sum(v.get("mode") == "sparse" for v in rep.tensors.values())
    print(f"state dict {mb:.1f} MB fp32 -> {rep.bytes / 1e6:.2f} MB coded ({rep.ratio:.1f}x, "
          f"{sparse} sparse Huffman tensors); median of {args.repeats} interleaved runs; MB/s of "
          "fp32 weights; 'huffman' = time inside the Huffman coder only")
    med = {c: {k: statistics.median(v) for k, v in times[c].items()} for c in coders}
    print(f"{'coder':<10}" + "".join(f"{k:>20}" for k in keys))
    for c in coders:
        print(f"{c:<10}" + "".join(f"{med[c][k]:>7.2f} s {mb / med[c][k]:>6.1f} MB/s" for k in keys))
    r = med["reference"]
    for c in ("numpy", "bitarray"):
        print(f"speed-up of {c} over reference: " + ", ".join(
            f"{k} {r[k] / med[c][k]:.1f}x" for k in keys))


if __name__ == "__main__":
    main()
