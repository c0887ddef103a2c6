"""The product-quantizer encode fast path gives the eager path's and faiss' codes, token for token, and its
benchmark prints its fields on CPU (timings are never asserted)."""

import json

import faiss
import numpy as np
import pytest
import torch

from benchmarks.bench_pq_encode import faiss_pq, main, unpack_codes
from kelix.tokenizer.quantizer import nearest_codes, nearest_codes_reference


def _normed(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.layer_norm(torch.randn(*shape, generator=g), shape[-1:])


@pytest.mark.parametrize("numpy_argmin", [True, False])  # False: the torch argmin a GPU runs
@pytest.mark.parametrize(("T", "N", "K", "d", "chunk"), [(700, 3, 64, 16, 128), (257, 8, 512, 32, 256), (5, 2, 8, 4, 2)])
def test_fast_search_equals_eager_faiss_pq_and_brute_force(monkeypatch, T, N, K, d, chunk, numpy_argmin):
    monkeypatch.setattr("kelix.tokenizer.quantizer.CPU_CHUNK_TOKENS", chunk)  # several chunks, a shorter last one
    monkeypatch.setattr("kelix.tokenizer.quantizer.CPU_NUMPY_ARGMIN", numpy_argmin)
    z, cb = _normed(T, N, d, seed=T), _normed(N, K, d, seed=K)
    codes = nearest_codes(z, cb)
    assert codes.shape == (T, N) and codes.dtype == torch.long
    assert torch.equal(codes, nearest_codes_reference(z, cb))
    brute = torch.stack([torch.cdist(z[:, n].double(), cb[n].double()).argmin(-1) for n in range(N)], 1)
    assert torch.equal(codes, brute)
    pq, nbits = faiss_pq(cb.numpy())  # M = N sub-quantizers of d dims, the same codebooks
    theirs = unpack_codes(pq.compute_codes(np.ascontiguousarray(z.reshape(T, N * d).numpy())), N, nbits)
    assert np.array_equal(codes.numpy(), theirs)


def test_unpack_codes_reads_faiss_bit_packing():
    # 6-bit codes straddle bytes: decode faiss' own packing of known codes
    pq = faiss.ProductQuantizer(12, 3, 6)
    cb = np.zeros((3, 64, 4), dtype=np.float32)
    cb[:, :, 0] = np.arange(64)
    faiss.copy_array_to_vector(cb.reshape(-1), pq.centroids)
    want = np.array([[5, 63, 0], [17, 1, 42]])
    x = np.zeros((2, 12), dtype=np.float32)
    x[:, 0::4] = want
    assert np.array_equal(unpack_codes(pq.compute_codes(x), 3, 6), want)
    assert np.array_equal(pq.decode(pq.compute_codes(x))[:, 0::4], want)


def test_fast_search_ties_strided_inputs_and_nan_match_eager(monkeypatch):
    monkeypatch.setattr("kelix.tokenizer.quantizer.CPU_CHUNK_TOKENS", 16)
    g = torch.Generator().manual_seed(1)
    # small integers: every distance is exact in float32, so equal rows tie exactly whatever the GEMM's order
    cb = torch.randint(-3, 4, (1, 40, 8), generator=g).float()
    cb = torch.cat([cb, cb], 1).expand(4, -1, -1)  # each row twice (ties) and one table for 4 slots (shared mode)
    z = torch.randint(-3, 4, (100, 8, 8), generator=g).float()[:, ::2]  # strided input
    z[3, 1] = float("nan")
    codes = nearest_codes(z.to(torch.bfloat16), cb)
    assert torch.equal(codes, nearest_codes_reference(z.to(torch.bfloat16), cb))
    assert (codes[torch.arange(100) != 3] < 40).all()  # the first of two equal rows wins
    assert torch.equal(nearest_codes(z[:0], cb), torch.zeros(0, 4, dtype=torch.long))


def test_search_chunks_by_the_distance_budget_too(monkeypatch):
    monkeypatch.setattr("kelix.tokenizer.quantizer.MAX_DIST_ELEMS", 3 * 50 * 7)  # 7 tokens a chunk, under the CPU one
    z, cb = _normed(300, 3, 8, seed=3), _normed(3, 50, 8, seed=4)
    assert torch.equal(nearest_codes(z, cb), nearest_codes_reference(z, cb))


def test_benchmark_prints_its_fields_at_a_tiny_size(capsys):
    out = main(["--N", "3", "--K", "64", "--d", "16", "--patches", "300", "--repeat", "1"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == json.loads(json.dumps(out))
    assert line["benchmark"] == "pq_encode" and line["device"] == "cpu" and line["torch"] == torch.__version__
    assert (line["N"], line["K"], line["d"], line["patches"]) == (3, 64, 16, 300)
    assert line["codes_equal"] is True and line["code_mismatches"] == 0 and line["equal_to_eager"] is True
    for key in ("ours_over_faiss", "ours_over_gemm", "ours_patches_per_s", "faiss_patches_per_s", "gemm_patches_per_s"):
        assert line[key] > 0
