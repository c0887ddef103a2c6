"""``kelix convert official`` and ``kelix convert to-official`` (see docs/official.md)."""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kelix convert", description="convert between the released Kelix and the kit")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("official", help="release (Kelix-SFT [+ Kelix-DiT + VAE]) -> kit pipeline directory")
    a.add_argument("--sft", required=True, help="the Kelix-SFT directory (config.json, safetensors shards, tokenizer)")
    a.add_argument("--dit", help="the Kelix-DiT directory (a SanaModel: config.json + safetensors)")
    a.add_argument("--vae", help="the DiT's VAE: a diffusers AutoencoderDC directory (SANA 1.5's DC-AE, subfolder vae)")
    a.add_argument("--tokenizer", help="text tokenizer directory (default: --sft)")
    a.add_argument("--out", required=True, help="the kit pipeline directory to write")
    a.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="dtype of the written weights")
    a.add_argument("--row-marker", default="{row},{cols}",
                   help="row-marker text the LLM reads ({row} 0-based, {row1} 1-based, {rows}, {cols})")
    a.add_argument("--shard-size", type=float, default=4.0, help="GiB per backbone shard")
    b = sub.add_parser("to-official", help="kit pipeline (from `convert official`, fine-tuned or not) -> release layout")
    b.add_argument("--pipeline", required=True, help="a pipeline directory written by `kelix convert official`")
    b.add_argument("--out", required=True, help="the Kelix-SFT-layout directory to write")
    b.add_argument("--llm", help="an LLM directory to write instead of the pipeline's llm/ (a fine-tuned export)")
    b.add_argument("--dit-out", help="also write the DiT as a Kelix-DiT (SanaModel) directory here")
    b.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], help="dtype of the written weights (default: as stored)")
    b.add_argument("--shard-size", type=float, default=4.0, help="GiB per shard")
    return p


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from kelix.official.config import ReleaseError

    if os.path.abspath(args.out) == os.path.abspath(getattr(args, "sft", None) or getattr(args, "pipeline", "")):
        print(f"kelix convert: --out {args.out!r} is the input directory", file=sys.stderr)
        return 2
    try:
        if args.cmd == "official":
            from kelix.official.convert import convert_official

            s = convert_official(args.sft, args.out, dit=args.dit, vae=args.vae, tokenizer=args.tokenizer,
                                 dtype=args.dtype, row_marker=args.row_marker,
                                 shard_bytes=int(args.shard_size * (1 << 30)))
            parts = ", ".join(f"{k} {_size(s[k])}" for k in ("tokenizer", "llm", "dit") if k in s)
            print(f"converted: {parts} parameters, {s['dtype']}, {s['bytes'] / 2**30:.2f} GiB written in "
                  f"{s['seconds']:.0f} s -> {s['out']}")
        else:
            from kelix.official.to_official import to_official

            s = to_official(args.pipeline, args.out, dtype=args.dtype, shard_bytes=int(args.shard_size * (1 << 30)),
                            dit_out=args.dit_out, llm=args.llm)
            print(f"wrote the release layout: {s['bytes'] / 2**30:.2f} GiB in {s['seconds']:.0f} s -> {s['out']}")
    except (ReleaseError, FileNotFoundError, KeyError, ValueError) as e:
        if os.environ.get("KELIX_DEBUG"):
            raise
        msg = e.args[0] if e.args else str(e)
        print(f"kelix convert: {msg}", file=sys.stderr)
        return 2
    return 0
