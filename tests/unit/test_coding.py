"""Deep-Compression coding: exact round trips, golden bytes, corrupted files, and the
compression a pruned + 4-bit k-means digits net reaches."""

import os

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.coding import CodingError, decode, encode
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
