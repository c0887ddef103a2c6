"""Serving: requests/s and p50/p95 latency of `kelix serve` at 1, 4 and 16 concurrent clients, the
batched server against the same server at ``--max-batch 1``, in one run (levels in turns, so a shared
machine's drift hits both alike).

Every request is a chat with its own image (a data URL) and question, greedy, ``--max-tokens`` blocks
(a random model rarely stops early, so each answer costs the same). Both servers run in this process
(:class:`~kelix.serve.background.BackgroundServer`); clients are threads with one HTTP connection each.
Default pipeline: the quickstart's shapes (kelix.hf.TINY_QWEN3, the tiny tokenizer, a 64-wide block
decoder) with random weights, no DiT; ``--pipeline DIR`` serves any saved pipeline (the quickstart's
``<out>/pipeline``). ``batched_over_max_batch_1`` is the headline (goal: >= 2 at 16 clients on 2 cores).
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import tempfile
import threading
import time

import torch

from benchmarks.common import report


def quickstart_shaped_pipeline(root: str) -> str:
    """A pipeline of the quickstart's shapes with random weights under ``root`` (chat only)."""
    from kelix.hf import TINY_QWEN3
    from kelix.llm.model import KelixLM, LLMConfig
    from kelix.pipeline import KelixPipeline
    from kelix.tokenizer.model import KelixTokenizer, tiny_config

    torch.manual_seed(0)
    tok, llm = os.path.join(root, "tokenizer"), os.path.join(root, "llm")
    KelixTokenizer(tiny_config()).save_pretrained(tok)
    KelixLM(LLMConfig(backbone_config=TINY_QWEN3, text_tokenizer="builtin:bytes", image_tokenizer=tok,
                      decoder_width=64, decoder_heads=2, decoder_ffn=128)).save_pretrained(llm)
    out = os.path.join(root, "pipeline")
    KelixPipeline.from_pretrained(tokenizer=tok, llm=llm, condition_size=56).save_pretrained(out)
    return out


def _request(i: int, max_tokens: int) -> dict:
    from PIL import Image

    img = Image.new("RGB", (64 + 8 * (i % 4), 48), "white")
    img.paste(((37 * i) % 256, 80, 160), (8, 8, 40, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": f"Question {i}: what is it?"}]}],
            "max_tokens": max_tokens, "temperature": 0}


def load(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    """``clients`` threads, each sending ``per_client`` requests one after another."""
    import httpx

    latencies, lock, errors = [], threading.Lock(), []

    def client(c: int):
        with httpx.Client(base_url=url, timeout=600) as http:
            for k in range(per_client):
                body = _request(c * per_client + k, max_tokens)
                t = time.perf_counter()
                r = http.post("/v1/chat/completions", json=body)
                dt = time.perf_counter() - t
                if r.status_code != 200:
                    errors.append(r.status_code)
                with lock:
                    latencies.append(dt)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {"requests_per_s": round(len(latencies) / wall, 3), "p50_s": round(statistics.median(latencies), 4),
            "p95_s": round(q[18], 4), "requests": len(latencies), "errors": len(errors)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", help="a saved pipeline (default: the quickstart's shapes, random weights)")
    p.add_argument("--clients", default="1,4,16", help="concurrency levels (default: %(default)s)")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch")
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    from kelix.pipeline import KelixPipeline
    from kelix.serve.background import BackgroundServer
    from kelix.serve.config import ServeConfig

    levels = [int(c) for c in a.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = a.pipeline or quickstart_shaped_pipeline(tmp)
        pipe = KelixPipeline.from_pretrained(path, dit=False, device=a.device)
    modes = {"batched": a.max_batch, "max_batch_1": 1}
    servers = {m: BackgroundServer(pipe, ServeConfig(max_batch=b, batch_wait_ms=a.batch_wait_ms, max_queue=1024))
               for m, b in modes.items()}
    try:
        for srv in servers.values():
            load(srv.url, 1, 1, a.max_tokens)  # warm-up
        results = {m: {} for m in modes}
        for c in levels:
            for m, srv in servers.items():
                results[m][str(c)] = load(srv.url, c, a.requests_per_client, a.max_tokens)
    finally:
        for srv in servers.values():
            srv.stop()
    ratio = {str(c): round(results["batched"][str(c)]["requests_per_s"] /
                           results["max_batch_1"][str(c)]["requests_per_s"], 3) for c in levels}
    return report("serve", clients=levels, batched_over_max_batch_1=ratio, batched=results["batched"],
                  max_batch_1=results["max_batch_1"], max_batch=a.max_batch, batch_wait_ms=a.batch_wait_ms,
                  max_tokens=a.max_tokens, requests_per_client=a.requests_per_client,
                  pipeline=a.pipeline or "quickstart shapes, random weights", device=a.device)


if __name__ == "__main__":
    main()
