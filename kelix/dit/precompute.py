"""``kelix precompute-dit``: shards of DiT samples -> shards of pre-computed latents and conditions.

Each input sample a :class:`~kelix.dit.data.DiTProcessor` accepts (inverted caption pair or
text-to-image chat) becomes ``{key}.json`` (the prompt as text ``segments``), ``{key}.latent.npy``
(float16 ``[C, h, w]``: the frozen VAE's scaled latents of the target) and ``{key}.cond.npy`` (float16
``[L, D]``: the condition states, padding removed). The frozen LLM (+ tokenizer for shards without codes)
then runs once per image instead of once per epoch; train on the output with
``DiTProcessor(target: latents, condition: precomputed)`` and ``PrecomputedConditions``
(recipes/dit/pretrain_precomputed.yaml).

The same processor options as the training recipe apply (target and condition sizes, aspect filter,
resize mode). ``--part i/n`` processes every n-th input shard, for one job per GPU.

A resumable job like ``kelix data convert``: input shard ``j`` (of the part) gives output shards
``{prefix}-{k:05d}.tar`` numbered on from the previous input's, each holding at most
``--samples-per-shard`` samples, and leaves a record ``{out}/.precompute-{prefix}/{j:05d}.json``
(its shards' samples and bytes, its skipped samples). A rerun keeps every input whose record matches
the job (options, input path and size, first shard number) and whose shards have their recorded sizes,
and redoes the rest; shards are byte-reproducible, so a resumed run gives an uninterrupted run's bytes.
``{out}/{prefix}.manifest.json`` lists the shards, totals and each skipped sample with its reason,
source shard and key.
"""

import argparse
import logging
import os
import re

import torch

log = logging.getLogger("kelix.dit")


def _batches(stream, size: int):
    batch = []
    for item in stream:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _recorder(url: str, processor):
    """The ShardStream checks and processor over one shard, in order, recording each skipped sample
    (``.skipped``). The stream's "all skipped" guards are for training: here an input shard holding no
    DiT sample (a VQA shard) is normal."""
    from kelix.data.stream import ShardStream

    class Recorder(ShardStream):
        def _skip(self, reason, message):
            self.stats[f"skipped/{reason}"] += 1
            message = re.sub(r" at 0x[0-9a-fA-F]+", "", message)  # PIL names an object address: reproducible manifest
            self.skipped.append({"source": url, "key": self._key, "reason": reason, "message": message})

        def __iter__(self):
            for _, raw in self._guard_shard(url, 0):
                self._key = raw.get("__key__")
                item = self._prepare(raw)
                self._key = None  # a shard-level skip (truncated, unreadable) names no sample
                if item is not None:
                    yield item

    stream = Recorder([url], processor=processor, shuffle_buffer=1, shuffle_shards=False, repeat=False)
    stream.skipped, stream._key = [], None
    return stream


@torch.no_grad()
def _precompute_shard(url, sink, processor, vae, condition, batch_size: int, device: str) -> list[dict]:
    """Write the samples of input shard ``url`` into ``sink``; return its skipped samples."""
    from kelix.data.writer import make_record
    from kelix.dit.data import vae_pixels

    stream = _recorder(url, processor)
    for items in _batches(stream, batch_size):
        batch = processor.collate(items)
        latents = vae.encode(vae_pixels(batch["pixels"].to(device))).half().cpu().numpy()
        states, mask = condition({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
        states, mask = states.half().cpu(), mask.cpu()
        for i, (key, prompt) in enumerate(zip(batch["keys"], batch["prompts"])):
            meta = {"task": "t2i", "segments": [{"type": "text", "text": prompt}]}
            files = {"latent.npy": latents[i], "cond.npy": states[i][mask[i]].numpy()}
            sink.write(make_record(key, meta, files))
    return stream.skipped


def precompute(sources, out_dir: str, processor, vae, condition, batch_size: int = 8, device: str = "cpu",
               samples_per_shard: int = 1000, prefix: str = "dit", job: dict | None = None,
               progress: bool = True) -> dict:
    """Write (or finish writing) pre-computed shards to ``out_dir`` and their manifest; returns counts
    (``samples``, ``shards``, skipped per reason, ``resumed_inputs``). ``job``: what else decides the output
    (the options of the processor, VAE and condition), part of each record's fingerprint."""
    import hashlib
    import json
    from collections import Counter

    from tqdm import tqdm

    from kelix.data.convert.job import RecordedSink, load_record, summarize
    from kelix.data.shards import MANIFEST_SUFFIX, MANIFEST_VERSION, as_sources
    from kelix.data.writer import write_json_atomic

    urls = [u for s in as_sources(sources) for u in (s.urls or s.expand())]
    desc = {"job": job or {}, "batch_size": batch_size, "samples_per_shard": samples_per_shard, "prefix": prefix}
    fp = hashlib.sha1(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]
    rec_dir = os.path.join(out_dir, f".precompute-{prefix}")
    os.makedirs(rec_dir, exist_ok=True)
    vae, condition = vae.to(device), condition.to(device)
    records, first, resumed = [], 0, 0
    for j, url in enumerate(tqdm(urls, desc="precompute-dit", unit="shard", disable=not progress)):
        rec_path = os.path.join(rec_dir, f"{j:05d}.json")
        source = {"path": os.path.abspath(url), "bytes": os.path.getsize(url)}
        rec = load_record(rec_path, fp, out_dir, source=source, first=first)
        if rec is not None:
            resumed += 1
        else:
            sink = RecordedSink(out_dir, prefix, first, rec_path, samples_per_shard)
            skipped = _precompute_shard(url, sink, processor, vae, condition, batch_size, device)
            sink.close()
            shards = {os.path.basename(p): {"samples": sink.counts[os.path.basename(p)],
                                            "bytes": os.path.getsize(p)} for p in sink.paths}
            rec = {"version": MANIFEST_VERSION, "job": fp, "source": source, "first": first, "shards": shards,
                   "skipped": skipped}
            write_json_atomic(rec_path, rec)  # after its shards' renames: a record always means whole shards
        records.append(rec)
        first += len(rec["shards"])
    summary = summarize(records)
    summary["totals"]["resumed_inputs"] = resumed
    manifest = {"version": MANIFEST_VERSION, "job": fp, "inputs": [os.path.abspath(u) for u in urls], **summary}
    write_json_atomic(os.path.join(out_dir, prefix + MANIFEST_SUFFIX), manifest)
    t = summary["totals"]
    by_reason = Counter({f"skipped/{r}": n for r, n in summary["skipped_by_reason"].items()})
    return {"samples": t["samples"], "shards": t["shards"], **by_reason, "resumed_inputs": resumed}


def main(argv: list[str] | None = None) -> int:
    from kelix.data.shards import Source

    p = argparse.ArgumentParser(prog="kelix precompute-dit", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", nargs="+", required=True, help="input shard patterns (braces, globs)")
    p.add_argument("--out", required=True, help="output directory for {prefix}-NNNNN.tar shards")
    vae = p.add_mutually_exclusive_group(required=True)
    vae.add_argument("--vae", help="local diffusers VAE directory (AutoencoderDC / AutoencoderKL)")
    vae.add_argument("--tiny-vae-seed", type=int, help="the random tiny VAE (kelix.dit.vae.TINY_DCAE) of this seed")
    cond = p.add_mutually_exclusive_group(required=True)
    cond.add_argument("--lm", help="exported Kelix LLM directory (the real condition)")
    cond.add_argument("--smoke-prompt-dim", type=int,
                      help="SMOKE TEST: PromptBytesConditions of this width instead of an LLM")
    p.add_argument("--vae-variant", help="weights variant of --vae (e.g. bf16: diffusion_pytorch_model.bf16.safetensors)")
    p.add_argument("--tokenizer", help="exported Kelix tokenizer directory (for shards without codes; with --lm)")
    p.add_argument("--no-markers", action="store_true", help="condition on the visual blocks only (with --lm)")
    p.add_argument("--include-end", action="store_true",
                   help="also condition on <|vision_end|>, as the released Kelix-DiT does (with --lm)")
    p.add_argument("--target-size", type=int, default=1024)
    p.add_argument("--condition-size", type=int, default=504)
    p.add_argument("--aspect-range", type=float, nargs=2, default=None, metavar=("LO", "HI"))
    p.add_argument("--min-source-side", type=int, default=0)
    p.add_argument("--resize", choices=["resize", "center_crop"], default="resize")
    p.add_argument("--token-size", type=int, default=28,
                   help="pixels per visual token of the tokenizer: pre-tokenized codes must be the "
                        "(condition-size / token-size)^2 grid")
    p.add_argument("--max-condition-length", type=int, default=720)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the frozen VAE and LLM")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--part", default="0/1", help="i/n: process input shards i, i+n, i+2n... (one job per GPU)")
    a = p.parse_args(argv)
    try:
        i, n = (int(x) for x in a.part.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        p.error(f"--part must be i/n with 0 <= i < n, got {a.part!r}")
    if a.tokenizer and not a.lm:
        p.error("--tokenizer needs --lm")
    if a.include_end and (not a.lm or a.no_markers):
        p.error("--include-end needs --lm and the markers (not --no-markers)")

    from kelix.dit.conditions import LLMConditions, PromptBytesConditions
    from kelix.dit.data import DiTProcessor
    from kelix.dit.vae import VAEConfig, load_vae

    urls = Source(a.shards).expand()[i::n]
    if not urls:
        p.error(f"part {a.part} has no input shard ({len(Source(a.shards).expand())} in all)")
    processor = DiTProcessor(a.target_size, a.condition_size, a.aspect_range, min_source_side=a.min_source_side,
                             resize=a.resize, target="pixels", condition="llm" if a.lm else "prompt",
                             max_condition_length=a.max_condition_length, token_size=a.token_size)
    vae = load_vae(VAEConfig(path=a.vae, dtype=a.dtype, variant=a.vae_variant) if a.vae else VAEConfig(seed=a.tiny_vae_seed))
    if a.lm:
        condition = LLMConditions(a.lm, a.tokenizer, include_markers=not a.no_markers, dtype=a.dtype,
                                  include_end=a.include_end)
    else:
        condition = PromptBytesConditions(a.smoke_prompt_dim, max_length=a.max_condition_length)
    os.makedirs(a.out, exist_ok=True)
    job = {k: v for k, v in vars(a).items() if k not in ("shards", "out", "device", "part", "batch_size",
                                                            "samples_per_shard")}
    for k in ("vae", "lm", "tokenizer"):  # a path names the weights wherever the job is started from
        job[k] = job[k] and os.path.abspath(job[k])
    counts = precompute(Source(urls), a.out, processor, vae, condition, a.batch_size, a.device, a.samples_per_shard,
                        prefix=f"dit-{i:03d}", job=job)
    print(" ".join(f"{k}={v}" for k, v in counts.items()), f"-> {a.out}")
    return 0
