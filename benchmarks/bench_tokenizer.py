"""Kelix-Tok: product-quantizer step at paper scale (N=8, K=8192, d=128) and nearest-neighbour search
against faiss' exact flat index on the same projected codebooks.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.common import report, timeit


def main(argv=None):
    import faiss

    from kelix.tokenizer.quantizer import ProductQuantizer, nearest_codes

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32768 if cuda else 2048, help="merged patch tokens per step")
    p.add_argument("--K", type=int, default=8192 if cuda else 1024)
    a = p.parse_args(argv)
    device = "cuda" if cuda else "cpu"
    N, d, width = 8, 128, 4096
    torch.manual_seed(0)
    pq = ProductQuantizer(width, N, a.K, d, centroid_dim=d).to(device)
    x = torch.randn(a.tokens, width, device=device, requires_grad=True)

    def step():
        out = pq(x)
        (out.z_q.float().pow(2).mean() + out.loss).backward()

    res = {"N": N, "K": a.K, "d": d, "tokens": a.tokens, "pq_forward_backward_s": round(timeit(step), 4)}
    with torch.no_grad():
        z = pq.continuous(x)
        cb = pq.code_vectors().float()
    res["nearest_codes_s"] = round(timeit(lambda: nearest_codes(z, cb)), 4)
    ours = nearest_codes(z, cb).cpu().numpy()

    # faiss (exact L2, CPU) on the same vectors: the reference the tests check parity against
    n_faiss = min(a.tokens, 4096)
    zc, cbc = z[:n_faiss].float().cpu().numpy(), cb.cpu().numpy()
    theirs = np.zeros((n_faiss, N), dtype=np.int64)

    def search():
        for j in range(N):
            index = faiss.IndexFlatL2(d)
            index.add(np.ascontiguousarray(cbc[j]))
            theirs[:, j] = index.search(np.ascontiguousarray(zc[:, j]), 1)[1][:, 0]

    res["faiss_flat_cpu_s_per_4096_tokens"] = round(timeit(search, warmup=1, repeat=3), 4)
    res["agreement_with_faiss"] = float((ours[:n_faiss] == theirs).mean())
    return report("tokenizer", **res)


if __name__ == "__main__":
    main()
