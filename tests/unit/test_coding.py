"""Deep-Compression coding: exact round trips, golden bytes, corrupted files, and the
compression a pruned + 4-bit k-means digits net reaches."""

import json
import os
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.coding import CodingError, bits, decode, encode, huffman
from graphprune.quantize import FixedPoint, KMeans, Linear, Naive, QuantizedTensor, quantize

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(os.path.dirname(HERE), "golden", "tiny.gpc")


def tiny_state():
    """A tiny, fully deterministic state: a sparse 4-level codebook tensor and a raw bias."""
    codes = torch.tensor([[0, 0, 3, 0, 1, 0, 0, 0], [2, 0, 0, 0, 0, 0, 0, 3]], dtype=torch.int32)
    q = QuantizedTensor(codes, "kmeans", 2, codebook=torch.tensor([0.0, -0.5, 0.25, 1.0]))
    return {"w": q.dequantize(), "b": torch.tensor([0.125, -2.0])}, {"w": q}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 10)).eval()


@pytest.mark.parametrize("cfg", [KMeans(bits=4), KMeans(bits=2, init="k-means++"), Linear(bits=8),
                                 Linear(bits=3, symmetric=False, per_channel=False),
                                 FixedPoint(2, 6), Naive()])
@pytest.mark.parametrize("method", ["huffman", "linear"])
def test_exact_round_trip(cfg, method, tmp_path):
    q = quantize(_net(), cfg)
    p = tmp_path / "m.gpc"
    rep = encode(q, p, method=method)
    assert rep.bytes == os.path.getsize(p) and rep.ratio > 1
    out = decode(p)
    ref = q.model.state_dict()
    assert list(out) == list(ref)
    for k in ref:
        assert out[k].dtype == ref[k].dtype and torch.equal(out[k], ref[k]), k
    model = _net()
    model.load_state_dict(out)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), q.model(x))


def test_fixed_point_coding_and_mismatch(tmp_path):
    q = quantize(_net(), FixedPoint(3, 5))
    rep = encode(q, tmp_path / "f.gpc", method="fixed_point", rules={"*.bias": "raw"})
    assert rep.tensors["0.weight"]["kind"] == "fixed_point"
    assert torch.equal(decode(tmp_path / "f.gpc")["0.weight"], q.model[0].weight)
    with pytest.raises(gp.ConfigError, match="not fixed point"):
        encode(quantize(_net(), KMeans(bits=3)), tmp_path / "x.gpc", method="fixed_point")


def test_sparse_relative_indices_beat_dense_and_fillers_work(tmp_path):
    w = torch.zeros(4096)
    w[[5, 600, 601, 4000]] = torch.tensor([1.0, -1.0, 0.5, 1.0])  # gaps far above 2**4
    rep = encode({"w": w}, tmp_path / "s.gpc", index_bits=4)
    assert rep.tensors["w"]["mode"] == "sparse"
    assert torch.equal(decode(tmp_path / "s.gpc")["w"], w)
    assert rep.bytes < 400  # 4096 floats would be 16 KB


def test_golden_bytes_of_a_tiny_tensor(tmp_path):
    state, qt = tiny_state()
    q = gp.quantize.QuantizedModel(nn.Module(), qt)
    q.model.register_buffer("w", state["w"])
    q.model.register_buffer("b", state["b"])
    p = tmp_path / "tiny.gpc"
    encode(q, p, index_bits=2)
    with open(GOLDEN, "rb") as f:
        golden = f.read()
    # the same magic, header content and payload bytes (the header's deflate stream itself may
    # differ between zlib builds, so it is compared decompressed)
    assert _parts(p.read_bytes()) == _parts(golden)
    out = decode(GOLDEN)
    assert torch.equal(out["w"], state["w"]) and torch.equal(out["b"], state["b"])


def _parts(blob: bytes):
    import struct
    import zlib

    (n,) = struct.unpack_from("<I", blob, 8)
    return blob[:8], zlib.decompress(blob[12:12 + n]), blob[16 + n:]


def test_corrupted_truncated_and_foreign_files(tmp_path):
    q = quantize(_net(), KMeans(bits=4))
    p = tmp_path / "m.gpc"
    encode(q, p)
    data = bytearray(p.read_bytes())
    bad = tmp_path / "bad.gpc"
    bad.write_bytes(bytes(data[:-40]))
    with pytest.raises(CodingError, match="truncated"):
        decode(bad)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CodingError, match="checksum mismatch in tensor"):
        decode(bad)
    flipped = bytearray(data)
    flipped[20] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CodingError, match="corrupted"):
        decode(bad)
    bad.write_bytes(b"PK\x03\x04 not a coded file")
    with pytest.raises(CodingError, match="not a graphprune coded file"):
        decode(bad)
    with pytest.raises(CodingError, match="cannot read"):
        decode(tmp_path / "missing.gpc")
    with pytest.raises(gp.ConfigError, match="index_bits"):
        encode(q, tmp_path / "y.gpc", index_bits=0)
    with pytest.raises(gp.GraphPruneError, match="Did you mean 'huffman'"):
        encode(q, tmp_path / "y.gpc", method="hufman")


def test_weights_changed_after_quantization_are_refused(tmp_path):
    q = quantize(_net(), KMeans(bits=4))
    with torch.no_grad():
        q.model[0].weight.add_(0.01)
    with pytest.raises(gp.ConfigError, match="differs from its quantized codes"):
        encode(q, tmp_path / "m.gpc")
    assert not (tmp_path / "m.gpc").exists()



def _coded_file(tmp_path):
    """A small coded file with sparse Huffman, linear and raw tensors."""
    net = _net()
    with torch.no_grad():  # prune 90% of the classifier's weights so that they code sparse
        w = net[4].weight
        w.mul_(w.abs() > w.abs().flatten().kthvalue(int(0.9 * w.numel())).values)
    q = quantize(net, KMeans(bits=4))
    p = tmp_path / "m.gpc"
    rep = encode(q, p, rules={"0.weight": "linear"}, index_bits=4)
    assert rep.tensors["4.weight"]["mode"] == "sparse" and rep.tensors["0.weight"]["kind"] == "linear"
    return p, p.read_bytes(), q.model.state_dict()


def test_a_file_shorter_than_its_header_is_reported_truncated(tmp_path):
    p, data, _ = _coded_file(tmp_path)
    bad = tmp_path / "short.gpc"
    (hlen,) = struct.unpack_from("<I", data, 8)
    for n in [*range(0, 40), *range(40, 16 + hlen, 5), 15 + hlen]:  # magic, length, header, CRC
        bad.write_bytes(data[:n])
        with pytest.raises(CodingError, match="truncated") as err:
            decode(bad)
        assert f"'{bad}'" in str(err.value)
    bad.write_bytes(data[:7])
    with pytest.raises(CodingError) as err:
        decode(bad)
    assert str(err.value) == (f"'{bad}' is truncated: a coded file has at least 16 bytes (magic, "
                              "header length, header, header checksum); this one has 7.")
    bad.write_bytes(data[:40])
    with pytest.raises(CodingError) as err:
        decode(bad)
    assert str(err.value) == (f"'{bad}' is truncated: its header length field says {hlen} bytes, "
                              f"so the file should have at least {16 + hlen} bytes; it has 40.")


def test_garbage_after_the_magic_is_corruption_not_truncation(tmp_path):
    bad = tmp_path / "garbage.gpc"
    garbage = bytes(torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0)).tolist())
    bad.write_bytes(b"GPCODE\x00\x01" + struct.pack("<I", 2973664090) + garbage)
    with pytest.raises(CodingError) as err:
        decode(bad)
    assert str(err.value) == (f"'{bad}' is corrupted: its header length field says 2973664090 "
                              "bytes but the file has only 200 after it, and those do not start a "
                              "coded header: the file is damaged, not truncated.")


def test_bytes_appended_to_a_valid_file_are_refused(tmp_path):
    p, data, ref = _coded_file(tmp_path)
    assert all(torch.equal(v, ref[k]) for k, v in decode(p).items())
    p.write_bytes(data + b"\x00")
    with pytest.raises(CodingError) as err:
        decode(p)
    assert str(err.value) == (f"'{p}' has 1 byte of trailing data after its last tensor "
                              f"'4.bias': the coded data ends at byte {len(data)} of "
                              f"{len(data) + 1} (the file is corrupted, or something was "
                              "appended to it).")


@pytest.mark.parametrize("numel,distinct,dtype", [(64, 64, torch.float32), (300, 256, torch.float32),
                                                  (200, 150, torch.float16), (4096, 4, torch.float32),
                                                  (1000, 16, torch.float16), (256, 32, torch.float32)])
def test_a_tensor_gets_its_own_codebook_only_when_that_is_smaller_than_raw(numel, distinct, dtype,
                                                                          tmp_path):
    g = torch.Generator().manual_seed(numel)
    levels = torch.randn(distinct, generator=g).to(dtype)
    t = levels[torch.cat([torch.arange(distinct), torch.randint(0, distinct, (numel - distinct,),
                                                                generator=g)])]
    auto = encode({"t": t}, tmp_path / "auto.gpc")
    raw = encode({"t": t}, tmp_path / "raw.gpc", method="raw")
    out = decode(tmp_path / "auto.gpc")["t"]
    assert out.dtype == dtype and torch.equal(out, t)
    if numel * t.element_size() <= distinct * 4 + distinct:  # codebook + code lengths alone
        assert auto.tensors["t"]["kind"] == "raw" and auto.bytes == raw.bytes
    if numel >= 1000:
        assert auto.tensors["t"]["kind"] == "huffman" and auto.bytes < raw.bytes
    assert auto.bytes <= raw.bytes


def test_random_truncations_flips_and_appended_bytes_all_raise_coding_error(tmp_path):
    p, data, _ = _coded_file(tmp_path)
    rng = random.Random(0)
    bad = tmp_path / "fuzz.gpc"
    for i in range(300):
        blob = bytearray(data)
        if i % 3 == 0:
            blob = blob[:rng.randrange(len(blob))]
        elif i % 3 == 1:
            for _ in range(rng.randint(1, 3)):
                blob[rng.randrange(len(blob))] ^= rng.randint(1, 255)
        else:
            blob += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        bad.write_bytes(bytes(blob))
        with pytest.raises(CodingError, match=f"'{bad}'"):
            decode(bad)


def test_headers_that_pass_their_checksum_but_do_not_add_up_raise_coding_error(tmp_path):
    """A header rewritten with a valid checksum (another writer, a bug): CodingError, nothing else."""
    p, data, _ = _coded_file(tmp_path)
    (hlen,) = struct.unpack_from("<I", data, 8)
    meta = json.loads(zlib.decompress(data[12:12 + hlen]))
    rng = random.Random(1)
    junk = [None, -1, 3, "x", [], {}, [1, 2], {"type": "codebook"}, 1.5, 10**30]
    for _ in range(200):
        m = json.loads(json.dumps(meta))
        e = rng.choice(m["tensors"])
        target = e
        key = rng.choice(sorted(target))
        if isinstance(target[key], dict) and target[key] and rng.random() < 0.5:
            target = target[key]
            key = rng.choice(sorted(target))
        target[key] = rng.choice(junk)
        header = zlib.compress(json.dumps(m, sort_keys=True, separators=(",", ":")).encode(), 9)
        p.write_bytes(data[:8] + struct.pack("<I", len(header)) + header
                      + struct.pack("<I", zlib.crc32(header)) + data[16 + hlen:])
        try:
            decode(p)
        except CodingError:
            pass


def test_huffman_bytes_match_a_bit_string_reference_and_both_decoders_agree():
    rng = np.random.default_rng(0)
    for alphabet, n in [(1, 50), (2, 1), (16, 5000), (256, 3000), (22, 2000)]:
        p = 0.5 ** np.arange(alphabet)  # skewed
        sym = rng.choice(alphabet, size=n, p=p / p.sum())
        sym[: min(n, alphabet)] = np.arange(min(n, alphabet))
        lengths = huffman.code_lengths(np.bincount(sym, minlength=alphabet))
        if alphabet == 22:  # lengths as for frequencies 2**21, 2**20, ...: codes up to 21 bits
            lengths = huffman.code_lengths(2 ** np.arange(alphabet)[::-1])
        codes = huffman.canonical_codes(lengths)
        ref = "".join(format(int(codes[s]), f"0{int(lengths[s])}b") for s in sym)
        data, nbits = huffman.encode(sym, lengths)
        assert nbits == len(ref) and data == int(ref + "0" * (-nbits % 8), 2).to_bytes(len(data), "big")
        fast = huffman.decode(data, nbits, n, lengths)
        slow = huffman._decode_numpy(data, nbits, n, huffman._canonical(lengths))
        assert np.array_equal(fast, sym) and np.array_equal(slow, sym)
    assert lengths.max() > huffman.TABLE_BITS  # the numpy decoder's long-code path ran
    widths = rng.integers(1, 33, size=500)
    values = rng.integers(0, 1 << 62, size=500) & ((1 << widths) - 1)
    data, nbits = bits.pack(values, widths)
    assert data == int("".join(format(int(v), f"0{w}b") for v, w in zip(values, widths))
                       + "0" * (-nbits % 8), 2).to_bytes(len(data), "big")
    data, nbits = bits.pack(values % 8, np.full(500, 3))
    assert nbits == 1500 and np.array_equal(bits.unpack_fixed(data, 3, 500), values % 8)


def test_files_decode_the_same_without_bitarray(tmp_path, monkeypatch):
    p, _, ref = _coded_file(tmp_path)
    monkeypatch.setattr(huffman, "_bitarray", lambda: None)
    out = decode(p)
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    out = decode(GOLDEN)
    assert torch.equal(out["w"], tiny_state()[0]["w"])

@pytest.mark.slow
def test_pruned_kmeans_digits_net_codes_30x_smaller_within_1_point(tmp_path):
    from safetensors.torch import save

    from graphprune.datasets import digits
    from graphprune.finetune import evaluate, train
    from graphprune.models import digits_net

    xtr, ytr, xte, yte = digits()
    torch.manual_seed(0)
    dense = train(digits_net(width=32), xtr, ytr, epochs=10, seed=0)
    acc0 = evaluate(dense, xte, yte)
    fp32 = len(save({k: v.contiguous() for k, v in dense.state_dict().items()}))
    r = gp.prune(dense, xtr[:1], sparsity=0.6, method="greedy", calibration=(xtr[:256], ytr[:256]),
                 reconstruct=True)
    q = quantize(gp.fold_batchnorm(r.model, xtr[:1]), KMeans(bits=4))
    q.share_weights()
    train(q.model, xtr, ytr, epochs=3, lr=1e-3, seed=0)
    q.freeze()
    rep = encode(q, tmp_path / "digits.gpc")
    model = gp.fold_batchnorm(r.model, xtr[:1])
    model.load_state_dict(decode(tmp_path / "digits.gpc"))
    acc = evaluate(model, xte, yte)
    assert fp32 / rep.bytes >= 30, (fp32, rep.bytes)
    assert acc >= acc0 - 0.01, (acc0, acc)
