"""Product-quantizer encode: patches/s of the kit's nearest-code search (:func:`nearest_codes`) against
faiss' ``ProductQuantizer.compute_codes`` on the same codebooks, and against the bare GEMM of the same
shapes (the limit: the search's multiply-adds without the argmin).

The faiss quantizer has M = N sub-quantizers of d dims and 2**nbits = K centroids each, set from the
kit's codebooks with ``faiss.copy_array_to_vector``; its bit-packed codes are unpacked and compared
code for code. The GEMM is timed over the same token chunks as the search, into one reused block.
CPU default N=8, K=1024, d=128, 2048 patches; GPU default K=8192, 32768 patches (faiss stays on CPU).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import report


def unpack_codes(packed: np.ndarray, M: int, nbits: int) -> np.ndarray:
    """faiss' packed PQ codes (``M`` codes of ``nbits`` bits, least significant bit first) -> ``[n, M]``."""
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : M * nbits].reshape(len(packed), M, nbits)
    return (bits.astype(np.int64) << np.arange(nbits)).sum(-1)


def faiss_pq(codebooks: np.ndarray):
    """A faiss ProductQuantizer holding ``codebooks [N, K, d]`` (K a power of two)."""
    import faiss

    N, K, d = codebooks.shape
    nbits = int(K).bit_length() - 1
    if 2**nbits != K:
        raise ValueError(f"--K {K} is not a power of two, which faiss' ProductQuantizer needs (K = 2**nbits)")
    pq = faiss.ProductQuantizer(N * d, N, nbits)
    faiss.copy_array_to_vector(np.ascontiguousarray(codebooks, dtype=np.float32).reshape(-1), pq.centroids)
    return pq, nbits


def interleaved(fns: dict, repeat: int) -> dict:
    """Median seconds per call of each function, timed in turns (a shared, noisy machine slows all alike)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = {k: [] for k in fns}
    for r in range(repeat + 1):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if r:  # the first turn warms up
                times[k].append(time.perf_counter() - t)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def chunk_tokens(T: int, N: int, K: int, device: str) -> int:
    """Tokens per chunk that :func:`nearest_codes` uses on ``device`` (the GEMM is timed over the same)."""
    from kelix.tokenizer import quantizer as q

    step = max(1, q.MAX_DIST_ELEMS // (N * K))
    return min(T, step, q.CPU_CHUNK_TOKENS) if device == "cpu" else min(T, step)


def main(argv=None):
    import faiss

    from kelix.tokenizer.quantizer import nearest_codes, nearest_codes_reference

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser()
    p.add_argument("--N", type=int, default=8)
    p.add_argument("--K", type=int, default=8192 if cuda else 1024)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--patches", type=int, default=32768 if cuda else 2048)
    p.add_argument("--repeat", type=int, default=5 if cuda else 3)
    a = p.parse_args(argv)
    device = "cuda" if cuda else "cpu"
    N, K, d, T = a.N, a.K, a.d, a.patches
    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)  # the same CPU threads for both

    # LayerNorm'd sub-vectors and codebooks, as the quantizer searches them
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.layer_norm(torch.randn(T, N, d, generator=g), (d,)).to(device)
    cb = torch.nn.functional.layer_norm(torch.randn(N, K, d, generator=g), (d,)).to(device)
    pq, nbits = faiss_pq(cb.cpu().numpy())
    x = np.ascontiguousarray(z.reshape(T, N * d).cpu().numpy())
    step = chunk_tokens(T, N, K, device)
    zt, cbt = z.transpose(0, 1).contiguous(), cb.transpose(1, 2)
    block = torch.empty(N, step, K, device=device)

    def gemm():
        for s in range(0, T, step):
            m = min(step, T - s)
            torch.bmm(zt[:, s : s + m], cbt, out=block.view(-1)[: N * m * K].view(N, m, K))

    # the kit's float32 search: no TF32 in this measurement (TF32 would change codes against faiss)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        t = interleaved({"ours": lambda: nearest_codes(z, cb), "faiss": lambda: pq.compute_codes(x), "gemm": gemm},
                        a.repeat)
        ours = nearest_codes(z, cb).cpu().numpy()
        reference = nearest_codes_reference(z, cb).cpu().numpy()
    finally:
        torch.set_float32_matmul_precision(precision)
    theirs = unpack_codes(pq.compute_codes(x), N, nbits)

    rate = {k: T / v for k, v in t.items()}
    return report(
        "pq_encode", N=N, K=K, d=d, patches=T, device=device, torch=torch.__version__, faiss=faiss.__version__,
        faiss_device="cpu", threads=threads, gemm_chunk_tokens=step,
        ours_patches_per_s=round(rate["ours"], 1), faiss_patches_per_s=round(rate["faiss"], 1),
        gemm_patches_per_s=round(rate["gemm"], 1), ours_over_faiss=round(rate["ours"] / rate["faiss"], 3),
        ours_over_gemm=round(rate["ours"] / rate["gemm"], 3), codes_equal=bool(np.array_equal(ours, theirs)),
        code_mismatches=int((ours != theirs).sum()), equal_to_eager=bool(np.array_equal(ours, reference)))


if __name__ == "__main__":
    main()
